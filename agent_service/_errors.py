"""The one place where an exception becomes a gRPC status: no call ever answers UNKNOWN.

Handlers raise ``ApiError`` for a request that cannot be served as asked; an outage of Temporal or Redis
becomes UNAVAILABLE naming the dependency; anything else is INTERNAL, logged once with its traceback, and the
caller gets an id to quote instead of Python's exception text.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import grpc
import redis.exceptions
from google.protobuf.any_pb2 import Any as ProtoAny
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from temporalio.client import RPCTimeoutOrCancelledError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from agent_service._relay import RelayUnavailable

log = logging.getLogger("agentrun.server")
_T = TypeVar("_T")

if TYPE_CHECKING:  # the stubs make these generic; at run time they are plain classes
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


class ApiError(Exception):
    """A request answered with a status other than OK; the message is fit for the caller.

    ``retry_after`` (seconds) goes to the caller as a google.rpc.RetryInfo detail too, for clients that read it.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


# When the call being served must be answered by (monotonic clock), so that calls to Temporal give up in time
# to answer UNAVAILABLE rather than let the caller's deadline pass.
_DEADLINE: ContextVar[float] = ContextVar("deadline")
# Temporal calls of a request without a deadline give up after this long.
DEFAULT_TEMPORAL_TIMEOUT_SECONDS = 10.0
# The share of the caller's time kept back to send the answer after a Temporal call gave up (at most half a second).
_ANSWER_MARGIN = 0.1


def temporal_timeout(at_most: float = DEFAULT_TEMPORAL_TIMEOUT_SECONDS) -> timedelta:
    """How long a Temporal call made for the current request may take."""
    deadline = _DEADLINE.get(None)
    if deadline is None:
        return timedelta(seconds=at_most)
    left = deadline - time.monotonic()
    left -= min(0.5, left * _ANSWER_MARGIN)
    return timedelta(seconds=max(0.01, min(left, at_most)))


async def from_temporal(call: Awaitable[_T], *, at_most: float = DEFAULT_TEMPORAL_TIMEOUT_SECONDS) -> _T:
    """Awaits a call to Temporal for as long as the current request allows.

    The SDK retries a Temporal it cannot reach for about ten seconds whatever timeout the call was given, so the
    bound is kept here: past it the caller hears UNAVAILABLE naming Temporal, before its own deadline passes.
    """
    try:
        async with asyncio.timeout(temporal_timeout(at_most).total_seconds()):
            return await call
    except TimeoutError:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, "Temporal did not answer in time; retry later") from None


def _remember_deadline(context: Context) -> None:
    remaining = context.time_remaining()
    if remaining is not None:
        _DEADLINE.set(time.monotonic() + remaining)


def invalid(field: str, problem: str) -> ApiError:
    """INVALID_ARGUMENT naming the field and what is wrong with it."""
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def status_of(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a caller sees for an exception."""
    if isinstance(err, ApiError):
        return err.code, err.message
    if isinstance(err, RPCError):
        if err.status == RPCStatusCode.RESOURCE_EXHAUSTED:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "Temporal is overloaded; retry later"
        return grpc.StatusCode.UNAVAILABLE, f"Temporal is unavailable ({err.status.name}); retry later"
    if isinstance(err, RPCTimeoutOrCancelledError | WorkflowUpdateRPCTimeoutOrCancelledError):
        return grpc.StatusCode.UNAVAILABLE, "Temporal did not answer in time; retry later"
    if isinstance(err, redis.exceptions.ConnectionError) and isinstance(err.__cause__, TimeoutError):
        # redis-py's blocking pool had no connection free in time: this server is busy, Redis may well be fine.
        return grpc.StatusCode.UNAVAILABLE, "the server is busy (no Redis connection came free in time); retry later"
    if isinstance(err, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, "Redis is unavailable; retry later"
    if isinstance(err, RelayUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"{err}; resume the stream (on another server if there is one)"
    incident = uuid.uuid4().hex[:12]
    log.exception("internal error %s", incident, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error {incident}; the server log has the details"


async def abort(context: Context, err: Exception) -> NoReturn:
    """Ends the call with the status of ``err``; a retry delay travels as a RetryInfo detail (rich status)."""
    code, message = status_of(err)
    if isinstance(err, ApiError) and err.retry_after is not None:
        delay = Duration()
        delay.FromTimedelta(timedelta(seconds=err.retry_after))
        detail = ProtoAny()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
        await context.abort(code, message, status.trailing_metadata)
    await context.abort(code, message)


class _Undecodable:
    """What a request whose bytes are no message of the method's request type decodes to."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, returning _Undecodable instead of raising.

    gRPC answers a request it cannot decode with a bare status and logs a traceback at ERROR each time: a log flood
    that anyone can cause. Decoding here lets the handler answer INVALID_ARGUMENT and log one line.
    """
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or whatever else malformed bytes make it raise
            return _Undecodable()

    return decode


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        log.warning("refused a request to %s whose bytes are no valid request message", method)
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is no valid message for {method}")


def _unary(behavior: UnaryBehavior, method: str) -> UnaryBehavior:
    async def wrapped(request: Any, context: Context) -> Any:
        _remember_deadline(context)
        try:
            _check_decoded(request, method)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler chose its status itself
        except Exception as err:
            await abort(context, err)

    return wrapped


def _streaming(behavior: StreamBehavior, method: str) -> StreamBehavior:
    async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
        _remember_deadline(context)
        try:
            _check_decoded(request, method)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise  # the handler chose its status itself
        except Exception as err:
            await abort(context, err)

    return wrapped


class ErrorMapping(grpc.aio.ServerInterceptor):
    """Maps what a handler raises to a status, for every method of the server."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # The stubs describe the synchronous server; under grpc.aio the behaviors are coroutine functions.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(cast(UnaryBehavior, handler.unary_unary), method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(cast(StreamBehavior, handler.unary_stream), method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
