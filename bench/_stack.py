"""The whole stack for a benchmark, started as production runs it.

The Temporal dev server, Redis, the offline model, and the worker and the gRPC server as separate processes, so
that each one's figures (CPU, memory, connections) are its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from devstack.stack import free_port, redis_server, temporal_dev_server, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 60
Procs = dict[str, asyncio.subprocess.Process]


@dataclass
class Stack:
    model_url: str  # the offline model's /v1 URL
    temporal_address: str
    grpc_target: str  # the gRPC server's address
    redis_url: str
    redis_prefix: str
    temporal_metrics_url: str  # the Temporal dev server's Prometheus endpoint
    logs: Path  # one <name>.log per process
    procs: Procs  # model, worker, server

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def log_lines(self, name: str) -> list[str]:
        return (self.logs / f"{name}.log").read_text(errors="replace").splitlines()


@asynccontextmanager
async def running_stack(
    agents_file: Path, *, token_delay_ms: float = 0.0, env: Mapping[str, str] | None = None, root: Path = ROOT
) -> AsyncIterator[Stack]:
    """Starts everything and yields the stack once the server is SERVING; ``env`` adds to the services' environment.
    The services run in ``root``, and so run the code of the checkout there (a module's own directory comes first on
    its path, before this environment's editable install).

    Logs are removed when the block ends without an error and kept for diagnosis otherwise.
    """
    logs = Path(tempfile.mkdtemp(prefix="agentrun-bench-"))
    procs: Procs = {}
    metrics_port = free_port()
    async with (
        temporal_dev_server(
            port=None, ui_port=None, ui=False, extra_args=["--metrics-port", str(metrics_port)]
        ) as temporal,
        redis_server(os.environ.get("REDIS_URL")) as redis_url,
    ):
        model_port, grpc_port = free_port(), free_port()
        unique = uuid.uuid4().hex[:8]  # own queue and keys, in case REDIS_URL is a shared Redis
        stack = Stack(
            model_url=f"http://127.0.0.1:{model_port}/v1",
            temporal_address=temporal,
            grpc_target=f"127.0.0.1:{grpc_port}",
            redis_url=redis_url,
            redis_prefix=f"bench:{unique}:",
            temporal_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            logs=logs,
            procs=procs,
        )
        service_env = {
            **os.environ,
            "TEMPORAL_ADDRESS": temporal,
            "REDIS_URL": redis_url,
            "AGENTRUN_TASK_QUEUE": f"bench-{unique}",
            "AGENTRUN_REDIS_PREFIX": stack.redis_prefix,
            "AGENTRUN_AGENTS_FILE": str(agents_file),
            "OPENAI_BASE_URL": stack.model_url,
            "OPENAI_API_KEY": "offline",
            **(env or {}),
        }
        commands = {
            "model": ["-m", "worker.offline_model", "--port", str(model_port), "--token-delay-ms", str(token_delay_ms)],
            "worker": ["-m", "agentrun.cli", "worker"],
            "server": ["-m", "agentrun.cli", "server", "--port", str(grpc_port)],
        }
        try:
            for name, args in commands.items():
                log = os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT)  # the child keeps its own copy
                procs[name] = await asyncio.create_subprocess_exec(
                    sys.executable, *args, cwd=root, env=service_env, stdout=log, stderr=asyncio.subprocess.STDOUT
                )
                os.close(log)
            await wait_ready(stack)
            yield stack
        finally:
            for proc in reversed(procs.values()):  # server, worker, model: each stops before what it calls
                if proc.returncode is None:
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    shutil.rmtree(logs, ignore_errors=True)  # reached only on success: logs are kept for diagnosis otherwise


async def wait_ready(stack: Stack) -> None:
    """Until the model lists its models and the gRPC server says SERVING (the worker polls on its own time)."""

    def still_starting() -> None:
        if dead := [name for name, proc in stack.procs.items() if proc.returncode is not None]:
            raise RuntimeError(f"{dead[0]} exited on start-up; see {stack.logs / dead[0]}.log")

    async with grpc.aio.insecure_channel(stack.grpc_target) as channel, asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
        await wait_until_serving(channel, still_starting=still_starting)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.model_url}/models") as reply:
            reply.raise_for_status()


async def add_script(stack: Stack, key: str, steps: list[dict[str, object]]) -> None:
    """Scripts the offline model: a prompt that contains ``key`` gets these steps (the last one repeats)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            stack.model_url.removesuffix("/v1") + "/_offline/scripts", json={"key": key, "steps": steps}
        ) as reply:
            reply.raise_for_status()


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def temporal_requests(stack: Stack) -> dict[str, float]:
    """How many requests the Temporal frontend has served so far, by operation (its Prometheus counters)."""
    counts: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.temporal_metrics_url) as reply:
            text = await reply.text()
    for line in text.splitlines():
        if line.startswith("service_requests{") and 'service_name="frontend"' in line:
            labels, value = line[len("service_requests{") :].rsplit("} ", 1)
            operation = labels.split('operation="', 1)[1].split('"', 1)[0]
            counts[operation] = counts.get(operation, 0.0) + float(value)
    return counts
