"""The services as separate processes, the way they are deployed, and the dev command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from grpc_reflection.v1alpha import reflection_pb2

from agentrun.client import AgentRunClient
from devstack.stack import free_port, wait_until_serving
from shared.settings import Settings
from tests.conftest import Model
from tests.processes import service_env, spawn

WORDS = [f"token{i} " for i in range(60)]


@dataclass
class Services:
    client: AgentRunClient
    server: asyncio.subprocess.Process
    env: dict[str, str]
    workers: list[asyncio.subprocess.Process]


@pytest.fixture
async def services(settings: Settings, redis_client: object) -> AsyncIterator[Services]:
    env = service_env(settings)
    port = free_port()
    server = await spawn("server", "--port", str(port), env=env)
    worker = await spawn("worker", env=env)
    async with AgentRunClient(f"127.0.0.1:{port}") as client:
        async with asyncio.timeout(30):
            await wait_until_serving(client.channel)
        running = Services(client, server, env, [worker])
        yield running
    for process in [server, *running.workers]:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_run_streams_through_separate_server_and_worker_processes(services: Services, model: Model) -> None:
    key = model.script({"chunks": WORDS, "delay_ms": 2})
    run_id = await services.client.start_run("assistant", key)

    events = [event async for event in services.client.stream_run(run_id)]

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert "".join(e.text_delta.text for e in events[:-1]) == "".join(WORDS)
    assert events[-1].run_completed.output == "".join(WORDS)


async def test_a_killed_worker_loses_nothing_and_repeats_no_text(services: Services, model: Model) -> None:
    key = model.script({"chunks": WORDS, "delay_ms": 50}, {"chunks": WORDS})
    run_id = await services.client.start_run("assistant", key)
    seen = []
    async for event in services.client.stream_run(run_id):
        seen.append(event)
        if len(seen) == 5:
            services.workers[0].kill()  # a crash, not a shutdown
            await services.workers[0].wait()
            services.workers.append(await spawn("worker", env=services.env))
            break

    rest = [event async for event in services.client.stream_run(run_id, after_sequence=seen[-1].sequence)]

    events = seen + rest
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "".join(WORDS)
    assert events[-1].run_completed.output == "".join(WORDS)


async def test_health_reflection_and_graceful_shutdown(services: Services) -> None:
    await services.client.run("assistant", "hello")  # both services are up and working
    reflection = services.client.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = reflection(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name async for reply in replies for service in reply.list_services_response.service}
    assert {"agentrun.v1.AgentService", "grpc.health.v1.Health"} <= names

    services.server.send_signal(signal.SIGTERM)
    services.workers[0].send_signal(signal.SIGTERM)

    assert await asyncio.wait_for(services.server.wait(), 30) == 0
    assert await asyncio.wait_for(services.workers[0].wait(), 30) == 0


async def test_agentrun_dev_streams_a_demo_run_with_everything_embedded() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REDIS_URL", "AGENTRUN_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentrun.cli",
        "dev",
        "--once",
        "--port",
        str(free_port()),
        "--temporal-port",
        str(free_port()),
        "--ui-port",
        str(free_port()),
        "--prompt",
        "say hello",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode()

    assert process.returncode == 0, text
    assert "OFFLINE model" in text
    assert "embedded Valkey" in text
    assert "You said: say hello" in text
    assert "completed:" in text


async def test_a_second_server_on_the_same_port_refuses_to_start(services: Services) -> None:
    address = services.client.targets[0]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentrun.cli",
        "server",
        "--port",
        address.rsplit(":", 1)[1],
        env=services.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 1
    assert err.decode().endswith(
        f"agentrun server: cannot listen on {address}: the address is in use or not available\n"
    )
    await services.client.run("assistant", "still the first")  # which goes on serving alone


async def test_a_server_without_temporal_says_where_it_looked(settings: Settings) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentrun.cli",
        "server",
        "--port",
        str(free_port()),
        env=service_env(settings, TEMPORAL_ADDRESS=nowhere),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 1
    assert err.decode().startswith(f"agentrun server: cannot connect to Temporal at {nowhere} (TEMPORAL_ADDRESS): ")
