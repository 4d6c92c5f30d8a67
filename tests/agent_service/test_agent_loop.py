"""The agent loop end to end: tools, approvals, conversations, limits, over the real stack."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from temporalio.api.enums.v1 import EventType

from agentrun.v1 import agent_service_pb2 as pb
from tests.agent_service.test_runs import collect, kinds, wait_for_state
from tests.conftest import Stack, details

APPROVER = (("x-agentrun-approver", "alice"),)


def calls(*specs: tuple[str, object]) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments} for name, arguments in specs]}


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m["role"] == "tool"]


async def approve(
    stack: Stack,
    run_id: str,
    approval_id: str,
    decision: pb.ApprovalDecision.ValueType,
    reason: str = "",
    **extra: str,
) -> pb.ApproveResponse:
    request = pb.ApproveRequest(run_id=run_id, approval_id=approval_id, decision=decision, reason=reason, **extra)
    return await stack.client.stub.Approve(request, metadata=APPROVER)


async def until(stack: Stack, run_id: str, kind: str) -> tuple[list[pb.RunEvent], pb.RunEvent]:
    """Streams a run up to the first event of ``kind``."""
    seen = []
    async for event in stack.client.stream_run(run_id):
        seen.append(event)
        if event.WhichOneof("kind") == kind:
            return seen, event
    raise AssertionError(f"no {kind} in {kinds(seen)}")


async def test_a_multi_round_tool_run(stack: Stack) -> None:
    key = stack.model.script(
        calls(("calculator", {"expression": "2 + 3"})),
        calls(("echo", {"text": "five"})),
        {"text": "The answer is 5."},
    )
    run_id = await stack.client.start_run("tools", f"{key} add two and three")

    events = await collect(stack, run_id)

    assert [k for k in kinds(events) if k != "text_delta"] == [
        "tool_call_started",
        "tool_call_finished",
        "tool_call_started",
        "tool_call_finished",
        "run_completed",
    ]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    started = [e.tool_call_started for e in events if e.HasField("tool_call_started")]
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert [s.tool_name for s in started] == ["calculator", "echo"]
    assert {tuple(e.agent_path) for e in events} == {("tools",)}
    assert json.loads(started[0].arguments) == {"expression": "2 + 3"}
    assert [(f.call_id, f.status, f.result) for f in finished] == [
        (started[0].call_id, pb.TOOL_CALL_STATUS_COMPLETED, "5"),
        (started[1].call_id, pb.TOOL_CALL_STATUS_COMPLETED, "five"),
    ]
    done = events[-1].run_completed
    assert done.output == "The answer is 5."
    requests = stack.model.server.requests_for(key)
    assert len(requests) == 3
    # Usage is summed over the three rounds.
    assert done.usage.completion_tokens > 4
    # Each round sees the calls and results of the rounds before it.
    assert tool_messages(requests[1]) == [{"role": "tool", "tool_call_id": started[0].call_id, "content": "5"}]
    assert [m["content"] for m in tool_messages(requests[2])] == ["5", "five"]
    assert {t["function"]["name"] for t in requests[0]["tools"]} == {
        "calculator",
        "echo",
        "current_time",
        "random",
        "nap",
        "idempotency_key",
    }


async def test_parallel_tool_calls_run_concurrently_and_answer_in_order(stack: Stack) -> None:
    key = stack.model.script(
        calls(("calculator", {"expression": "6 * 7"}), ("echo", {"text": "b"}), ("calculator", {"expression": "1+1"})),
        {"text": "done"},
    )
    run_id = await stack.client.start_run("tools", key)

    events = await collect(stack, run_id)

    finished = {
        e.tool_call_finished.call_id: e.tool_call_finished.result for e in events if e.HasField("tool_call_finished")
    }
    started = [e.tool_call_started.call_id for e in events if e.HasField("tool_call_started")]
    assert len(started) == 3 and set(finished) == set(started)
    assert [m["content"] for m in tool_messages(stack.model.server.requests_for(key)[1])] == ["42", "b", "2"]
    # All three tool activities were scheduled by one workflow task: they ran side by side.
    history = await stack.temporal.get_workflow_handle(run_id).fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "run_tool"
    ]
    assert len(scheduled) == 3
    assert len({s.workflow_task_completed_event_id for s in scheduled}) == 1


async def test_bad_tool_calls_reach_the_model_as_errors_and_the_run_goes_on(stack: Stack) -> None:
    key = stack.model.script(
        {
            "tool_calls": [
                {"name": "calculator", "arguments": {"expr": "1"}},
                {"name": "no_such_tool", "arguments": {}},
                {"name": "echo", "arguments": "{not json"},
                {"name": "calculator", "arguments": {"expression": "1/0"}},
            ]
        },
        {"text": "sorry"},
    )
    run_id = await stack.client.start_run("tools", key)

    events = await collect(stack, run_id)

    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert [f.status for f in finished] == [pb.TOOL_CALL_STATUS_FAILED] * 4
    by_tool = {f.tool_name: f.error for f in finished if f.tool_name != "calculator"}
    assert "unknown tool 'no_such_tool'" in by_tool["no_such_tool"]
    assert "not valid JSON" in by_tool["echo"]
    errors = [f.error for f in finished if f.tool_name == "calculator"]
    assert any("expression" in e for e in errors) and any("ZeroDivisionError" in e for e in errors)
    assert events[-1].run_completed.output == "sorry"
    seen_by_model = [m["content"] for m in tool_messages(stack.model.server.requests_for(key)[1])]
    assert all(content.startswith("error: ") for content in seen_by_model) and len(seen_by_model) == 4
    # The failed calls were not retried: one model call per round.
    assert len(stack.model.server.requests_for(key)) == 2


async def test_an_approved_call_runs_and_records_the_approver(stack: Stack) -> None:
    key = stack.model.script(calls(("echo", {"text": "launch"})), {"text": "launched"})
    run_id = await stack.client.start_run("careful", key)
    _, requested_event = await until(stack, run_id, "approval_requested")
    requested = requested_event.approval_requested

    assert requested.tool_name == "echo"
    assert requested.arguments_sha256 == hashlib.sha256(requested.arguments.encode()).hexdigest()
    assert requested.deadline.seconds > requested_event.time.seconds
    waiting = await stack.client.get_run(run_id)
    assert waiting.state == pb.RUN_STATE_WAITING_FOR_APPROVAL
    assert [p.approval_id for p in waiting.pending_approvals] == [requested.approval_id]

    answer = await approve(
        stack,
        run_id,
        requested.approval_id,
        pb.APPROVAL_DECISION_APPROVE,
        "looks fine",
        arguments_sha256=requested.arguments_sha256,
    )
    events = await collect(stack, run_id, after=requested_event.sequence)

    assert (answer.decision, answer.approver, answer.reason) == (pb.APPROVAL_DECISION_APPROVE, "alice", "looks fine")
    decided = next(e.approval_decided for e in events if e.HasField("approval_decided"))
    assert (decided.approval_id, decided.approver, decided.reason) == (requested.approval_id, "alice", "looks fine")
    assert decided.decision == pb.APPROVAL_DECISION_APPROVE and not decided.timed_out
    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert (finished.status, finished.result) == (pb.TOOL_CALL_STATUS_COMPLETED, "launch")
    assert events[-1].run_completed.output == "launched"
    run = await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)
    assert not run.pending_approvals
    assert [(d.approver, d.reason) for d in run.decided_approvals] == [("alice", "looks fine")]


async def test_a_denied_call_tells_the_model_who_denied_it_and_why(stack: Stack) -> None:
    key = stack.model.script(calls(("calculator", {"expression": "2**10"})), {"text": "ok, I won't"})
    run_id = await stack.client.start_run("careful", key)
    _, requested = await until(stack, run_id, "approval_requested")

    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_DENY, "too risky")
    events = await collect(stack, run_id, after=requested.sequence)

    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert finished.status == pb.TOOL_CALL_STATUS_DENIED
    assert finished.error == "the call was denied by alice: too risky"
    assert tool_messages(stack.model.server.requests_for(key)[1])[0]["content"] == (
        "error: the call was denied by alice: too risky"
    )
    assert events[-1].run_completed.output == "ok, I won't"


async def test_a_missed_deadline_denies_when_the_agent_says_deny(stack: Stack) -> None:
    key = stack.model.script(calls(("echo", {"text": "x"})), {"text": "no answer came"})
    run_id = await stack.client.start_run("careful", key)

    events = await collect(stack, run_id)

    decided = next(e.approval_decided for e in events if e.HasField("approval_decided"))
    assert decided.timed_out and decided.approver == "agentrun:timeout"
    assert decided.decision == pb.APPROVAL_DECISION_DENY
    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert finished.status == pb.TOOL_CALL_STATUS_DENIED
    assert events[-1].run_completed.output == "no answer came"


async def test_a_missed_deadline_fails_the_run_when_the_agent_says_fail(stack: Stack) -> None:
    key = stack.model.script(calls(("echo", {"text": "x"})), {"text": "never"})
    run_id = await stack.client.start_run("strict", key)

    events = await collect(stack, run_id)

    assert kinds(events)[-2:] == ["approval_decided", "run_failed"]
    assert "timed out" in events[-1].run_failed.error
    run = await wait_for_state(stack, run_id, pb.RUN_STATE_FAILED)
    assert "timed out" in run.error
    assert len(stack.model.server.requests_for(key)) == 1


async def test_approve_is_idempotent_and_rejects_what_it_cannot_do(stack: Stack) -> None:
    # The answer after the approval is slow, so the run is still going while Approve is tried again.
    key = stack.model.script(calls(("echo", {"text": "a"})), {"chunks": [f"w{i} " for i in range(30)], "delay_ms": 50})
    run_id = await stack.client.start_run("patient", key)
    _, requested = await until(stack, run_id, "approval_requested")
    approval_id = requested.approval_requested.approval_id

    async def error_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        return raised.value.code(), details(raised.value)

    assert (await error_of(approve(stack, run_id, "ap-nope", pb.APPROVAL_DECISION_APPROVE)))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    assert (await error_of(approve(stack, "run-nope", approval_id, pb.APPROVAL_DECISION_APPROVE)))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, message = await error_of(approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_UNSPECIFIED))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("decision:")
    code, message = await error_of(
        approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE, arguments_sha256="abc")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("arguments_sha256:")
    code, _ = await error_of(
        approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE, arguments_sha256="0" * 64)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    anonymous = stack.client.stub.Approve(
        pb.ApproveRequest(run_id=run_id, approval_id=approval_id, decision=pb.APPROVAL_DECISION_APPROVE)
    )
    assert (await error_of(anonymous))[0] == grpc.StatusCode.UNAUTHENTICATED

    first = await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE, "yes")
    again = await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE, "yes again")
    assert (again.decision, again.approver, again.reason) == (first.decision, "alice", "yes")
    code, message = await error_of(approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_DENY))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already decided" in message

    await collect(stack, run_id)
    await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)
    # After the run has ended, the same decision is still answered with the recorded one (a caller retrying
    # through an outage learns the outcome); another decision is refused.
    late = await approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_APPROVE)
    assert (late.decision, late.approver, late.reason) == (first.decision, "alice", "yes")
    code, message = await error_of(approve(stack, run_id, approval_id, pb.APPROVAL_DECISION_DENY))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already decided" in message


async def test_a_reconnecting_client_sees_pending_approvals_again(stack: Stack) -> None:
    key = stack.model.script(
        {"chunks": ["Let ", "me ", "check. "], "tool_calls": [{"name": "echo", "arguments": {"text": "x"}}]},
        {"text": "ok"},
    )
    run_id = await stack.client.start_run("patient", key)
    seen, requested = await until(stack, run_id, "approval_requested")

    # The client went away after the request; it comes back after a later event.
    resumed = stack.client.stream_run(run_id, after_sequence=requested.sequence)
    first = await anext(resumed)
    await resumed.aclose()

    # The very event that was published: same sequence, time, agent path and request.
    assert first == requested
    await stack.client.cancel_run(run_id)


async def test_cancel_during_an_approval_wait_stops_the_run(stack: Stack) -> None:
    key = stack.model.script(calls(("echo", {"text": "x"})), {"text": "never"})
    run_id = await stack.client.start_run("patient", key)
    _, requested = await until(stack, run_id, "approval_requested")

    await stack.client.cancel_run(run_id, reason="changed my mind")
    events = await collect(stack, run_id, after=requested.sequence)

    assert events[-1].run_cancelled.reason == "changed my mind"
    run = await wait_for_state(stack, run_id, pb.RUN_STATE_CANCELLED)
    assert not run.pending_approvals


async def test_a_conversation_carries_history_across_runs(stack: Stack) -> None:
    key = stack.model.script({"text": "Nice to meet you, Ada."}, {"text": "Your name is Ada."})
    first = await stack.client.start_run("chat", f"{key} My name is Ada.", conversation_id="conv-ada")
    await collect(stack, first)
    second = await stack.client.start_run("chat", f"{key} What is my name?", conversation_id="conv-ada")
    await collect(stack, second)

    sent = stack.model.server.requests_for(key)[1]["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", f"{key} My name is Ada."),
        ("assistant", "Nice to meet you, Ada."),
        ("user", f"{key} What is my name?"),
    ]


async def test_the_history_window_is_trimmed_only_at_turn_boundaries(stack: Stack) -> None:
    # Every turn has four messages (user, assistant with a call, tool, assistant),
    # and the agent keeps at most four: each window must be exactly whole turns.
    key = stack.model.script(calls(("echo", {"text": "t"})), {"text": "done"})
    for turn in range(3):
        stack.model.server.add_script(key, [calls(("echo", {"text": f"t{turn}"})), {"text": f"done {turn}"}])
        run_id = await stack.client.start_run("chat", f"{key} turn {turn}", conversation_id="conv-trim")
        await collect(stack, run_id)

    for request in stack.model.server.requests_for(key):
        messages = request["messages"]
        assert messages[0]["role"] == "user"
        announced: set[str] = set()
        for message in messages:
            announced |= {c["id"] for c in message.get("tool_calls") or []}
            if message["role"] == "tool":
                assert message["tool_call_id"] in announced
    last = stack.model.server.requests_for(key)[-1]["messages"]
    assert last[0]["content"] == f"{key} turn 2"  # earlier turns no longer fit


async def test_one_active_run_per_conversation(stack: Stack) -> None:
    slow = stack.model.script({"chunks": [f"w{i} " for i in range(40)], "delay_ms": 20})
    first = await stack.client.start_run("chat", slow, conversation_id="conv-busy")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.start_run("chat", "me too", conversation_id="conv-busy")

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first in details(raised.value)
    await collect(stack, first)
    await wait_for_state(stack, first, pb.RUN_STATE_COMPLETED)
    assert await stack.client.start_run("chat", slow, conversation_id="conv-busy") != first


async def test_a_failed_run_keeps_the_users_turn(stack: Stack) -> None:
    key = stack.model.script({"error": {"status": 400, "message": "nope"}}, {"text": "second try works"})
    failed = await stack.client.start_run("chat", f"{key} remember this", conversation_id="conv-fail")
    assert kinds(await collect(stack, failed)) == ["run_failed"]

    after = await stack.client.start_run("chat", f"{key} and this", conversation_id="conv-fail")
    await collect(stack, after)

    sent = stack.model.server.requests_for(key)[1]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == [f"{key} remember this", f"{key} and this"]


async def test_max_iterations_ends_cleanly_and_tells_the_model(stack: Stack) -> None:
    key = stack.model.script(calls(("echo", {"text": "1"})), calls(("echo", {"text": "2"})))
    run_id = await stack.client.start_run("limited", key)

    events = await collect(stack, run_id)

    requests = stack.model.server.requests_for(key)
    assert len(requests) == 2
    assert "tools" not in requests[1]
    assert "answer now" in requests[1]["messages"][-1]["content"].lower()
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    started = [e.tool_call_started for e in events if e.HasField("tool_call_started")]
    assert len(started) == len(finished) == 2  # no announced call is dropped
    assert finished[-1].status == pb.TOOL_CALL_STATUS_FAILED
    assert "limit of 2 model rounds" in finished[-1].error
    assert events[-1].HasField("run_completed")


async def test_structured_output_is_parsed_and_validated(stack: Stack) -> None:
    key = stack.model.script({"text": '{"city": "Paris", "population": 2100000}'})
    run_id = await stack.client.start_run("json", key)

    events = await collect(stack, run_id)

    answer = events[-1].run_completed.structured_output
    assert answer.struct_value.fields["city"].string_value == "Paris"
    assert answer.struct_value.fields["population"].number_value == 2100000
    run = await wait_for_state(stack, run_id, pb.RUN_STATE_COMPLETED)
    assert run.structured_output == answer
    assert stack.model.server.requests_for(key)[0]["response_format"]["type"] == "json_schema"


async def test_an_answer_that_breaks_the_schema_fails_the_run(stack: Stack) -> None:
    key = stack.model.script({"text": '{"city": "Paris"}'})
    run_id = await stack.client.start_run("json", key)

    events = await collect(stack, run_id)

    assert kinds(events)[-1] == "run_failed"
    assert "population" in events[-1].run_failed.error


async def test_a_run_that_exceeds_its_timeout_fails_clearly(stack: Stack) -> None:
    key = stack.model.script({"chunks": [f"w{i} " for i in range(200)], "delay_ms": 20})
    run_id = await stack.client.start_run("hasty", key)

    events = await collect(stack, run_id)

    assert events[-1].run_failed.error == "the run exceeded its timeout of 1 s (interactive mode)"
    await wait_for_state(stack, run_id, pb.RUN_STATE_FAILED)


async def test_sampling_settings_reach_the_model(stack: Stack) -> None:
    key = stack.model.script({"text": "short"})
    await collect(stack, await stack.client.start_run("terse", key))
    request = stack.model.server.requests_for(key)[0]
    assert request["max_completion_tokens"] == 64
    assert "temperature" not in request


async def test_a_tool_gets_an_idempotency_key_named_after_the_run_and_call(stack: Stack) -> None:
    key = stack.model.script(calls(("idempotency_key", {})), {"text": "ok"})
    run_id = await stack.client.start_run("tools", key)

    events = await collect(stack, run_id)

    finished = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert finished.result == f"{run_id}:{finished.call_id}"


async def test_cancel_during_a_tool_call_stops_the_run_promptly(stack: Stack) -> None:
    key = stack.model.script(calls(("nap", {"seconds": 60})), {"text": "never"})
    run_id = await stack.client.start_run("tools", key)
    _, started = await until(stack, run_id, "tool_call_started")

    await stack.client.cancel_run(run_id, reason="too slow")
    events = await collect(stack, run_id, after=started.sequence)

    assert kinds(events) == ["run_cancelled"]
    await wait_for_state(stack, run_id, pb.RUN_STATE_CANCELLED)
