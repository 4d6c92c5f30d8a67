"""What one server process holds: idle streams, and many runs streaming at once.

Starts every real component as production runs them (Temporal dev server, Redis, the offline model, and the worker
and the gRPC server as separate processes) and prints figures; nothing is asserted. From the repo root:
    python -m bench.streams [--idle-streams 10000] [--idle-runs 100] [--active-runs 1000]

Idle: runs wait for an approval while ``--idle-streams`` StreamRun calls follow them (spread over the runs). It
prints how many streams the server holds, its memory per open stream, its Redis connections, and the calls per second
it makes to Temporal while nothing happens.

Active: ``--active-runs`` runs start together against a paced model, each followed by one stream from its start; it
prints how many completed, events lost or repeated, and the time from StartRun to run_completed beside the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
import uuid
from dataclasses import dataclass, field

import grpc
import openai
import redis.asyncio as redis

from agentrun.client import AgentRunClient
from agentrun.v1 import agent_service_pb2 as pb
from agentrun.v1 import agent_service_pb2_grpc as pb_grpc
from bench._stack import ROOT, Stack, add_script, rss_bytes, running_stack, temporal_requests

AGENTS_FILE = ROOT / "agents.yaml"
IDLE_AGENT = "operator"  # asks for an approval before its calculator call, then waits for it
ACTIVE_AGENT = "assistant"
STREAMS_PER_CHANNEL = 100  # each channel is one HTTP/2 connection, as many clients would open
IDLE_WINDOW_SECONDS = 30.0
SETTLE_SECONDS = 3.0
START_CONCURRENCY = 200  # StartRun calls in flight while the idle runs are created
# Long polls of the worker; what is left is what the server (and the worker's real work) asks of Temporal.
WORKER_POLLS = {"PollWorkflowTaskQueue", "PollActivityTaskQueue", "PollNexusTaskQueue"}


def channel_options() -> list[tuple[str, int]]:
    # A channel of its own (not shared with others of the same target), so the streams spread over connections.
    return [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 4 << 20)]


# --- idle streams -----------------------------------------------------------------------------------------------


@dataclass
class Idle:
    streams: int
    runs: int
    held: int  # streams open and waiting once every one has seen its run's approval request
    rss_before: int
    rss_after: int
    rss_idle: int  # at the end of the idle window
    redis_connections: dict[str, int]
    temporal_calls_per_second: dict[str, float]
    open_seconds: float
    relay_log: list[str]  # what the server logged about its relay (reconnects, failed checks)


async def idle_runs(client: AgentRunClient, n: int) -> list[str]:
    """Runs that wait for an approval (their calculator call), started ``START_CONCURRENCY`` at a time."""
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def start(i: int) -> str:
        async with gate:
            return await client.start_run(IDLE_AGENT, f"Idle run {i}: what is {i} + 1?")

    return await asyncio.gather(*(start(i) for i in range(n)))


async def follow_until_waiting(stub: pb_grpc.AgentServiceAsyncStub, run_id: str, waiting: asyncio.Event) -> None:
    """One idle watcher: reads its run until the approval request, then holds the stream open."""
    async for reply in stub.StreamRun(pb.StreamRunRequest(run_id=run_id)):
        if reply.event.WhichOneof("kind") == "approval_requested":
            waiting.set()
        elif reply.event.WhichOneof("kind") in ("run_completed", "run_failed", "run_cancelled"):
            raise RuntimeError(f"idle run {run_id} ended: {reply.event}")


async def redis_connections(url: str) -> dict[str, int]:
    """The Redis connections open now, by client name, of the server (named agentrun-server*)."""
    async with redis.Redis.from_url(url) as direct:
        clients = await direct.client_list()
    counts: dict[str, int] = {}
    for entry in clients:
        if entry.get("name", "").startswith("agentrun-server"):
            counts[entry["name"]] = counts.get(entry["name"], 0) + 1
    return counts


async def idle_phase(stack: Stack, client: AgentRunClient, streams: int, runs: int) -> Idle:
    run_ids = await idle_runs(client, runs)
    await asyncio.sleep(SETTLE_SECONDS)
    rss_before = rss_bytes(stack.pid("server"))
    channels = [
        grpc.aio.insecure_channel(stack.grpc_target, options=channel_options())
        for _ in range(-(-streams // STREAMS_PER_CHANNEL))
    ]
    stubs: list[pb_grpc.AgentServiceAsyncStub] = [pb_grpc.AgentServiceStub(channel) for channel in channels]
    waiting = [asyncio.Event() for _ in range(streams)]
    t0 = time.perf_counter()
    watchers = [
        asyncio.create_task(follow_until_waiting(stubs[i % len(stubs)], run_ids[i % runs], waiting[i]))
        for i in range(streams)
    ]
    try:
        for event, task in zip(waiting, watchers, strict=True):
            done, _ = await asyncio.wait([asyncio.ensure_future(event.wait()), task], return_when="FIRST_COMPLETED")
            if task in done:
                task.result()  # raises what ended the watcher
        open_seconds = time.perf_counter() - t0
        await asyncio.sleep(SETTLE_SECONDS)
        rss_after = rss_bytes(stack.pid("server"))
        connections = await redis_connections(stack.redis_url)
        before = await temporal_requests(stack)
        await asyncio.sleep(IDLE_WINDOW_SECONDS)
        after = await temporal_requests(stack)
        rss_idle = rss_bytes(stack.pid("server"))
        held = sum(not task.done() for task in watchers)
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in channels))
    rates = {op: (after[op] - before.get(op, 0.0)) / IDLE_WINDOW_SECONDS for op in after if op not in WORKER_POLLS}
    await asyncio.gather(*(client.cancel_run(run_id, reason="benchmark done") for run_id in run_ids))
    relay_log = [line for line in stack.log_lines("server") if "relay" in line]
    return Idle(streams, runs, held, rss_before, rss_after, rss_idle, connections, rates, open_seconds, relay_log)


# --- active runs ------------------------------------------------------------------------------------------------


@dataclass
class Active:
    runs: int
    tokens: int
    model_seconds: float  # the model's own time for one reply, streamed directly
    totals: list[float] = field(default_factory=list)  # StartRun -> run_completed, per completed run
    completed: int = 0
    ended_otherwise: list[str] = field(default_factory=list)
    lost: int = 0  # sequence numbers skipped
    repeated: int = 0  # sequence numbers seen twice
    wrong_text: int = 0  # runs whose streamed text is not the model's
    wall_seconds: float = 0.0
    temporal_calls: dict[str, float] = field(default_factory=dict)  # Temporal frontend calls during the phase


async def one_active_run(client: AgentRunClient, prompt: str, expected: str, result: Active) -> None:
    t0 = time.perf_counter()
    run_id = await client.start_run(ACTIVE_AGENT, prompt)
    seen: set[int] = set()
    last, parts, kind = 0, [], ""
    async for event in client.stream_run(run_id):
        if event.sequence in seen:
            result.repeated += 1
        seen.add(event.sequence)
        result.lost += max(0, event.sequence - last - 1)
        last = max(last, event.sequence)
        kind = event.WhichOneof("kind") or ""
        if kind == "text_delta":
            parts.append(event.text_delta.text)
    if kind != "run_completed":
        result.ended_otherwise.append(f"{run_id}: {kind or 'no terminal event'}")
        return
    result.completed += 1
    result.totals.append(time.perf_counter() - t0)
    result.wrong_text += "".join(parts) != expected


async def model_time(stack: Stack, prompt: str, reps: int = 5) -> float:
    """The model's own time for the scripted reply: a direct stream from request to its end (median)."""
    async with openai.AsyncOpenAI(base_url=stack.model_url, api_key="offline", max_retries=0) as llm:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            stream = await llm.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
            )
            async for _chunk in stream:
                pass
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def active_phase(stack: Stack, client: AgentRunClient, runs: int, tokens: int, token_delay_ms: float) -> Active:
    """``runs`` runs started together, each streaming ``tokens`` tokens paced ``token_delay_ms`` apart."""
    key = f"paced-{uuid.uuid4().hex[:12]}"
    chunks = [f"tok{i} " for i in range(tokens)]
    await add_script(stack, key, [{"chunks": chunks, "delay_ms": token_delay_ms}])
    result = Active(runs, tokens, await model_time(stack, f"Measure {key}."))
    calls_before = await temporal_requests(stack)
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(
        *(one_active_run(client, f"Run {i} of {key}.", "".join(chunks), result) for i in range(runs)),
        return_exceptions=True,
    )
    result.wall_seconds = time.perf_counter() - t0
    calls_after = await temporal_requests(stack)
    result.temporal_calls = {
        op: n - calls_before.get(op, 0.0) for op, n in calls_after.items() if op not in WORKER_POLLS
    }
    result.ended_otherwise += [f"{type(err).__name__}: {err}" for err in outcomes if isinstance(err, BaseException)]
    return result


# --- report -----------------------------------------------------------------------------------------------------


def print_idle(idle: Idle) -> None:
    per_stream = (idle.rss_after - idle.rss_before) / max(1, idle.held)
    print(f"idle: {idle.streams} StreamRun calls over {idle.runs} runs waiting for an approval, one server process")
    print(f"  streams held open                      {idle.held:>10}   (all open after {idle.open_seconds:.1f} s)")
    before, after = idle.rss_before / 2**20, idle.rss_after / 2**20
    print(f"  server memory before / after           {before:>8.1f} / {after:.1f} MiB")
    print(f"  server memory per open stream          {per_stream / 1024:>10.1f} KB   target <= 20 KB")
    growth = (idle.rss_idle - idle.rss_after) / 2**20
    print(f"  server memory growth while idle        {growth:>10.1f} MiB over {IDLE_WINDOW_SECONDS:.0f} s")
    names = ", ".join(f"{name} {count}" for name, count in sorted(idle.redis_connections.items()))
    print(f"  server's Redis connections             {sum(idle.redis_connections.values()):>10}   ({names})")
    calls = {op: rate for op, rate in idle.temporal_calls_per_second.items() if rate > 0}
    detail = ", ".join(f"{op} {rate:.2f}" for op, rate in sorted(calls.items())) or "none"
    window = f"{IDLE_WINDOW_SECONDS:.0f} s"
    print(f"  Temporal calls/s over {window} idle          {sum(calls.values()):>10.2f}   ({detail})")
    print("    (all Temporal frontend calls but the worker's long polls, so the worker's own work counts too)")
    for line in idle.relay_log[:5]:
        print(f"  server log: {line}")


def print_active(active: Active) -> None:
    def ms(xs: list[float], q: float) -> str:
        return f"{statistics.quantiles(xs, n=100, method='inclusive')[int(q) - 1] * 1e3:>10.0f}" if xs else "       n/a"

    print(f"active: {active.runs} runs started together, each streaming {active.tokens} tokens from a paced model")
    print(f"  completed                              {active.completed:>10}   of {active.runs}")
    print(f"  events lost / repeated                 {active.lost:>10} / {active.repeated}")
    print(f"  runs whose text differs from the model {active.wrong_text:>10}")
    for failure in active.ended_otherwise[:5]:
        print(f"  NOT COMPLETED: {failure}")
    print(f"  model's own time for one reply (ms)    {active.model_seconds * 1e3:>10.0f}")
    print(f"  StartRun -> run_completed median (ms)  {ms(active.totals, 50)}")
    print(f"  StartRun -> run_completed p99 (ms)     {ms(active.totals, 99)}")
    print(f"  all {active.runs} runs, first start to last end  {active.wall_seconds:>8.1f} s")
    busiest = sorted(active.temporal_calls.items(), key=lambda item: -item[1])[:4]
    print("  Temporal calls per run: " + ", ".join(f"{op} {n / active.runs:.1f}" for op, n in busiest))


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, {platform.platform(terse=True)}, load average before the run {load}"


async def bench(args: argparse.Namespace) -> None:
    env = {"AGENTRUN_WORKER_ACTIVITIES": str(max(1000, args.active_runs))}
    print(f"agentrun streams benchmark: {machine()}\n")
    async with running_stack(AGENTS_FILE, env=env) as stack, AgentRunClient(stack.grpc_target) as client:
        await client.run(ACTIVE_AGENT, "Warm-up: say hello.")
        if args.idle_streams:
            print_idle(await idle_phase(stack, client, args.idle_streams, args.idle_runs))
            print()
        if args.active_runs:
            print_active(await active_phase(stack, client, args.active_runs, args.tokens, args.token_delay_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-streams", type=int, default=10_000, help="idle StreamRun calls to hold (0: skip)")
    parser.add_argument("--idle-runs", type=int, default=100, help="runs the idle streams follow")
    parser.add_argument("--active-runs", type=int, default=1000, help="runs streaming at once (0: skip)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens each active run streams")
    parser.add_argument("--token-delay-ms", type=float, default=5.0, help="the paced model's delay between tokens")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
