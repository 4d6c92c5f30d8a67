"""The AgentService gRPC server."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from agent_service import _reflection, _runs
from agent_service._auth import (
    RESERVED_PREFIX,
    AuthConfigError,
    Authentication,
    Authenticator,
    is_loopback,
    is_reserved,
    principal,
)
from agent_service._errors import ApiError, Context, ErrorMapping, from_temporal, invalid, temporal_timeout
from agent_service._limits import Limits
from agent_service._relay import CATCH_UP_BATCH, StreamRelay
from agentrun.v1 import agent_service_pb2 as pb
from agentrun.v1 import agent_service_pb2_grpc as pb_grpc
from shared import events, telemetry
from shared.agents import AgentConfig, load_agents, sub_agent_snapshot
from shared.contract import (
    DECIDE_APPROVAL_UPDATE,
    ID_CHARACTERS,
    ID_PATTERN,
    MEMO_AGENT,
    MEMO_APPROVERS,
    MEMO_CONVERSATION,
    MEMO_TENANT,
    TENANT_SEARCH_ATTRIBUTE,
    WORKFLOW_NAME,
    Approval,
    ApprovalAnswer,
    Decision,
    ErrorType,
    RunInput,
)
from shared.conversations import ConversationStore, tenant_conversation
from shared.events import is_terminal
from shared.run_stream import (
    StartMark,
    approval_run,
    is_known,
    is_pending_approval,
    last_event,
    mark_started,
    pending_approvals,
    read_range,
    start_mark,
    stream_exists,
)
from shared.settings import Settings, connect_redis, connect_temporal, stop_on_signals

log = logging.getLogger("agentrun.server")

# How the server's connections appear in Redis's CLIENT LIST (the relay's subscription adds "-relay").
REDIS_CLIENT_NAME = "agentrun-server"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
# The input travels in Temporal payloads (Temporal warns past 512 KB, and refuses past 2 MB) and in every model
# request of the run: 256 KiB keeps each well inside, with the agent's prompt and the conversation beside it.
MAX_INPUT_BYTES = 256 << 10
MAX_ID_LENGTH = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_LENGTH = 4096
_PAGE_DIGEST_SIZE = 8
# Approve waits this long for a worker to take the decision before it answers UNAVAILABLE.
APPROVE_ACCEPT_SECONDS = 5.0
# Runs asked about in one Temporal visibility query when the relay looks for runs that ended quietly.
ENDED_QUERY_BATCH = 200
# StreamRun adds the events it relayed to the metric in batches of this many, not one call per event.
EVENTS_METRIC_BATCH = 64
# Grace for unary calls in flight when the server stops; streams end at once with UNAVAILABLE.
SHUTDOWN_GRACE_SECONDS = 10.0
# Set on purpose rather than left to gRPC's defaults: ping idle clients so that a dead one frees its streams,
# accept clients' keepalive pings every 10 s, cap messages at 4 MiB (the largest input is 256 KiB), and never share
# a port with another server (gRPC sets SO_REUSEPORT by default, and two servers would then take turns answering).
# Calls that arrived but that the server has not yet taken up are "pending"; the asyncio server takes them up one
# at a time, so a burst (every client of a dead replica failing over here) queues thousands. Past gRPC's default of
# 1,000 it starts cancelling them (clients see CANCELLED); a queued call costs a few KB, so let the burst wait.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.max_send_message_length", 4 << 20),
]
# The workflow enforces each run's timeout; Temporal's own limit only catches a stuck run.
RUN_TIMEOUT_GRACE_SECONDS = 60
MAX_REASON_LENGTH = 2000
APPROVER_METADATA = "x-agentrun-approver"
_APPROVAL_ERRORS = {ErrorType.APPROVAL_CONFLICT: grpc.StatusCode.FAILED_PRECONDITION}
# Not 'ContinuedAsNew': that execution's run goes on in the next one, under the same workflow id.
_ENDED_STATUSES = "'Completed', 'Failed', 'Canceled', 'Terminated', 'TimedOut'"
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_TENANT_KEY = SearchAttributeKey.for_keyword(TENANT_SEARCH_ATTRIBUTE)


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(self, settings: Settings, temporal: Client, redis_client: redis.Redis, agents: dict[str, AgentConfig]):
        self._settings = settings
        self._temporal = temporal
        self._redis = redis_client
        self._agents = agents
        self._conversations = ConversationStore(redis_client, settings.redis_prefix)
        self._limits = Limits(
            max_streams=settings.limit_streams,
            starts_per_second=settings.limit_starts_per_second,
            start_burst=settings.limit_start_burst,
        )
        self.relay = StreamRelay(
            settings.redis_url, redis_client, settings.redis_prefix, self._ended_runs, name=f"{REDIS_CLIENT_NAME}-relay"
        )

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        _check_id("agent", request.agent, required=True)  # bounded, so that NOT_FOUND can name it
        if not request.input.strip():
            raise invalid("input", "must not be empty")
        if len(request.input.encode()) > MAX_INPUT_BYTES:
            raise invalid("input", f"must be at most {MAX_INPUT_BYTES} bytes")
        _check_id("conversation_id", request.conversation_id, required=False)
        _check_id("request_id", request.request_id, required=False)
        agent = self._agents.get(request.agent)
        if agent is None:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"agent {request.agent!r} is not configured; the agents are: {', '.join(sorted(self._agents))}",
            )
        caller = principal()
        self._limits.take_start(caller)
        tenant = caller.tenant
        # A request_id maps to one workflow id, and Temporal admits one workflow per
        # id: duplicates, concurrent or late, all land on the first run.
        if request.request_id:
            run_id = _run_id(self._settings.run_id_secret, tenant, request.request_id)
            digest = _request_digest(request)
            # Before anything is written for it: the same request_id with another request is a caller's mistake.
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                _check_same_request(await start_mark(self._redis, self._settings.redis_prefix, run_id), digest, run_id)
        else:
            run_id, digest = "run-" + uuid.uuid4().hex, ""
        conversation = tenant_conversation(tenant, request.conversation_id)
        if conversation:
            await self._claim_conversation(conversation, run_id, agent, request.conversation_id)
            # The user's turn is saved before the run starts, so a run that fails
            # later never loses it (saving is idempotent per run).
            await self._conversations.append(
                conversation,
                run_id,
                [{"role": "user", "content": request.input}],
                ttl_seconds=agent.history_ttl_seconds,
            )
        try:
            started = self._temporal.start_workflow(
                WORKFLOW_NAME,
                RunInput(run_id, agent, request.input, conversation, sub_agent_snapshot(self._agents, agent.name)),
                id=run_id,
                task_queue=self._settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                # A backstop only: the workflow enforces the run's timeout itself and ends cleanly.
                execution_timeout=timedelta(seconds=agent.run_timeout_seconds() + RUN_TIMEOUT_GRACE_SECONDS),
                memo={
                    MEMO_AGENT: agent.name,
                    MEMO_CONVERSATION: request.conversation_id,
                    MEMO_TENANT: tenant,
                    MEMO_APPROVERS: list(agent.approval.approvers),
                },
                # ListRuns finds a tenant's runs by it; runs without a tenant need no search attribute.
                search_attributes=TypedSearchAttributes([SearchAttributePair(_TENANT_KEY, tenant)] if tenant else []),
            )
            await from_temporal(started)
        except WorkflowAlreadyStartedError:
            # The first run with this request_id has already finished.
            if conversation:
                await self._conversations.release_active_run(conversation, run_id)
        except BaseException:
            if conversation:
                await self._conversations.release_active_run(conversation, run_id)
            raise
        # The run's trace is the one of the StartRun that started it: a duplicate StartRun answers with that one.
        mark = StartMark(telemetry.traceparent(), digest, tenant)
        # Lets StreamRun follow the run before its first event without asking Temporal; without it, it asks.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            ttl = self._settings.stream_ttl_seconds
            mark = await mark_started(self._redis, self._settings.redis_prefix, run_id, ttl_seconds=ttl, mark=mark)
        _check_same_request(mark, digest, run_id)  # another request with this request_id started the run just now
        traceparent = mark.traceparent
        telemetry.instruments().runs_started.add(1, {"gen_ai.agent.name": agent.name})
        run_trace = telemetry.span_context_of(traceparent)
        trace_id = f"{run_trace.trace_id:032x}" if run_trace is not None else telemetry.trace_id_hex()
        return pb.StartRunResponse(run_id=run_id, trace_id=trace_id)

    async def _claim_conversation(self, conversation: str, run_id: str, agent: AgentConfig, named: str) -> None:
        """One active run per conversation (its tenant's key; ``named`` is the caller's id); a claim left by a run
        that has ended is taken over."""
        lease = int(agent.run_timeout_seconds() + RUN_TIMEOUT_GRACE_SECONDS)
        holder = await self._conversations.acquire_active_run(conversation, run_id, ttl_seconds=lease)
        if holder is None:
            return
        if not await self._is_running(holder) and await self._conversations.replace_active_run(
            conversation, holder, run_id, ttl_seconds=lease
        ):
            return
        current = await self._conversations.active_run(conversation) or holder
        raise ApiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"conversation {named!r} already has an active run {current!r}; wait for it to end or cancel it",
        )

    async def _is_running(self, run_id: str) -> bool:
        execution = await self._find(run_id)
        return execution is not None and not _runs.is_finished(execution)

    async def StreamRun(self, request: pb.StreamRunRequest, context: Context) -> AsyncIterator[pb.StreamRunResponse]:
        _check_id("run_id", request.run_id, required=True)
        if request.after_sequence < 0:
            raise invalid("after_sequence", "must not be negative")
        run_id, after = request.run_id, request.after_sequence
        telemetry.current_run_id.set(run_id)
        caller = principal()
        span = self._stream_span(context, run_id) if telemetry.enabled() else None
        metrics = telemetry.instruments()
        metrics.open_streams.add(1)
        relayed = 0
        try:
            execution = await self._check_tenant(run_id, caller.tenant)
            if span is not None:  # only now: another tenant's run's trace is none of the caller's business
                await self._link_to_run_trace(span, run_id)
            with self._limits.stream(caller):
                async for response in self._stream(run_id, after, execution):
                    if relayed == EVENTS_METRIC_BATCH:
                        metrics.stream_events.add(relayed)
                        relayed = 0
                    relayed += 1
                    yield response
        except Exception as err:
            if span is not None:
                span.record_exception(err)
                span.set_status(trace.StatusCode.ERROR, str(err))
            raise
        finally:
            metrics.open_streams.add(-1)
            if relayed:
                metrics.stream_events.add(relayed)
            if span is not None:
                span.end()

    async def _check_tenant(self, run_id: str, tenant: str) -> WorkflowExecution | None:
        """NOT_FOUND, as for a run that does not exist, unless the run is the tenant's: by its start mark in Redis
        when Redis has it, else by Temporal's record, which it returns (None when the mark decided)."""
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            mark = await start_mark(self._redis, self._settings.redis_prefix, run_id)
            if mark is not None:
                if mark.tenant != tenant:
                    raise _no_such_run(run_id)
                return None
        return await self._describe(run_id)

    def _stream_span(self, context: Context, run_id: str) -> trace.Span:
        """StreamRun's server span, in the caller's trace (linked to the run's once the run is the caller's).

        Made here rather than by the gRPC instrumentation, whose span is the current one across the stream's
        yields: a client that goes away closes the stream from another context, where detaching it fails. This
        one is current nowhere, and ended when the stream ends.
        """
        from opentelemetry import propagate

        carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        return telemetry.tracer().start_span(
            f"/{SERVICE_NAME}/StreamRun",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE_NAME,
                "rpc.method": "StreamRun",
                "agentrun.run_id": run_id,
            },
        )

    async def _run_trace(self, run_id: str) -> trace.SpanContext | None:
        """The span of the StartRun that started the run, when it was traced and Redis still has its mark."""
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            mark = await start_mark(self._redis, self._settings.redis_prefix, run_id)
            return telemetry.span_context_of(mark.traceparent) if mark is not None else None
        return None

    async def _link_to_run_trace(self, span: trace.Span, run_id: str, approval_id: str = "") -> None:
        """Links the call's span to the trace of the run it is about (a watcher's or approver's call has a trace of
        its own): to the span of the StartRun that started it, or to the approval's request span. Only once the run
        is known to be the caller's tenant's."""
        run_trace = await self._run_trace(run_id)
        if run_trace is None:
            return
        attributes = {"agentrun.run_id": run_id}
        if approval_id:
            span_id = telemetry.approval_span_id(run_id, approval_id)
            run_trace = trace.SpanContext(run_trace.trace_id, span_id, True, run_trace.trace_flags)
            attributes["agentrun.approval.id"] = approval_id
        span.add_link(run_trace, attributes)

    async def _stream(
        self, run_id: str, after: int, described: WorkflowExecution | None
    ) -> AsyncIterator[pb.StreamRunResponse]:
        """The run's events after ``after``; ``described`` is Temporal's record of the run when the tenant check
        has just asked for it (not asked again)."""
        async with self.relay.watch(run_id) as watch:
            if after > 0:
                # A client that reconnects gets the approval requests still waiting for
                # an answer again, even those it saw before it went away.
                for pending in await self._pending_approvals(run_id):
                    if pending.sequence <= after:
                        yield pb.StreamRunResponse(event=pending)
            if not await is_known(self._redis, self._settings.redis_prefix, run_id):
                # The run may be unknown, or ended with its stream gone: Temporal knows which.
                execution = described or await self._describe(run_id)
                if _runs.is_finished(execution):
                    for response in await self._rest_of_ended_run(execution, after):
                        yield response
                    return
            if after > 0:
                ended = await self._announced_end(run_id)
                if ended is not None and ended.sequence <= after:
                    return  # the caller has seen the whole run: no need to wait for Temporal to say it ended
            async for event in watch.follow(after):
                for response in _responses(event, after):
                    yield response
                after = event.sequence
                if is_terminal(event):
                    return
            # Temporal says the run has ended, and Redis has no terminal event for it.
            for response in await self._rest_of_ended_run(await self._describe(run_id), after):
                yield response

    async def _rest_of_ended_run(self, execution: WorkflowExecution, after: int) -> list[pb.StreamRunResponse]:
        """The responses left for a finished run: what Redis still has, and then its terminal event, rebuilt from
        Temporal's record when Redis no longer has it."""
        prefix = self._settings.redis_prefix
        responses = []
        terminal_sent = False
        while batch := await read_range(self._redis, prefix, execution.id, after, count=CATCH_UP_BATCH):
            for event in batch:
                responses += _responses(event, after)
                after = event.sequence
                terminal_sent = is_terminal(event)
        if not terminal_sent:
            terminal = await _runs.terminal_event(execution, await _runs.ended(self._temporal, execution))
            if terminal.sequence == 0:  # the run ended without publishing one (timeout, termination)
                terminal.sequence = after + 1
            if terminal.sequence > after:
                responses += _responses(terminal, after)
        return responses

    async def _pending_approvals(
        self, run_id: str, execution: WorkflowExecution | None = None, sub_runs: list[WorkflowExecution] | None = None
    ) -> list[pb.RunEvent]:
        """The approval_requested events still waiting for an answer (the sub-agents' runs' included): as published,
        from Redis, which has them the moment they are; rebuilt from the memos when Redis lost them (or is down)."""
        prefix = self._settings.redis_prefix
        try:
            pending = await pending_approvals(self._redis, prefix, run_id)
            if pending or await stream_exists(self._redis, prefix, run_id):
                return pending
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        execution = execution or await self._describe(run_id)
        if sub_runs is None:
            sub_runs = await _runs.sub_runs(self._temporal, execution)
        rebuilt = [event for run in [execution, *sub_runs] for event in await _runs.memo_pending_approvals(run)]
        return sorted(rebuilt, key=lambda event: event.sequence)

    async def _ended_runs(self, run_ids: list[str]) -> set[str]:
        """Which of ``run_ids`` have ended, per Temporal's visibility store: one query per batch of runs."""
        ended = set()
        for start in range(0, len(run_ids), ENDED_QUERY_BATCH):
            ids = ", ".join(_quoted(run_id) for run_id in run_ids[start : start + ENDED_QUERY_BATCH])
            query = f"WorkflowId IN ({ids}) AND ExecutionStatus IN ({_ENDED_STATUSES})"
            async for execution in self._temporal.list_workflows(query, page_size=ENDED_QUERY_BATCH):
                ended.add(execution.id)
        return ended

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        _check_id("run_id", request.run_id, required=True)
        execution = await self._describe(request.run_id)
        subs = await _runs.sub_runs(self._temporal, execution)  # their approvals are the run's
        if _runs.is_finished(execution):
            ended = await _runs.ended(self._temporal, execution)
            return pb.GetRunResponse(run=await _runs.to_run(execution, ended, sub_runs=subs))
        announced = await self._announced_end(execution.id)
        if announced is not None:
            return pb.GetRunResponse(run=await _runs.to_run(execution, _runs.Ended.announced(announced), sub_runs=subs))
        pending = [_with_sequence(event) for event in await self._pending_approvals(execution.id, execution, subs)]
        return pb.GetRunResponse(run=await _runs.to_run(execution, pending=pending, sub_runs=subs))

    async def CancelRun(self, request: pb.CancelRunRequest, context: Context) -> pb.CancelRunResponse:
        _check_id("run_id", request.run_id, required=True)
        if len(request.reason) > MAX_REASON_LENGTH:
            raise invalid("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        execution = await self._describe(request.run_id)
        state = await self._final_state(execution)
        if state == pb.RUN_STATE_CANCELLED:
            return pb.CancelRunResponse()  # cancelling twice is harmless
        if state is not None:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {request.run_id!r} has already ended ({pb.RunState.Name(state)})",
            )
        await from_temporal(_runs.handle(self._temporal, request.run_id).cancel(reason=request.reason))
        return pb.CancelRunResponse()

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise invalid("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        token = _temporal_page_token(request.page_token)
        # Sub-agents' runs are part of their roots'; a run that continued as new is listed once, by its latest
        # execution.
        query = (
            f"WorkflowType = {_quoted(WORKFLOW_NAME)} AND TaskQueue = {_quoted(self._settings.task_queue)} "
            "AND ParentWorkflowId IS NULL AND ExecutionStatus != 'ContinuedAsNew'"
        )
        caller = principal()
        if caller.authenticated:
            query += f" AND {TENANT_SEARCH_ATTRIBUTE} = {_quoted(caller.tenant)}"
        page = self._temporal.list_workflows(
            query,
            page_size=request.page_size or DEFAULT_PAGE_SIZE,
            next_page_token=token,
        )
        try:
            await from_temporal(page.fetch_next_page())
        except RPCError as err:
            if err.status == RPCStatusCode.INVALID_ARGUMENT:
                raise invalid("page_token", "is not a token that ListRuns returned") from None
            raise
        runs = [await _runs.to_run(execution) for execution in page.current_page or []]
        next_token = _page_token(page.next_page_token) if page.next_page_token else ""
        return pb.ListRunsResponse(runs=runs, next_page_token=next_token)

    async def ListAgents(self, request: pb.ListAgentsRequest, context: Context) -> pb.ListAgentsResponse:
        return pb.ListAgentsResponse(
            agents=[
                pb.Agent(
                    name=agent.name,
                    description=agent.description,
                    model=agent.model,
                    tools=agent.tools,
                    approval_policy=agent.approval.policy,
                    sub_agents=agent.sub_agents,
                )
                for _, agent in sorted(self._agents.items())
            ]
        )

    async def Approve(self, request: pb.ApproveRequest, context: Context) -> pb.ApproveResponse:
        _check_id("run_id", request.run_id, required=True)
        _check_id("approval_id", request.approval_id, required=True)
        decision = events.decision_from_proto(request.decision)
        if decision == Decision.PENDING:
            raise invalid("decision", "must be APPROVAL_DECISION_APPROVE or APPROVAL_DECISION_DENY")
        if len(request.reason) > MAX_REASON_LENGTH:
            raise invalid("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        if request.arguments_sha256 and not _SHA256_PATTERN.match(request.arguments_sha256):
            raise invalid("arguments_sha256", "must be 64 lowercase hexadecimal digits")
        approver = approver_of(context)
        telemetry.current_run_id.set(request.run_id)
        execution = await self._describe(request.run_id)
        if telemetry.enabled():
            await self._link_to_run_trace(trace.get_current_span(), request.run_id, request.approval_id)
        # A sub-agent's approval is answered through the root's id, and decided by the sub-agent's run, under the
        # sub-agent's approvers.
        asking = await self._asking_run(execution, request.approval_id)
        approvers: list[str] = await asking.memo_value(MEMO_APPROVERS, [], type_hint=list[str])
        if approvers and approver not in approvers:
            agent = await asking.memo_value(MEMO_AGENT, "")
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{approver!r} may not decide approvals of agent {agent!r}: only its approvers may "
                "(approval.approvers in the agents file)",
            )
        recorded = await _runs.recorded_approval(asking, request.approval_id)
        if recorded is None and not await self._is_pending_in_redis(request.run_id, request.approval_id):
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"approval {request.approval_id!r} does not exist")
        if recorded is not None and recorded.decision != Decision.PENDING:
            # A decision already recorded answers a repeated Approve even after the run has ended, so that a caller
            # who retried through an outage learns the outcome.
            if recorded.decision != decision:
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"approval {request.approval_id!r} was already decided: {recorded.decision} by {recorded.approver}",
                )
            return _approve_response(recorded)
        if await self._final_state(execution) is not None:
            raise _already_ended(request.run_id)
        answer = ApprovalAnswer(
            request.approval_id, decision, approver, request.reason, arguments_sha256=request.arguments_sha256
        )
        handle = _runs.handle(self._temporal, asking.id)
        try:
            # Temporal answers within APPROVE_ACCEPT_SECONDS when no worker takes the update; the outer bound is for a
            # Temporal that does not answer at all.
            update = await from_temporal(
                handle.start_update(
                    DECIDE_APPROVAL_UPDATE,
                    answer,
                    wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                    result_type=Approval,
                    rpc_timeout=temporal_timeout(at_most=APPROVE_ACCEPT_SECONDS),
                )
            )
            approval = await from_temporal(update.result())
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            # Temporal may still hand the update to a worker that returns, or drop it: only a retry can tell.
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"no worker took the decision for run {request.run_id!r} within {APPROVE_ACCEPT_SECONDS:g} s (is a "
                f"worker serving task queue {asking.task_queue!r}?); it may still take effect when a worker "
                "returns: send the same decision again, which is answered with the decision recorded",
            ) from None
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.type in _APPROVAL_ERRORS:
                raise ApiError(_APPROVAL_ERRORS[ErrorType(cause.type)], cause.message) from None
            raise
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:  # the run ended meanwhile
                raise _already_ended(request.run_id) from None
            raise
        return _approve_response(approval)

    async def _asking_run(self, execution: WorkflowExecution, approval_id: str) -> WorkflowExecution:
        """The workflow that asked for an approval of the run: the run's own, or one of its sub-agents' runs.

        Redis records which sub-agent's run asked the moment it asks; without that record, the memos of the run
        and of its sub-agents' runs tell. An approval that none knows yet is the run's own (see Approve).
        """
        redis_answered = False
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            asking = await approval_run(self._redis, self._settings.redis_prefix, execution.id, approval_id)
            redis_answered = True
            if asking is not None:
                return await from_temporal(_runs.handle(self._temporal, asking).describe())
        if await _runs.recorded_approval(execution, approval_id) is not None:
            return execution
        for sub in await _runs.sub_runs(self._temporal, execution):
            if await _runs.recorded_approval(sub, approval_id) is not None:
                return sub
        if not redis_answered:
            # Asked a moment ago (the memos lag Redis), by the run or by a sub-agent's run: which one cannot be told,
            # and an answer sent to the root for a sub-agent's request would leave it waiting for a request it never
            # makes.
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"Redis is unavailable, and Temporal does not know approval {approval_id!r} yet; retry later",
            )
        return execution

    async def _is_pending_in_redis(self, run_id: str, approval_id: str) -> bool:
        # Redis knows a request the moment it is published; the memo a moment later.
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            return await is_pending_approval(self._redis, self._settings.redis_prefix, run_id, approval_id)
        return False

    async def _announced_end(self, run_id: str) -> pb.RunEvent | None:
        """The run's terminal event when its stream has it.

        The workflow publishes its terminal event a moment before Temporal records the end, and the stream sends
        it at once: a client that saw it must find the run ended in every call it makes next. Without Redis, only
        Temporal's record counts.
        """
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            last = await last_event(self._redis, self._settings.redis_prefix, run_id)
            if last is not None and is_terminal(last):
                return last
        return None

    async def _final_state(self, execution: WorkflowExecution) -> pb.RunState.ValueType | None:
        """How the run ended, by Temporal's record or by its announced end; None while it goes on."""
        if _runs.is_finished(execution):
            return _runs.state(execution)
        announced = await self._announced_end(execution.id)
        return _runs.Ended.announced(announced).state if announced is not None else None

    async def _find(self, run_id: str) -> WorkflowExecution | None:
        """The run's workflow execution; None when there is no run with this id."""
        try:
            execution = await from_temporal(_runs.handle(self._temporal, run_id).describe())
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        return execution if _runs.is_agent_run(execution) else None

    async def _describe(self, run_id: str) -> WorkflowExecution:
        """The caller's run; NOT_FOUND when there is none, or when it is another tenant's (the same answer, so that
        nobody learns which ids another tenant uses)."""
        execution = await self._find(run_id)
        if execution is None or await execution.memo_value(MEMO_TENANT, "") != principal().tenant:
            raise _no_such_run(run_id)
        return execution


def _no_such_run(run_id: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"run {run_id!r} does not exist")


def approver_of(context: Context) -> str:
    """Who is calling Approve: the one place that reads the approver's identity.

    The authenticated subject; without authentication (loopback dev and tests), the name in the request metadata.
    Never the server's own names (``agentrun:timeout``).
    """
    caller = principal()
    if caller.authenticated:
        return caller.subject  # never a reserved name: authentication refuses those
    for key, value in context.invocation_metadata() or ():
        if key == APPROVER_METADATA and isinstance(value, str) and value.strip():
            if len(value) > MAX_ID_LENGTH:
                raise invalid(APPROVER_METADATA, f"must be at most {MAX_ID_LENGTH} characters")
            if is_reserved(value.strip()):
                raise invalid(APPROVER_METADATA, f"names starting with {RESERVED_PREFIX!r} are the server's own")
            return value.strip()
    raise ApiError(
        grpc.StatusCode.UNAUTHENTICATED, f"Approve needs the approver's identity in the {APPROVER_METADATA} metadata"
    )


def _run_id(secret: str | None, tenant: str, request_id: str) -> str:
    """The run id of a request_id: the same for every replica and every retry, and, under the server's secret,
    one that nobody without it can work out for another tenant. Without a secret (no authentication, so one
    tenant) it is the digest it has always been."""
    if secret is None:
        return "run-" + hashlib.sha256(request_id.encode()).hexdigest()[:32]
    keyed = hmac.new(secret.encode(), f"{tenant}\0{request_id}".encode(), hashlib.sha256)
    return "run-" + keyed.hexdigest()[:32]


def _responses(event: pb.RunEvent, after: int) -> list[pb.StreamRunResponse]:
    """The event for a client that has seen up to ``after``; first an events_lost for numbers it cannot get."""
    responses = []
    if event.sequence > after + 1:
        responses.append(pb.StreamRunResponse(event=events.events_lost(after + 1, event.sequence - 1)))
    responses.append(pb.StreamRunResponse(event=event))
    return responses


def _with_sequence(event: pb.RunEvent) -> pb.ApprovalRequested:
    """The approval request of an approval_requested event, carrying the event's sequence (as GetRun shows it)."""
    requested = pb.ApprovalRequested()
    requested.CopyFrom(event.approval_requested)
    requested.sequence = event.sequence
    return requested


def _approve_response(approval: Approval) -> pb.ApproveResponse:
    return pb.ApproveResponse(
        decision=events.decision_to_proto(approval.decision), approver=approval.approver, reason=approval.reason
    )


def _already_ended(run_id: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"run {run_id!r} has already ended")


def _request_digest(request: pb.StartRunRequest) -> str:
    """What a StartRun asks for, apart from its request_id: a duplicate asks for the same."""
    asked = "\0".join([request.agent, request.input, request.conversation_id])
    return hashlib.sha256(asked.encode()).hexdigest()[:32]


def _check_same_request(mark: StartMark | None, digest: str, run_id: str) -> None:
    """ALREADY_EXISTS when the run of this request_id was started by another request (agent, input or conversation).

    Only while Redis keeps the run's start mark (as long as its stream); runs marked before digests were kept pass.
    """
    if mark is None or not mark.request_digest or not digest or mark.request_digest == digest:
        return
    raise ApiError(
        grpc.StatusCode.ALREADY_EXISTS,
        f"request_id: {run_id} was started with it by another request (agent, input or conversation differ); "
        "a new request needs a new request_id",
    )


def _page_token(temporal_token: bytes) -> str:
    """ListRuns' page token: Temporal's, behind a digest of it."""
    return base64.urlsafe_b64encode(_page_digest(temporal_token) + temporal_token).decode()


def _temporal_page_token(page_token: str) -> bytes | None:
    """Temporal's page token inside ours; INVALID_ARGUMENT for anything ListRuns did not return.

    Temporal answers a token it cannot parse with UNKNOWN, which its client retries for seconds: garbage must never
    reach it. The digest is no secret; it tells a token we made from any other string.
    """
    if not page_token:
        return None
    try:
        # Strict: the lenient decoder drops characters outside the alphabet, so " " or "*" became no token at all.
        raw = base64.b64decode(page_token, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    digest, token = raw[:_PAGE_DIGEST_SIZE], raw[_PAGE_DIGEST_SIZE:]
    if len(page_token) > MAX_PAGE_TOKEN_LENGTH or not token or digest != _page_digest(token):
        raise invalid("page_token", "is not a token that ListRuns returned")
    return token


def _page_digest(token: bytes) -> bytes:
    return hashlib.blake2b(token, digest_size=_PAGE_DIGEST_SIZE, person=b"agentrun:runs:v1").digest()


def _check_id(field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            raise invalid(field, "must not be empty")
        return
    if len(value) > MAX_ID_LENGTH or not ID_PATTERN.fullmatch(value):
        raise invalid(field, f"must be 1 to {MAX_ID_LENGTH} characters of {ID_CHARACTERS}")


def _quoted(value: str) -> str:
    """A string literal of a Temporal visibility query. Ids and tenants keep to ID_PATTERN, which has no quote or
    backslash, but a query is no place to rely on that."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials; with a client CA, every caller must present a certificate it signed (gRPC
    verifies a client certificate only when it requires one)."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise AuthConfigError("AGENTRUN_TLS_CLIENT_CA needs AGENTRUN_TLS_CERT and AGENTRUN_TLS_KEY")
        return None
    try:
        files = [settings.tls_key, settings.tls_cert, settings.tls_client_ca]
        key, cert, client_ca = (Path(path).read_bytes() if path else None for path in files)
    except OSError as err:
        raise AuthConfigError(f"cannot read a TLS file ({err.filename}): {err.strerror}") from None
    if key is None or cert is None:
        raise AuthConfigError("AGENTRUN_TLS_CERT and AGENTRUN_TLS_KEY go together")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca))


async def _check_tenant_attribute(temporal: Client, namespace: str) -> None:
    """AuthConfigError when the namespace lacks the search attribute that tenants' runs carry: every StartRun would
    fail. A Temporal that does not let this server ask (Temporal Cloud's API keys may not) is trusted to have it."""
    try:
        listed = await temporal.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace), timeout=timedelta(seconds=10)
        )
    except RPCError as err:
        if err.status not in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNIMPLEMENTED):
            raise
        log.warning("could not check that namespace %r has the search attribute %s", namespace, TENANT_SEARCH_ATTRIBUTE)
        return
    if TENANT_SEARCH_ATTRIBUTE not in listed.custom_attributes:
        raise AuthConfigError(
            f"the Temporal namespace {namespace!r} lacks the search attribute {TENANT_SEARCH_ATTRIBUTE} that "
            f"tenants' runs carry: temporal operator search-attribute create --namespace {namespace} --name "
            f"{TENANT_SEARCH_ATTRIBUTE} --type Keyword"
        )


async def serve(
    settings: Settings,
    *,
    port: int = 50051,
    host: str = "127.0.0.1",
    temporal: Client | None = None,
    redis_client: redis.Redis | None = None,
    insecure: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Starts the server; port 0 picks a free port. Returns the server and its port; stop it with ``shutdown``.

    Without authentication settings the server authenticates no one, and with them but without TLS the tokens
    travel in plaintext: either way it listens only on a loopback address unless ``insecure`` says that this is
    meant. AuthConfigError names a setting that is missing or unreadable.
    """
    authenticator = Authenticator.from_settings(settings)
    credentials = _credentials(settings)
    if authenticator is None and not insecure and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to listen on {host} without authentication: set AGENTRUN_AUTH_JWKS (with AGENTRUN_AUTH_ISSUER "
            "and AGENTRUN_AUTH_AUDIENCE) or AGENTRUN_TLS_CLIENT_CA, or pass --insecure to let anyone who can reach "
            "the port read, start, approve and cancel every run"
        )
    if authenticator is not None and credentials is None and not insecure and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to listen on {host} in plaintext with authentication: tokens would cross the network readable "
            "by anyone on the way; set AGENTRUN_TLS_CERT and AGENTRUN_TLS_KEY, or pass --insecure if something "
            "in front of the server (a mesh, a proxy) encrypts the traffic"
        )
    if authenticator is not None and not settings.run_id_secret:
        raise AuthConfigError(
            "AGENTRUN_RUN_ID_SECRET is needed with authentication: run ids are keyed with it so that no tenant can "
            "work out another's (give every replica the same long random value)"
        )
    agents = load_agents(settings.agents_file)
    temporal = temporal or await connect_temporal(settings)
    if authenticator is not None:
        await _check_tenant_attribute(temporal, settings.temporal_namespace)
    redis_client = redis_client or connect_redis(settings, name=REDIS_CLIENT_NAME, wait_out_outages=False)
    # Authentication first: a caller it refuses reaches nothing else, not even the request's decoding.
    interceptors: list[grpc.aio.ServerInterceptor] = [Authentication(authenticator), ErrorMapping()]
    if telemetry.enabled() and "grpc" not in telemetry.disabled_instrumentations():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        # Outermost, so that its span sees the status that ErrorMapping gives each error. AgentService's calls
        # only: StreamRun makes its own span, and health checks and reflection are not requests anyone follows.
        traced = filters.all_of(filters.service_name(SERVICE_NAME), filters.negate(filters.method_name("StreamRun")))
        interceptors.insert(0, aio_server_interceptor(filter_=traced))  # type: ignore[no-untyped-call]
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    service = AgentService(settings, temporal, redis_client, agents)
    pb_grpc.add_AgentServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _reflection.enable(server, [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    try:
        address = f"{host}:{port}"
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # gRPC's error when the port is taken
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the address is in use or not available")
    await service.relay.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _RUNNING[server] = (health_servicer, service.relay, authenticator)
    log.info(
        "AgentService listening on %s:%d (task queue %r; %s; %s)",
        host,
        bound,
        settings.task_queue,
        "TLS" if credentials else "plaintext",
        "callers authenticated" if authenticator else "NO authentication",
    )
    return server, bound


# What shutdown() needs of each server that serve() started.
_RUNNING: dict[grpc.aio.Server, tuple[health.aio.HealthServicer, StreamRelay, Authenticator | None]] = {}


async def shutdown(server: grpc.aio.Server, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
    """Stops the server the documented way: health says NOT_SERVING, open streams end at once with UNAVAILABLE (a
    client resumes on another replica), and unary calls in flight get ``grace`` seconds to finish."""
    health_servicer, relay, authenticator = _RUNNING.pop(server)
    await health_servicer.enter_graceful_shutdown()
    await relay.close()
    await server.stop(grace)
    if authenticator is not None:
        await authenticator.close()


async def run_server(
    settings: Settings, *, port: int, host: str, stop: asyncio.Event | None = None, insecure: bool = False
) -> None:
    stop = stop or stop_on_signals()
    telemetry.setup("agentrun-server")
    server, _ = await serve(settings, port=port, host=host, insecure=insecure)
    await stop.wait()
    log.info("server shutting down")
    await shutdown(server)
    telemetry.shutdown()
