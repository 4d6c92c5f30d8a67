"""Reads a run's state from Temporal and turns it into the API's types."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle

from agentrun.v1 import agent_service_pb2 as pb
from worker.run_stream import new_event
from worker.workflows import MEMO_AGENT, MEMO_CONVERSATION, MEMO_LAST_SEQUENCE, AgentRunWorkflow, RunResult

WORKFLOW_TYPE = AgentRunWorkflow.__name__

_STATES = {
    WorkflowExecutionStatus.RUNNING: pb.RUN_STATE_RUNNING,
    WorkflowExecutionStatus.COMPLETED: pb.RUN_STATE_COMPLETED,
    WorkflowExecutionStatus.FAILED: pb.RUN_STATE_FAILED,
    WorkflowExecutionStatus.TIMED_OUT: pb.RUN_STATE_FAILED,
    WorkflowExecutionStatus.TERMINATED: pb.RUN_STATE_FAILED,
    WorkflowExecutionStatus.CANCELED: pb.RUN_STATE_CANCELLED,
    # Continue-as-new keeps the run going under the same id.
    WorkflowExecutionStatus.CONTINUED_AS_NEW: pb.RUN_STATE_RUNNING,
}


@dataclass
class Outcome:
    """How a finished run ended, as Temporal recorded it."""

    state: pb.RunState.ValueType
    result: RunResult | None = None
    error: str = ""


def handle(client: Client, run_id: str) -> WorkflowHandle[AgentRunWorkflow, RunResult]:
    return client.get_workflow_handle_for(AgentRunWorkflow.run, run_id)


def is_agent_run(execution: WorkflowExecution) -> bool:
    return execution.workflow_type == WORKFLOW_TYPE


def is_finished(execution: WorkflowExecution) -> bool:
    return _STATES.get(execution.status) not in (None, pb.RUN_STATE_RUNNING)  # type: ignore[arg-type]


async def outcome(handle: WorkflowHandle, execution: WorkflowExecution) -> Outcome:
    """The result or failure of a finished run (reads the closing event of its history)."""
    state = _STATES[execution.status]  # type: ignore[index]
    if execution.status == WorkflowExecutionStatus.TIMED_OUT:
        return Outcome(state, error="the run timed out")
    if execution.status == WorkflowExecutionStatus.TERMINATED:
        return Outcome(state, error="the run was terminated")
    if execution.status == WorkflowExecutionStatus.CANCELED:
        return Outcome(state)
    try:
        return Outcome(state, result=await handle.result(follow_runs=False))
    except WorkflowFailureError as err:
        cause = err.cause
        return Outcome(state, error=str(cause.message if hasattr(cause, "message") else cause))


async def to_run(execution: WorkflowExecution, finished: Outcome | None = None) -> pb.Run:
    memo = await execution.memo()
    run = pb.Run(
        run_id=execution.id,
        agent=str(memo.get(MEMO_AGENT, "")),
        conversation_id=str(memo.get(MEMO_CONVERSATION, "")),
        state=_STATES.get(execution.status, pb.RUN_STATE_UNSPECIFIED),  # type: ignore[arg-type]
        create_time=_timestamp(execution.start_time),
    )
    if execution.close_time is not None:
        run.end_time.CopyFrom(_timestamp(execution.close_time))
    if finished is not None:
        run.error = finished.error
        if finished.result is not None:
            run.output = finished.result.output
            run.usage.CopyFrom(finished.result.usage.to_proto())
    return run


async def terminal_event(execution: WorkflowExecution, finished: Outcome) -> pb.RunEvent:
    """The terminal event of a finished run, rebuilt from Temporal for when Redis no longer has it."""
    if finished.result is not None:
        event = new_event(
            run_completed=pb.RunCompleted(output=finished.result.output, usage=finished.result.usage.to_proto())
        )
    elif finished.state == pb.RUN_STATE_CANCELLED:
        event = new_event(run_cancelled=pb.RunCancelled())
    else:
        event = new_event(run_failed=pb.RunFailed(error=finished.error))
    memo = await execution.memo()
    event.sequence = int(memo.get(MEMO_LAST_SEQUENCE, 0))
    if execution.close_time is not None:
        event.time.CopyFrom(_timestamp(execution.close_time))
    return event


def _timestamp(moment) -> Timestamp:  # type: ignore[no-untyped-def]
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
