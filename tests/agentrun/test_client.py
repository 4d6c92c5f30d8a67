"""The client library against real server replicas: processes killed for real, addresses where nothing listens, and
an answer lost on the network."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from agent_service.server import serve
from agentrun.client import AgentRunClient, RunCancelledError, RunEndedError, RunFailedError
from agentrun.v1 import agent_service_pb2 as pb
from devstack.stack import free_port
from shared.settings import Settings
from tests.agent_service.test_agent_loop import calls
from tests.agent_service.test_runs import wait_for_state
from tests.conftest import Stack
from tests.processes import assert_every_event_once, replicas, service_env, spawn

WORDS = [f"word{i} " for i in range(60)]
TEXT = "".join(WORDS)
APPROVE = pb.APPROVAL_DECISION_APPROVE
# The HTTP/2 frame type that carries gRPC messages.
HTTP2_DATA = 0x0


class LossyProxy:
    """A TCP proxy to a server that loses the first gRPC message the server answers with: it cuts both connections
    instead of passing it on, as when a server does the work and dies before its answer arrives."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.lost = b""  # the lost HTTP/2 DATA frame's payload: one length-prefixed gRPC message
        self.address = ""

    async def __aenter__(self) -> LossyProxy:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._upstream)

        async def requests() -> None:
            while data := await client_reader.read(65536):
                server_writer.write(data)
                await server_writer.drain()

        async def answers() -> None:
            # From the server, HTTP/2 is a sequence of frames from the first byte on: a 9-byte header (payload length,
            # type, flags, stream) and the payload.
            while True:
                header = await server_reader.readexactly(9)
                payload = await server_reader.readexactly(int.from_bytes(header[:3]))
                if header[3] == HTTP2_DATA and payload and not self.lost:
                    self.lost = payload
                    return
                client_writer.write(header + payload)
                await client_writer.drain()

        pumps = [asyncio.create_task(requests()), asyncio.create_task(answers())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)  # a closed connection ends a pump with an error
        client_writer.close()
        server_writer.close()


def text_of(events: list[pb.RunEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


async def collect(client: AgentRunClient, run_id: str, after: int = 0) -> list[pb.RunEvent]:
    return [event async for event in client.stream_run(run_id, after_sequence=after)]


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_a_stream_finishes_on_the_second_replica_when_the_first_is_killed(
    stack: Stack, settings: Settings
) -> None:
    key = stack.model.script({"chunks": WORDS, "delay_ms": 30})
    async with replicas(settings, 2) as (first, second), AgentRunClient([first.address, second.address]) as client:
        run_id = await client.start_run("assistant", key)
        events: list[pb.RunEvent] = []
        async for event in client.stream_run(run_id):
            events.append(event)
            if len(events) == 5:
                await first.kill()
        assert second.alive

    assert not any(e.WhichOneof("kind") == "run_completed" for e in events[:5])  # the kill came mid-stream
    assert_every_event_once(events)
    assert text_of(events) == TEXT
    assert events[-1].run_completed.output == TEXT


async def test_pending_approvals_come_again_after_failovers_and_nothing_else_does(
    stack: Stack, settings: Settings
) -> None:
    # Two calls that need approval: the first is approved and runs, the second still waits when replicas die, so
    # each resumed stream repeats its request with a sequence number older than where the stream was.
    key = stack.model.script(calls(("echo", {"text": "one"}), ("echo", {"text": "two"})), {"text": "both done"})
    async with replicas(settings, 2) as (first, second):
        # The third replica is the test's own server, which stays up.
        async with AgentRunClient([first.address, second.address, stack.address]) as client:
            run_id = await client.start_run("patient", key)
            events: list[pb.RunEvent] = []
            requests: list[pb.ApprovalRequested] = []
            first_call_ran = False
            async for event in client.stream_run(run_id):
                repeated = bool(events) and event.sequence <= max(e.sequence for e in events)
                events.append(event)
                if event.HasField("approval_requested") and not repeated:
                    requests.append(event.approval_requested)
                    if len(requests) == 1:
                        await client.approve(run_id, requests[0].approval_id, APPROVE, approver="alice")
                first_call_ran |= (
                    event.HasField("tool_call_finished") and event.tool_call_finished.call_id == requests[0].call_id
                )
                if first.alive and first_call_ran and len(requests) == 2:
                    await first.kill()
                elif repeated and second.alive:
                    assert event.sequence < max(e.sequence for e in events[:-1])  # older than where the stream was
                    await second.kill()
                    # Approve fails over too: the replica it used last is dead.
                    await client.approve(run_id, requests[1].approval_id, APPROVE, approver="alice")

    assert not first.alive and not second.alive
    assert_every_event_once(events)
    again = [e for e in events if e.approval_requested.approval_id == requests[1].approval_id]
    assert len(again) >= 2
    finished = [e.tool_call_finished for e in events if e.HasField("tool_call_finished")]
    assert sorted(f.result for f in finished) == ["one", "two"]
    assert events[-1].run_completed.output == "both done"


async def test_a_dead_first_address_sends_every_call_to_the_second(stack: Stack) -> None:
    dead = dead_address()

    def dead_first() -> AgentRunClient:
        return AgentRunClient([dead, stack.address])

    key = stack.model.script(calls(("echo", {"text": "x"})), {"text": "done"})
    async with dead_first() as client:
        run_id = await client.start_run("patient", key)
    async with dead_first() as client:
        async for event in client.stream_run(run_id):
            if event.HasField("approval_requested"):
                requested = event
                break
    async with dead_first() as client:
        decided = await client.approve(run_id, requested.approval_requested.approval_id, APPROVE, approver="alice")
    assert (decided.decision, decided.approver) == (APPROVE, "alice")
    async with dead_first() as client:
        rest = await collect(client, run_id, after=requested.sequence)
    assert rest[-1].run_completed.output == "done"
    async with dead_first() as client:
        assert (await client.get_run(run_id)).state == pb.RUN_STATE_COMPLETED
    async with dead_first() as client:
        for _ in range(100):  # visibility is eventually consistent
            if run_id in {run.run_id for run in (await client.list_runs()).runs}:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{run_id} is not listed")

    waiting = await stack.client.start_run("patient", stack.model.script(calls(("echo", {"text": "y"}))))
    await wait_for_state(stack, waiting, pb.RUN_STATE_WAITING_FOR_APPROVAL)
    async with dead_first() as client:
        await client.cancel_run(waiting, reason="enough")
    assert (await collect(stack.client, waiting))[-1].run_cancelled.reason == "enough"


async def test_a_start_whose_answer_was_lost_is_retried_into_the_same_run(stack: Stack, settings: Settings) -> None:
    other, port = await serve(settings, port=0, temporal=stack.temporal, redis_client=stack.redis)
    key = stack.model.script({"text": "once"})
    try:
        async with LossyProxy(stack.address) as proxy, AgentRunClient([proxy.address, f"127.0.0.1:{port}"]) as client:
            run_id = await client.start_run("assistant", key)  # no request_id: the client makes one

            assert proxy.lost, "the first answer was not lost"
            # The first replica started a run and its answer never arrived; the retry on the second found that run.
            assert pb.StartRunResponse.FromString(proxy.lost[5:]).run_id == run_id
            assert (await collect(client, run_id))[-1].run_completed.output == "once"
    finally:
        await other.stop(None)
    assert len(stack.model.server.requests_for(key)) == 1  # one run, one model call


async def test_calls_raise_unavailable_once_the_budget_is_spent() -> None:
    async with AgentRunClient([dead_address(), dead_address()], retry_budget_seconds=1) as client:
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: client.get_run("run-anything"),
            lambda: collect(client, "run-anything"),
        ]
        for attempt in attempts:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await attempt()
            elapsed = time.monotonic() - started

            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert 0.9 <= elapsed < 15  # it kept trying for the budget, and then stopped


async def test_other_codes_are_raised_at_once(stack: Stack) -> None:
    finished = await stack.client.start_run("assistant", stack.model.script({"text": "done"}))
    await collect(stack.client, finished)
    attempts: list[tuple[Callable[[AgentRunClient], Awaitable[object]], grpc.StatusCode]] = [
        (lambda client: client.get_run("run-missing"), grpc.StatusCode.NOT_FOUND),
        (lambda client: collect(client, "run-missing"), grpc.StatusCode.NOT_FOUND),
        (lambda client: client.approve("run-missing", "ap-x", APPROVE, approver="a"), grpc.StatusCode.NOT_FOUND),
        (lambda client: client.start_run("no-such-agent", "hi"), grpc.StatusCode.NOT_FOUND),
        (lambda client: client.start_run("assistant", "hi", request_id="has space"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda client: client.cancel_run(finished), grpc.StatusCode.FAILED_PRECONDITION),
    ]
    # Two live replicas and a long budget: retrying any of these would take the whole budget.
    other, port = await serve(stack.settings, port=0, temporal=stack.temporal, redis_client=stack.redis)
    try:
        async with AgentRunClient([stack.address, f"127.0.0.1:{port}"], retry_budget_seconds=10) as client:
            for attempt, code in attempts:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await attempt(client)
                assert raised.value.code() == code
                assert time.monotonic() - started < 5
    finally:
        await other.stop(None)


async def test_a_stream_resumes_when_its_only_server_restarts(stack: Stack, settings: Settings) -> None:
    key = stack.model.script({"chunks": WORDS, "delay_ms": 30})
    async with replicas(settings, 1) as (server,), AgentRunClient(server.address) as client:
        run_id = await client.start_run("assistant", key)
        events: list[pb.RunEvent] = []
        async for event in client.stream_run(run_id):
            events.append(event)
            if len(events) == 5:
                await server.kill()
                port = server.address.rsplit(":", 1)[1]
                server.process = await spawn("server", "--port", port, env=service_env(settings))

    assert not any(e.WhichOneof("kind") == "run_completed" for e in events[:5])
    assert_every_event_once(events)
    assert text_of(events) == TEXT


async def test_run_raises_run_ended_errors(stack: Stack) -> None:
    failing = stack.model.script({"error": {"status": 400, "message": "bad sampling"}})
    with pytest.raises(RunFailedError) as failed:
        await stack.client.run("assistant", failing)
    assert "bad sampling" in failed.value.event.run_failed.error
    assert failed.value.run_id.startswith("run-")

    key = stack.model.script(calls(("echo", {"text": "x"})))
    # The same request_id makes run() take the run whose id the test knows.
    run_id = await stack.client.start_run("patient", key, request_id="req-cancel-me")
    waiting = asyncio.create_task(stack.client.run("patient", key, request_id="req-cancel-me"))
    await wait_for_state(stack, run_id, pb.RUN_STATE_WAITING_FOR_APPROVAL)
    await stack.client.cancel_run(run_id, reason="enough")
    with pytest.raises(RunCancelledError) as cancelled:
        await waiting
    assert cancelled.value.run_id == run_id
    assert cancelled.value.event.run_cancelled.reason == "enough"
    assert str(cancelled.value) == f"run {run_id} was cancelled: enough"
    assert isinstance(cancelled.value, RunEndedError) and isinstance(failed.value, RunEndedError)


async def test_addresses_come_as_a_list_or_with_commas(stack: Stack) -> None:
    assert AgentRunClient("10.0.0.1:50051, 10.0.0.2:50051").targets == ("10.0.0.1:50051", "10.0.0.2:50051")
    assert AgentRunClient(["a:1", "b:2"]).targets == ("a:1", "b:2")
    assert AgentRunClient("dns:///agentrun:50051").targets == ("dns:///agentrun:50051",)
    for empty in ["", "a:1,,b:2", " "]:
        with pytest.raises(ValueError):
            AgentRunClient(empty)
    with pytest.raises(ValueError):
        AgentRunClient([])

    channel = grpc.aio.insecure_channel(stack.address)
    async with AgentRunClient(channel=channel) as given:
        assert given.targets == ()
        await given.list_runs()
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
