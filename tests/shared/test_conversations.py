"""Conversation history and the active-run claim against a real Redis: idempotent appends,
trimming, the model's window and its turn boundaries, and claims under concurrency."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import redis.asyncio as redis

from shared.conversations import ConversationStore, Message, active_key, messages_key, runs_key
from shared.settings import Settings

CONV = "conv-1"


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str | None = None, calls: list[str] | None = None) -> Message:
    message: Message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": call, "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": call})}}
            for call in calls
        ]
    return message


def tool(call_id: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "content": f"result of {call_id}"}


def turn(run_id: str, steps: int, *, final: bool = True) -> list[Message]:
    """A run's messages: its user message, ``steps`` rounds of one tool call, then maybe an answer."""
    messages = [user(f"{run_id}: question ✓")]
    for step in range(steps):
        call = f"{run_id}-call-{step}"
        messages += [assistant(calls=[call]), tool(call)]
    if final:
        messages.append(assistant(f"{run_id}: answer"))
    return messages


@pytest.fixture
def store(settings: Settings, redis_client: redis.Redis) -> ConversationStore:
    return ConversationStore(redis_client, settings.redis_prefix)


async def test_append_stores_only_what_the_run_has_not_stored(
    store: ConversationStore, settings: Settings, redis_client: redis.Redis
) -> None:
    messages = turn("r1", steps=1)

    assert await store.append(CONV, "r1", messages[:2], ttl_seconds=60) == 2
    assert await store.append(CONV, "r1", messages[:2], ttl_seconds=60) == 2
    assert await store.append(CONV, "r1", messages[:1], ttl_seconds=60) == 2
    assert await store.append(CONV, "r1", [], ttl_seconds=60) == 2
    assert await store.messages(CONV) == messages[:2]
    assert await store.append(CONV, "r1", messages, ttl_seconds=60) == 4
    assert await store.append(CONV, "r1", messages, ttl_seconds=60) == 4

    assert await store.messages(CONV) == messages
    raw = await redis_client.lrange(messages_key(settings.redis_prefix, CONV), 0, -1)
    assert [json.loads(item) for item in raw] == [{"run_id": "r1", "message": m} for m in messages]


async def test_concurrent_retries_in_any_order_store_each_message_once(store: ConversationStore) -> None:
    messages = turn("r1", steps=4)
    prefixes = [messages[:length] for length in range(len(messages) + 1)] * 3
    random.Random(7).shuffle(prefixes)

    await asyncio.gather(*(store.append(CONV, "r1", prefix, ttl_seconds=60) for prefix in prefixes))

    assert await store.messages(CONV) == messages


async def test_two_runs_add_their_turns_in_order(store: ConversationStore) -> None:
    first, second = turn("r1", steps=1), turn("r2", steps=2)
    await store.append(CONV, "r1", first[:2], ttl_seconds=60)
    await store.append(CONV, "r1", first, ttl_seconds=60)
    await store.append(CONV, "r2", second[:1], ttl_seconds=60)
    await store.append(CONV, "r1", first, ttl_seconds=60)  # a late retry of the earlier run
    await store.append(CONV, "r2", second, ttl_seconds=60)

    assert await store.messages(CONV) == first + second
    assert await store.messages("other") == []


async def test_every_write_sets_and_refreshes_the_expiry(
    store: ConversationStore, settings: Settings, redis_client: redis.Redis
) -> None:
    keys = [messages_key(settings.redis_prefix, CONV), runs_key(settings.redis_prefix, CONV)]
    messages = turn("r1", steps=0)
    await store.append(CONV, "r1", messages[:1], ttl_seconds=100)
    assert [0 < await redis_client.ttl(key) <= 100 for key in keys] == [True, True]

    for key in keys:
        await redis_client.expire(key, 5)
    await store.append(CONV, "r1", messages, ttl_seconds=100)
    assert [await redis_client.ttl(key) > 5 for key in keys] == [True, True]

    for key in keys:
        await redis_client.expire(key, 5)
    await store.append(CONV, "r1", messages, ttl_seconds=100)  # a retry that stores nothing
    assert [await redis_client.ttl(key) > 5 for key in keys] == [True, True]


async def test_storage_keeps_the_newest_messages_and_retries_do_not_restore_trimmed_ones(
    store: ConversationStore,
) -> None:
    first, second = turn("r1", steps=2), turn("r2", steps=1)  # 6 and 4 messages

    await store.append(CONV, "r1", first, ttl_seconds=60, max_stored=5)
    assert await store.messages(CONV) == first[-5:]
    await store.append(CONV, "r2", second, ttl_seconds=60, max_stored=5)
    assert await store.messages(CONV) == (first + second)[-5:]
    assert await store.append(CONV, "r1", first, ttl_seconds=60, max_stored=5) == 6

    assert await store.messages(CONV) == (first + second)[-5:]


async def test_append_rejects_settings_that_would_delete_or_keep_everything(store: ConversationStore) -> None:
    with pytest.raises(ValueError):
        await store.append(CONV, "r1", [user("hi")], ttl_seconds=0)
    with pytest.raises(ValueError):
        await store.append(CONV, "r1", [user("hi")], ttl_seconds=60, max_stored=0)


async def store_turns(store: ConversationStore, turns: dict[str, list[Message]], max_stored: int = 1000) -> None:
    for run_id, messages in turns.items():
        await store.append(CONV, run_id, messages, ttl_seconds=60, max_stored=max_stored)


async def test_window_drops_whole_turns_with_their_tool_calls(store: ConversationStore) -> None:
    turns = {"r1": turn("r1", steps=1), "r2": turn("r2", steps=0), "r3": turn("r3", steps=1)}  # 4, 2, 4
    await store_turns(store, turns)

    assert await store.window(CONV, max_messages=100) == turns["r1"] + turns["r2"] + turns["r3"]
    assert await store.window(CONV, max_messages=10) == turns["r1"] + turns["r2"] + turns["r3"]
    assert await store.window(CONV, max_messages=9) == turns["r2"] + turns["r3"]
    assert await store.window(CONV, max_messages=6) == turns["r2"] + turns["r3"]
    assert await store.window(CONV, max_messages=5) == turns["r3"]
    assert await store.window("empty", max_messages=5) == []


async def test_a_window_boundary_inside_a_turn_moves_to_the_next_turn(store: ConversationStore) -> None:
    turns = {run_id: turn(run_id, steps=1) for run_id in ("r1", "r2", "r3")}  # 4 messages each
    await store_turns(store, turns)

    # The last 6 messages would begin with r2's tool call and its result.
    window = await store.window(CONV, max_messages=6)

    assert window == turns["r3"]


async def test_a_latest_turn_longer_than_the_window_comes_whole(store: ConversationStore) -> None:
    turns = {"r1": turn("r1", steps=0), "r2": turn("r2", steps=3, final=False)}  # 2 and 7, in progress
    await store_turns(store, turns)

    assert await store.window(CONV, max_messages=3) == turns["r2"]
    assert await store.window(CONV, max_messages=0) == turns["r2"]
    assert await store.window(CONV, max_messages=9) == turns["r1"] + turns["r2"]


async def test_a_window_starts_after_a_turn_that_storage_trimming_cut(store: ConversationStore) -> None:
    turns = {"r1": turn("r1", steps=2), "r2": turn("r2", steps=1)}  # 6 and 4
    await store_turns(store, turns, max_stored=7)
    stored = await store.messages(CONV)
    assert stored[0] == turns["r1"][-3]  # r1's second tool call, its result and its answer are left

    assert await store.window(CONV, max_messages=100) == turns["r2"]


async def test_a_latest_turn_without_its_user_message_gives_no_window(store: ConversationStore) -> None:
    await store_turns(store, {"r1": turn("r1", steps=0), "r2": turn("r2", steps=3)}, max_stored=5)

    assert await store.window(CONV, max_messages=100) == []


async def test_a_stale_run_writing_into_a_newer_turn_leaves_no_tool_result_orphaned(store: ConversationStore) -> None:
    stale = [user("stale question"), assistant(calls=["c1"]), tool("c1")]
    fresh = [user("fresh question"), assistant("fresh answer")]
    await store.append(CONV, "stale", stale[:2], ttl_seconds=60)
    await store.append(CONV, "fresh", fresh[:1], ttl_seconds=60)
    await store.append(CONV, "stale", stale, ttl_seconds=60)
    await store.append(CONV, "fresh", fresh, ttl_seconds=60)

    # Starting at the fresh user message would send c1's result without the call.
    assert await store.window(CONV, max_messages=2) == await store.messages(CONV)


def random_turn(rng: random.Random, run_id: str) -> list[Message]:
    messages = [user(f"{run_id} asks")]
    for step in range(rng.randint(0, 3)):
        calls = [f"{run_id}-{step}-{k}" for k in range(rng.randint(1, 3))]
        messages.append(assistant(rng.choice([None, "thinking"]), calls))
        messages += [tool(call) for call in calls]
    if rng.random() < 0.8:
        messages.append(assistant("done"))
    return messages


async def test_windows_of_random_conversations_keep_the_invariants(store: ConversationStore) -> None:
    rng = random.Random(20240601)
    for case in range(150):
        conversation_id = f"random-{case}"
        max_stored = rng.randint(3, 40)
        written: list[tuple[str, Message]] = []
        for number in range(rng.randint(1, 6)):
            run_id = f"c{case}-r{number}"
            messages = random_turn(rng, run_id)
            # A run may be in progress, or may have stopped early; it writes in chunks, some retried.
            length = rng.randint(1, len(messages))
            messages = messages[:length]
            done = 0
            while done < length:
                done = min(length, done + rng.randint(1, 4))
                for _ in range(rng.choice([1, 1, 2])):
                    await store.append(conversation_id, run_id, messages[:done], ttl_seconds=60, max_stored=max_stored)
            written += [(run_id, message) for message in messages]

        kept = written[-max_stored:]
        stored = [message for _, message in kept]
        assert await store.messages(conversation_id) == stored, case
        first_index = len(written) - len(kept)
        # A turn's head is its run's first message, if trimming left it.
        heads = [
            i
            for i in range(len(kept))
            if first_index + i == 0 or written[first_index + i - 1][0] != written[first_index + i][0]
        ]
        heads = [i for i in heads if kept[i][1]["role"] == "user"]
        latest_run = written[-1][0]

        for max_messages in (rng.randint(0, 25) for _ in range(4)):
            window = await store.window(conversation_id, max_messages=max_messages)
            note = (case, max_messages)
            start = len(stored) - len(window)
            assert window == stored[start:], note
            if not window:
                assert not heads, note
                continue
            assert window[0]["role"] == "user" and start in heads, note
            called: set[str] = set()
            for message in window:
                if message["role"] == "assistant":
                    called |= {call["id"] for call in message.get("tool_calls", [])}
                if message["role"] == "tool":
                    assert message["tool_call_id"] in called, note
            is_latest_turn = {run_id for run_id, _ in kept[start:]} == {latest_run}
            assert len(window) <= max_messages or is_latest_turn, note
            # The window takes every whole turn that fits.
            assert not [h for h in heads if h < start and len(stored) - h <= max_messages], note


async def test_one_run_holds_a_conversation(
    store: ConversationStore, settings: Settings, redis_client: redis.Redis
) -> None:
    assert await store.active_run(CONV) is None
    assert await store.acquire_active_run(CONV, "r1", ttl_seconds=100) is None
    assert await store.acquire_active_run(CONV, "r1", ttl_seconds=100) is None  # a retried start
    assert await store.acquire_active_run(CONV, "r2", ttl_seconds=100) == "r1"
    assert await store.active_run(CONV) == "r1"
    assert 0 < await redis_client.ttl(active_key(settings.redis_prefix, CONV)) <= 100

    await store.release_active_run(CONV, "r2")
    assert await store.active_run(CONV) == "r1"
    await store.release_active_run(CONV, "r1")
    assert await store.active_run(CONV) is None
    await store.release_active_run(CONV, "r1")  # a retried release

    assert await store.acquire_active_run(CONV, "r2", ttl_seconds=100) is None
    assert await store.active_run(CONV) == "r2"


async def test_claiming_again_renews_the_claim(
    store: ConversationStore, settings: Settings, redis_client: redis.Redis
) -> None:
    key = active_key(settings.redis_prefix, CONV)
    await store.acquire_active_run(CONV, "r1", ttl_seconds=100)
    await redis_client.expire(key, 5)

    assert await store.acquire_active_run(CONV, "r1", ttl_seconds=100) is None
    assert await redis_client.ttl(key) > 5


async def test_an_expired_claim_frees_the_conversation(
    store: ConversationStore, settings: Settings, redis_client: redis.Redis
) -> None:
    await store.acquire_active_run(CONV, "r1", ttl_seconds=100)
    await redis_client.pexpire(active_key(settings.redis_prefix, CONV), 1)
    await asyncio.sleep(0.05)

    assert await store.acquire_active_run(CONV, "r2", ttl_seconds=100) is None
    assert await store.active_run(CONV) == "r2"


async def test_a_stale_holder_is_replaced_only_by_compare_and_set(
    store: ConversationStore, settings: Settings, redis_client: redis.Redis
) -> None:
    assert await store.replace_active_run(CONV, "r1", "r2", ttl_seconds=100) is False  # nobody holds it
    assert await store.active_run(CONV) is None

    await store.acquire_active_run(CONV, "r1", ttl_seconds=100)
    assert await store.replace_active_run(CONV, "r0", "r2", ttl_seconds=100) is False
    assert await store.active_run(CONV) == "r1"

    assert await store.replace_active_run(CONV, "r1", "r2", ttl_seconds=50) is True
    assert await store.replace_active_run(CONV, "r1", "r2", ttl_seconds=50) is True  # a retried replace
    assert await store.active_run(CONV) == "r2"
    assert 0 < await redis_client.ttl(active_key(settings.redis_prefix, CONV)) <= 50
    assert await store.replace_active_run(CONV, "r1", "r3", ttl_seconds=50) is False
    assert await store.active_run(CONV) == "r2"


async def test_exactly_one_of_many_concurrent_claims_wins(store: ConversationStore) -> None:
    run_ids = [f"r{i}" for i in range(20)]

    results = await asyncio.gather(*(store.acquire_active_run(CONV, r, ttl_seconds=100) for r in run_ids))

    winners = [run_id for run_id, holder in zip(run_ids, results, strict=True) if holder is None]
    assert len(winners) == 1
    assert {holder for holder in results if holder is not None} == set(winners)
    assert await store.active_run(CONV) == winners[0]


async def test_exactly_one_of_many_concurrent_replacements_wins(store: ConversationStore) -> None:
    await store.acquire_active_run(CONV, "stale", ttl_seconds=100)
    run_ids = [f"r{i}" for i in range(20)]

    results = await asyncio.gather(*(store.replace_active_run(CONV, "stale", r, ttl_seconds=100) for r in run_ids))

    winners = [run_id for run_id, replaced in zip(run_ids, results, strict=True) if replaced]
    assert len(winners) == 1
    assert await store.active_run(CONV) == winners[0]


async def test_a_client_that_decodes_responses_works_too(settings: Settings, redis_client: redis.Redis) -> None:
    # redis_client is here for its teardown, which deletes the keys under the test's prefix.
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        store = ConversationStore(client, settings.redis_prefix)
        await store.append(CONV, "r1", turn("r1", steps=1), ttl_seconds=60)
        assert await store.window(CONV, max_messages=10) == turn("r1", steps=1)
        assert await store.acquire_active_run(CONV, "r1", ttl_seconds=60) is None
        assert await store.acquire_active_run(CONV, "r2", ttl_seconds=60) == "r1"
        assert await store.active_run(CONV) == "r1"
    finally:
        await client.aclose()
