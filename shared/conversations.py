"""The Redis layout of conversation history, shared by the runs of one conversation.

A conversation is an ordered list of OpenAI Chat Completions messages. Each run adds
one turn: its user message, then the assistant and tool messages it produces. The list
holds JSON elements ``{"run_id": ..., "message": {...}}``; beside it a hash counts how
many messages each run has stored, so a writer passes a run's whole message list and
only the part not stored yet is added. That makes every write safe to retry, from any
process, in any order.

A separate key claims the conversation for its one active run.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis

Message = dict[str, Any]

# ARGV: run id, ttl, max stored, then every message of the run, encoded. The run's count
# outlives the trimming of its messages, so a retry of an old write cannot re-add them.
# Both keys get the same expiry on every call: a count that expired before its messages
# would let a retried write duplicate them.
_APPEND = """
local stored = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local total = #ARGV - 3
if total > stored then
  for i = 4 + stored, #ARGV do
    redis.call('RPUSH', KEYS[1], ARGV[i])
  end
  redis.call('HSET', KEYS[2], ARGV[1], total)
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
  stored = total
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return stored
"""

# Claiming again with the holder's own id succeeds and renews the lease, so a retried
# start is harmless and the holder can keep its claim alive.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV: stale holder, new holder, ttl. Already holding counts as success, so a retried
# replace does not report a loss.
_REPLACE = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] and holder ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def tenant_conversation(tenant: str, conversation_id: str) -> str:
    """The id under which a tenant's conversation is kept: the same conversation id in two tenants is two
    conversations. "/" never occurs in an id or a tenant, so no two pairs give one key. Without tenants (no
    authentication) it is the conversation id itself, as before."""
    return f"{tenant}/{conversation_id}" if tenant and conversation_id else conversation_id


def _key(prefix: str, conversation_id: str, name: str) -> str:
    # The braces are a cluster hash tag: the scripts touch several keys of one conversation,
    # which must then live on one node.
    return f"{prefix}conv:{{{conversation_id}}}:{name}"


def messages_key(prefix: str, conversation_id: str) -> str:
    return _key(prefix, conversation_id, "messages")


def runs_key(prefix: str, conversation_id: str) -> str:
    return _key(prefix, conversation_id, "runs")


def active_key(prefix: str, conversation_id: str) -> str:
    return _key(prefix, conversation_id, "active")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def window_start(run_ids: list[str], messages: list[Message], max_messages: int) -> int:
    """Where the window over ``messages`` starts; ``len(messages)`` when no start is safe.

    A start is the first message of a run's turn, and must be a user message. Storage
    trimming can leave a turn's tail without its head, and a start is also unsafe if a
    tool message after it answers an assistant message before it: the model API rejects
    such a tool message. The window takes the most turns that fit in ``max_messages``,
    and at least the latest turn that can start one.
    """
    count = len(messages)
    # Each tool message makes the starts after its assistant message, up to itself, unsafe;
    # summing +1/-1 marks over the positions finds them in one pass.
    marks = [0] * (count + 1)
    issued_at: dict[Any, int] = {}
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                issued_at[call.get("id")] = index
        elif role == "tool":
            marks[issued_at.get(message.get("tool_call_id"), -1) + 1] += 1
            marks[index + 1] -= 1
    starts = []
    unsafe = 0
    for index, message in enumerate(messages):
        unsafe += marks[index]
        turn_begins = index == 0 or run_ids[index] != run_ids[index - 1]
        if turn_begins and not unsafe and message.get("role") == "user":
            starts.append(index)
    for start in starts:
        if count - start <= max_messages:
            return start
    return starts[-1] if starts else count


class ConversationStore:
    """Conversation history and the active-run claim of conversations."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._append = client.register_script(_APPEND)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._replace = client.register_script(_REPLACE)

    async def append(
        self, conversation_id: str, run_id: str, messages: list[Message], *, ttl_seconds: int, max_stored: int = 1000
    ) -> int:
        """Stores the messages of ``messages`` (the run's whole list so far) not stored yet.

        Returns how many of the run's messages are stored now.
        """
        if ttl_seconds < 1 or max_stored < 1:
            # EXPIRE 0 would delete the conversation, and LTRIM -0 would keep all of it.
            raise ValueError("ttl_seconds and max_stored must be positive")
        payloads = [json.dumps({"run_id": run_id, "message": message}) for message in messages]
        stored = await self._append(
            keys=[messages_key(self._prefix, conversation_id), runs_key(self._prefix, conversation_id)],
            args=[run_id, ttl_seconds, max_stored, *payloads],
        )
        return int(stored)

    async def _entries(self, conversation_id: str) -> tuple[list[str], list[Message]]:
        raw = await self._client.lrange(messages_key(self._prefix, conversation_id), 0, -1)
        entries = [json.loads(item) for item in raw]
        return [entry["run_id"] for entry in entries], [entry["message"] for entry in entries]

    async def messages(self, conversation_id: str) -> list[Message]:
        """Everything stored, oldest first."""
        _, messages = await self._entries(conversation_id)
        return messages

    async def window(self, conversation_id: str, *, max_messages: int) -> list[Message]:
        """The latest messages to send to the model, cut only where a turn begins."""
        run_ids, messages = await self._entries(conversation_id)
        return messages[window_start(run_ids, messages, max_messages) :]

    async def acquire_active_run(self, conversation_id: str, run_id: str, *, ttl_seconds: int) -> str | None:
        """Claims the conversation for ``run_id``; returns None if it holds it now, else the holder."""
        holder = await self._acquire(keys=[active_key(self._prefix, conversation_id)], args=[run_id, ttl_seconds])
        return _text(holder)

    async def release_active_run(self, conversation_id: str, run_id: str) -> None:
        """Releases the claim if ``run_id`` holds it."""
        await self._release(keys=[active_key(self._prefix, conversation_id)], args=[run_id])

    async def replace_active_run(
        self, conversation_id: str, stale_run_id: str, run_id: str, *, ttl_seconds: int
    ) -> bool:
        """Moves the claim from ``stale_run_id`` to ``run_id``; False if someone else holds it, or nobody."""
        replaced = await self._replace(
            keys=[active_key(self._prefix, conversation_id)], args=[stale_run_id, run_id, ttl_seconds]
        )
        return bool(replaced)

    async def active_run(self, conversation_id: str) -> str | None:
        return _text(await self._client.get(active_key(self._prefix, conversation_id)))
