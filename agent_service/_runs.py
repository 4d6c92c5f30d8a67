"""Reads a run's state from Temporal and turns it into the API's types."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import FailureError
from temporalio.service import RPCError, RPCStatusCode

from agent_service._errors import from_temporal
from agentrun.v1 import agent_service_pb2 as pb
from shared import events
from shared.contract import (
    MEMO_AGENT,
    MEMO_APPROVALS,
    MEMO_CONVERSATION,
    MEMO_LAST_SEQUENCE,
    MEMO_STARTED,
    MEMO_SUB_AGENT_USAGE,
    MEMO_SUB_RUNS,
    MEMO_USAGE,
    WORKFLOW_NAME,
    AgentUsage,
    Approval,
    Decision,
    RunEnd,
    RunOutcome,
    RunResult,
    Usage,
)

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


_END_STATES = {
    RunEnd.COMPLETED: pb.RUN_STATE_COMPLETED,
    RunEnd.FAILED: pb.RUN_STATE_FAILED,
    RunEnd.CANCELLED: pb.RUN_STATE_CANCELLED,
}


# How many sub-agents' runs GetRun and Approve describe at once.
SUB_RUN_BATCH = 20


@dataclass
class Ended:
    """How a finished run ended: as Temporal recorded it, or as its terminal event announced it."""

    outcome: RunOutcome
    # Set when Temporal has not recorded the end yet: the time of the terminal event.
    announced_at: datetime | None = None

    @classmethod
    def announced(cls, terminal: pb.RunEvent) -> Ended:
        return cls(events.outcome_of(terminal), terminal.time.ToDatetime(tzinfo=UTC))

    @property
    def state(self) -> pb.RunState.ValueType:
        return _END_STATES[self.outcome.end]


def handle(client: Client, run_id: str) -> WorkflowHandle[object, RunResult]:
    return client.get_workflow_handle(run_id, result_type=RunResult)


def is_agent_run(execution: WorkflowExecution) -> bool:
    return execution.workflow_type == WORKFLOW_NAME


def state(execution: WorkflowExecution) -> pb.RunState.ValueType:
    return _STATES.get(execution.status, pb.RUN_STATE_UNSPECIFIED) if execution.status else pb.RUN_STATE_UNSPECIFIED


def is_finished(execution: WorkflowExecution) -> bool:
    return state(execution) not in (pb.RUN_STATE_UNSPECIFIED, pb.RUN_STATE_RUNNING)


async def ended(client: Client, execution: WorkflowExecution) -> Ended:
    """The outcome of a finished run (reads the closing event of its history)."""
    if execution.status == WorkflowExecutionStatus.TIMED_OUT:
        return Ended(RunOutcome(RunEnd.FAILED, error="the run timed out"))
    if execution.status == WorkflowExecutionStatus.TERMINATED:
        return Ended(RunOutcome(RunEnd.FAILED, error="the run was terminated"))
    if execution.status == WorkflowExecutionStatus.CANCELED:
        usage = await execution.memo_value(MEMO_USAGE, Usage(), type_hint=Usage)
        return Ended(RunOutcome(RunEnd.CANCELLED, usage=usage))
    try:
        result = await from_temporal(handle(client, execution.id).result(follow_runs=False))
    except WorkflowFailureError as err:
        cause = err.cause
        message = cause.message if isinstance(cause, FailureError) else str(cause)
        return Ended(RunOutcome(RunEnd.FAILED, error=message))
    return Ended(
        RunOutcome(
            RunEnd.COMPLETED, output=result.output, usage=result.usage, structured_output=result.structured_output
        )
    )


async def created(execution: WorkflowExecution) -> datetime:
    """When the run started: its first execution's start, also after it continued as new."""
    if MEMO_STARTED not in await execution.memo():
        return execution.start_time
    return await execution.memo_value(MEMO_STARTED, type_hint=datetime)


async def approvals(execution: WorkflowExecution) -> list[Approval]:
    """The run's approval requests, answered or not, as its memo records them."""
    recorded: list[Approval] = await execution.memo_value(MEMO_APPROVALS, [], type_hint=list[Approval])
    return recorded


async def sub_runs(client: Client, execution: WorkflowExecution) -> list[WorkflowExecution]:
    """The runs of the sub-agents below a run, as the memos record them, breadth first (none for most runs).

    A sub-agent's run ends before its root, so Temporal's retention may have removed it while the root is still
    shown: it is left out. Each level is described SUB_RUN_BATCH runs at a time.
    """
    found: list[WorkflowExecution] = []
    waiting: list[str] = await execution.memo_value(MEMO_SUB_RUNS, [], type_hint=list[str])
    while waiting:
        batch, waiting = waiting[:SUB_RUN_BATCH], waiting[SUB_RUN_BATCH:]
        described = await from_temporal(asyncio.gather(*(_described_unless_removed(client, run) for run in batch)))
        for sub in described:
            if sub is not None:
                found.append(sub)
                waiting += await sub.memo_value(MEMO_SUB_RUNS, [], type_hint=list[str])
    return found


async def _described_unless_removed(client: Client, run_id: str) -> WorkflowExecution | None:
    try:
        return await handle(client, run_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def recorded_approval(execution: WorkflowExecution, approval_id: str) -> Approval | None:
    """The approval request with this id as the memo records it, decided or not."""
    for approval in await approvals(execution):
        if approval.approval_id == approval_id:
            return approval
    return None


async def memo_pending_approvals(execution: WorkflowExecution) -> list[pb.RunEvent]:
    """The approval_requested events of the pending approvals, rebuilt from the workflow's memo (Redis has the
    events as published; see the server)."""
    if is_finished(execution):
        return []
    return [events.approval_requested(a) for a in await approvals(execution) if a.decision == Decision.PENDING]


async def to_run(
    execution: WorkflowExecution,
    finished: Ended | None = None,
    pending: list[pb.ApprovalRequested] | None = None,
    sub_runs: Sequence[WorkflowExecution] = (),
) -> pb.Run:
    """The run as the API shows it; ``pending`` overrides the memo's (possibly older) pending approvals, and the
    approvals of ``sub_runs``, its sub-agents' runs, are the run's too."""
    run = pb.Run(
        run_id=execution.id,
        agent=str(await execution.memo_value(MEMO_AGENT, "")),
        conversation_id=str(await execution.memo_value(MEMO_CONVERSATION, "")),
        state=state(execution),
        create_time=events.timestamp(await created(execution)),
    )
    recorded = await approvals(execution)
    for sub in sub_runs:
        recorded += await approvals(sub)
    recorded.sort(key=lambda approval: approval.sequence)
    run.decided_approvals.extend(events.approval_decision(a) for a in recorded if a.decision != Decision.PENDING)
    if not is_finished(execution):
        if pending is None:
            pending = [events.approval_request(a) for a in recorded if a.decision == Decision.PENDING]
        run.pending_approvals.extend(pending)
        if run.pending_approvals:
            run.state = pb.RUN_STATE_WAITING_FOR_APPROVAL
    if execution.close_time is not None:
        run.end_time.CopyFrom(events.timestamp(execution.close_time))
    if finished is None:
        return run
    run.state = finished.state
    run.pending_approvals.clear()
    if finished.announced_at is not None and execution.close_time is None:
        run.end_time.CopyFrom(events.timestamp(finished.announced_at))
    run.error = finished.outcome.error
    if finished.outcome.end == RunEnd.CANCELLED and finished.outcome.usage != Usage():
        run.usage.CopyFrom(events.usage(finished.outcome.usage))
    if finished.outcome.end == RunEnd.COMPLETED:
        completed = events.run_ended(finished.outcome).run_completed
        run.output = completed.output
        run.usage.CopyFrom(completed.usage)
        if completed.HasField("structured_output"):
            run.structured_output.CopyFrom(completed.structured_output)
    if run.HasField("usage"):
        run.usage_by_agent.extend(await _usage_by_agent(execution, run.agent, finished.outcome.usage))
    return run


async def _usage_by_agent(execution: WorkflowExecution, agent: str, total: Usage) -> list[pb.AgentUsage]:
    """The run's usage by agent: its sub-agents' parts as its memo records them, and the rest its own agent's."""
    below: list[AgentUsage] = await execution.memo_value(MEMO_SUB_AGENT_USAGE, [], type_hint=list[AgentUsage])
    own = total - sum((part.usage for part in below), Usage())
    return [
        pb.AgentUsage(agent_path=part.agent_path, usage=events.usage(part.usage))
        for part in [AgentUsage([agent], own), *below]
    ]


async def terminal_event(execution: WorkflowExecution, finished: Ended) -> pb.RunEvent:
    """The terminal event of a finished run, rebuilt from Temporal for when Redis no longer has it."""
    sequence = int(await execution.memo_value(MEMO_LAST_SEQUENCE, 0))
    return events.run_ended(finished.outcome, sequence=sequence, at=execution.close_time)
