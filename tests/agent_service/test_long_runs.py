"""Long runs over the real stack: the transcript stays out of Temporal's history, and a run continues as new
before its history nears Temporal's limits, as the same run to every caller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory

from agent_service.server import AgentService
from agentrun.v1 import agent_service_pb2 as pb
from shared.agents import load_agents
from shared.contract import ErrorType
from shared.transcripts import transcript_key
from tests.agent_service.test_agent_loop import approve, calls, tool_messages, until
from tests.agent_service.test_runs import collect
from tests.conftest import Stack

ROUNDS = 300
RESULT_SIZE = 20_000
# Temporal's hard limits of one execution's history.
TEMPORAL_MAX_EVENTS = 51_200
TEMPORAL_MAX_BYTES = 50 << 20


@dataclass
class Execution:
    history: WorkflowHistory

    @property
    def size(self) -> int:
        return sum(event.ByteSize() for event in self.history.events)

    def scheduled(self, activity: str) -> list[HistoryEvent]:
        return [
            e
            for e in self.history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == activity
        ]

    def model_inputs(self) -> list[dict[str, Any]]:
        return [
            json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data)
            for e in self.scheduled("call_model")
        ]


async def executions(stack: Stack, run_id: str) -> list[Execution]:
    """Every execution of the run, first to last, each with its history."""
    found: list[Execution] = []
    execution_id = ""  # the latest
    while True:
        history = await stack.temporal.get_workflow_handle(run_id, run_id=execution_id or None).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        found.insert(0, Execution(history))
        execution_id = started.continued_execution_run_id
        if not execution_id:
            return found


async def ended_runs(stack: Stack) -> list[pb.Run]:
    """ListRuns once every run it lists has ended (visibility is eventually consistent)."""
    for _ in range(100):
        runs = list((await stack.client.list_runs()).runs)
        if runs and all(r.state not in (pb.RUN_STATE_RUNNING, pb.RUN_STATE_WAITING_FOR_APPROVAL) for r in runs):
            return runs
        await asyncio.sleep(0.1)
    raise AssertionError(f"ListRuns still lists runs that go on: {runs}")


async def next_approval_request(stack: Stack, run_id: str, after: pb.RunEvent) -> pb.RunEvent:
    """The first approval request after the event ``after`` (a pending request seen before comes again on resume)."""
    async for event in stack.client.stream_run(run_id, after_sequence=after.sequence):
        if event.HasField("approval_requested") and event.sequence > after.sequence:
            return event
    raise AssertionError("the run ended without another approval request")


def pad(round: int) -> dict[str, object]:
    return calls(("pad", {"text": f"round {round}:", "size": RESULT_SIZE}))


async def test_a_run_of_300_rounds_of_20_kb_results_continues_as_new_and_streams_as_one(stack: Stack) -> None:
    key = stack.model.script(*(pad(n) for n in range(ROUNDS)), {"text": "done"}, keep_requests=1)
    run_id = await stack.client.start_run("long", f"{key} go")
    created = (await stack.client.get_run(run_id)).create_time

    events = []
    async for event in stack.client.stream_run(run_id):
        events.append(event)
        if event.tool_call_finished.result.startswith(f"round {ROUNDS // 2}:"):
            # Past the first continue-as-new (after about 80 rounds): still the same running run.
            run = await stack.client.get_run(run_id)
            assert (run.state, run.agent, run.create_time) == (pb.RUN_STATE_RUNNING, "long", created)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].run_completed.output == "done"
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert len(finished) == ROUNDS and {len(f.result) for f in finished} == {RESULT_SIZE}
    # The last round's model request held the whole transcript, in order, read back from Redis.
    contents = [m["content"] for m in tool_messages(stack.model.server.requests_for(key)[-1])]
    assert [c.split(":")[0] for c in contents] == [f"round {n}" for n in range(ROUNDS)]
    run = await stack.client.get_run(run_id)
    assert (run.state, run.output, run.create_time) == (pb.RUN_STATE_COMPLETED, "done", created)
    assert run.usage == events[-1].run_completed.usage and run.usage.prompt_tokens > ROUNDS
    assert [r.run_id for r in await ended_runs(stack)] == [run_id]  # once, not once per execution

    runs = await executions(stack, run_id)
    assert len(runs) > 1
    total_events = sum(len(r.history.events) for r in runs)
    total_bytes = sum(r.size for r in runs)
    each = ", ".join(f"{len(r.history.events)} events/{r.size} bytes" for r in runs)
    print(f"{ROUNDS} rounds: {len(runs)} executions ({each}), {total_events} events, {total_bytes} bytes in all")
    for execution in runs:
        assert len(execution.history.events) < TEMPORAL_MAX_EVENTS / 20
        assert execution.size < TEMPORAL_MAX_BYTES / 10
        # Each round's input carries the round's new messages only: one call and its result, not the transcript.
        inputs = execution.model_inputs()
        assert all(len(i["messages"]) <= 2 for i in inputs[1:])
        assert (
            max(e.activity_task_scheduled_event_attributes.input.ByteSize() for e in execution.scheduled("call_model"))
            < 2 * RESULT_SIZE
        )
    # Each 20 KB result is in the history about twice: in its tool's result and in the next round's input.
    assert total_bytes < ROUNDS * RESULT_SIZE * 2.5


async def test_a_transcript_that_redis_lost_is_sent_again_and_the_run_completes(stack: Stack) -> None:
    key = stack.model.script(
        calls(("calculator", {"expression": "6 * 7"})), calls(("echo", {"text": "again"})), {"text": "done"}
    )
    run_id = await stack.client.start_run("patient", key)  # the echo waits for approval, the calculator does not
    _, requested = await until(stack, run_id, "approval_requested")
    await stack.redis.delete(transcript_key(stack.settings.redis_prefix, run_id))

    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id, after=requested.sequence)

    assert events[-1].run_completed.output == "done"
    requests = stack.model.server.requests_for(key)
    assert [m["content"] for m in tool_messages(requests[-1])] == ["42", "again"]
    assert [m["role"] for m in requests[-1]["messages"]] == ["user", "assistant", "tool", "assistant", "tool"]
    [execution] = await executions(stack, run_id)
    failures = [
        e.activity_task_failed_event_attributes.failure.application_failure_info.type
        for e in execution.history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    ]
    assert failures == [ErrorType.TRANSCRIPT_LOST]
    # The third round was sent twice: from where the second left off, then whole.
    starts = [(i.get("first_message", 0), len(i["messages"])) for i in execution.model_inputs()]
    assert starts == [(0, 1), (1, 2), (3, 2), (0, 5)]


async def test_approvals_are_asked_and_decided_across_continues_as_new(stack: Stack) -> None:
    key = stack.model.script(
        calls(("echo", {"text": "first"})),
        calls(("calculator", {"expression": "6 * 7"})),
        calls(("echo", {"text": "second"})),
        {"text": "done"},
    )
    run_id = await stack.client.start_run("stepwise", key)  # continues as new after every round
    _, first = await until(stack, run_id, "approval_requested")
    await approve(stack, run_id, first.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    second = await next_approval_request(stack, run_id, after=first)

    waiting = await stack.client.get_run(run_id)
    assert waiting.state == pb.RUN_STATE_WAITING_FOR_APPROVAL
    assert [p.approval_id for p in waiting.pending_approvals] == [second.approval_requested.approval_id]
    assert [d.approval_id for d in waiting.decided_approvals] == [first.approval_requested.approval_id]
    # The decision made two executions ago is still the run's: the same answer again is answered with it.
    again = await approve(stack, run_id, first.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    assert (again.decision, again.approver) == (pb.APPROVAL_DECISION_APPROVE, "alice")
    await approve(stack, run_id, second.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].run_completed.output == "done"
    assert [m["content"] for m in tool_messages(stack.model.server.requests_for(key)[-1])] == ["first", "42", "second"]
    run = await stack.client.get_run(run_id)
    assert run.state == pb.RUN_STATE_COMPLETED and len(run.decided_approvals) == 2
    assert len(await executions(stack, run_id)) == 4  # one per round
    assert [r.run_id for r in await ended_runs(stack)] == [run_id]


async def test_a_continued_run_is_cancelled_like_any_other(stack: Stack) -> None:
    key = stack.model.script(calls(("calculator", {"expression": "1 + 1"})), calls(("echo", {"text": "wait"})))
    run_id = await stack.client.start_run("stepwise", key)
    await until(stack, run_id, "approval_requested")  # in the second execution

    await stack.client.cancel_run(run_id, reason="enough")
    events = await collect(stack, run_id)

    assert events[-1].run_cancelled.reason == "enough"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    run = await stack.client.get_run(run_id)
    assert run.state == pb.RUN_STATE_CANCELLED and not run.pending_approvals
    assert len(await executions(stack, run_id)) == 2


async def test_the_run_timeout_counts_from_the_runs_start_not_from_each_continue_as_new(stack: Stack) -> None:
    # Twenty rounds of 0.4 s in a run allowed 3 s: each execution alone would be within the timeout.
    key = stack.model.script(*[calls(("nap", {"seconds": 0.4}))] * 20, {"text": "too late"})
    run_id = await stack.client.start_run("stepwise_short", key)

    events = await collect(stack, run_id)

    assert events[-1].run_failed.error == "the run exceeded its timeout of 3 s (interactive mode)"
    assert len(await executions(stack, run_id)) > 1


async def test_a_transcript_lost_after_a_continue_as_new_is_sent_again_when_it_was_carried(stack: Stack) -> None:
    key = stack.model.script(
        calls(("calculator", {"expression": "6 * 7"})), calls(("echo", {"text": "again"})), {"text": "done"}
    )
    run_id = await stack.client.start_run("stepwise", key)
    _, requested = await until(stack, run_id, "approval_requested")  # in the second execution
    await stack.redis.delete(transcript_key(stack.settings.redis_prefix, run_id))

    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id, after=requested.sequence)

    assert events[-1].run_completed.output == "done"
    request = stack.model.server.requests_for(key)[-1]
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "tool", "assistant", "tool"]


async def test_a_transcript_lost_after_a_continue_as_new_too_large_to_carry_it_fails_the_run_saying_so(
    stack: Stack,
) -> None:
    big = 150_000  # two results are more than a continue-as-new carries
    key = stack.model.script(
        calls(("pad", {"text": "a", "size": big})),
        calls(("pad", {"text": "b", "size": big})),
        calls(("echo", {"text": "pause"})),
        {"text": "never"},
    )
    run_id = await stack.client.start_run("stepwise", key)
    _, requested = await until(stack, run_id, "approval_requested")
    await stack.redis.delete(transcript_key(stack.settings.redis_prefix, run_id))

    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id, after=requested.sequence)

    assert events[-1].run_failed.error == (
        "Redis lost the run's transcript, and the first 3 of its 7 messages (the user's input and the earliest "
        "rounds' calls and results) were too large to carry through a continue-as-new: they are only in the "
        "Temporal histories of the run's earlier executions"
    )
    assert len(stack.model.server.requests_for(key)) == 3  # the model was not asked with a broken transcript


async def test_the_relay_does_not_count_a_continued_execution_as_the_runs_end(stack: Stack) -> None:
    # The relay asks Temporal which quiet runs have ended with this query; a run waiting for approval is quiet.
    service = AgentService(stack.settings, stack.temporal, stack.redis, load_agents(stack.settings.agents_file))
    steps = [calls(("calculator", {"expression": "1+1"})), calls(("echo", {"text": "x"})), {"text": "ok"}]
    key = stack.model.script(*steps)
    run_id = await stack.client.start_run("stepwise", key)
    _, requested = await until(stack, run_id, "approval_requested")  # in the second execution
    continued = f"WorkflowId = '{run_id}' AND ExecutionStatus = 'ContinuedAsNew'"

    async def first_execution_visible() -> bool:
        return bool([e async for e in stack.temporal.list_workflows(continued)])

    await eventually(first_execution_visible)
    assert await service._ended_runs([run_id]) == set()
    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    await collect(stack, run_id)

    async def ended() -> bool:
        return await service._ended_runs([run_id]) == {run_id}

    await eventually(ended)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Waits for Temporal's visibility store, which is eventually consistent, to answer as ``check`` wants."""
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{check.__name__} stayed false")
