"""The Redis layout of a run's live event stream, written by the worker and read by the server.

Each run has one Redis stream. An entry's id is ``<sequence>-0``, so the sequence
numbers that clients see are the stream ids: strictly increasing, without gaps,
and resumable with a plain XREAD after ``<after_sequence>-0``. The entry holds the
serialized ``agentrun.v1.RunEvent`` without its sequence. The entry of the terminal
event carries a ``t`` field; once it is there, the stream takes no more events,
which makes a retried publish of the terminal event harmless.

Beside the stream, a hash maps each approval request still waiting for an answer
to the sequence of its event. The script that publishes the request or its
decision updates it, so a reconnecting client never misses a pending request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from agentrun.v1 import agent_service_pb2 as pb
from shared.events import is_terminal

# Appends a batch atomically. The sequence continues from the larger of the stream's
# last entry and the caller's floor, so a stream that Redis lost mid-run never
# reuses a sequence number that a client may already have seen.
_APPEND = """
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then
  last = tonumber(string.match(top[1][1], '^(%d+)'))
  local entry = top[1][2]
  for i = 1, #entry, 2 do
    if entry[i] == 't' then return {last, 1} end
  end
end
-- A batch with a "once" key is written at most once: a retried activity that
-- already published it adds nothing.
if ARGV[4] ~= '' and redis.call('HSETNX', KEYS[2], ARGV[4], 1) == 0 then
  return {last, 0}
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
local seq = math.max(last, tonumber(ARGV[1]))
-- Then pairs of (marker, payload); a marker "+id" or "-id" adds or removes a pending approval.
for i = 5, #ARGV, 2 do
  seq = seq + 1
  if i + 1 == #ARGV and ARGV[3] == '1' then
    redis.call('XADD', KEYS[1], seq .. '-0', 'e', ARGV[i + 1], 't', '1')
    redis.call('DEL', KEYS[3])
  else
    redis.call('XADD', KEYS[1], seq .. '-0', 'e', ARGV[i + 1])
  end
  local marker = ARGV[i]
  if string.sub(marker, 1, 1) == '+' then
    redis.call('HSET', KEYS[3], string.sub(marker, 2), seq)
    redis.call('EXPIRE', KEYS[3], ARGV[2])
  elseif string.sub(marker, 1, 1) == '-' then
    redis.call('HDEL', KEYS[3], string.sub(marker, 2))
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {seq, 0}
"""


def stream_key(prefix: str, run_id: str) -> str:
    # The braces are a cluster hash tag: every key of one run lands on one node.
    return f"{prefix}run:{{{run_id}}}:events"


def _once_key(prefix: str, run_id: str) -> str:
    return f"{prefix}run:{{{run_id}}}:published"


def _pending_key(prefix: str, run_id: str) -> str:
    return f"{prefix}run:{{{run_id}}}:pending-approvals"


def _marker(event: pb.RunEvent) -> str:
    if event.HasField("approval_requested"):
        return "+" + event.approval_requested.approval_id
    if event.HasField("approval_decided"):
        return "-" + event.approval_decided.approval_id
    return ""


@dataclass(frozen=True)
class AppendResult:
    """The sequence of the last entry now in the stream, and whether the stream had already ended."""

    last_sequence: int
    closed: bool


class RunStreamWriter:
    """Appends events to runs' streams."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_seconds: int) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._append = client.register_script(_APPEND)

    async def append(
        self,
        run_id: str,
        events: list[pb.RunEvent],
        *,
        floor: int,
        agent_path: Sequence[str] = (),
        once: str = "",
    ) -> AppendResult:
        """Appends ``events`` in order, stamped with the agent that emitted them; a terminal event may only come last.

        With ``once``, a batch published before under the same key is not
        published again.
        """
        for event in events:
            event.agent_path[:] = agent_path
        terminal = bool(events) and is_terminal(events[-1])
        pairs = [part for event in events for part in (_marker(event), event.SerializeToString())]
        last, closed = await self._append(
            keys=[
                stream_key(self._prefix, run_id),
                _once_key(self._prefix, run_id),
                _pending_key(self._prefix, run_id),
            ],
            args=[floor, self._ttl, "1" if terminal else "0", once, *pairs],
        )
        return AppendResult(int(last), bool(closed))

    async def read_after(self, run_id: str, after_sequence: int) -> list[pb.RunEvent]:
        """Everything already in the stream after a sequence number (used to resume a retried call)."""
        return await read_range(self._client, self._prefix, run_id, after_sequence)


def _decode(entries: Any) -> list[pb.RunEvent]:
    events = []
    for entry_id, fields in entries:
        event = pb.RunEvent.FromString(fields[b"e"])
        event.sequence = int(entry_id.split(b"-", 1)[0])
        events.append(event)
    return events


async def read_range(client: redis.Redis, prefix: str, run_id: str, after_sequence: int) -> list[pb.RunEvent]:
    entries = await client.xrange(stream_key(prefix, run_id), min=f"({after_sequence}-0", max="+")
    return _decode(entries)


async def read_next(
    client: redis.Redis, prefix: str, run_id: str, after_sequence: int, *, block_ms: int, count: int = 512
) -> list[pb.RunEvent]:
    """Waits up to ``block_ms`` for events after ``after_sequence``; an empty list means none came."""
    key = stream_key(prefix, run_id)
    reply: Any = await client.xread({key: f"{after_sequence}-0"}, count=count, block=block_ms)
    return _decode(reply[0][1]) if reply else []


async def stream_exists(client: redis.Redis, prefix: str, run_id: str) -> bool:
    return bool(await client.exists(stream_key(prefix, run_id)))


async def pending_approvals(client: redis.Redis, prefix: str, run_id: str) -> list[pb.RunEvent]:
    """The approval_requested events still waiting for an answer, in sequence order."""
    sequences: Any = await client.hvals(_pending_key(prefix, run_id))
    events = []
    for sequence in sorted(int(s) for s in sequences):
        events += _decode(await client.xrange(stream_key(prefix, run_id), min=f"{sequence}-0", max=f"{sequence}-0"))
    return events
