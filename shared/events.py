"""Builds every ``agentrun.v1.RunEvent``: nothing else spells an event kind.

The worker builds events as they happen; the server rebuilds a run's terminal event and its approval requests
from Temporal's record when Redis no longer has them. Both go through these functions, so an event reads the
same whichever way it reached the client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun.v1 import agent_service_pb2 as pb
from shared.contract import (
    Approval,
    Decision,
    RunEnd,
    RunOutcome,
    ToolCallEnd,
    ToolCallRequest,
    ToolCallStatus,
    ToolOutcome,
    Usage,
    WorkflowEvent,
)

TERMINAL_KINDS = frozenset(end.value for end in RunEnd)

_TOOL_CALL_STATUSES = {
    ToolCallStatus.COMPLETED: pb.TOOL_CALL_STATUS_COMPLETED,
    ToolCallStatus.FAILED: pb.TOOL_CALL_STATUS_FAILED,
    ToolCallStatus.DENIED: pb.TOOL_CALL_STATUS_DENIED,
}
_DECISIONS = {
    Decision.PENDING: pb.APPROVAL_DECISION_UNSPECIFIED,
    Decision.APPROVE: pb.APPROVAL_DECISION_APPROVE,
    Decision.DENY: pb.APPROVAL_DECISION_DENY,
}
_DECISIONS_FROM_PROTO = {value: key for key, value in _DECISIONS.items()}


def is_terminal(event: pb.RunEvent) -> bool:
    return event.WhichOneof("kind") in TERMINAL_KINDS


def _event(at: datetime | None = None, **kind: Any) -> pb.RunEvent:
    """A RunEvent with one ``kind`` set, stamped with ``at`` or the current time."""
    event = pb.RunEvent(**kind)
    if at is None:
        event.time.GetCurrentTime()
    else:
        event.time.FromDatetime(at)
    return event


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        total_tokens=usage.total_tokens,
    )


def decision_to_proto(decision: Decision) -> pb.ApprovalDecision.ValueType:
    return _DECISIONS[decision]


def decision_from_proto(decision: pb.ApprovalDecision.ValueType) -> Decision:
    """The decision an ApproveRequest asks for; PENDING when it names none."""
    return _DECISIONS_FROM_PROTO.get(decision, Decision.PENDING)


def text_delta(text: str) -> pb.RunEvent:
    return _event(text_delta=pb.TextDelta(text=text))


def tool_call_started(call: ToolCallRequest) -> pb.RunEvent:
    return _event(
        tool_call_started=pb.ToolCallStarted(call_id=call.call_id, tool_name=call.name, arguments=call.arguments)
    )


def tool_call_finished(call_id: str, tool_name: str, outcome: ToolOutcome | ToolCallEnd) -> pb.RunEvent:
    finished = pb.ToolCallFinished(
        call_id=call_id,
        tool_name=tool_name,
        status=_TOOL_CALL_STATUSES[outcome.status],
        result=getattr(outcome, "result", ""),
        error=outcome.error,
    )
    return _event(tool_call_finished=finished)


def approval_request(approval: Approval) -> pb.ApprovalRequested:
    requested = pb.ApprovalRequested(
        approval_id=approval.approval_id,
        call_id=approval.call_id,
        tool_name=approval.tool_name,
        arguments=approval.arguments,
        arguments_sha256=approval.arguments_sha256,
        sequence=approval.sequence,
    )
    requested.deadline.FromJsonString(approval.deadline)
    return requested


def approval_decision(approval: Approval) -> pb.ApprovalDecided:
    return pb.ApprovalDecided(
        approval_id=approval.approval_id,
        call_id=approval.call_id,
        tool_name=approval.tool_name,
        decision=decision_to_proto(approval.decision),
        approver=approval.approver,
        reason=approval.reason,
        timed_out=approval.timed_out,
    )


def approval_requested(approval: Approval) -> pb.RunEvent:
    """The approval_requested event of a request, rebuilt from what the workflow recorded of it."""
    event = _event(approval_requested=approval_request(approval))
    event.approval_requested.ClearField("sequence")  # as published: the event carries it
    event.sequence = approval.sequence
    return event


def workflow_event(spec: WorkflowEvent) -> pb.RunEvent:
    """The event for something the workflow itself decided."""
    if spec.tool_call_finished is not None:
        end = spec.tool_call_finished
        return tool_call_finished(end.call_id, end.tool_name, end)
    if spec.approval_requested is not None:
        requested = approval_request(spec.approval_requested)
        requested.ClearField("sequence")  # the stream gives the event its sequence
        return _event(approval_requested=requested)
    if spec.approval_decided is not None:
        return _event(approval_decided=approval_decision(spec.approval_decided))
    raise ValueError("a WorkflowEvent must set one field")


def events_lost(first_sequence: int, last_sequence: int) -> pb.RunEvent:
    """Stands for the events from ``first_sequence`` to ``last_sequence`` that the server no longer has."""
    event = _event(events_lost=pb.EventsLost(first_sequence=first_sequence))
    event.sequence = last_sequence
    return event


def outcome_of(event: pb.RunEvent) -> RunOutcome:
    """The outcome that a terminal event announces (the inverse of ``run_ended``)."""
    end = RunEnd(event.WhichOneof("kind") or "")  # a ValueError for an event that does not end a run
    if end == RunEnd.CANCELLED:
        return RunOutcome(end, reason=event.run_cancelled.reason)
    if end == RunEnd.FAILED:
        return RunOutcome(end, error=event.run_failed.error)
    completed = event.run_completed
    return RunOutcome(
        end,
        output=completed.output,
        usage=Usage(
            completed.usage.prompt_tokens,
            completed.usage.completion_tokens,
            completed.usage.cached_tokens,
            completed.usage.reasoning_tokens,
            completed.usage.total_tokens,
        ),
        structured_output=(
            json_format.MessageToDict(completed.structured_output) if completed.HasField("structured_output") else None
        ),
    )


def run_ended(outcome: RunOutcome, *, sequence: int = 0, at: datetime | None = None) -> pb.RunEvent:
    """The terminal event: built by the workflow's last activity, or rebuilt by the server from Temporal."""
    if outcome.end == RunEnd.COMPLETED:
        completed = pb.RunCompleted(output=outcome.output, usage=usage(outcome.usage))
        if outcome.structured_output is not None:
            json_format.ParseDict(outcome.structured_output, completed.structured_output)
        event = _event(at, run_completed=completed)
    elif outcome.end == RunEnd.CANCELLED:
        event = _event(at, run_cancelled=pb.RunCancelled(reason=outcome.reason))
    else:
        event = _event(at, run_failed=pb.RunFailed(error=outcome.error))
    event.sequence = sequence
    return event
