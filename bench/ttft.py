"""Time to first token and throughput: a direct OpenAI stream vs. a whole agentrun run.

Starts every real component as production runs them (Temporal dev server, Redis, the offline model, and the
worker and the gRPC server as separate processes) and prints figures; nothing is asserted. From the repo root:
    python -m bench.ttft [--runs 30] [--tokens 2000] [--tracing | --against REV]

With ``--tracing`` it runs two stacks side by side instead, one without telemetry and one whose server, worker and
client trace every run and export spans and metrics over OTLP/gRPC to a receiver in a process of its own, and
prints the time to first token of both, their samples interleaved.

With ``--against REV`` it runs two stacks side by side the same way, one on this checkout's code and one on the
code of the git revision REV (in a temporary worktree; this environment's dependencies serve both), to measure what a
change does to the time to first token on a machine whose noise is larger than the change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import openai
import yaml

from agentrun.client import AgentRunClient
from bench._stack import ROOT, add_script, running_stack
from devstack.stack import free_port

AGENTS_FILE = ROOT / "agents.yaml"
AGENT = "assistant"
WARMUP = 3
THROUGHPUT_REPS = 5
RUN_TIMEOUT = 60.0  # a run this slow means a component is stuck, not slow
Paths = dict[str, Callable[[str], Awaitable["Sample"]]]  # path name -> one timed call with a prompt


@dataclass
class Sample:
    ttft: float  # seconds from the call to the first text
    total: float  # seconds from the call to the end of the stream
    text: str
    deltas: int
    start_rpc: float = 0.0  # agentrun only: the StartRun round trip
    emitted: float = 0.0  # agentrun only: StartRun call -> the worker creates the first delta (wall clock)
    last_text: float = 0.0  # agentrun only: seconds from the call to the last text


async def direct(llm: openai.AsyncOpenAI, agent: dict[str, Any], prompt: str) -> Sample:
    # The request the worker sends for this agent, so both paths ask the model the same thing.
    messages: Any = [{"role": "system", "content": agent["system_prompt"]}, {"role": "user", "content": prompt}]
    options: Any = {"temperature": agent.get("temperature"), "max_completion_tokens": agent.get("max_tokens")}
    t0 = time.perf_counter()
    ttft, parts = 0.0, []
    stream = await llm.chat.completions.create(
        model=agent["model"], messages=messages, stream=True, stream_options={"include_usage": True}, **options
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = ttft or time.perf_counter() - t0
                parts.append(choice.delta.content)
    return Sample(ttft, time.perf_counter() - t0, "".join(parts), len(parts))


async def via_agentrun(client: AgentRunClient, prompt: str) -> Sample:
    wall0, t0 = time.time(), time.perf_counter()
    run_id = await client.start_run(AGENT, prompt)
    start_rpc = time.perf_counter() - t0
    ttft = emitted = last_text = 0.0
    kind, parts = "", []
    # Opened as soon as the run id is known; stream_run stops after the terminal event.
    async for event in client.stream_run(run_id):
        kind = event.WhichOneof("kind") or ""
        if kind == "text_delta":
            if not ttft:
                ttft = time.perf_counter() - t0
                # The worker stamps each event as it creates it; one machine, so one clock.
                emitted = event.time.ToNanoseconds() / 1e9 - wall0
            parts.append(event.text_delta.text)
            last_text = time.perf_counter() - t0
    if kind != "run_completed":
        raise RuntimeError(f"run {run_id} ended with {kind or 'no terminal event'}")
    return Sample(ttft, time.perf_counter() - t0, "".join(parts), len(parts), start_rpc, emitted, last_text)


async def interleaved(paths: Paths, n: int, prompt: str) -> dict[str, list[Sample]]:
    """Both paths each iteration, the order flipping, so noise and drift hit both alike."""
    samples: dict[str, list[Sample]] = {name: [] for name in paths}
    for i in range(n):
        for name in list(paths)[:: 1 if i % 2 == 0 else -1]:
            samples[name].append(await asyncio.wait_for(paths[name](prompt.format(i=i)), RUN_TIMEOUT))
    return samples


Measured = tuple[dict[str, list[Sample]], dict[str, list[Sample]]]  # TTFT samples, throughput samples


async def measure(runs: int, chunks: list[str], *, env: dict[str, str]) -> Measured:
    agent = yaml.safe_load(AGENTS_FILE.read_text())["agents"][AGENT]
    key = f"bench-{uuid.uuid4().hex[:12]}"
    async with (
        running_stack(AGENTS_FILE, env=env) as stack,
        openai.AsyncOpenAI(base_url=stack.model_url, api_key="offline", max_retries=0) as llm,
        AgentRunClient(stack.grpc_target) as client,
    ):
        paths: Paths = {"direct": partial(direct, llm, agent), "agentrun": partial(via_agentrun, client)}
        # Warm-up: connections, lazy imports, Temporal's first workflow tasks, the worker's first poll.
        await interleaved(paths, WARMUP, "Warm-up {i}: say hello.")
        ttft = await interleaved(paths, runs, "Question {i}: what is a durable workflow?")
        # Past its last step a script repeats it, so one key serves every repetition of both paths.
        await add_script(stack, key, [{"chunks": chunks}])
        long = await interleaved(paths, THROUGHPUT_REPS, f"Recite {key}, take {{i}}.")
    return ttft, long


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[str]:
    """An OTLP/gRPC receiver in a process of its own (so that receiving costs the measured processes nothing);
    yields its endpoint."""
    port = free_port()
    receiver = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devstack.collector",
        "--port",
        str(port),
        "--quiet",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        receiver.terminate()
        await receiver.wait()


async def bench(runs: int, tokens: int, tracing: bool) -> None:
    chunks = [f"tok{i} " for i in range(tokens)]
    off = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    if not tracing:
        ttft, long = await measure(runs, chunks, env=off)
        report(runs, tokens, ttft, long, "".join(chunks))
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Two stacks at once, one traced, and their samples interleaved: on a shared machine, the noise between two
    # stacks measured one after the other is larger than what tracing costs.
    async with otlp_receiver() as endpoint:
        on = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp"}
        provider = TracerProvider(resource=Resource.create({"service.name": "bench-client"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        interceptors = aio_client_interceptors(tracer_provider=provider)  # type: ignore[no-untyped-call]
        async with (
            running_stack(AGENTS_FILE, env=off) as plain,
            running_stack(AGENTS_FILE, env=on) as traced,
            AgentRunClient(plain.grpc_target) as plain_client,
            AgentRunClient(traced.grpc_target, interceptors=interceptors) as traced_client,
        ):
            paths: Paths = {"off": partial(via_agentrun, plain_client), "on": partial(via_agentrun, traced_client)}
            await interleaved(paths, WARMUP, "Warm-up {i}: say hello.")
            ttft = await interleaved(paths, runs, "Question {i}: what is a durable workflow?")
        await asyncio.to_thread(provider.shutdown)
    print(f"\nagentrun TTFT with tracing off and on: {os.cpu_count()} CPUs, {platform.platform(terse=True)}")
    print(f"two stacks side by side, {runs} interleaved samples each after {WARMUP} warm-ups; 'on' traces every run")
    print("in server, worker and client and exports spans and metrics over OTLP/gRPC to a receiver process\n")
    print(f"{'StartRun -> first text_delta (ms)':<46}{'median':>8}{'p10':>8}{'p90':>8}")
    print(_row("tracing off", [s.ttft for s in ttft["off"]]))
    print(_row("tracing on", [s.ttft for s in ttft["on"]]))
    added = statistics.median(s.ttft for s in ttft["on"]) - statistics.median(s.ttft for s in ttft["off"])
    verdict = "met" if added * 1e3 <= 2 else f"MISSED by {added * 1e3 - 2:.1f} ms"
    print(f"  {'added by tracing (median - median)':<44}{added * 1e3:>8.1f}   target <= 2 ms: {verdict}")
    print(_row("StartRun round trip, tracing off", [s.start_rpc for s in ttft["off"]]))
    print(_row("StartRun round trip, tracing on", [s.start_rpc for s in ttft["on"]]))


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The repo at ``revision``, in a temporary git worktree."""
    tree = Path(tempfile.mkdtemp(prefix="agentrun-bench-")) / "tree"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(tree), revision], check=True)
    try:
        yield tree
    finally:
        subprocess.run([*git, "remove", "--force", str(tree)], check=True)
        shutil.rmtree(tree.parent, ignore_errors=True)


async def against(runs: int, revision: str) -> None:
    """This checkout's time to first token beside ``revision``'s, two stacks side by side, samples interleaved."""
    off = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    ours = "this checkout"
    with checkout(revision) as tree:
        async with (
            running_stack(tree / "agents.yaml", env=off, root=tree) as their_stack,
            running_stack(AGENTS_FILE, env=off) as our_stack,
            AgentRunClient(their_stack.grpc_target) as their_client,
            AgentRunClient(our_stack.grpc_target) as our_client,
        ):
            paths: Paths = {revision: partial(via_agentrun, their_client), ours: partial(via_agentrun, our_client)}
            await interleaved(paths, WARMUP, "Warm-up {i}: say hello.")
            ttft = await interleaved(paths, runs, "Question {i}: what is a durable workflow?")
    print(f"\nagentrun TTFT, {ours} beside {revision}: {os.cpu_count()} CPUs, {platform.platform(terse=True)}")
    print(f"two stacks side by side, {runs} interleaved samples each after {WARMUP} warm-ups\n")
    print(f"{'StartRun -> first text_delta (ms)':<46}{'median':>8}{'p10':>8}{'p90':>8}")
    medians = {name: statistics.median(s.ttft for s in samples) for name, samples in ttft.items()}
    for name, samples in ttft.items():
        print(_row(name, [s.ttft for s in samples]))
    print(f"  {f'{ours} - {revision} (median - median)':<44}{(medians[ours] - medians[revision]) * 1e3:>8.1f}")
    for name, samples in ttft.items():
        print(_row(f"StartRun round trip, {name}", [s.start_rpc for s in samples]))


def _row(label: str, xs: list[float]) -> str:  # median, p10, p90 in ms
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    return f"  {label:<44}{statistics.median(xs) * 1e3:>8.1f}{deciles[0] * 1e3:>8.1f}{deciles[-1] * 1e3:>8.1f}"


def report(runs: int, tokens: int, ttft: dict[str, list[Sample]], long: dict[str, list[Sample]], expected: str) -> None:
    row = _row

    print(f"\nagentrun TTFT benchmark: {os.cpu_count()} CPUs, {platform.platform(terse=True)}")
    print(f"offline model (0 ms token delay); {runs} interleaved samples per path after {WARMUP} warm-ups\n")
    d, a = ttft["direct"], ttft["agentrun"]
    print(f"{'time to first token (ms)':<46}{'median':>8}{'p10':>8}{'p90':>8}")
    print(row("direct   (create() -> first content chunk)", [s.ttft for s in d]))
    print(row("agentrun (StartRun -> first text_delta)", [s.ttft for s in a]))
    added = (statistics.median(s.ttft for s in a) - statistics.median(s.ttft for s in d)) * 1e3
    verdict = "met" if added <= 30 else f"MISSED by {added - 30:.1f} ms"
    print(f"  {'added by agentrun (median - median)':<44}{added:>8.1f}   target <= 30 ms: {verdict}")
    # Where the first token's time goes: StartRun, the worker (workflow/activity dispatch, model), delivery.
    print("  agentrun breakdown:")
    print(row("  StartRun round trip", [s.start_rpc for s in a]))
    print(row("  StartRun call -> worker creates 1st delta", [s.emitted for s in a]))
    print(row("  worker creates 1st delta -> client has it", [s.ttft - s.emitted for s in a]))
    print(row("  StartRun returned -> client has 1st delta", [s.ttft - s.start_rpc for s in a]))
    print(row("  whole run: StartRun -> terminal event", [s.total for s in a]))

    print(f"\n{f'throughput, {tokens}-token reply, {THROUGHPUT_REPS} reps':<46}{'tok/s':>8}{'ms':>8}{'deltas':>8}")
    labels = {"direct": "direct   (create() -> end of stream)", "agentrun": "agentrun (StartRun -> terminal event)"}
    for name, rows in long.items():
        rate = statistics.median(tokens / s.total for s in rows)
        total = statistics.median(s.total for s in rows) * 1e3
        print(f"  {labels[name]:<44}{rate:>8.0f}{total:>8.1f}{statistics.median(s.deltas for s in rows):>8.0f}")
        if bad := sum(s.text != expected for s in rows):
            print(f"  WARNING: {name}: {bad} of {len(rows)} streamed texts differ from the scripted text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="TTFT samples per path (at least 2)")
    parser.add_argument("--tokens", type=int, default=2000, help="length of the throughput reply, in tokens")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--tracing", action="store_true", help="measure again with tracing on, and compare")
    modes.add_argument("--against", metavar="REV", help="compare this checkout with a git revision, side by side")
    args = parser.parse_args()
    if args.against:
        asyncio.run(against(max(2, args.runs), args.against))
    else:
        asyncio.run(bench(max(2, args.runs), args.tokens, args.tracing))


if __name__ == "__main__":
    main()
