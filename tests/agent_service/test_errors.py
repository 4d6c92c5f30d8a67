"""What a caller hears for each kind of failure, from the one place that decides it."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import redis.asyncio as redis

from agent_service._errors import status_of


async def test_an_exhausted_redis_pool_is_told_apart_from_a_redis_outage(redis_url: str) -> None:
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=0.2)
    client = redis.Redis(connection_pool=pool)
    # The pool's one connection waits in BLPOP; the next command finds none free in time.
    holder = asyncio.ensure_future(client.blpop([f"test:{uuid.uuid4().hex}"], timeout=2))
    await asyncio.sleep(0.1)
    try:
        try:
            await client.get("anything")
        except redis.ConnectionError as err:
            busy = status_of(err)
        else:
            raise AssertionError("the pool had a free connection")
    finally:
        await holder
        await client.aclose()
    unreachable = redis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5, retry=None)
    try:
        await unreachable.ping()
    except redis.ConnectionError as err:
        down = status_of(err)
    else:
        raise AssertionError("something answered on port 1")
    finally:
        await unreachable.aclose()

    busy_message = "the server is busy (no Redis connection came free in time); retry later"
    assert busy == (grpc.StatusCode.UNAVAILABLE, busy_message)
    assert down == (grpc.StatusCode.UNAVAILABLE, "Redis is unavailable; retry later")
