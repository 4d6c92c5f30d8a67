"""Requests an attacker or a broken client sends: each gets a prompt, clear answer, and none floods the log."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_service.server import MAX_INPUT_BYTES
from agentrun.v1 import agent_service_pb2 as pb
from tests.agent_service.test_runs import collect
from tests.conftest import AuthStack, Stack, details

SERVICE = "/agentrun.v1.AgentService/"
UNARY = ["StartRun", "GetRun", "ListRuns", "CancelRun", "Approve", "ListAgents"]
# A malformed request is answered at once: no dependency is asked, nothing is retried.
PROMPT_SECONDS = 2.0
# What a hostile request may get; never UNKNOWN or INTERNAL.
EXPECTED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
}


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The server runs in the test's process: its log (and gRPC's) is captured here."""
    caplog.set_level(logging.WARNING)
    return caplog


def no_tracebacks(log: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in log.records if r.exc_info or r.levelno >= logging.ERROR] == []


@pytest.fixture
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.address) as opened:
        yield opened


async def raw_call(
    channel: grpc.aio.Channel, method: str, body: bytes, token: str | None = None
) -> tuple[grpc.StatusCode, str, float]:
    """Sends ``body`` as the request of ``method``, as any client could, and returns the status and the time taken."""
    started = time.monotonic()
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    try:
        # No serializers: the bytes go out as they are, and the replies come back as bytes.
        if method == "StreamRun":
            stream = cast("grpc.aio.UnaryStreamMultiCallable[bytes, bytes]", channel.unary_stream(SERVICE + method))
            async for _ in stream(body, timeout=10, metadata=metadata):
                pass
        else:
            unary = cast("grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]", channel.unary_unary(SERVICE + method))
            await unary(body, timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as err:
        return err.code(), details(err), time.monotonic() - started
    return grpc.StatusCode.OK, "", time.monotonic() - started


@pytest.mark.parametrize("method", [*UNARY, "StreamRun"])
async def test_undecodable_bytes_are_invalid_argument_logged_once_without_traceback(
    channel: grpc.aio.Channel, server_log: pytest.LogCaptureFixture, method: str
) -> None:
    # A field 1 of wire type "length-delimited" whose length runs past the end of the message.
    code, message, took = await raw_call(channel, method, b"\x0a\xff\xff\x03garbage")

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == f"the request is no valid message for {SERVICE}{method}"
    assert took < PROMPT_SECONDS
    no_tracebacks(server_log)
    assert sum("no valid request message" in r.getMessage() for r in server_log.records) == 1


@pytest.mark.parametrize("token", [" ", "*", "%%%", "not a token", "Z2FyYmFnZQ==", "=" * 8, "A" * 5000])
async def test_a_malformed_page_token_is_invalid_argument_at_once(stack: Stack, token: str) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.stub.ListRuns(pb.ListRunsRequest(page_token=token))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(raised.value) == "page_token: is not a token that ListRuns returned"
    assert time.monotonic() - started < PROMPT_SECONDS


@pytest.mark.parametrize("field", ["request_id", "conversation_id"])
async def test_an_id_ending_in_a_newline_is_refused(stack: Stack, field: str) -> None:
    request = pb.StartRunRequest(agent="assistant", input="hi", **{field: "abc\n"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.stub.StartRun(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(raised.value).startswith(f"{field}:")


async def test_a_huge_agent_name_is_refused_without_being_echoed(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stack.client.stub.StartRun(pb.StartRunRequest(agent="a" * 20_000, input="hi"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(raised.value).startswith("agent:") and len(details(raised.value)) < 200


async def test_an_input_at_the_limit_completes_its_run(stack: Stack) -> None:
    key = stack.model.script({"text": "read it all"})
    prompt = f"{key} " + "x" * (MAX_INPUT_BYTES - len(key) - 1)
    assert len(prompt.encode()) == MAX_INPUT_BYTES

    events = await collect(stack, await stack.client.start_run("assistant", prompt))

    assert events[-1].run_completed.output == "read it all"
    assert stack.model.server.requests_for(key)[0]["messages"][-1]["content"] == prompt


def fuzzed(request_type: type[Message]) -> st.SearchStrategy[Message]:
    """Requests of one type with arbitrary values in every field the hostile caller controls."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for descriptor in request_type.DESCRIPTOR.fields:
        if descriptor.type == descriptor.TYPE_STRING:
            fields[descriptor.name] = st.text(max_size=300) | st.sampled_from(["", " ", "run-x", "assistant", "\n"])
        elif descriptor.type in (descriptor.TYPE_INT32, descriptor.TYPE_INT64, descriptor.TYPE_ENUM):
            fields[descriptor.name] = st.integers(-(2**31), 2**31 - 1)
        elif descriptor.type == descriptor.TYPE_BOOL:
            fields[descriptor.name] = st.booleans()
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: request_type(**values))


REQUEST_TYPES = {
    "StartRun": pb.StartRunRequest,
    "GetRun": pb.GetRunRequest,
    "ListRuns": pb.ListRunsRequest,
    "CancelRun": pb.CancelRunRequest,
    "Approve": pb.ApproveRequest,
    "StreamRun": pb.StreamRunRequest,
    "ListAgents": pb.ListAgentsRequest,
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
async def test_fuzzed_requests_never_get_unknown_or_internal(
    channel: grpc.aio.Channel, server_log: pytest.LogCaptureFixture, data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(sorted(REQUEST_TYPES)), label="method")
    request = data.draw(fuzzed(REQUEST_TYPES[method]), label="request")
    if method == "StartRun" and request.agent == "assistant" and request.input.strip():  # type: ignore[attr-defined]
        request.input = "fuzz"  # type: ignore[attr-defined]  # a valid start runs a real run: keep it short

    code, message, took = await raw_call(channel, method, request.SerializeToString())

    assert code in EXPECTED_CODES | {grpc.StatusCode.OK}, (code, message)
    assert code == grpc.StatusCode.OK or took < PROMPT_SECONDS
    no_tracebacks(server_log)


@FUZZ
@given(method=st.sampled_from(sorted(REQUEST_TYPES)), body=st.binary(max_size=200))
async def test_fuzzed_bytes_never_get_unknown_or_internal(
    channel: grpc.aio.Channel, server_log: pytest.LogCaptureFixture, method: str, body: bytes
) -> None:
    code, message, took = await raw_call(channel, method, body)

    assert code in EXPECTED_CODES | {grpc.StatusCode.OK}, (code, message)
    assert code == grpc.StatusCode.OK or took < PROMPT_SECONDS
    no_tracebacks(server_log)


@pytest.fixture
async def auth_channel(auth_stack: AuthStack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(auth_stack.address) as opened:
        yield opened


# Printable ASCII: what gRPC lets a client put in a metadata value at all.
_TOKENS = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_fuzzed_requests_and_tokens_to_an_authenticated_server_never_get_unknown_or_internal(
    auth_stack: AuthStack, auth_channel: grpc.aio.Channel, server_log: pytest.LogCaptureFixture, data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(sorted(REQUEST_TYPES)), label="method")
    request = data.draw(fuzzed(REQUEST_TYPES[method]), label="request")
    if method == "StartRun" and request.agent == "assistant" and request.input.strip():  # type: ignore[attr-defined]
        request.input = "fuzz"  # type: ignore[attr-defined]
    valid = auth_stack.issuer.token()
    signed = valid.rindex(".")  # the header and claims, which the signature covers character by character
    # A valid token, or a forged one: garbage, the valid one cut short, or with a signed character changed.
    token = data.draw(
        st.just(valid)
        | _TOKENS
        | st.integers(1, len(valid) - 1).map(lambda end: valid[:end])
        | st.integers(0, signed - 1).map(lambda at: valid[:at] + ("B" if valid[at] == "A" else "A") + valid[at + 1 :]),
        label="token",
    )

    code, message, took = await raw_call(auth_channel, method, request.SerializeToString(), token)

    assert code in EXPECTED_CODES | {grpc.StatusCode.OK}, (code, message)
    assert token == valid or code == grpc.StatusCode.UNAUTHENTICATED or token.strip() == valid, (code, message)
    assert code == grpc.StatusCode.OK or took < PROMPT_SECONDS
    assert len(token) < 16 or token.strip() not in message  # never echoed
    no_tracebacks(server_log)
