"""The agent-run workflow: deterministic orchestration of one run; all I/O is in activities."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from worker.activities import CallModelInput, ModelReply, PublishInput, RunActivities, Usage
    from worker.agents import AgentConfig

# Memo keys that the server reads back from Temporal when Redis no longer has the stream.
MEMO_AGENT = "agent"
MEMO_CONVERSATION = "conversation_id"
MEMO_LAST_SEQUENCE = "last_sequence"

MODEL_CALL_TIMEOUT = timedelta(minutes=10)
MODEL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
MODEL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=3)
PUBLISH_TIMEOUT = timedelta(seconds=30)


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


@workflow.defn
class AgentRunWorkflow:
    @workflow.run
    async def run(self, input: RunInput) -> RunResult:
        last_sequence = 0
        messages = []
        if input.agent.system_prompt:
            messages.append({"role": "system", "content": input.agent.system_prompt})
        messages.append({"role": "user", "content": input.input})
        try:
            reply: ModelReply = await workflow.execute_activity_method(
                RunActivities.call_model,
                CallModelInput(input.run_id, input.agent, messages, after_sequence=last_sequence),
                start_to_close_timeout=MODEL_CALL_TIMEOUT,
                heartbeat_timeout=MODEL_HEARTBEAT_TIMEOUT,
                retry_policy=MODEL_RETRY,
            )
        except (ActivityError, asyncio.CancelledError) as err:
            reason = workflow.cancellation_reason()
            if reason is not None and is_cancelled_exception(err):
                await self._finish(PublishInput(input.run_id, last_sequence, "run_cancelled", reason=reason))
                raise
            if not isinstance(err, ActivityError):
                raise
            message = _failure_message(err)
            await self._finish(PublishInput(input.run_id, last_sequence, "run_failed", error=message))
            raise ApplicationError(message, type="RunFailed", non_retryable=True) from err
        last_sequence = reply.last_sequence
        terminal = PublishInput(input.run_id, last_sequence, "run_completed", output=reply.text, usage=reply.usage)
        return RunResult(reply.text, reply.usage, await self._finish(terminal))

    async def _finish(self, event: PublishInput) -> int:
        """Publishes the terminal event and records its sequence in the memo.

        Temporal stays the truth when Redis fails: the run still ends, and the
        server rebuilds the event from the workflow's result.
        """
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


def _failure_message(err: ActivityError) -> str:
    cause = err.cause
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    return str(cause or err)
