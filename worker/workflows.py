"""The agent-run workflow: deterministic orchestration of one run; all I/O is in activities."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from worker.activities import (
        CallModelInput,
        ModelReply,
        PublishEventsInput,
        PublishInput,
        RunActivities,
        RunToolInput,
        ToolCallRequest,
        ToolOutcome,
        Usage,
    )
    from worker.agents import AgentConfig

# Memo keys that the server reads back from Temporal (they outlive the Redis stream).
MEMO_AGENT = "agent"
MEMO_CONVERSATION = "conversation_id"
MEMO_LAST_SEQUENCE = "last_sequence"
MEMO_APPROVALS = "approvals"

MODEL_CALL_TIMEOUT = timedelta(minutes=10)
MODEL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
MODEL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3)
TOOL_TIMEOUT = timedelta(minutes=5)
TOOL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Tool errors come back as results; a retry is only for a worker that died mid-call.
TOOL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=5)
PUBLISH_TIMEOUT = timedelta(seconds=30)
TIMEOUT_APPROVER = "agentrun:timeout"
# Runs started before the run timeout existed replay without its timer.
RUN_TIMEOUT_PATCH = "run-timeout"


@dataclass
class RunInput:
    """Everything a run needs, fixed when it starts: the agent definition is a snapshot."""

    run_id: str
    agent: AgentConfig
    input: str
    conversation_id: str = ""


@dataclass
class RunResult:
    """The final answer, its cost, and the sequence number of the run's terminal event."""

    output: str
    usage: Usage = field(default_factory=Usage)
    last_sequence: int = 0
    structured_output: Any = None


@dataclass
class Approval:
    """An approval request of the run and, once given, its decision."""

    approval_id: str
    call_id: str
    tool_name: str
    arguments: str
    arguments_sha256: str
    deadline: str  # RFC 3339
    sequence: int = 0
    decision: str = ""  # "", "approve" or "deny"
    approver: str = ""
    reason: str = ""
    timed_out: bool = False


@dataclass
class ApprovalDecision:
    """An answer to an approval request, from Approve."""

    approval_id: str
    decision: str  # "approve" or "deny"
    approver: str
    reason: str = ""
    arguments_sha256: str = ""


class _RunFailure(Exception):
    """Ends the run as failed with a message fit for the caller."""


@workflow.defn
class AgentRunWorkflow:
    def __init__(self) -> None:
        # The agents from the root of the run to this one; sub-agents will extend it.
        self._agent_path: list[str] = []
        self._approvals: dict[str, Approval] = {}
        self._last_sequence = 0
        self._batches = 0

    @workflow.run
    async def run(self, input: RunInput) -> RunResult:
        if not workflow.patched(RUN_TIMEOUT_PATCH):
            return await self._run(input)
        timeout = input.agent.run_timeout_seconds()
        try:
            return await asyncio.wait_for(self._run(input), timeout)
        except TimeoutError:
            message = f"the run exceeded its timeout of {timeout:g} s ({input.agent.mode} mode)"
            await self._finish(input, "run_failed", error=message)
            raise ApplicationError(message, type="RunTimedOut", non_retryable=True) from None

    async def _run(self, input: RunInput) -> RunResult:
        agent = input.agent
        self._agent_path = [agent.name]
        messages: list[dict[str, Any]] = [{"role": "user", "content": input.input}]
        usage = Usage()
        try:
            for round in range(agent.max_iterations):
                final = round == agent.max_iterations - 1
                reply: ModelReply = await workflow.execute_activity_method(
                    RunActivities.call_model,
                    CallModelInput(
                        input.run_id,
                        agent,
                        messages,
                        after_sequence=self._last_sequence,
                        round=round,
                        conversation_id=input.conversation_id,
                        final_round=final and bool(agent.tools),
                        agent_path=self._agent_path,
                    ),
                    start_to_close_timeout=MODEL_CALL_TIMEOUT,
                    heartbeat_timeout=MODEL_HEARTBEAT_TIMEOUT,
                    retry_policy=MODEL_RETRY,
                )
                self._last_sequence = max(self._last_sequence, reply.last_sequence)
                usage += reply.usage
                messages.append(reply.message)
                if not reply.tool_calls:
                    break
                # The calls of one round run concurrently; their results go back in call order.
                messages += await asyncio.gather(*(self._tool_call(input, call, final) for call in reply.tool_calls))
                if final:
                    break
            if reply.output_error:
                raise _RunFailure(reply.output_error)
        except (ActivityError, asyncio.CancelledError) as err:
            if is_cancelled_exception(err):
                reason = workflow.cancellation_reason()
                if reason is None:
                    # The run's own timeout cancelled its work; run() reports that.
                    raise asyncio.CancelledError() from err
                await self._finish(input, "run_cancelled", reason=reason)
                raise
            assert isinstance(err, ActivityError)
            message = _failure_message(err)
            await self._finish(input, "run_failed", error=message)
            raise ApplicationError(message, type="RunFailed", non_retryable=True) from err
        except _RunFailure as err:
            await self._finish(input, "run_failed", error=str(err))
            raise ApplicationError(str(err), type="RunFailed", non_retryable=True) from None
        last = await self._finish(
            input, "run_completed", output=reply.text, usage=usage, structured_output=reply.structured_output
        )
        return RunResult(reply.text, usage, last, reply.structured_output)

    async def _tool_call(self, input: RunInput, call: ToolCallRequest, final: bool) -> dict[str, Any]:
        """Takes one tool call to its end and returns the tool message for the model."""
        if final:
            rounds = input.agent.max_iterations
            return await self._end_call(call, "failed", f"not run: the run reached its limit of {rounds} model rounds")
        if call.error:
            return await self._end_call(call, "failed", call.error)
        if call.needs_approval:
            approval = await self._approval(input, call)
            if approval.decision != "approve":
                because = f": {approval.reason}" if approval.reason else ""
                return await self._end_call(call, "denied", f"the call was denied by {approval.approver}{because}")
        outcome: ToolOutcome = await workflow.execute_activity_method(
            RunActivities.run_tool,
            RunToolInput(
                input.run_id,
                call.call_id,
                call.name,
                call.arguments,
                after_sequence=self._last_sequence,
                agent_path=self._agent_path,
            ),
            start_to_close_timeout=TOOL_TIMEOUT,
            heartbeat_timeout=TOOL_HEARTBEAT_TIMEOUT,
            retry_policy=TOOL_RETRY,
        )
        self._last_sequence = max(self._last_sequence, outcome.last_sequence)
        content = outcome.result if outcome.status == "completed" else f"error: {outcome.error}"
        return _tool_message(call, content)

    async def _end_call(self, call: ToolCallRequest, status: str, error: str) -> dict[str, Any]:
        """A call that does not run: its end is published, and the model gets the reason as the result."""
        finished = {
            "call_id": call.call_id,
            "tool_name": call.name,
            "status": f"TOOL_CALL_STATUS_{status.upper()}",
            "error": error,
        }
        await self._publish({"tool_call_finished": finished})
        return _tool_message(call, f"error: {error}")

    async def _approval(self, input: RunInput, call: ToolCallRequest) -> Approval:
        """Asks for approval and waits durably, for as long as the agent's policy allows."""
        policy = input.agent.approval
        deadline = workflow.now() + timedelta(seconds=policy.timeout_seconds)
        approval = Approval(
            approval_id=f"ap-{workflow.uuid4().hex[:16]}",
            call_id=call.call_id,
            tool_name=call.name,
            arguments=call.arguments,
            arguments_sha256=hashlib.sha256(call.arguments.encode()).hexdigest(),
            deadline=deadline.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        self._approvals[approval.approval_id] = approval
        requested = {k: v for k, v in asdict(approval).items() if k in _REQUESTED_FIELDS}
        approval.sequence = await self._publish({"approval_requested": requested})
        self._record_approvals()
        try:
            await workflow.wait_condition(lambda: bool(approval.decision), timeout=policy.timeout_seconds)
        except TimeoutError:
            approval.decision, approval.approver, approval.timed_out = "deny", TIMEOUT_APPROVER, True
            approval.reason = f"no decision within {policy.timeout_seconds:g} s"
        decided = {k: v for k, v in asdict(approval).items() if k in _DECIDED_FIELDS}
        decided["decision"] = f"APPROVAL_DECISION_{approval.decision.upper()}"
        await self._publish({"approval_decided": decided})
        self._record_approvals()
        if approval.timed_out and policy.on_timeout == "fail":
            raise _RunFailure(f"approval {approval.approval_id} for tool {call.name!r} timed out")
        return approval

    @workflow.update
    def decide_approval(self, decision: ApprovalDecision) -> Approval:
        """Records an answer to a pending approval; answering again with the same decision changes nothing."""
        approval = self._approvals[decision.approval_id]
        if not approval.decision:
            approval.decision, approval.approver, approval.reason = (
                decision.decision,
                decision.approver,
                decision.reason,
            )
        return approval

    @decide_approval.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        approval = self._approvals.get(decision.approval_id)
        if approval is None:
            raise ApplicationError(f"approval {decision.approval_id!r} does not exist", type="ApprovalNotFound")
        if decision.arguments_sha256 and decision.arguments_sha256 != approval.arguments_sha256:
            raise ApplicationError(
                f"approval {decision.approval_id!r} is for other arguments than arguments_sha256 says",
                type="ApprovalConflict",
            )
        if approval.decision and approval.decision != decision.decision:
            raise ApplicationError(
                f"approval {decision.approval_id!r} was already decided: {approval.decision} by {approval.approver}",
                type="ApprovalConflict",
            )

    def _record_approvals(self) -> None:
        # The memo lets GetRun show approvals without a worker, and after Redis lost the stream.
        workflow.upsert_memo({MEMO_APPROVALS: [asdict(a) for a in self._approvals.values()]})

    async def _publish(self, event: dict[str, Any]) -> int:
        self._batches += 1
        sequence = await workflow.execute_local_activity_method(
            RunActivities.publish_events,
            # The workflow id is the run id.
            PublishEventsInput(
                workflow.info().workflow_id,
                self._last_sequence,
                [event],
                once=f"workflow:{self._batches}",
                agent_path=self._agent_path,
            ),
            schedule_to_close_timeout=PUBLISH_TIMEOUT,
        )
        self._last_sequence = max(self._last_sequence, sequence)
        return sequence

    async def _finish(self, input: RunInput, kind: str, **fields: Any) -> int:
        """Publishes the terminal event and records its sequence in the memo.

        Temporal stays the truth when Redis fails: the run still ends, and the
        server rebuilds the event from the workflow's result.
        """
        event = PublishInput(
            input.run_id,
            self._last_sequence,
            kind,
            conversation_id=input.conversation_id,
            agent_path=self._agent_path,
            **fields,
        )
        sequence = event.after_sequence + 1
        try:
            sequence = await workflow.execute_local_activity_method(
                RunActivities.publish_terminal_event,
                event,
                schedule_to_close_timeout=PUBLISH_TIMEOUT,
            )
        except ActivityError:
            workflow.logger.warning("could not publish %s for run %s", event.kind, event.run_id)
        workflow.upsert_memo({MEMO_LAST_SEQUENCE: sequence})
        return sequence


_REQUESTED_FIELDS = {"approval_id", "call_id", "tool_name", "arguments", "arguments_sha256", "deadline"}
_DECIDED_FIELDS = {"approval_id", "call_id", "tool_name", "approver", "reason", "timed_out"}


def _tool_message(call: ToolCallRequest, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.call_id, "content": content}


def _failure_message(err: ActivityError) -> str:
    cause = err.cause
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    return str(cause or err)
