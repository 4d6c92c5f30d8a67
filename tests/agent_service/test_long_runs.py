"""Long runs over the real stack: the transcript stays out of Temporal's history."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory

from agentrun.v1 import agent_service_pb2 as pb
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
    run_id: str
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
        found.insert(0, Execution(execution_id or started.original_execution_run_id, history))
        execution_id = started.continued_execution_run_id
        if not execution_id:
            return found


def pad(round: int) -> dict[str, object]:
    return calls(("pad", {"text": f"round {round}:", "size": RESULT_SIZE}))


async def test_a_run_of_300_rounds_of_20_kb_results_carries_each_message_about_twice(stack: Stack) -> None:
    key = stack.model.script(*(pad(n) for n in range(ROUNDS)), {"text": "done"}, keep_requests=1)
    run_id = await stack.client.start_run("long", f"{key} go")

    events = await collect(stack, run_id)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].run_completed.output == "done"
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert len(finished) == ROUNDS and {len(f.result) for f in finished} == {RESULT_SIZE}
    # The last round's model request held the whole transcript, in order, read back from Redis.
    contents = [m["content"] for m in tool_messages(stack.model.server.requests_for(key)[-1])]
    assert [c.split(":")[0] for c in contents] == [f"round {n}" for n in range(ROUNDS)]
    run = await stack.client.get_run(run_id)
    assert (run.state, run.output) == (pb.RUN_STATE_COMPLETED, "done")

    runs = await executions(stack, run_id)
    total_events = sum(len(r.history.events) for r in runs)
    total_bytes = sum(r.size for r in runs)
    print(f"{ROUNDS} rounds: {len(runs)} executions, {total_events} events, {total_bytes} bytes of history")
    for execution in runs:
        assert len(execution.history.events) < TEMPORAL_MAX_EVENTS / 5
        assert execution.size < TEMPORAL_MAX_BYTES / 3
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
