"""Sub-agents end to end: delegation as child runs, their events in the root's stream, approvals through the root,
usage rolled up, cancellation and failure, over the real stack."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError, CancelledError

from agentrun.v1 import agent_service_pb2 as pb
from shared.agents import load_agents, sub_agent_snapshot
from shared.contract import MEMO_AGENT, MEMO_SUB_RUNS, WORKFLOW_NAME, RunInput, RunResult
from shared.events import usage as events_usage
from tests.agent_service.test_agent_loop import approve, calls, tool_messages, until
from tests.agent_service.test_runs import collect, kinds, text_of, wait_for_state
from tests.conftest import AGENTS_FILE, Stack
from worker.worker import build_worker

REPO = Path(__file__).parent.parent.parent


def delegate(agent: str, task: str) -> dict[str, Any]:
    return calls((f"delegate_to_{agent}", {"task": task}))


def paths(events: list[pb.RunEvent]) -> list[str]:
    return ["/".join(e.agent_path) for e in events]


def offered(request: dict[str, Any]) -> set[str]:
    return {t["function"]["name"] for t in request.get("tools", [])}


def total(usages: Iterable[pb.Usage]) -> pb.Usage:
    summed = pb.Usage()
    for usage in usages:
        for field in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens"):
            setattr(summed, field, getattr(summed, field) + getattr(usage, field))
    return summed


def steps(events: list[pb.RunEvent]) -> list[tuple[str, str | None]]:
    """Each event's agent path and kind, with a run of text deltas as one."""
    seen: list[tuple[str, str | None]] = []
    for path, kind in zip(paths(events), kinds(events), strict=True):
        if not (kind == "text_delta" and seen and seen[-1] == (path, kind)):
            seen.append((path, kind))
    return seen


async def test_a_sub_agents_events_are_in_the_root_stream_in_order_with_its_path(stack: Stack) -> None:
    child = stack.model.script(calls(("echo", {"text": "page 7"})), {"text": "It is on page 7."})
    root = stack.model.script(delegate("researcher", f"{child} find the page"), {"text": "Page 7, says research."})
    run_id = await stack.client.start_run("planner", f"{root} where is it?")

    events = await collect(stack, run_id)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert steps(events) == [
        ("planner", "tool_call_started"),
        ("planner/researcher", "tool_call_started"),
        ("planner/researcher", "tool_call_finished"),
        ("planner/researcher", "text_delta"),
        ("planner", "tool_call_finished"),
        ("planner", "text_delta"),
        ("planner", "run_completed"),
    ]
    # The child's answer is the delegation's result, for the stream and for the parent's model; only the root ends.
    ends = [e.tool_call_finished for e in events if e.HasField("tool_call_finished") and paths([e]) == ["planner"]]
    delegation = ends[0]
    assert delegation.tool_name == "delegate_to_researcher"
    assert (delegation.status, delegation.result) == (pb.TOOL_CALL_STATUS_COMPLETED, "It is on page 7.")
    assert text_of([e for e in events if list(e.agent_path) == ["planner", "researcher"]]) == "It is on page 7."
    assert [k for k in kinds(events) if k in ("run_completed", "run_failed", "run_cancelled")] == ["run_completed"]
    assert events[-1].run_completed.output == "Page 7, says research."
    assert tool_messages(stack.model.server.requests_for(root)[1])[0]["content"] == "It is on page 7."
    # The sub-agent got the task alone, and its own tools and sub-agents as tools.
    first = stack.model.server.requests_for(child)[0]
    assert [m for m in first["messages"] if m["role"] == "user"] == [
        {"role": "user", "content": f"{child} find the page"}
    ]
    assert offered(first) == {"echo", "calculator", "delegate_to_fetcher"}
    planner_tool = stack.model.server.requests_for(root)[0]["tools"][0]["function"]
    assert planner_tool["description"] == "Looks things up, and may ask the fetcher."
    assert planner_tool["parameters"]["required"] == ["task"]


@dataclass
class ThreeLevels:
    run_id: str  # the planner's run
    events: list[pb.RunEvent]  # its whole stream
    child_id: str  # the researcher's run, delegated by the planner
    grandchild_id: str  # the fetcher's run, delegated by the researcher


async def three_levels(stack: Stack, answer: str) -> ThreeLevels:
    """A planner run that delegates to the researcher, which delegates to the fetcher (who answers ``answer``)."""
    grandchild = stack.model.script({"text": answer})
    child = stack.model.script(delegate("fetcher", f"{grandchild} fetch it"), {"text": "researched"})
    root = stack.model.script(delegate("researcher", f"{child} research it"), {"text": "planned"})
    run_id = await stack.client.start_run("planner", root)
    events = await collect(stack, run_id)
    # Each delegation is a child workflow whose id derives from its parent's and the call's.
    started = [e.tool_call_started for e in events if e.HasField("tool_call_started")]
    child_id = f"{run_id}/{started[0].call_id}"
    return ThreeLevels(run_id, events, child_id, f"{child_id}/{started[1].call_id}")


async def test_a_grandchild_runs_within_the_depth_limit_as_a_child_workflow_of_its_parent(stack: Stack) -> None:
    tree = await three_levels(stack, "fetched")
    run_id, events, child_id, grandchild_id = tree.run_id, tree.events, tree.child_id, tree.grandchild_id

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [p for p in dict.fromkeys(paths(events))] == ["planner", "planner/researcher", "planner/researcher/fetcher"]
    assert text_of([e for e in events if paths([e]) == ["planner/researcher/fetcher"]]) == "fetched"
    assert events[-1].run_completed.output == "planned"
    child_run = await stack.temporal.get_workflow_handle(child_id).describe()
    grandchild_run = await stack.temporal.get_workflow_handle(grandchild_id).describe()
    assert (child_run.parent_id, grandchild_run.parent_id) == (run_id, child_id)
    assert child_run.status == grandchild_run.status == WorkflowExecutionStatus.COMPLETED
    # A sub-agent's run is part of its root's, not a run of its own to list (its id is no run id either).
    listed: list[str] = []
    for _ in range(100):  # visibility is eventually consistent; the children ended before the root
        listed = [r.run_id for r in (await stack.client.list_runs()).runs if r.state == pb.RUN_STATE_COMPLETED]
        if run_id in listed:
            break
        await asyncio.sleep(0.1)
    assert listed == [run_id]


async def test_sub_agents_usage_is_in_the_roots_with_a_part_per_agent(stack: Stack) -> None:
    tree = await three_levels(stack, "fetched it all")
    child_result = await stack.temporal.get_workflow_handle(tree.child_id, result_type=RunResult).result()
    grandchild_result = await stack.temporal.get_workflow_handle(tree.grandchild_id, result_type=RunResult).result()

    run = await wait_for_state(stack, tree.run_id, pb.RUN_STATE_COMPLETED)

    assert run.usage == tree.events[-1].run_completed.usage
    parts = {"/".join(part.agent_path): part.usage for part in run.usage_by_agent}
    assert list(parts) == ["planner", "planner/researcher", "planner/researcher/fetcher"]
    assert total(parts.values()) == run.usage
    assert parts["planner/researcher/fetcher"] == events_usage(grandchild_result.usage)
    assert total([parts["planner/researcher"], parts["planner/researcher/fetcher"]]) == events_usage(child_result.usage)
    assert all(part.prompt_tokens > 0 and part.completion_tokens > 0 for part in parts.values())


async def test_sub_agents_running_at_once_share_one_numbering_and_one_runs_on_its_own_queue(stack: Stack) -> None:
    words = [f"w{i} " for i in range(30)]
    near = stack.model.script({"chunks": [f"near-{w}" for w in words], "delay_ms": 5})
    far = stack.model.script({"chunks": [f"far-{w}" for w in words], "delay_ms": 5})
    root = stack.model.script(
        calls(("delegate_to_researcher", {"task": f"{near} go"}), ("delegate_to_remote", {"task": f"{far} go"})),
        {"text": "both done"},
    )
    remote_settings = replace(stack.settings, task_queue="agentrun-test-remote")
    remote_worker = build_worker(
        stack.temporal,
        remote_settings,
        redis_client=stack.redis,
        model=stack.llm,
        agents=load_agents(stack.settings.agents_file),
        sandboxed=True,
    )
    async with remote_worker:
        run_id = await stack.client.start_run("coordinator", root)
        events = await collect(stack, run_id)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert text_of([e for e in events if paths([e]) == ["coordinator/researcher"]]) == "".join(
        f"near-{w}" for w in words
    )
    assert text_of([e for e in events if paths([e]) == ["coordinator/remote"]]) == "".join(f"far-{w}" for w in words)
    results = {
        e.tool_call_finished.tool_name: e.tool_call_finished.result for e in events if e.HasField("tool_call_finished")
    }
    assert results == {
        "delegate_to_researcher": "".join(f"near-{w}" for w in words),
        "delegate_to_remote": "".join(f"far-{w}" for w in words),
    }
    assert events[-1].run_completed.output == "both done"
    started = {
        e.tool_call_started.tool_name: e.tool_call_started.call_id
        for e in events
        if paths([e]) == ["coordinator"] and e.HasField("tool_call_started")
    }
    remote_run = await stack.temporal.get_workflow_handle(f"{run_id}/{started['delegate_to_remote']}").describe()
    near_run = await stack.temporal.get_workflow_handle(f"{run_id}/{started['delegate_to_researcher']}").describe()
    assert (remote_run.task_queue, near_run.task_queue) == ("agentrun-test-remote", stack.settings.task_queue)


async def test_past_the_depth_limit_no_delegation_tool_is_offered(stack: Stack) -> None:
    child = stack.model.script({"text": "done alone"})
    root = stack.model.script(delegate("researcher", f"{child} go"), {"text": "ok"})
    run_id = await stack.client.start_run("shallow", root)  # max_delegation_depth 1: its children delegate no more

    events = await collect(stack, run_id)

    assert events[-1].run_completed.output == "ok"
    assert offered(stack.model.server.requests_for(root)[0]) == {"delegate_to_researcher"}
    assert offered(stack.model.server.requests_for(child)[0]) == {"echo", "calculator"}


async def test_a_failed_sub_agent_is_an_error_result_for_the_parents_model(stack: Stack) -> None:
    child = stack.model.script({"error": {"status": 400, "message": "no such model"}})
    root = stack.model.script(delegate("researcher", f"{child} try"), {"text": "Research failed, sorry."})
    run_id = await stack.client.start_run("planner", root)

    events = await collect(stack, run_id)

    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert finished.status == pb.TOOL_CALL_STATUS_FAILED
    assert finished.error.startswith("sub-agent 'researcher' failed: ")
    # The child's failure tells its parent the last sequence it knew published (the parent's, here).
    child_run = stack.temporal.get_workflow_handle(f"{run_id}/{finished.call_id}")
    with pytest.raises(WorkflowFailureError) as failed:
        await child_run.result()
    assert isinstance(failed.value.cause, ApplicationError)
    assert list(failed.value.cause.details)[0] == events[0].sequence
    assert "no such model" in finished.error
    assert tool_messages(stack.model.server.requests_for(root)[1])[0]["content"] == f"error: {finished.error}"
    assert events[-1].run_completed.output == "Research failed, sorry."
    assert (await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)).output == "Research failed, sorry."


async def test_what_a_failed_sub_agent_spent_is_in_the_roots_usage(stack: Stack) -> None:
    child = stack.model.script(calls(("echo", {"text": "one"})), {"error": {"status": 400, "message": "no more"}})
    root = stack.model.script(delegate("researcher", f"{child} try"), {"text": "It failed."})
    run_id = await stack.client.start_run("planner", root)
    events = await collect(stack, run_id)

    run = await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)

    parts = {"/".join(part.agent_path): part.usage for part in run.usage_by_agent}
    assert list(parts) == ["planner", "planner/researcher"]
    assert parts["planner/researcher"].prompt_tokens > 0  # its first round, before the one that failed
    assert total(parts.values()) == run.usage == events[-1].run_completed.usage


async def test_a_sub_agents_approval_is_answered_through_the_root_run(stack: Stack) -> None:
    child = stack.model.script(calls(("echo", {"text": "ship it"})), {"text": "shipped"})
    root = stack.model.script(delegate("vetted", f"{child} ship"), {"text": "all shipped"})
    run_id = await stack.client.start_run("manager", root)
    _, requested = await until(stack, run_id, "approval_requested")
    assert list(requested.agent_path) == ["manager", "vetted"]
    approval_id = requested.approval_requested.approval_id

    waiting = await stack.client.get_run(run_id)
    assert waiting.state == pb.RUN_STATE_WAITING_FOR_APPROVAL
    assert [(p.approval_id, p.tool_name, p.sequence) for p in waiting.pending_approvals] == [
        (approval_id, "echo", requested.sequence)
    ]
    answer = await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE, "fine")
    events = await collect(stack, run_id, after=requested.sequence)

    assert (answer.decision, answer.approver) == (pb.APPROVAL_DECISION_APPROVE, "alice")
    assert steps(events) == [
        ("manager/vetted", "approval_decided"),
        ("manager/vetted", "tool_call_finished"),
        ("manager/vetted", "text_delta"),
        ("manager", "tool_call_finished"),
        ("manager", "text_delta"),
        ("manager", "run_completed"),
    ]
    assert events[1].tool_call_finished.result == "ship it"
    # Deciding again the same way answers with the decision recorded, after the run has ended too.
    again = await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
    assert (again.decision, again.approver, again.reason) == (pb.APPROVAL_DECISION_APPROVE, "alice", "fine")
    done = await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)
    assert [(d.approval_id, d.tool_name, d.approver) for d in done.decided_approvals] == [
        (approval_id, "echo", "alice")
    ]


async def test_a_sub_agents_approval_reaches_it_through_the_memos_when_redis_forgot_which_run_asked(
    stack: Stack,
) -> None:
    child = stack.model.script(calls(("echo", {"text": "again"})), {"text": "echoed"})
    root = stack.model.script(delegate("vetted", f"{child} echo"), {"text": "done"})
    run_id = await stack.client.start_run("manager", root)
    started, requested = await until(stack, run_id, "approval_requested")
    approval_id = requested.approval_requested.approval_id
    child_run = stack.temporal.get_workflow_handle(f"{run_id}/{started[0].tool_call_started.call_id}")
    for _ in range(200):  # the memo follows the published request by a moment
        if (await (await child_run.describe()).memo()).get("approvals"):
            break
        await asyncio.sleep(0.05)
    await stack.redis.delete(f"{stack.settings.redis_prefix}run:{{{run_id}}}:approval-runs")

    answer = await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_DENY, "not today")
    events = await collect(stack, run_id, after=requested.sequence)

    assert (answer.decision, answer.reason) == (pb.APPROVAL_DECISION_DENY, "not today")
    assert events[0].approval_decided.approval_id == approval_id
    assert events[-1].run_completed.output == "done"


async def test_a_root_is_still_shown_when_temporal_removed_its_sub_agents_run(stack: Stack) -> None:
    # A sub-agent's run ends before its root, so Temporal's retention removes it first: the root's memo then names a
    # run Temporal does not know. (Temporal's own delete takes most of a minute here, so the root is started with
    # such a memo, as the server would start it.)
    run_id = f"run-{uuid.uuid4().hex}"
    agent = load_agents(AGENTS_FILE)["planner"]
    started = RunInput(run_id, agent, stack.model.script({"text": "done"}))
    await stack.temporal.start_workflow(
        WORKFLOW_NAME,
        started,
        id=run_id,
        task_queue=stack.settings.task_queue,
        memo={MEMO_AGENT: "planner", MEMO_SUB_RUNS: [f"{run_id}/call_removed"]},
    )
    await collect(stack, run_id)

    run = await stack.client.get_run(run_id)

    assert (run.state, run.output) == (pb.RUN_STATE_COMPLETED, "done")


async def test_a_call_id_the_model_repeats_in_a_later_round_starts_no_second_sub_agent_under_it(
    stack: Stack,
) -> None:
    first, second = stack.model.script({"text": "first answer"}), stack.model.script({"text": "second answer"})
    root = stack.model.script(
        {"tool_calls": [{"id": "same", "name": "delegate_to_researcher", "arguments": {"task": f"{first} one"}}]},
        {"tool_calls": [{"id": "same", "name": "delegate_to_researcher", "arguments": {"task": f"{second} two"}}]},
        {"text": "done"},
    )
    run_id = await stack.client.start_run("planner", root)

    events = await collect(stack, run_id)

    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert [(f.status, f.result or f.error) for f in finished] == [
        (pb.TOOL_CALL_STATUS_COMPLETED, "first answer"),
        (pb.TOOL_CALL_STATUS_FAILED, "call id 'same' was already used for a delegation"),
    ]
    assert stack.model.server.requests_for(second) == []
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].run_completed.output == "done"


async def test_a_delegation_follows_the_approval_policy_like_any_tool(stack: Stack) -> None:
    child = stack.model.script({"text": "never asked"})
    root = stack.model.script(delegate("fetcher", f"{child} fetch"), {"text": "not allowed, then"})
    run_id = await stack.client.start_run("overseen", root)
    _, requested = await until(stack, run_id, "approval_requested")
    assert requested.approval_requested.tool_name == "delegate_to_fetcher"

    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_DENY, "no")
    events = await collect(stack, run_id, after=requested.sequence)

    assert {tuple(e.agent_path) for e in events} == {("overseen",)}
    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert finished.status == pb.TOOL_CALL_STATUS_DENIED
    assert stack.model.server.requests_for(child) == []  # the sub-agent never ran


async def test_cancelling_the_root_cancels_its_running_sub_agent(stack: Stack) -> None:
    child = stack.model.script({"text": "slow " * 500, "delay_ms": 20})
    root = stack.model.script(delegate("researcher", f"{child} take your time"))
    run_id = await stack.client.start_run("planner", root)
    started, _ = await until(stack, run_id, "tool_call_started")
    seen = list(started)
    async for event in stack.client.stream_run(run_id, after_sequence=seen[-1].sequence):
        seen.append(event)
        if event.HasField("text_delta"):
            break  # the sub-agent is answering
    assert list(seen[-1].agent_path) == ["planner", "researcher"]

    await stack.client.stub.CancelRun(pb.CancelRunRequest(run_id=run_id, reason="enough"))
    events = seen + await collect(stack, run_id, after=seen[-1].sequence)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert (paths(events[-1:]), events[-1].run_cancelled.reason) == (["planner"], "enough")
    child_run = stack.temporal.get_workflow_handle(f"{run_id}/{started[0].tool_call_started.call_id}")
    with pytest.raises(WorkflowFailureError) as ended:
        await child_run.result()
    assert isinstance(ended.value.cause, CancelledError)
    # The child ended through its own cancellation path, which records its end (and publishes nothing).
    assert "usage" in await (await child_run.describe()).memo()
    assert (await wait_for_state(stack, run_id, pb.RUN_STATE_CANCELLED)).error == ""


async def test_the_shipped_planner_delegates_with_the_offline_model(stack: Stack) -> None:
    shipped = REPO / "agents.yaml"
    agents = load_agents(shipped)
    await stack.restart_worker(agents_file=shipped)
    run_id = f"run-{uuid.uuid4().hex}"
    # Started as the server starts a run (its agents are the test suite's).
    question = "What is 12 * (3 + 4)?"
    started = RunInput(run_id, agents["planner"], question, sub_agents=sub_agent_snapshot(agents, "planner"))
    await stack.temporal.start_workflow(WORKFLOW_NAME, started, id=run_id, task_queue=stack.settings.task_queue)

    events = await collect(stack, run_id)

    assert steps(events) == [
        ("planner", "tool_call_started"),
        ("planner/assistant", "tool_call_started"),
        ("planner/assistant", "tool_call_finished"),
        ("planner/assistant", "text_delta"),
        ("planner", "tool_call_finished"),
        ("planner", "text_delta"),
        ("planner", "run_completed"),
    ]
    assert events[0].tool_call_started.tool_name == "delegate_to_assistant"
    assert events[-1].run_completed.output.endswith("84")
