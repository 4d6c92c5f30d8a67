"""``agentrun dev`` as a person runs it: a real process tree on free ports, and the commands it prints."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from devstack.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
# Who the dev stack's token names: the user who started it.
DEV_SUBJECT = os.environ.get("USER") or "cli"
CLI = (sys.executable, "-m", "agentrun.cli")
STARTUP_SECONDS = 120
# The venv's scripts are not on PATH after `make dev`: the printed commands must work without them.
BIN = Path(sys.executable).parent
PATH_WITHOUT_VENV = os.pathsep.join(
    part for part in os.environ.get("PATH", "").split(os.pathsep) if part and Path(part) != BIN
)


def dev_env(redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REDIS_URL", "AGENTRUN_"))}
    env["PATH"] = PATH_WITHOUT_VENV
    env["AGENTRUN_REDIS_PREFIX"] = f"test-dev:{uuid.uuid4().hex[:12]}:"  # a shared Redis keeps our keys apart
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


@dataclass
class Dev:
    """A running ``agentrun dev`` and what it printed so far."""

    process: asyncio.subprocess.Process
    port: int
    temporal_port: int
    ui_port: int
    output: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def read_until(self, text: str) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(STARTUP_SECONDS):
            while text not in self.output:
                line = await self.process.stdout.readline()
                assert line, f"agentrun dev ended before printing {text!r}:\n{self.output}"
                self.output += line.decode()
        return self.output

    async def stop(self) -> None:
        if self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGINT)
            rest, _ = await asyncio.wait_for(self.process.communicate(), 60)
            self.output += rest.decode()


async def start_dev(redis_url: str | None, *ports: int) -> Dev:
    port, temporal_port, ui_port = ports or (free_port(), free_port(), free_port())
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "dev",
        "--port",
        str(port),
        "--temporal-port",
        str(temporal_port),
        "--ui-port",
        str(ui_port),
        "--prompt",
        "say hello",
        cwd=ROOT,
        env=dev_env(redis_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a process group of its own, as a terminal gives a command: Ctrl-C reaches all of it
    )
    return Dev(process, port, temporal_port, ui_port)


@pytest.fixture(scope="module")
async def dev(redis_url: str) -> AsyncIterator[Dev]:
    running = await start_dev(redis_url)
    try:
        await running.read_until("(Ctrl-C stops)")
        yield running
    finally:
        await running.stop()


async def shell(command: str, *, stdin: str = "") -> tuple[int, str, str]:
    """Runs a command line that agentrun printed, as a person pastes it, without the venv on PATH."""
    process = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        cwd=ROOT,
        env={**os.environ, "PATH": PATH_WITHOUT_VENV},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_dev_announces_each_component_once_and_a_command_that_works(dev: Dev) -> None:
    output = await dev.read_until("(Ctrl-C stops)")

    assert output.count("OFFLINE") == 1, output
    assert "You said: say hello" in output
    match = re.search(r"Running\. Try: (.+?)   \(Ctrl-C stops\)", output)
    assert match, output
    code, out, err = await shell(match.group(1))
    assert code == 0, err
    assert "You said: Hello" in out
    assert "completed:" in out


async def test_the_approval_hints_print_commands_that_work(dev: Dev) -> None:
    # The offline model calls the calculator for arithmetic, and the operator agent asks before every call.
    runner = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        "operator",
        "What is 12 * (3 + 4)?",
        "--no-prompt",
        "--server",
        dev.address,
        cwd=ROOT,
        env={**os.environ, "PATH": PATH_WITHOUT_VENV},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert runner.stdout is not None
    shown = b""
    while b"  deny:" not in shown:
        line = await asyncio.wait_for(runner.stdout.readline(), 60)
        assert line, shown
        shown += line
    approve = re.search(r"  approve: (.+)\n", shown.decode())
    assert approve, shown

    # The dev server authenticates: the approver is the subject of the dev token, whatever --approver says.
    code, out, err = await shell(f"{approve.group(1)} --approver mallory")

    assert (code, err) == (0, ""), out
    assert out == f"✓ approved by {DEV_SUBJECT}\n"
    rest, _ = await asyncio.wait_for(runner.communicate(), 60)
    assert runner.returncode == 0
    assert f"✓ approved by {DEV_SUBJECT}\n← 84\n" in rest.decode()


async def test_dev_authenticates_callers_and_the_cli_uses_its_token_by_itself(dev: Dev) -> None:
    output = await dev.read_until("(Ctrl-C stops)")
    assert f"Authentication       on: the CLI here calls as {DEV_SUBJECT!r} (tenant 'dev', every right)" in output

    # AGENTRUN_TOKEN goes before the dev token: a bad one is refused, and the CLI says what to do.
    env = {**os.environ, "PATH": PATH_WITHOUT_VENV, "AGENTRUN_TOKEN": "not-a-token"}
    refused = await asyncio.create_subprocess_exec(
        *CLI, "list", "--server", dev.address, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 2
    assert err.decode().startswith("error: UNAUTHENTICATED: the token is malformed (not a signed JWT)\n")
    assert "set AGENTRUN_TOKEN to a token it accepts" in err.decode()


async def test_a_second_dev_stack_on_the_same_ports_is_refused_naming_the_port_and_its_holder(
    dev: Dev, redis_url: str
) -> None:
    second = await start_dev(redis_url, dev.port, dev.temporal_port, dev.ui_port)
    output, _ = await asyncio.wait_for(second.process.communicate(), 60)
    text = output.decode()

    assert second.process.returncode == 1, text
    assert f"port {dev.port} (the agentrun server) is in use by process {dev.process.pid} (python" in text
    assert "agentrun dev --port" in text
    assert "Traceback" not in text and "Temporal dev server" not in text  # refused before starting anything

    # A Temporal port that is taken is refused as well (the Temporal dev server would exit, and the stack would
    # use the other one's).
    third = await start_dev(redis_url, free_port(), dev.temporal_port, free_port())
    output, _ = await asyncio.wait_for(third.process.communicate(), 60)
    text = output.decode()
    assert third.process.returncode == 1, text
    assert f"port {dev.temporal_port} (the Temporal dev server) is in use by process " in text
    assert "(temporal server start-dev" in text


@pytest.mark.parametrize("redis", ["embedded", "REDIS_URL"])
async def test_ctrl_c_ends_client_streams_with_shutting_down_and_stops_everything(redis: str, redis_url: str) -> None:
    running = await start_dev(redis_url if redis == "REDIS_URL" else None)
    try:
        await running.read_until("(Ctrl-C stops)")
        children = psutil.Process(running.process.pid).children(recursive=True)
        assert any(child.name() == "temporal" for child in children)
        client = await asyncio.create_subprocess_exec(
            *CLI,
            "run",
            "operator",
            "What is 2 + 3?",
            "--no-prompt",
            "--retry-seconds",
            "0",
            "--server",
            running.address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        while b"waits for approval" not in await asyncio.wait_for(client.stdout.readline(), 60):
            pass

        os.killpg(running.process.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        started = time.monotonic()
        rest, _ = await asyncio.wait_for(running.process.communicate(), 60)
        print(f"agentrun dev ({redis}) stopped {time.monotonic() - started:.2f} s after Ctrl-C")
        _, err = await asyncio.wait_for(client.communicate(), 60)
    finally:
        await running.stop()
    output = running.output + rest.decode()

    assert running.process.returncode == 0, output
    assert "Traceback" not in output
    assert output.endswith("Stopped.\n"), output
    assert client.returncode == 2
    assert "\nerror: UNAVAILABLE: the server is shutting down" in err.decode(), err
    # Temporal, Valkey and everything else it started are gone with it.
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


async def test_a_server_without_authentication_refuses_a_public_address_unless_insecure() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTRUN_")}
    port = str(free_port())
    process = await asyncio.create_subprocess_exec(
        *CLI, "server", "--host", "0.0.0.0", "--port", port, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 1
    assert err.decode().startswith(
        "agentrun server: refusing to listen on 0.0.0.0 without authentication: set AGENTRUN_AUTH_JWKS"
    )
    assert "or pass --insecure" in err.decode() and "Traceback" not in err.decode()
