"""The Python client library of agentrun: a thin, typed layer over the generated gRPC stubs that fails over
between server replicas."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from agentrun.v1 import agent_service_pb2 as pb
from agentrun.v1 import agent_service_pb2_grpc as pb_grpc

TERMINAL_KINDS = frozenset({"run_completed", "run_failed", "run_cancelled"})
# A server without authentication (loopback dev) takes Approve's approver from this metadata key; one that
# authenticates records the caller's own identity and ignores it.
APPROVER_METADATA = "x-agentrun-approver"
RETRY_BUDGET_SECONDS = 60.0

# The codes that say the server or the connection went away rather than answering the request. UNAVAILABLE: nothing
# listens at the address ("failed to connect to all addresses"), the server's process died mid-call ("Stream removed
# (Socket closed)" when it is SIGKILLed), or it stopped and ended the calls still open ("Cancelling all calls").
# CANCELLED that this client did not ask for (its own cancellations raise asyncio.CancelledError): gRPC on the server
# shed the call before any handler saw it, as it does when more calls arrive at once than it queues. Every other
# code is an answer that another replica would repeat; INTERNAL in particular also means a bug on the server.
_FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 2.0
# gRPC waits up to two minutes between attempts to reconnect to an address that keeps failing, during which every
# call there fails at once; a replica that comes back should be used within our own backoff instead. Keepalive
# pings find a server whose host vanished without closing the connection, which would otherwise leave an open
# stream waiting forever (the server accepts a ping every 10 s).
_CHANNEL_OPTIONS = [
    ("grpc.max_reconnect_backoff_ms", int(_MAX_BACKOFF_SECONDS * 1000)),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

_T = TypeVar("_T")


class _BearerToken:
    """Sends ``authorization: Bearer <token>`` with every call; ``token`` may be a function, called for every
    call, so that a program can hand over a token it refreshes."""

    def __init__(self, token: str | Callable[[], str]) -> None:
        self._token = token

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        token = self._token() if callable(self._token) else self._token
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", f"Bearer {token}")
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# gRPC files an interceptor under the first kind of call it implements: each kind needs an object of its own.
class _UnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


class _StreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)


def tls_credentials(
    *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: trusting ``ca_file`` (PEM; the system's CAs when None), and presenting the client
    certificate in ``cert_file`` with its key in ``key_file`` to a server that requires one (mutual TLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


class RunEndedError(Exception):
    """A run ended without an answer; ``event`` is its terminal event."""

    def __init__(self, run_id: str, event: pb.RunEvent) -> None:
        if event.HasField("run_cancelled"):
            ending = f"was cancelled: {event.run_cancelled.reason}" if event.run_cancelled.reason else "was cancelled"
        else:
            ending = f"failed: {event.run_failed.error}"
        super().__init__(f"run {run_id} {ending}")
        self.run_id = run_id
        self.event = event


class RunFailedError(RunEndedError):
    """A run failed; ``event.run_failed.error`` says why."""


class RunCancelledError(RunEndedError):
    """A run was cancelled; ``event.run_cancelled.reason`` says why, when the canceller gave a reason."""


class _Retries:
    """The waits between one call's attempts: exponential backoff with jitter, within a budget of time."""

    def __init__(self, budget_seconds: float) -> None:
        self._budget_seconds = budget_seconds
        self.restart()

    def restart(self) -> None:
        """The call made progress: the next failure starts again with a short wait and the whole budget."""
        self._backoff = _FIRST_BACKOFF_SECONDS
        self._deadline = time.monotonic() + self._budget_seconds

    def spent(self) -> bool:
        return time.monotonic() >= self._deadline

    async def wait(self) -> None:
        # Full jitter: the clients of a replica that died do not all come back to the next one in step.
        delay = random.uniform(0, self._backoff)
        await asyncio.sleep(min(delay, max(0.0, self._deadline - time.monotonic())))
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF_SECONDS)


class AgentRunClient:
    """Calls agentrun servers. Use as ``async with AgentRunClient("localhost:50051") as client``.

    ``target`` is one server address or several replicas: a list, or one string with commas
    (``"10.0.0.1:50051,10.0.0.2:50051"``). A call that fails with UNAVAILABLE (the server or the connection went
    away) moves to the next address and tries again, with exponential backoff and jitter between attempts, until
    ``retry_budget_seconds`` are spent; then it raises the last error. Every other error is raised at once. Each
    call retries only what is safe to repeat: see the methods. A single DNS name that resolves to several addresses
    works as well without a list: gRPC's resolver connects to one of them and to another when that one fails, and
    these retries come on top.

    With ``channel``, the client makes its calls on that channel alone (no list to fail over to, but UNAVAILABLE is
    still retried there) and closes it on ``close()``. Otherwise it opens one channel per address on first use, with
    ``interceptors`` on each: to trace the calls, pass OpenTelemetry's, which send the W3C trace context to the
    server (``opentelemetry.instrumentation.grpc.aio_client_interceptors()``, from the
    ``opentelemetry-instrumentation-grpc`` package; the client itself needs no OpenTelemetry).
    ``on_retry`` is called with each error that is retried, before the wait, so that a program can tell its user.

    ``token`` (a string, or a function that returns the current one) goes with every call as
    ``authorization: Bearer <token>``; ``credentials`` makes the channels TLS (see ``tls_credentials``). A token
    over a plaintext channel is seen by anyone on the way: outside loopback, use TLS. Both apply to the channels
    the client opens; a ``channel`` given brings its own.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        retry_budget_seconds: float = RETRY_BUDGET_SECONDS,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        on_retry: Callable[[grpc.aio.AioRpcError], None] | None = None,
        token: str | Callable[[], str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._interceptors = list(interceptors) + ([_UnaryToken(token), _StreamToken(token)] if token else [])
        self._credentials = credentials
        self.on_retry = on_retry
        self.targets: tuple[str, ...] = () if channel is not None else _addresses(target)
        self.retry_budget_seconds = retry_budget_seconds
        self._channels: dict[int, grpc.aio.Channel] = {} if channel is None else {0: channel}
        self._stubs: dict[int, pb_grpc.AgentServiceAsyncStub] = {}
        self._current = 0  # the address that answered last: calls go there first

    async def __aenter__(self) -> AgentRunClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the address in use now. Calls made on it directly do not fail over."""
        return self._channel(self._current)

    @property
    def stub(self) -> pb_grpc.AgentServiceAsyncStub:
        """The generated stub over ``channel``. Calls made on it directly do not fail over."""
        return self._stub(self._current)

    async def start_run(self, agent: str, input: str, *, conversation_id: str = "", request_id: str = "") -> str:
        """Starts a run and returns its id.

        Every start carries a ``request_id``, a new one when none is given, so that a retry after an answer lost on
        the way returns the run the first attempt started instead of starting a second. Give your own to make your
        own retries safe as well (the same ``request_id`` always returns the same run).
        """
        request = pb.StartRunRequest(
            agent=agent, input=input, conversation_id=conversation_id, request_id=request_id or uuid.uuid4().hex
        )
        return (await self._call(lambda stub: stub.StartRun(request))).run_id

    async def stream_run(self, run_id: str, *, after_sequence: int = 0) -> AsyncGenerator[pb.RunEvent]:
        """Yields the run's events after ``after_sequence``, up to and including its terminal event.

        When the server or the connection goes away, the stream resumes after the last event it yielded, on the next
        address, so every event comes once and in order. The retry budget starts again with every event: a stream
        that makes progress never runs out. After a resume, approval requests that still wait for an answer come
        again first, with their original (older) sequence numbers; tell them apart by ``approval_id``.
        """
        retries = _Retries(self.retry_budget_seconds)
        while True:
            index = self._current
            call = self._stub(index).StreamRun(pb.StreamRunRequest(run_id=run_id, after_sequence=after_sequence))
            try:
                async for response in call:
                    event = response.event
                    # The repeated approval requests of a resumed stream carry older sequence numbers; resuming
                    # from one of those again would repeat the events after it.
                    after_sequence = max(after_sequence, event.sequence)
                    retries.restart()
                    yield event
                    if event.WhichOneof("kind") in TERMINAL_KINDS:
                        return
                return
            except grpc.aio.AioRpcError as err:
                await self._fail_over(index, err, retries)
            finally:
                # A caller that stops reading early must not leave the server streaming to nobody.
                call.cancel()

    async def run(self, agent: str, input: str, *, conversation_id: str = "", request_id: str = "") -> pb.RunCompleted:
        """Starts a run and waits for its answer.

        Raises ``RunFailedError`` or ``RunCancelledError`` (both ``RunEndedError``) when the run ends without one.
        """
        run_id = await self.start_run(agent, input, conversation_id=conversation_id, request_id=request_id)
        async for event in self.stream_run(run_id):
            if event.HasField("run_completed"):
                return event.run_completed
            if event.HasField("run_cancelled"):
                raise RunCancelledError(run_id, event)
            if event.HasField("run_failed"):
                raise RunFailedError(run_id, event)
        raise RunFailedError(run_id, pb.RunEvent(run_failed=pb.RunFailed(error="the stream ended without a result")))

    async def get_run(self, run_id: str) -> pb.Run:
        request = pb.GetRunRequest(run_id=run_id)
        return (await self._call(lambda stub: stub.GetRun(request))).run

    async def cancel_run(self, run_id: str, *, reason: str = "") -> None:
        """Asks the run to stop; retried like every call, since cancelling a cancelled run is no error."""
        request = pb.CancelRunRequest(run_id=run_id, reason=reason)
        await self._call(lambda stub: stub.CancelRun(request))

    async def list_runs(self, *, page_size: int = 0, page_token: str = "") -> pb.ListRunsResponse:
        request = pb.ListRunsRequest(page_size=page_size, page_token=page_token)
        return await self._call(lambda stub: stub.ListRuns(request))

    async def list_agents(self) -> list[pb.Agent]:
        """The agents that ``start_run`` accepts, by name."""
        return list((await self._call(lambda stub: stub.ListAgents(pb.ListAgentsRequest()))).agents)

    async def approve(
        self,
        run_id: str,
        approval_id: str,
        decision: pb.ApprovalDecision.ValueType,
        *,
        reason: str = "",
        approver: str = "",
        arguments_sha256: str = "",
    ) -> pb.ApproveResponse:
        """Answers a pending approval and returns the decision the run recorded.

        A server that authenticates records the caller (the token's or certificate's subject) as the approver;
        ``approver`` is the name a server without authentication records instead.
        Pass the request's ``arguments_sha256`` to make sure the decision applies to exactly the arguments shown.
        A retry is safe: deciding again with the same decision is answered with the recorded one.
        """
        request = pb.ApproveRequest(
            run_id=run_id, approval_id=approval_id, decision=decision, reason=reason, arguments_sha256=arguments_sha256
        )
        metadata = ((APPROVER_METADATA, approver),) if approver else ()
        return await self._call(lambda stub: stub.Approve(request, metadata=metadata))

    async def _call(self, call: Callable[[pb_grpc.AgentServiceAsyncStub], Awaitable[_T]]) -> _T:
        """Makes a unary call with failover. Only for calls that are safe to repeat: an attempt that failed may
        have reached a server that did the work and died before it answered."""
        retries = _Retries(self.retry_budget_seconds)
        while True:
            index = self._current
            try:
                return await call(self._stub(index))
            except grpc.aio.AioRpcError as err:
                await self._fail_over(index, err, retries)

    async def _fail_over(self, index: int, err: grpc.aio.AioRpcError, retries: _Retries) -> None:
        """Moves on from the address at ``index`` and waits before the next attempt, or raises ``err`` when it is
        no failover code or the budget is spent."""
        if err.code() not in _FAILOVER_CODES or retries.spent():
            raise err
        # Calls that fail at the same address together move on once, not once each: with two addresses, a second
        # move would lead back to the one that failed.
        if index == self._current:
            self._current = (index + 1) % (len(self.targets) or 1)  # a given channel is the only one
        if self.on_retry is not None:
            self.on_retry(err)
        await retries.wait()

    def _channel(self, index: int) -> grpc.aio.Channel:
        if index not in self._channels:
            interceptors = self._interceptors or None
            if self._credentials is not None:
                self._channels[index] = grpc.aio.secure_channel(
                    self.targets[index], self._credentials, options=_CHANNEL_OPTIONS, interceptors=interceptors
                )
            else:
                self._channels[index] = grpc.aio.insecure_channel(
                    self.targets[index], options=_CHANNEL_OPTIONS, interceptors=interceptors
                )
        return self._channels[index]

    def _stub(self, index: int) -> pb_grpc.AgentServiceAsyncStub:
        if index not in self._stubs:
            self._stubs[index] = pb_grpc.AgentServiceStub(self._channel(index))
        return self._stubs[index]


def _addresses(target: str | Sequence[str]) -> tuple[str, ...]:
    addresses = tuple(part.strip() for part in (target.split(",") if isinstance(target, str) else target))
    if not addresses or not all(addresses):
        raise ValueError(f"server addresses must not be empty: {target!r}")
    return addresses
