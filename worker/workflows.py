"""The agent-run workflow: deterministic orchestration of one run; all I/O is in activities."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

with workflow.unsafe.imports_passed_through():
    from shared.agents import sub_agent_snapshot
    from shared.contract import (
        DECIDE_APPROVAL_UPDATE,
        MEMO_AGENT,
        MEMO_APPROVALS,
        MEMO_APPROVERS,
        MEMO_LAST_SEQUENCE,
        MEMO_STARTED,
        MEMO_SUB_AGENT_USAGE,
        MEMO_SUB_RUNS,
        MEMO_USAGE,
        TIMEOUT_APPROVER,
        WORKFLOW_NAME,
        AgentUsage,
        Approval,
        ApprovalAnswer,
        CallModelInput,
        Decision,
        Delegation,
        ErrorType,
        ModelReply,
        PublishEventsInput,
        PublishOutcomeInput,
        RunEnd,
        RunInput,
        RunOutcome,
        RunProgress,
        RunResult,
        RunToolInput,
        ToolCallEnd,
        ToolCallRequest,
        ToolCallStatus,
        ToolOutcome,
        Usage,
        WorkflowEvent,
    )
    from shared.run_stream import writer_name
    from worker.activities import RunActivities

MODEL_CALL_TIMEOUT = timedelta(minutes=10)
MODEL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# A rate-limited or overloaded endpoint gets minutes, not a second: 1, 2, 4 ... 60 s apart (or as Retry-After says),
# as many times as the agent's model_attempts. Errors that another attempt cannot fix are non-retryable.
MODEL_RETRY_INITIAL = timedelta(seconds=1)
MODEL_RETRY_MAXIMUM = timedelta(seconds=60)
TOOL_TIMEOUT = timedelta(minutes=5)
TOOL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# Tool errors come back as results; a retry is for a worker that died mid-call or a Redis that stayed away.
TOOL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)
# Longer than the worker waits out a Redis outage (AGENTRUN_REDIS_OUTAGE_SECONDS, 60 s by default).
PUBLISH_TIMEOUT = timedelta(minutes=2)
# Runs started before the run timeout existed replay without its timer.
RUN_TIMEOUT_PATCH = "run-timeout"
# Runs started before transcripts were kept in Redis send their whole message list in every model round.
TRANSCRIPT_PATCH = "transcript-in-redis"
# Runs started before continue-as-new never continue as new.
CONTINUE_AS_NEW_PATCH = "continue-as-new"
# A run that continues as new carries its messages into the next execution when they are at most this large (as
# JSON); larger ones are only in Redis then (and in the histories of the earlier executions). Temporal warns about
# payloads past 512 KB, and the input holds the agent's snapshot and the approvals beside them.
CARRIED_MESSAGES_MAX_BYTES = 256 << 10


class _Transcript:
    """The run's messages, and how many of them the run's transcript in Redis holds (shared/transcripts.py).

    A model round sends only the messages added since the round before, so that each message enters the history
    about twice (in the result that brought it and in the next round's input) instead of once in every round.
    """

    def __init__(self, messages: list[dict[str, Any]], incremental: bool, *, first: int = 0, stored: int = 0) -> None:
        # The run's messages from index ``first`` on: after a continue-as-new that could not carry them all, the
        # earlier ones are only in Redis.
        self.messages = messages
        self.first = first
        # False in runs that predate transcripts in Redis: every round sends every message, as it did then.
        self.incremental = incremental
        self.stored = stored

    def add(self, *messages: dict[str, Any]) -> None:
        self.messages += messages

    def unsent(self) -> tuple[int, list[dict[str, Any]]]:
        """Where the messages that Redis lacks start in the transcript, and those messages."""
        start = self.stored if self.incremental else 0
        return start, self.messages[start - self.first :]

    def sent(self) -> None:
        self.stored = self.first + len(self.messages)

    def resend_all(self) -> bool:
        """Sends every message again in the next round; False when this execution no longer has them all."""
        if self.first:
            return False
        self.stored = 0
        return True

    def carried(self) -> tuple[int, list[dict[str, Any]]] | None:
        """What a continue-as-new takes along: where its messages start, and the messages: all of them when they
        are small, else those Redis lacks; None when even those are too large to carry now."""
        for start in (self.first, self.stored):
            messages = self.messages[start - self.first :]
            if len(json.dumps(messages)) <= CARRIED_MESSAGES_MAX_BYTES:
                return start, messages
        return None


class _RunFailure(Exception):
    """Ends the run as failed with a message fit for the caller."""

    def __init__(self, message: str, error_type: ErrorType) -> None:
        super().__init__(message)
        self.error_type = error_type


@workflow.defn(name=WORKFLOW_NAME)
class AgentRunWorkflow:
    def __init__(self) -> None:
        # The run whose stream this workflow publishes into: its own, or for a sub-agent's run, the root's.
        self._run_id = ""
        # The agents from the root of the run to this one.
        self._agent_path: list[str] = []
        # For a sub-agent's run, its workflow id (see CallModelInput.sub_run); empty for a root run.
        self._sub_run = ""
        # What the sub-agents' runs used: in all, not yet added to the run's usage, and per agent path below this run.
        self._delegated_usage = Usage()
        self._sub_agent_usage: dict[tuple[str, ...], Usage] = {}
        self._sub_runs: list[str] = []
        self._approvals: dict[str, Approval] = {}
        self._last_sequence = 0
        self._batches = 0
        # The schema digests of the tools as the run's first model round offered them.
        self._tool_digests: dict[str, str] = {}

    @workflow.run
    async def run(self, input: RunInput) -> RunResult:
        # Before anything can end the run (its timeout may have passed when a continued execution starts): which run
        # this is and where its stream stands, so that its end is published as this run's, past its last number.
        self._identify(input)
        self._restore(input.progress)
        if not workflow.patched(RUN_TIMEOUT_PATCH):
            return await self._run(input)
        timeout = input.agent.run_timeout_seconds()
        try:
            return await asyncio.wait_for(self._run(input), _time_left(input, timeout))
        except TimeoutError:
            message = f"the run exceeded its timeout of {timeout:g} s ({input.agent.mode} mode)"
            await self._finish(input, RunOutcome(RunEnd.FAILED, error=message))
            raise ApplicationError(
                message, self._last_sequence, type=ErrorType.RUN_TIMED_OUT, non_retryable=True
            ) from None

    async def _run(self, input: RunInput) -> RunResult:
        agent = input.agent
        transcript, usage, first_round = self._start_or_resume(input)
        continues = workflow.patched(CONTINUE_AS_NEW_PATCH)
        try:
            for round in range(first_round, agent.max_iterations):
                final = round == agent.max_iterations - 1
                offers_tools = bool(agent.tools or agent.mcp_servers or agent.sub_agents)
                reply = await self._call_model(input, transcript, round, usage, final_round=final and offers_tools)
                usage += reply.usage
                transcript.add(reply.message)
                if not reply.tool_calls:
                    break
                # The calls of one round run concurrently; their results go back in call order.
                results = await asyncio.gather(*(self._tool_call(input, call, final) for call in reply.tool_calls))
                transcript.add(*results)
                usage += self._take_delegated_usage()
                if final:
                    break
                if continues:
                    await self._continue_as_new_if_due(input, transcript, round + 1, usage)
            if reply.output_error:
                raise _RunFailure(reply.output_error, ErrorType.INVALID_OUTPUT)
        except (ActivityError, asyncio.CancelledError) as err:
            if is_cancelled_exception(err):
                reason = workflow.cancellation_reason()
                if reason is None:
                    # The run's own timeout cancelled its work; run() reports that.
                    raise asyncio.CancelledError() from err
                # The usage of the rounds that finished: GetRun shows it for the cancelled run.
                usage += self._take_delegated_usage()
                await self._finish(input, RunOutcome(RunEnd.CANCELLED, reason=reason, usage=usage))
                raise
            assert isinstance(err, ActivityError)
            # The failed call may have published events the workflow has not heard of: number past them.
            self._last_sequence = max(self._last_sequence, _published_floor(err))
            message = _failure_message(err)
            await self._finish(input, RunOutcome(RunEnd.FAILED, error=message))
            raise self._failure(message, ErrorType.ACTIVITY_FAILED, usage) from err
        except _RunFailure as err:
            await self._finish(input, RunOutcome(RunEnd.FAILED, error=str(err)))
            raise self._failure(str(err), err.error_type, usage) from None
        if reply.ended_run:
            # The model round published run_completed itself; only the memo is left to record.
            last = reply.ended_run
            workflow.upsert_memo({MEMO_LAST_SEQUENCE: last})
        else:
            outcome = RunOutcome(
                RunEnd.COMPLETED, output=reply.text, usage=usage, structured_output=reply.structured_output
            )
            last = await self._finish(input, outcome)
        return RunResult(reply.text, usage, last, reply.structured_output, self._sub_agent_usage_list())

    def _failure(self, message: str, error_type: ErrorType, usage: Usage) -> ApplicationError:
        """The error a failed run ends with. Its details tell a sub-agent's parent the last sequence the run
        published (the parent numbers past it) and what the run spent, in all and per agent path below it."""
        spent = [asdict(entry) for entry in self._sub_agent_usage_list()]
        return ApplicationError(message, self._last_sequence, asdict(usage), spent, type=error_type, non_retryable=True)

    def _restore(self, progress: RunProgress | None) -> None:
        """Takes up where the run's earlier executions left it, when it continued as new."""
        if progress is None:
            return
        self._last_sequence, self._batches = progress.last_sequence, progress.batches
        self._approvals = {approval.approval_id: approval for approval in progress.approvals}
        self._tool_digests = progress.tool_digests
        self._sub_runs = progress.sub_runs
        self._sub_agent_usage = {tuple(entry.agent_path): entry.usage for entry in progress.sub_agent_usage}

    def _start_or_resume(self, input: RunInput) -> tuple[_Transcript, Usage, int]:
        """The run's messages, usage and next round: from its input, or where the earlier executions left it when
        it continued as new."""
        incremental = workflow.patched(TRANSCRIPT_PATCH)
        progress = input.progress
        if progress is None:
            return _Transcript([{"role": "user", "content": input.input}], incremental), Usage(), 0
        transcript = _Transcript(
            progress.messages, incremental, first=progress.first_message, stored=progress.stored_messages
        )
        return transcript, progress.usage, progress.round

    async def _continue_as_new_if_due(self, input: RunInput, transcript: _Transcript, round: int, usage: Usage) -> None:
        """Goes on in a new execution of the run before its history nears Temporal's limits.

        Called between rounds, when no tool call or approval is in flight; an Approve still being handled finishes
        first. The run id (the workflow id), its stream's numbering, its approvals and its memo go on unchanged.
        """
        info = workflow.info()
        agent = input.agent
        due = (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= agent.continue_as_new_after_events
            or info.get_current_history_size() >= agent.continue_as_new_after_bytes
        )
        carried = transcript.carried() if due and transcript.incremental else None
        if carried is None:
            return  # not yet; or this round's messages are too large to carry: the next round's may not be
        await workflow.wait_condition(workflow.all_handlers_finished)
        started_at = input.progress.started_at if input.progress else info.workflow_start_time
        first_message, messages = carried
        progress = RunProgress(
            started_at=started_at,
            round=round,
            last_sequence=self._last_sequence,
            batches=self._batches,
            usage=usage,
            approvals=list(self._approvals.values()),
            tool_digests=self._tool_digests,
            messages=messages,
            first_message=first_message,
            stored_messages=transcript.stored,
            sub_runs=self._sub_runs,
            sub_agent_usage=self._sub_agent_usage_list(),
        )
        workflow.continue_as_new(
            dataclasses.replace(input, progress=progress), memo={**workflow.memo(), MEMO_STARTED: started_at}
        )

    async def _call_model(
        self, input: RunInput, transcript: _Transcript, round: int, usage_before: Usage, *, final_round: bool
    ) -> ModelReply:
        try:
            reply = await self._model_round(input, transcript, round, usage_before, final_round=final_round)
        except ActivityError as err:
            if not _transcript_lost(err):
                raise
            # Redis lost the messages that earlier rounds sent; the workflow has them all: it sends them again.
            if not transcript.resend_all():
                raise _RunFailure(
                    f"Redis lost the run's transcript, and the first {transcript.first} of its "
                    f"{transcript.first + len(transcript.messages)} messages (the user's input and the earliest "
                    "rounds' calls and results) were too large to carry through a continue-as-new: they are only in "
                    "the Temporal histories of the run's earlier executions",
                    ErrorType.TRANSCRIPT_LOST,
                ) from err
            reply = await self._model_round(input, transcript, round, usage_before, final_round=final_round)
        transcript.sent()
        return reply

    async def _model_round(
        self, input: RunInput, transcript: _Transcript, round: int, usage_before: Usage, *, final_round: bool
    ) -> ModelReply:
        first_message, messages = transcript.unsent()
        reply = await workflow.execute_activity_method(
            RunActivities.call_model,
            CallModelInput(
                input.run_id,
                input.agent,
                messages,
                after_sequence=self._last_sequence,
                round=round,
                conversation_id=input.conversation_id,
                final_round=final_round,
                agent_path=self._agent_path,
                tool_digests=self._tool_digests,
                usage_before=usage_before,
                sub_agents=self._delegation_offers(input),
                sub_run=self._sub_run,
                first_message=first_message,
            ),
            start_to_close_timeout=MODEL_CALL_TIMEOUT,
            heartbeat_timeout=MODEL_HEARTBEAT_TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=MODEL_RETRY_INITIAL,
                backoff_coefficient=2.0,
                maximum_interval=MODEL_RETRY_MAXIMUM,
                maximum_attempts=input.agent.model_attempts,
            ),
        )
        self._last_sequence = max(self._last_sequence, reply.last_sequence)
        self._tool_digests = self._tool_digests or reply.tool_digests
        return reply

    async def _tool_call(self, input: RunInput, call: ToolCallRequest, final: bool) -> dict[str, Any]:
        """Takes one tool call to its end and returns the tool message for the model."""
        if final:
            rounds = input.agent.max_iterations
            return await self._end_call(call, f"not run: the run reached its limit of {rounds} model rounds")
        if call.error:
            return await self._end_call(call, call.error)
        if call.needs_approval:
            approval = await self._approval(input, call)
            if approval.decision != Decision.APPROVE:
                because = f": {approval.reason}" if approval.reason else ""
                error = f"the call was denied by {approval.approver}{because}"
                return await self._end_call(call, error, ToolCallStatus.DENIED)
        if call.sub_agent:
            return await self._delegate(input, call)
        outcome: ToolOutcome = await workflow.execute_activity_method(
            RunActivities.run_tool,
            RunToolInput(
                input.run_id,
                call.call_id,
                call.name,
                call.arguments,
                after_sequence=self._last_sequence,
                agent_path=self._agent_path,
                tool_digest=self._tool_digests.get(call.name, ""),
                trace_content=input.agent.trace_content,
                sub_run=self._sub_run,
            ),
            start_to_close_timeout=TOOL_TIMEOUT,
            heartbeat_timeout=TOOL_HEARTBEAT_TIMEOUT,
            retry_policy=TOOL_RETRY,
        )
        self._last_sequence = max(self._last_sequence, outcome.last_sequence)
        content = outcome.result if outcome.status == ToolCallStatus.COMPLETED else f"error: {outcome.error}"
        return _tool_message(call, content)

    async def _end_call(
        self, call: ToolCallRequest, error: str, status: ToolCallStatus = ToolCallStatus.FAILED
    ) -> dict[str, Any]:
        """A call that does not run: its end is published, and the model gets the reason as the result."""
        await self._publish(WorkflowEvent(tool_call_finished=ToolCallEnd(call.call_id, call.name, status, error)))
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
            requested_at=workflow.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        self._approvals[approval.approval_id] = approval
        approval.sequence = await self._publish(WorkflowEvent(approval_requested=approval))
        self._record_approvals()
        try:
            await workflow.wait_condition(lambda: approval.decision != Decision.PENDING, timeout=policy.timeout_seconds)
        except TimeoutError:
            approval.decision, approval.approver, approval.timed_out = Decision.DENY, TIMEOUT_APPROVER, True
            approval.reason = f"no decision within {policy.timeout_seconds:g} s"
        await self._publish(WorkflowEvent(approval_decided=approval))
        self._record_approvals()
        if approval.timed_out and policy.on_timeout == "fail":
            raise _RunFailure(
                f"approval {approval.approval_id} for tool {call.name!r} timed out", ErrorType.APPROVAL_TIMED_OUT
            )
        return approval

    @workflow.update(name=DECIDE_APPROVAL_UPDATE)
    async def decide_approval(self, answer: ApprovalAnswer) -> Approval:
        """Records an answer to an approval request; answering again with the same decision changes nothing.

        A worker that replays the run may get the answer before its replay has reached the request again; the
        answer then waits for it. (The server answers NOT_FOUND for an approval that neither Redis nor the memo
        knows, so the wait is only ever for a request the run has made.)
        """
        await workflow.wait_condition(lambda: answer.approval_id in self._approvals)
        approval = self._approvals[answer.approval_id]
        conflict = _conflict(approval, answer)
        if conflict:
            raise ApplicationError(conflict, type=ErrorType.APPROVAL_CONFLICT)
        if approval.decision == Decision.PENDING:
            approval.decision, approval.approver, approval.reason = answer.decision, answer.approver, answer.reason
        return approval

    @decide_approval.validator
    def _check_answer(self, answer: ApprovalAnswer) -> None:
        # Rejected before it enters the history when the run knows the request; otherwise decide_approval waits.
        approval = self._approvals.get(answer.approval_id)
        conflict = _conflict(approval, answer) if approval is not None else ""
        if conflict:
            raise ApplicationError(conflict, type=ErrorType.APPROVAL_CONFLICT)

    def _record_approvals(self) -> None:
        # The memo lets GetRun show approvals without a worker, and after Redis lost the stream.
        workflow.upsert_memo({MEMO_APPROVALS: [asdict(a) for a in self._approvals.values()]})

    async def _publish(self, event: WorkflowEvent) -> int:
        self._batches += 1
        sequence = await workflow.execute_local_activity_method(
            RunActivities.publish_events,
            PublishEventsInput(
                self._run_id,
                self._last_sequence,
                [event],
                once=writer_name(self._sub_run, f"workflow:{self._batches}"),
                agent_path=self._agent_path,
                sub_run=self._sub_run,
            ),
            schedule_to_close_timeout=PUBLISH_TIMEOUT,
        )
        self._last_sequence = max(self._last_sequence, sequence)
        return sequence

    async def _finish(self, input: RunInput, outcome: RunOutcome) -> int:
        """Publishes the terminal event and records its sequence in the memo.

        Temporal stays the truth when Redis fails: the run still ends, and the server rebuilds the event from the
        workflow's result. A sub-agent's run publishes no terminal event: its end is no end of the root's stream,
        and its parent reports it as the end of the delegation's tool call.
        """
        if self._sub_run:
            workflow.upsert_memo({MEMO_USAGE: asdict(outcome.usage)})
            return self._last_sequence
        publish = PublishOutcomeInput(
            input.run_id,
            self._last_sequence,
            outcome,
            conversation_id=input.conversation_id,
            agent_path=self._agent_path,
        )
        sequence = publish.after_sequence + 1
        try:
            sequence = await workflow.execute_local_activity_method(
                RunActivities.publish_terminal_event, publish, schedule_to_close_timeout=PUBLISH_TIMEOUT
            )
        except ActivityError:
            workflow.logger.warning("could not publish %s for run %s", outcome.end, input.run_id)
        workflow.upsert_memo({MEMO_LAST_SEQUENCE: sequence, MEMO_USAGE: asdict(outcome.usage)})
        return sequence

    # Sub-agents: a delegation runs the sub-agent as a child run of the same workflow, publishing into the root's
    # stream under its own agent path.

    def _identify(self, input: RunInput) -> None:
        """Where the run stands in its tree: a root run, or a sub-agent's run started by a delegation."""
        self._run_id = input.run_id
        if input.delegation is None:
            self._agent_path = [input.agent.name]
        else:
            self._agent_path = list(input.delegation.agent_path)
            self._sub_run = input.delegation.sub_run
            self._last_sequence = input.delegation.after_sequence

    def _delegation_offers(self, input: RunInput) -> dict[str, str]:
        """The sub-agents this run's model is offered, with their descriptions: none at the depth limit."""
        limit = input.delegation.max_depth if input.delegation else input.agent.max_delegation_depth
        if len(self._agent_path) - 1 >= limit:
            return {}
        return {name: sub.description for name in input.agent.sub_agents if (sub := input.sub_agents.get(name))}

    async def _delegate(self, input: RunInput, call: ToolCallRequest) -> dict[str, Any]:
        """Runs a sub-agent as a child run with the call's task; its answer, or why it failed, is the call's result.

        The child's id derives from this run's and the call's, so a replayed or retried parent never starts a
        second child. Cancelling the parent requests the child's cancellation without waiting for it (its worker
        may be gone), and the parent's close, however it comes, requests it too: the child ends through its own
        cancellation path rather than being terminated.
        """
        sub = input.sub_agents[call.sub_agent]
        # A root run's tree: its id, its queue, and its agent's depth limit.
        tree = input.delegation or Delegation(
            input.run_id, [], workflow.info().task_queue, input.agent.max_delegation_depth
        )
        path = [*self._agent_path, sub.name]
        child_id = f"{tree.sub_run}/{call.call_id}"
        child = RunInput(
            input.run_id,
            sub,
            json.loads(call.arguments)["task"],
            sub_agents=sub_agent_snapshot(input.sub_agents, sub.name),
            delegation=Delegation(child_id, path, tree.task_queue, tree.max_depth, self._last_sequence),
        )
        if child_id not in self._sub_runs:
            self._sub_runs.append(child_id)
            workflow.upsert_memo({MEMO_SUB_RUNS: self._sub_runs})
        try:
            result: RunResult = await workflow.execute_child_workflow(
                WORKFLOW_NAME,
                child,
                result_type=RunResult,
                id=child_id,
                # A model that repeats a call id in a later round must not start a second run under the first's id:
                # the two would share writer names in the stream, and one's events would be taken for the other's.
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                task_queue=sub.task_queue or tree.task_queue,
                cancellation_type=workflow.ChildWorkflowCancellationType.TRY_CANCEL,
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                # Who may decide the sub-agent's approvals: the server checks it where it checks a root run's.
                memo={MEMO_AGENT: sub.name, MEMO_APPROVERS: list(sub.approval.approvers)},
            )
        except ChildWorkflowError as err:
            self._last_sequence = max(self._last_sequence, _published_floor(err))
            spent = _spent_by_failed_run(err)
            if spent is not None:  # runs that failed before failures said so, or by their timeout, do not tell
                self._add_sub_agent_usage(path, spent)
            return await self._end_call(call, f"sub-agent {sub.name!r} failed: {_failure_message(err)}")
        except WorkflowAlreadyStartedError:  # a model that gave two calls one id
            return await self._end_call(call, f"call id {call.call_id!r} was already used for a delegation")
        self._last_sequence = max(self._last_sequence, result.last_sequence)
        self._add_sub_agent_usage(path, result)
        end = ToolCallEnd(call.call_id, call.name, ToolCallStatus.COMPLETED, result=result.output)
        await self._publish(WorkflowEvent(tool_call_finished=end))
        return _tool_message(call, result.output)

    def _add_sub_agent_usage(self, path: list[str], result: RunResult) -> None:
        below = result.sub_agent_usage
        own = result.usage - sum((entry.usage for entry in below), Usage())
        for entry in [AgentUsage(path, own), *below]:
            key = tuple(entry.agent_path)
            self._sub_agent_usage[key] = self._sub_agent_usage.get(key, Usage()) + entry.usage
        self._delegated_usage += result.usage
        # GetRun reads the parts from the memo: a cancelled run has no result to carry them.
        workflow.upsert_memo({MEMO_SUB_AGENT_USAGE: [asdict(entry) for entry in self._sub_agent_usage_list()]})

    def _sub_agent_usage_list(self) -> list[AgentUsage]:
        return [AgentUsage(list(path), usage) for path, usage in self._sub_agent_usage.items()]

    def _take_delegated_usage(self) -> Usage:
        """What the sub-agents used since the run last took it into its usage."""
        taken, self._delegated_usage = self._delegated_usage, Usage()
        return taken


def _conflict(approval: Approval, answer: ApprovalAnswer) -> str:
    """Why ``answer`` cannot apply to ``approval``; empty when it can."""
    if answer.arguments_sha256 and answer.arguments_sha256 != approval.arguments_sha256:
        return f"approval {answer.approval_id!r} is for other arguments than arguments_sha256 says"
    if approval.decision != Decision.PENDING and approval.decision != answer.decision:
        return f"approval {answer.approval_id!r} was already decided: {approval.decision} by {approval.approver}"
    return ""


def _tool_message(call: ToolCallRequest, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.call_id, "content": content}


def _published_floor(err: FailureError) -> int:
    """The last sequence a failed activity or child run reported publishing, in its error's details or its last
    heartbeat."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        details: Sequence[Any] = cause.details
    elif isinstance(cause, TemporalTimeoutError):
        details = cause.last_heartbeat_details
    else:
        details = ()
    return max((d for d in details if isinstance(d, int)), default=0)


def _spent_by_failed_run(err: ChildWorkflowError) -> RunResult | None:
    """What a sub-agent's run spent before it failed, as its failure's details say (see _failure)."""
    cause = err.cause
    details = list(cause.details) if isinstance(cause, ApplicationError) else []
    if len(details) < 3 or not isinstance(details[1], dict) or not isinstance(details[2], list):
        return None
    below = [AgentUsage(entry["agent_path"], Usage(**entry["usage"])) for entry in details[2]]
    return RunResult("", Usage(**details[1]), sub_agent_usage=below)


def _time_left(input: RunInput, timeout: float) -> float:
    """The run's timeout counts from its first execution's start, not from the latest continue-as-new."""
    if input.progress is None:
        return timeout
    return timeout - (workflow.now() - input.progress.started_at).total_seconds()


def _transcript_lost(err: ActivityError) -> bool:
    return isinstance(err.cause, ApplicationError) and err.cause.type == ErrorType.TRANSCRIPT_LOST


def _failure_message(err: FailureError) -> str:
    cause = err.cause
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    return str(cause or err)
