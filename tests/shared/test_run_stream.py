"""The Redis stream layout against a real Redis: sequence numbers, floors and the closed stream."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis

from agentrun.v1 import agent_service_pb2 as pb
from shared import events
from shared.contract import RunEnd, RunOutcome
from shared.run_stream import LOST_SEQUENCE_JUMP, RunStreamWriter, channel, decode_published, read_range, stream_key
from shared.settings import Settings


def delta(text: str) -> pb.RunEvent:
    return events.text_delta(text)


async def test_sequences_are_the_stream_ids_and_have_no_gaps(settings: Settings, redis_client: redis.Redis) -> None:
    writer = RunStreamWriter(redis_client, settings.redis_prefix, ttl_seconds=60)
    first = await writer.append("r1", [delta("a"), delta("b")], floor=0)
    second = await writer.append("r1", [delta("c")], floor=0)

    stored = await read_range(redis_client, settings.redis_prefix, "r1", 0)

    assert (first.last_sequence, second.last_sequence) == (2, 3)
    assert [(e.sequence, e.text_delta.text) for e in stored] == [(1, "a"), (2, "b"), (3, "c")]
    assert [e.sequence for e in await read_range(redis_client, settings.redis_prefix, "r1", 2)] == [3]
    assert 0 < await redis_client.ttl(stream_key(settings.redis_prefix, "r1")) <= 60


async def test_a_floor_keeps_numbering_past_a_lost_stream(settings: Settings, redis_client: redis.Redis) -> None:
    writer = RunStreamWriter(redis_client, settings.redis_prefix, ttl_seconds=60)

    result = await writer.append("r2", [delta("x")], floor=41)

    assert result.last_sequence == 41 + LOST_SEQUENCE_JUMP + 1
    assert [e.sequence for e in await read_range(redis_client, settings.redis_prefix, "r2", 0)] == [
        result.last_sequence
    ]


async def test_a_writer_whose_floor_lags_others_never_reuses_their_numbers_after_a_loss(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # A parent and its sub-agents write one stream, each knowing only its own floor: a sub-agent streamed on to 900
    # while its sibling, last told 120, ran a tool; then Redis lost the stream.
    writer = RunStreamWriter(redis_client, settings.redis_prefix, ttl_seconds=60)
    ahead = await writer.append("r5", [delta("x") for _ in range(900)], floor=0)
    await redis_client.delete(stream_key(settings.redis_prefix, "r5"))

    behind = await writer.append("r5", [delta("y")], floor=120)
    after = await writer.append("r5", [delta("z")], floor=ahead.last_sequence)

    assert behind.last_sequence > ahead.last_sequence
    assert after.last_sequence == behind.last_sequence + 1


async def test_a_terminal_event_closes_the_stream(settings: Settings, redis_client: redis.Redis) -> None:
    writer = RunStreamWriter(redis_client, settings.redis_prefix, ttl_seconds=60)
    await writer.append("r3", [delta("a")], floor=0)
    done = events.run_ended(RunOutcome(RunEnd.COMPLETED, output="a"))

    first = await writer.append("r3", [done], floor=1)
    retried = await writer.append("r3", [done], floor=1)
    late = await writer.append("r3", [delta("too late")], floor=0)

    assert first.last_sequence == 2 and not first.closed
    assert retried.last_sequence == 2 and retried.closed
    assert late.closed
    stored = await read_range(redis_client, settings.redis_prefix, "r3", 0)
    assert [e.WhichOneof("kind") for e in stored] == ["text_delta", "run_completed"]


async def test_each_entry_is_published_on_the_run_channel(settings: Settings, redis_client: redis.Redis) -> None:
    writer = RunStreamWriter(redis_client, settings.redis_prefix, ttl_seconds=60)
    async with redis_client.pubsub() as pubsub:
        await pubsub.ssubscribe(channel(settings.redis_prefix, "r4"))
        await writer.append("r4", [delta("a"), delta("b")], floor=0, agent_path=["assistant"])

        messages: list[pb.RunEvent] = []
        async with asyncio.timeout(10):
            while len(messages) < 2:
                message = await pubsub.get_message(timeout=1)
                if message is not None and message["type"] == "smessage":
                    messages.append(decode_published(message["data"]))

    assert [(e.sequence, e.text_delta.text, list(e.agent_path)) for e in messages] == [
        (1, "a", ["assistant"]),
        (2, "b", ["assistant"]),
    ]


async def test_a_writer_publishes_each_batch_once(settings: Settings, redis_client: redis.Redis) -> None:
    writer = RunStreamWriter(redis_client, settings.redis_prefix, ttl_seconds=60)

    first = await writer.append("r5", [delta("a"), delta("b")], floor=0, writer="started:0")
    again = await writer.append("r5", [delta("a"), delta("b")], floor=0, writer="started:0")
    text = await writer.append("r5", [delta("c")], floor=2, writer="model:0", batch="1:1")
    retried = await writer.append("r5", [delta("c")], floor=2, writer="model:0", batch="1:1")
    following = await writer.append("r5", [delta("d")], floor=3, writer="model:0", batch="1:2")

    assert [r.last_sequence for r in (first, again, text, retried, following)] == [2, 2, 3, 3, 4]
    stored = await read_range(redis_client, settings.redis_prefix, "r5", 0)
    assert [e.text_delta.text for e in stored] == ["a", "b", "c", "d"]
    assert await writer.last_sequence("r5") == 4
    assert await writer.last_sequence("no-such-run") == 0
