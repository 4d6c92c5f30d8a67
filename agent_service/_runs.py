"""Reads a run's state from Temporal and turns it into the API's types."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle

from agentrun.v1 import agent_service_pb2 as pb
from worker.run_stream import new_event
from worker.workflows import (
    MEMO_AGENT,
    MEMO_APPROVALS,
    MEMO_CONVERSATION,
    MEMO_LAST_SEQUENCE,
    AgentRunWorkflow,
    RunResult,
)

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
_DECISIONS = {"approve": pb.APPROVAL_DECISION_APPROVE, "deny": pb.APPROVAL_DECISION_DENY}


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


def decision_to_proto(decision: str) -> pb.ApprovalDecision.ValueType:
    return _DECISIONS.get(decision, pb.APPROVAL_DECISION_UNSPECIFIED)


def approval_requested(approval: dict[str, Any]) -> pb.ApprovalRequested:
    requested = pb.ApprovalRequested(
        approval_id=approval["approval_id"],
        call_id=approval["call_id"],
        tool_name=approval["tool_name"],
        arguments=approval["arguments"],
        arguments_sha256=approval["arguments_sha256"],
        sequence=approval["sequence"],
    )
    requested.deadline.FromJsonString(approval["deadline"])
    return requested


def approval_decided(approval: dict[str, Any]) -> pb.ApprovalDecided:
    return pb.ApprovalDecided(
        approval_id=approval["approval_id"],
        call_id=approval["call_id"],
        tool_name=approval["tool_name"],
        decision=decision_to_proto(approval["decision"]),
        approver=approval["approver"],
        reason=approval["reason"],
        timed_out=approval["timed_out"],
    )


async def memo_pending_approvals(execution: WorkflowExecution) -> list[pb.ApprovalRequested]:
    """Pending approvals as the workflow's memo records them (Redis has them sooner; see the server)."""
    if is_finished(execution):
        return []
    approvals = (await execution.memo()).get(MEMO_APPROVALS, [])
    return [approval_requested(a) for a in approvals if not a["decision"]]


async def to_run(
    execution: WorkflowExecution,
    finished: Outcome | None = None,
    pending: list[pb.ApprovalRequested] | None = None,
) -> pb.Run:
    """The run as the API shows it; ``pending`` overrides the memo's (possibly older) pending approvals."""
    memo = await execution.memo()
    run = pb.Run(
        run_id=execution.id,
        agent=str(memo.get(MEMO_AGENT, "")),
        conversation_id=str(memo.get(MEMO_CONVERSATION, "")),
        state=_STATES.get(execution.status, pb.RUN_STATE_UNSPECIFIED),  # type: ignore[arg-type]
        create_time=_timestamp(execution.start_time),
    )
    approvals = memo.get(MEMO_APPROVALS, [])
    run.decided_approvals.extend(approval_decided(a) for a in approvals if a["decision"])
    if not is_finished(execution):
        if pending is None:
            pending = [approval_requested(a) for a in approvals if not a["decision"]]
        run.pending_approvals.extend(pending)
        if run.pending_approvals:
            run.state = pb.RUN_STATE_WAITING_FOR_APPROVAL
    if execution.close_time is not None:
        run.end_time.CopyFrom(_timestamp(execution.close_time))
    if finished is not None:
        run.error = finished.error
        if finished.result is not None:
            run.output = finished.result.output
            run.usage.CopyFrom(finished.result.usage.to_proto())
            if finished.result.structured_output is not None:
                json_format.ParseDict(finished.result.structured_output, run.structured_output)
    return run


async def terminal_event(execution: WorkflowExecution, finished: Outcome) -> pb.RunEvent:
    """The terminal event of a finished run, rebuilt from Temporal for when Redis no longer has it."""
    if finished.result is not None:
        completed = pb.RunCompleted(output=finished.result.output, usage=finished.result.usage.to_proto())
        if finished.result.structured_output is not None:
            json_format.ParseDict(finished.result.structured_output, completed.structured_output)
        event = new_event(run_completed=completed)
    elif finished.state == pb.RUN_STATE_CANCELLED:
        event = new_event(run_cancelled=pb.RunCancelled())
    else:
        event = new_event(run_failed=pb.RunFailed(error=finished.error))
    memo = await execution.memo()
    event.sequence = int(memo.get(MEMO_LAST_SEQUENCE, 0))
    if execution.close_time is not None:
        event.time.CopyFrom(_timestamp(execution.close_time))
    return event


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
