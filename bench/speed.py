"""The cost of a token and of a run: agentrun beside a direct model stream and beside plain Temporal, in one run.

Starts every real component as production runs them (Temporal dev server, Redis, the offline model, and the worker
and the gRPC server as separate processes) and prints medians side by side; nothing is asserted. From the repo root:
    python -m bench.speed [--quick]

1. added time to first token over a direct ``openai`` stream, beside the floor of any run whose model call is a
   Temporal activity (a plain workflow's activity has its first text), and last token -> run_completed at the client;
2. tokens/s for one long reply, beside the direct stream, with the worker's CPU time per token; and what the relay
   (Redis -> server -> client) carries alone, fed straight into Redis;
3. runs/s with 50 in flight, each streaming 200 tokens to a consumer, beside a plain Temporal workflow with one
   activity making the same model call (bench/_plain.py, its worker in its own process);
4. runs started together against a paced model (bench/streams.py's active phase).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import openai
import redis.asyncio as redis
import yaml
from temporalio.client import Client

from agentrun.client import AgentRunClient
from bench import _plain
from bench._stack import ROOT, Stack, add_script, cpu_seconds, running_stack
from bench.streams import active_phase, machine, print_active
from bench.ttft import AGENT, AGENTS_FILE, Paths, Sample, direct, interleaved, via_agentrun
from shared import events
from shared.contract import RunEnd, RunOutcome
from shared.run_stream import RunStreamWriter, StartMark, mark_started

WARMUP = 3
IN_FLIGHT = 50
RELAY_BATCH = 64  # events per append when the relay is fed straight into Redis


@dataclass
class Sizes:
    ttft_samples: int
    long_tokens: int
    long_reps: int
    relay_tokens: int
    flight_runs: int
    flight_tokens: int
    paced_runs: int
    paced_tokens: int
    paced_delay_ms: float


FULL = Sizes(30, 20_000, 3, 200_000, 150, 200, 1000, 100, 5.0)
QUICK = Sizes(6, 5_000, 2, 50_000, 50, 200, 100, 100, 5.0)


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


# --- plain Temporal: the floor --------------------------------------------------------------------------------


@dataclass
class Plain:
    temporal: Client
    task_queue: str  # bench/_plain.py's worker polls it

    async def run(self, prompt: str) -> _plain.PlainReply:
        reply: _plain.PlainReply = await self.temporal.execute_workflow(
            _plain.WORKFLOW,
            prompt,
            id=f"{self.task_queue}-{uuid.uuid4().hex}",
            task_queue=self.task_queue,
            result_type=_plain.PlainReply,
        )
        return reply


@asynccontextmanager
async def plain_temporal(stack: Stack) -> AsyncIterator[Plain]:
    """bench/_plain.py's worker in a process of its own, on the stack's Temporal and model."""
    queue = f"plain-{uuid.uuid4().hex[:8]}"
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench._plain", "--temporal", stack.temporal_address),
        *("--task-queue", queue, "--model-url", stack.model_url),
        cwd=ROOT,
    )
    try:
        yield Plain(await Client.connect(stack.temporal_address), queue)
    finally:
        worker.terminate()
        await worker.wait()


async def via_plain(plain: Plain, prompt: str) -> Sample:
    """A plain workflow started as StartRun starts one; its time to first token is when its activity has the
    text, which no client has yet."""
    wall0, t0 = time.time(), time.perf_counter()
    reply = await plain.run(prompt)
    return Sample(reply.first_text_at - wall0, time.perf_counter() - t0, reply.text, 0)


# --- 1 and 2: one run at a time ---------------------------------------------------------------------------------


async def long_reply(stack: Stack, paths: Paths, tokens: int, reps: int) -> tuple[dict[str, list[Sample]], float, str]:
    """The long reply through both paths, and the worker's CPU seconds per token on agentrun's."""
    key = f"long-{uuid.uuid4().hex[:12]}"
    chunks = [f"tok{i} " for i in range(tokens)]
    await add_script(stack, key, [{"chunks": chunks}])
    cpu0 = cpu_seconds(stack.pid("worker"))
    # The worker's CPU covers agentrun's runs only: the direct path never reaches it.
    samples = await interleaved(paths, reps, f"Recite {key}, take {{i}}.")
    per_token = (cpu_seconds(stack.pid("worker")) - cpu0) / (tokens * reps)
    return samples, per_token, "".join(chunks)


@dataclass
class Relayed:
    tokens_per_second: float  # at the client, from its first event to its last
    events: int
    server_cpu_per_event: float  # seconds


async def relay_alone(stack: Stack, client: AgentRunClient, tokens: int, *, coalesce: bool) -> Relayed:
    """Feeds a run's Redis stream straight, with no model and no worker, while a client streams the run.

    ``coalesce``: as the worker feeds it, text written while an append is in flight goes out as one event. Else one
    event per token, appended ``RELAY_BATCH`` at a time: what the relay costs per event.
    """
    run_id = f"relay-bench-{uuid.uuid4().hex[:12]}"
    texts = [f"tok{i} " for i in range(tokens)]
    async with redis.Redis.from_url(stack.redis_url) as direct_redis:
        await mark_started(direct_redis, stack.redis_prefix, run_id, ttl_seconds=600, mark=StartMark())
        writer = RunStreamWriter(direct_redis, stack.redis_prefix, ttl_seconds=600)
        received: list[str] = []
        first = asyncio.get_running_loop().create_future()

        async def consume() -> float:
            async for event in client.stream_run(run_id):
                if not first.done():
                    first.set_result(time.perf_counter())
                if event.WhichOneof("kind") == "text_delta":
                    received.append(event.text_delta.text)
                elif event.WhichOneof("kind") == "run_completed":
                    return time.perf_counter()
            raise RuntimeError("the relayed stream ended without its terminal event")

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.2)  # the stream is open and watching before the first append
        cpu0 = cpu_seconds(stack.pid("server"))
        last = await (feed_coalesced(writer, run_id, texts) if coalesce else feed_per_token(writer, run_id, texts))
        await writer.append(run_id, [events.run_ended(RunOutcome(RunEnd.COMPLETED, output="done"))], floor=last)
        end = await consumer
        cpu = cpu_seconds(stack.pid("server")) - cpu0
    if "".join(received) != "".join(texts):
        raise RuntimeError("the relayed text differs from the text appended")
    started: float = first.result()
    return Relayed(tokens / (end - started), len(received) + 1, cpu / (len(received) + 1))


async def feed_per_token(writer: RunStreamWriter, run_id: str, texts: list[str]) -> int:
    last = 0
    for start in range(0, len(texts), RELAY_BATCH):
        batch = [events.text_delta(text) for text in texts[start : start + RELAY_BATCH]]
        last = (await writer.append(run_id, batch, floor=last)).last_sequence
    return last


async def feed_coalesced(writer: RunStreamWriter, run_id: str, texts: list[str]) -> int:
    pending: list[str] = []

    async def produce() -> None:  # a model that is never the limit: chunks in bursts, as a socket hands them over
        for i, text in enumerate(texts):
            pending.append(text)
            if i % 50 == 49:
                await asyncio.sleep(0)

    producer, last = asyncio.create_task(produce()), 0
    while not producer.done() or pending:
        if not pending:
            await asyncio.sleep(0)
            continue
        text = "".join(pending)
        pending.clear()
        last = (await writer.append(run_id, [events.text_delta(text)], floor=last)).last_sequence
    return last


# --- 3: runs per second with 50 in flight ----------------------------------------------------------------------


async def in_flight(n: int, one: Callable[[int], Awaitable[str]], expected: str) -> float:
    """Runs per second with ``IN_FLIGHT`` runs at a time."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated(i: int) -> None:
        async with gate:
            if (text := await one(i)) != expected:
                raise RuntimeError(f"run {i} answered {len(text)} characters, not the {len(expected)} expected")

    t0 = time.perf_counter()
    await asyncio.gather(*(gated(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def runs_per_second(
    client: AgentRunClient, plain: Plain, stack: Stack, runs: int, tokens: int
) -> dict[str, float]:
    key = f"flight-{uuid.uuid4().hex[:12]}"
    chunks = [f"tok{i} " for i in range(tokens)]
    await add_script(stack, key, [{"chunks": chunks}])
    expected = "".join(chunks)

    async def plain_text(i: int) -> str:
        return (await plain.run(f"Run {i} of {key}.")).text

    async def agentrun(i: int) -> str:
        return (await via_agentrun(client, f"Run {i} of {key}.")).text

    for one in (plain_text, agentrun):  # warm both: first workflow tasks, connections
        await in_flight(IN_FLIGHT, lambda i, one=one: one(10_000_000 + i), expected)  # type: ignore[misc]
    rates: dict[str, list[float]] = {"plain": [], "agentrun": []}
    for rep in range(2):  # interleaved, the order flipping, so drift hits both alike
        for name in ("plain", "agentrun")[:: 1 if rep % 2 == 0 else -1]:
            one = plain_text if name == "plain" else agentrun
            rates[name].append(await in_flight(runs, lambda i, one=one, rep=rep: one(rep * runs + i), expected))  # type: ignore[misc]
    return {name: statistics.median(xs) for name, xs in rates.items()}


# --- the whole benchmark ----------------------------------------------------------------------------------------


async def bench(sizes: Sizes) -> None:
    agent = yaml.safe_load(AGENTS_FILE.read_text())["agents"][AGENT]
    print(f"agentrun speed benchmark: {machine()}\n")
    async with (
        running_stack(AGENTS_FILE) as stack,
        openai.AsyncOpenAI(base_url=stack.model_url, api_key="offline", max_retries=0) as llm,
        AgentRunClient(stack.grpc_target) as client,
        plain_temporal(stack) as plain,
    ):
        paths: Paths = {"direct": partial(direct, llm, agent), "agentrun": partial(via_agentrun, client)}
        first: Paths = {**paths, "plain": partial(via_plain, plain)}
        await interleaved(first, WARMUP, "Warm-up {i}: say hello.")
        short = await interleaved(first, sizes.ttft_samples, "Question {i}: what is a durable workflow?")
        long, cpu_per_token, expected = await long_reply(stack, paths, sizes.long_tokens, sizes.long_reps)
        relay = await relay_alone(stack, client, sizes.relay_tokens, coalesce=True)
        per_token = await relay_alone(stack, client, sizes.relay_tokens // 5, coalesce=False)
        flight = await runs_per_second(client, plain, stack, sizes.flight_runs, sizes.flight_tokens)
        paced = await active_phase(stack, client, sizes.paced_runs, sizes.paced_tokens, sizes.paced_delay_ms)

    direct_ms, agentrun_ms, plain_ms = (
        median_ms([s.ttft for s in short[path]]) for path in ("direct", "agentrun", "plain")
    )
    print(f"1. one short run at a time, {sizes.ttft_samples} interleaved samples per path (medians)")
    print(
        f"   time to first token: direct {direct_ms:.1f} ms, agentrun {agentrun_ms:.1f} ms; "
        f"added {agentrun_ms - direct_ms:.1f} ms   target <= 15 ms"
    )
    print(
        f"   the floor of a model call in a Temporal activity: a plain workflow's activity has its first text "
        f"{plain_ms:.1f} ms after start_workflow (Temporal adds {plain_ms - direct_ms:.1f} ms, with no client "
        f"told yet); agentrun adds {agentrun_ms - plain_ms:.1f} ms to that"
    )
    tail = median_ms([s.total - s.last_text for s in short["agentrun"]])
    print(f"   last token -> run_completed at the client: {tail:.1f} ms   target <= 5 ms")

    rate = {name: statistics.median(sizes.long_tokens / s.total for s in rows) for name, rows in long.items()}
    wrong = sum(s.text != expected for rows in long.values() for s in rows)
    print(f"\n2. one {sizes.long_tokens}-token reply, {sizes.long_reps} interleaved reps per path (medians)")
    print(
        f"   direct {rate['direct']:,.0f} tok/s, agentrun {rate['agentrun']:,.0f} tok/s: "
        f"{rate['agentrun'] / rate['direct']:.2f}x direct   target >= 0.8x"
    )
    print(
        f"   events per agentrun reply (text coalesced while a write is in flight): "
        f"{statistics.median(s.deltas for s in long['agentrun']):.0f}"
    )
    print(f"   worker CPU per token: {cpu_per_token * 1e3:.4f} ms   target <= 0.05 ms")
    print(
        f"   relay alone (no model, no worker: appended straight to Redis, coalesced as the worker does): "
        f"{relay.tokens_per_second:,.0f} tok/s in {relay.events} events   target >= 20,000"
    )
    print(
        f"   relay alone, one token per event: {per_token.tokens_per_second:,.0f} events/s at one client; "
        f"server CPU per event {per_token.server_cpu_per_event * 1e6:.0f} us"
    )
    if wrong:
        print(f"   WARNING: {wrong} streamed texts differ from the scripted text")

    print(f"\n3. {sizes.flight_runs} runs, {IN_FLIGHT} in flight, {sizes.flight_tokens} tokens each (median of 2 reps)")
    print(
        f"   plain Temporal workflow + activity {flight['plain']:.1f} runs/s, agentrun {flight['agentrun']:.1f} "
        f"runs/s: {flight['agentrun'] / flight['plain']:.2f}x   target >= 0.8x\n"
    )
    print("4.", end=" ")
    print_active(paced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, to try the benchmark out")
    asyncio.run(bench(QUICK if parser.parse_args().quick else FULL))


if __name__ == "__main__":
    main()
