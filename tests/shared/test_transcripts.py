"""Runs' transcripts against a real Redis: writes from a start, retries that change nothing, loss, expiry."""

from __future__ import annotations

import pytest
import redis.asyncio as redis

from shared.settings import Settings
from shared.transcripts import Message, TranscriptLostError, TranscriptStore, transcript_key

RUN = "run-1"


def message(n: int) -> Message:
    return {"role": "tool", "tool_call_id": f"call-{n}", "content": f"result {n} ✓"}


@pytest.fixture
def store(settings: Settings, redis_client: redis.Redis) -> TranscriptStore:
    return TranscriptStore(redis_client, settings.redis_prefix)


async def test_each_write_adds_the_new_messages_and_returns_the_whole_transcript(store: TranscriptStore) -> None:
    assert await store.write(RUN, 0, [message(0)], ttl_seconds=60) == [message(0)]
    assert await store.write(RUN, 1, [message(1), message(2)], ttl_seconds=60) == [message(0), message(1), message(2)]
    assert await store.write(RUN, 3, [], ttl_seconds=60) == [message(0), message(1), message(2)]


async def test_a_retried_write_adds_nothing(store: TranscriptStore) -> None:
    await store.write(RUN, 0, [message(0)], ttl_seconds=60)
    await store.write(RUN, 1, [message(1)], ttl_seconds=60)

    assert await store.write(RUN, 1, [message(1)], ttl_seconds=60) == [message(0), message(1)]


async def test_a_write_replaces_what_the_transcript_has_from_its_start_on(store: TranscriptStore) -> None:
    # A stale attempt of an earlier round, or a run that Temporal reset: the writer's messages are the truth.
    await store.write(RUN, 0, [message(0), message(1), message(2)], ttl_seconds=60)

    assert await store.write(RUN, 1, [message(5)], ttl_seconds=60) == [message(0), message(5)]
    assert await store.write(RUN, 0, [message(7)], ttl_seconds=60) == [message(7)]


async def test_a_transcript_shorter_than_the_start_was_lost(
    store: TranscriptStore, settings: Settings, redis_client: redis.Redis
) -> None:
    await store.write(RUN, 0, [message(0), message(1)], ttl_seconds=60)
    await redis_client.delete(transcript_key(settings.redis_prefix, RUN))

    with pytest.raises(TranscriptLostError, match="holds fewer than the 2 messages"):
        await store.write(RUN, 2, [message(2)], ttl_seconds=60)
    assert not await redis_client.exists(transcript_key(settings.redis_prefix, RUN))
    # Sent whole again, it is whole again.
    assert await store.write(RUN, 0, [message(0), message(1), message(2)], ttl_seconds=60) == [
        message(0),
        message(1),
        message(2),
    ]


async def test_every_write_renews_the_expiry_and_delete_drops_it(
    store: TranscriptStore, settings: Settings, redis_client: redis.Redis
) -> None:
    key = transcript_key(settings.redis_prefix, RUN)
    await store.write(RUN, 0, [message(0)], ttl_seconds=60)
    await redis_client.expire(key, 5)

    await store.write(RUN, 1, [], ttl_seconds=60)

    assert 55 < await redis_client.ttl(key) <= 60
    await store.delete(RUN)
    assert not await redis_client.exists(key)
    with pytest.raises(ValueError, match="positive"):
        await store.write(RUN, 0, [message(0)], ttl_seconds=0)
