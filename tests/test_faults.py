"""Faults an operator sees every week, with real processes: Redis killed or flushed, Temporal killed and started again
on its database, workers killed under load, a server stopped with streams open, Approve with no worker up."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from temporalio.testing import WorkflowEnvironment

from agentrun.client import AgentRunClient
from agentrun.v1 import agent_service_pb2 as pb
from shared.settings import Settings
from tests.agent_service.test_agent_loop import calls as tool_calls
from tests.conftest import Model, details
from tests.processes import OwnRedis, OwnTemporal, Workers, replicas

WORDS = [f"w{i} " for i in range(80)]
TEXT = "".join(WORDS)
APPROVE = pb.APPROVAL_DECISION_APPROVE


def assert_each_number_once(events: list[pb.RunEvent]) -> None:
    """Every sequence number from 1 to the terminal event comes exactly once: as an event, or within the range of
    an events_lost that stands for events the server no longer has. No number stands for two events."""
    # As spans (first, last): after a loss the numbering jumps a billion past what was lost.
    spans = [
        (event.events_lost.first_sequence if event.HasField("events_lost") else event.sequence, event.sequence)
        for event in events
    ]
    ends = [0] + [last for _, last in spans[:-1]]
    assert all(first == end + 1 and last >= first for (first, last), end in zip(spans, ends, strict=True)), spans
    assert events[-1].WhichOneof("kind") in ("run_completed", "run_failed", "run_cancelled")


def text_of(events: list[pb.RunEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


def lost(events: list[pb.RunEvent]) -> list[pb.RunEvent]:
    return [e for e in events if e.HasField("events_lost")]


async def collect(client: AgentRunClient, run_id: str, after: int = 0) -> list[pb.RunEvent]:
    return [event async for event in client.stream_run(run_id, after_sequence=after)]


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    server = OwnRedis()
    await server.start()
    yield server
    await server.kill()


@pytest.fixture
async def workers(settings: Settings, redis_client: redis.Redis) -> AsyncIterator[Workers]:
    running = Workers(settings)
    yield running
    await running.stop_all()


@pytest.fixture
async def on_own_redis(settings: Settings, own_redis: OwnRedis) -> AsyncIterator[Settings]:
    """The test's settings moved to a Redis of its own, which the test may kill, with a worker running on them."""
    moved = replace(settings, redis_url=own_redis.url)
    workers = Workers(moved)
    await workers.start()
    yield moved
    await workers.stop_all()


async def test_a_redis_restarted_empty_mid_run_fails_no_run_and_reuses_no_number(
    on_own_redis: Settings, own_redis: OwnRedis, model: Model
) -> None:
    key = model.script({"chunks": WORDS, "delay_ms": 50})
    async with replicas(on_own_redis, 1) as (server,), AgentRunClient(server.address) as client:
        run_id = await client.start_run("assistant", key)
        events: list[pb.RunEvent] = []
        async for event in client.stream_run(run_id):
            events.append(event)
            if len(events) == 10:
                await own_redis.kill()
                await asyncio.sleep(3)  # the worker and the server wait it out
                await own_redis.start()
        resumed = await collect(client, run_id, after=5)

    assert_each_number_once(events)
    assert events[-1].run_completed.output == TEXT
    if not lost(events):  # the kill came between two deltas, as it almost always does
        assert text_of(events) == TEXT
    # A client resuming from a number it saw is told that Redis lost what followed, and still gets the end.
    assert resumed[0].events_lost.first_sequence == 6
    assert_each_number_once(events[:5] + resumed)
    assert resumed[-1] == events[-1]


async def test_a_flushed_redis_mid_run_fails_no_run_and_reuses_no_number(
    on_own_redis: Settings, own_redis: OwnRedis, model: Model
) -> None:
    key = model.script({"chunks": WORDS, "delay_ms": 30})
    async with (
        replicas(on_own_redis, 1) as (server,),
        AgentRunClient(server.address) as client,
        redis.Redis.from_url(own_redis.url) as direct,
    ):
        run_id = await client.start_run("assistant", key)
        events: list[pb.RunEvent] = []
        async for event in client.stream_run(run_id):
            events.append(event)
            if len(events) == 10:
                await direct.flushall()
        resumed = await collect(client, run_id, after=5)

    assert_each_number_once(events)
    assert text_of(events) == TEXT
    assert events[-1].run_completed.output == TEXT
    assert resumed[0].events_lost.first_sequence == 6
    assert_each_number_once(events[:5] + resumed)


async def test_calls_answer_unavailable_naming_redis_while_it_is_down(
    on_own_redis: Settings, own_redis: OwnRedis, model: Model, temporal_env: WorkflowEnvironment
) -> None:
    key = model.script({"text": "before the outage"})
    async with replicas(on_own_redis, 1) as (server,), AgentRunClient(server.address) as client:
        run_id = await client.start_run("assistant", key)
        await collect(client, run_id)
        await temporal_env.client.get_workflow_handle(run_id).result()  # Temporal has recorded the end
        await own_redis.kill()

        # Temporal holds the state: GetRun still answers.
        assert (await client.stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=10)).run.output == (
            "before the outage"
        )
        calls: list[Awaitable[object]] = [
            client.stub.StartRun(pb.StartRunRequest(agent="chat", input="hi", conversation_id="c1"), timeout=10),
            client.stub.StreamRun(pb.StreamRunRequest(run_id=run_id), timeout=10).read(),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in details(raised.value)
        await own_redis.start()


async def test_temporal_killed_and_started_again_on_its_database_mid_run(
    settings: Settings, model: Model, redis_client: redis.Redis, tmp_path: Path
) -> None:
    temporal = OwnTemporal(tmp_path)
    await temporal.start()
    settings = replace(settings, temporal_address=temporal.address)
    key = model.script({"chunks": WORDS, "delay_ms": 50})
    workers = Workers(settings)
    await workers.start()
    try:
        async with replicas(settings, 1) as (server,), AgentRunClient(server.address) as client:
            run_id = await client.start_run("assistant", key)
            stream = client.stream_run(run_id)
            events = [await anext(stream) for _ in range(5)]
            await temporal.kill()

            # Meanwhile every call that needs Temporal says so, within the caller's deadline; the stream goes on.
            outage_calls: dict[str, Awaitable[object]] = {
                "GetRun": client.stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=5),
                "StartRun": client.stub.StartRun(pb.StartRunRequest(agent="assistant", input="hi"), timeout=5),
                "ListRuns": client.stub.ListRuns(pb.ListRunsRequest(), timeout=5),
                "CancelRun": client.stub.CancelRun(pb.CancelRunRequest(run_id="run-other"), timeout=5),
            }
            for name, call in outage_calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert "Temporal" in details(raised.value), name
            events.append(await anext(stream))

            await temporal.start()
            events += [event async for event in stream]
            run = await client.get_run(run_id)
    finally:
        await workers.stop_all()
        await temporal.kill()

    assert_each_number_once(events)
    assert not lost(events)
    assert text_of(events) == TEXT
    assert events[-1].run_completed.output == TEXT
    assert run.state == pb.RUN_STATE_COMPLETED


async def test_300_streams_on_one_server_lose_and_repeat_nothing_while_the_worker_is_killed_twice(
    settings: Settings, model: Model, workers: Workers
) -> None:
    key = model.script({"chunks": WORDS[:40], "delay_ms": 50})
    await workers.start()
    async with replicas(settings, 1) as (server,), AgentRunClient(server.address) as client:
        run_ids = await asyncio.gather(*(client.start_run("assistant", f"{key} run {i}") for i in range(300)))
        streams = [asyncio.create_task(collect(client, run_id)) for run_id in run_ids]
        await asyncio.sleep(1)  # the runs are streaming
        await workers.kill()
        await workers.start()
        # The killed worker's model calls time out after 10 s without heartbeats; they are streaming again by then.
        await asyncio.sleep(11.5)
        await workers.kill()
        await workers.start()
        results = await asyncio.gather(*streams)

    for events in results:
        assert_each_number_once(events)
        assert not lost(events)
        assert text_of(events) == "".join(WORDS[:40])
        assert events[-1].run_completed.output == "".join(WORDS[:40])


async def test_a_stopped_server_ends_its_streams_at_once_and_the_client_resumes_on_another(
    settings: Settings, model: Model, workers: Workers
) -> None:
    key = model.script({"chunks": WORDS, "delay_ms": 30})
    await workers.start()
    async with replicas(settings, 2) as (first, second):
        async with AgentRunClient(first.address) as direct:
            run_id = await direct.start_run("assistant", key)
            raw = direct.stub.StreamRun(pb.StreamRunRequest(run_id=run_id))
            await raw.read()
            first.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                while True:
                    await raw.read()
            # Not the 10 s grace for unary calls, and a status the client library resumes from.
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in details(raised.value)
            assert await asyncio.wait_for(first.process.wait(), 30) == 0
        async with AgentRunClient([first.address, second.address]) as client:
            events = await collect(client, run_id)

    assert_each_number_once(events)
    assert text_of(events) == TEXT


async def test_approve_with_no_worker_up_answers_unavailable_and_takes_effect_when_one_returns(
    settings: Settings, model: Model, workers: Workers
) -> None:
    key = model.script(tool_calls(("echo", {"text": "hi"})), {"text": "done"})
    await workers.start()
    async with replicas(settings, 1) as (server,), AgentRunClient(server.address) as client:
        run_id = await client.start_run("patient", key)
        async for event in client.stream_run(run_id):
            if event.HasField("approval_requested"):
                approval_id = event.approval_requested.approval_id
                break
        await workers.kill()

        request = pb.ApproveRequest(run_id=run_id, approval_id=approval_id, decision=APPROVE)
        metadata = (("x-agentrun-approver", "alice"),)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.stub.Approve(request, metadata=metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no worker" in details(raised.value) and "send the same decision again" in details(raised.value)

        # As a caller does: the same decision again, retried (the client library retries UNAVAILABLE) until a worker
        # is back; it is answered with the decision recorded, whether the first call took effect or not.
        await workers.start()
        decided = await client.approve(run_id, approval_id, APPROVE, approver="alice")
        events = await collect(client, run_id)
        again = await client.approve(run_id, approval_id, APPROVE, approver="alice")  # after the run has ended

    assert events[-1].run_completed.output == "done"
    assert (decided.decision, decided.approver) == (APPROVE, "alice")
    assert again == decided


async def test_a_worker_killed_while_a_sub_agent_streams_repeats_no_text_and_no_number(
    settings: Settings, model: Model, workers: Workers
) -> None:
    child = model.script({"chunks": WORDS[:40], "delay_ms": 50})
    root = model.script(
        tool_calls(("delegate_to_researcher", {"task": f"{child} take your time"})), {"text": "relayed"}
    )
    await workers.start()
    async with replicas(settings, 1) as (server,), AgentRunClient(server.address) as client:
        run_id = await client.start_run("planner", root)
        seen: list[pb.RunEvent] = []
        async for event in client.stream_run(run_id):
            seen.append(event)
            if event.HasField("text_delta"):
                break  # the sub-agent is streaming
        await workers.kill()
        await workers.start()
        # The killed worker's calls time out after 10 s without heartbeats, then run again on the new one.
        events = seen + await collect(client, run_id, after=seen[-1].sequence)

    assert_each_number_once(events)
    sub_agent = [e for e in events if list(e.agent_path) == ["planner", "researcher"]]
    assert text_of(sub_agent) == "".join(WORDS[:40])
    delegation = next(e.tool_call_finished for e in events if e.HasField("tool_call_finished"))
    assert delegation.result == "".join(WORDS[:40])
    assert events[-1].run_completed.output == "relayed"
