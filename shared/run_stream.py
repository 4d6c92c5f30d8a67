"""The Redis layout of a run's live event stream, written by the worker and read by the server.

Each run has one Redis stream. An entry's id is ``<sequence>-0``, so the sequence numbers that clients see are the
stream ids: strictly increasing and resumable with a plain XRANGE after ``<after_sequence>-0``. The entry holds the
serialized ``agentrun.v1.RunEvent`` without its sequence. The entry of the terminal event carries a ``t`` field; once
it is there, the stream takes no more events, which makes a retried publish of the terminal event harmless.

The script that appends an entry also publishes it on the run's sharded pub/sub channel as ``<sequence>:<event>``, so
a server follows any number of runs over one subscription and reads the stream only to catch up.

Beside the stream, a hash maps each approval request still waiting for an answer to the sequence of its event. The
script that publishes the request or its decision updates it, so a reconnecting client never misses a pending request.
A sub-agent's run publishes into its root's stream; another hash maps each approval it requests to its workflow id,
so that an answer sent through the root's id reaches it.
Another hash remembers the last batch of each writer, so that a retried append adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from agentrun.v1 import agent_service_pb2 as pb
from shared.events import is_terminal

# When a run's stream holds less than a writer has seen (Redis lost entries: a flush, a failover, an expiry), its
# numbering jumps this far past the writer's floor. The run's other writers may have published past that floor in the
# meantime (a model call since its last heartbeat, a parent and its sub-agents, each knowing only its own floor);
# no run publishes a billion events, and a client sees the jump as one events_lost.
LOST_SEQUENCE_JUMP = 1_000_000_000

# Appends a batch atomically. The sequence continues from the stream's last entry, or past the caller's floor when the
# stream has lost entries, so a stream that Redis lost mid-run never reuses a number that a client may have seen.
# KEYS: stream, writers' last batches, pending approvals, channel. ARGV: floor, ttl, terminal ("1" or "0"), writer,
# batch, then pairs of (marker, event).
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
-- A writer's batch is written at most once: a retry of the command, or of an activity that already
-- published it, finds the batch recorded as the writer's last and adds nothing.
if ARGV[4] ~= '' then
  if redis.call('HGET', KEYS[2], ARGV[4]) == ARGV[5] then return {last, 0} end
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
local seq = last
if last < tonumber(ARGV[1]) then seq = tonumber(ARGV[1]) + @LOST_SEQUENCE_JUMP@ end
-- A marker "+id" or "-id" adds or removes a pending approval.
for i = 6, #ARGV, 2 do
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
  redis.call('SPUBLISH', KEYS[4], seq .. ':' .. ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {seq, 0}
""".replace("@LOST_SEQUENCE_JUMP@", str(LOST_SEQUENCE_JUMP))


def _key(prefix: str, run_id: str, name: str) -> str:
    # The braces are a cluster hash tag: every key and the channel of one run land on one node.
    return f"{prefix}run:{{{run_id}}}:{name}"


def stream_key(prefix: str, run_id: str) -> str:
    return _key(prefix, run_id, "events")


def channel(prefix: str, run_id: str) -> str:
    """The sharded pub/sub channel that carries the run's new entries."""
    return _key(prefix, run_id, "live")


_NO_TRACE = "1"


def _started_key(prefix: str, run_id: str) -> str:
    return _key(prefix, run_id, "started")


def _writers_key(prefix: str, run_id: str) -> str:
    return _key(prefix, run_id, "published")


def _pending_key(prefix: str, run_id: str) -> str:
    return _key(prefix, run_id, "pending-approvals")


def _approval_runs_key(prefix: str, run_id: str) -> str:
    return _key(prefix, run_id, "approval-runs")


def writer_name(sub_run: str, name: str) -> str:
    """The name of a writer in a run's stream. A sub-agent's run (``sub_run``, its workflow id) shares its root's
    stream, so its writers' names carry its id: the dedupe of one run's batches never drops another run's."""
    return f"{sub_run}/{name}" if sub_run else name


def _marker(event: pb.RunEvent) -> str:
    if event.HasField("approval_requested"):
        return "+" + event.approval_requested.approval_id
    if event.HasField("approval_decided"):
        return "-" + event.approval_decided.approval_id
    return ""


def decode_published(message: bytes) -> pb.RunEvent:
    """The event of a message on a run's channel."""
    sequence, _, payload = message.partition(b":")
    event = pb.RunEvent.FromString(payload)
    event.sequence = int(sequence)
    return event


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
        writer: str = "",
        batch: str = "1",
    ) -> AppendResult:
        """Appends ``events`` in order, stamped with the agent that emitted them; a terminal event may only come last.

        With ``writer``, the append is idempotent: a batch that is already the writer's last is not published again.
        A writer that publishes once needs no ``batch``; one that publishes many batches names each.
        """
        for event in events:
            event.agent_path[:] = agent_path
        terminal = bool(events) and is_terminal(events[-1])
        pairs = [part for event in events for part in (_marker(event), event.SerializeToString())]
        last, closed = await self._append(
            keys=[
                stream_key(self._prefix, run_id),
                _writers_key(self._prefix, run_id),
                _pending_key(self._prefix, run_id),
                channel(self._prefix, run_id),
            ],
            args=[floor, self._ttl, "1" if terminal else "0", writer, batch, *pairs],
        )
        return AppendResult(int(last), bool(closed))

    async def route_approval(self, run_id: str, approval_id: str, workflow_id: str) -> None:
        """Records that a sub-agent's run (``workflow_id``) asked for an approval in the run's stream."""
        key = _approval_runs_key(self._prefix, run_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, approval_id, workflow_id)
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def read_after(self, run_id: str, after_sequence: int) -> list[pb.RunEvent]:
        """Everything already in the stream after a sequence number (used to resume a retried call)."""
        return await read_range(self._client, self._prefix, run_id, after_sequence)

    async def last_sequence(self, run_id: str) -> int:
        """The sequence of the stream's last entry; 0 when Redis has no stream for the run."""
        return await last_sequence(self._client, self._prefix, run_id)


def _decode(entries: Any) -> list[pb.RunEvent]:
    events = []
    for entry_id, fields in entries:
        event = pb.RunEvent.FromString(fields[b"e"])
        event.sequence = int(entry_id.split(b"-", 1)[0])
        events.append(event)
    return events


async def read_range(
    client: redis.Redis, prefix: str, run_id: str, after_sequence: int, *, count: int | None = None
) -> list[pb.RunEvent]:
    """The events after a sequence number, oldest first; at most ``count`` of them."""
    entries = await client.xrange(stream_key(prefix, run_id), min=f"({after_sequence}-0", max="+", count=count)
    return _decode(entries)


async def last_event(client: redis.Redis, prefix: str, run_id: str) -> pb.RunEvent | None:
    """The stream's last event; None when Redis has no stream for the run."""
    entries = await client.xrevrange(stream_key(prefix, run_id), max="+", min="-", count=1)
    decoded = _decode(entries)
    return decoded[0] if decoded else None


async def last_sequence(client: redis.Redis, prefix: str, run_id: str) -> int:
    event = await last_event(client, prefix, run_id)
    return event.sequence if event is not None else 0


async def stream_exists(client: redis.Redis, prefix: str, run_id: str) -> bool:
    return bool(await client.exists(stream_key(prefix, run_id)))


@dataclass(frozen=True)
class StartMark:
    """What Redis keeps of a run's start: the trace it started in (a W3C ``traceparent``, or empty), a digest of
    the request that started it (empty when it had no request_id, or was marked before digests were kept), and
    the tenant the run belongs to (empty without authentication, or when marked before tenants)."""

    traceparent: str = ""
    request_digest: str = ""
    tenant: str = ""

    def encode(self) -> str:
        # "tenant|digest|traceparent"; tenants never hold "|". Marks of before tenants are "digest|traceparent".
        head = f"{self.tenant}|{self.request_digest}" if self.tenant else self.request_digest
        return f"{head}|{self.traceparent or _NO_TRACE}"

    @classmethod
    def decode(cls, value: Any) -> StartMark:
        text = value.decode() if isinstance(value, bytes) else str(value or "")
        head, _, traceparent = text.rpartition("|")  # a mark without "|" is only a trace
        tenant, _, digest = head.rpartition("|")
        return cls("" if traceparent == _NO_TRACE else traceparent, digest, tenant)


async def mark_started(
    client: redis.Redis, prefix: str, run_id: str, *, ttl_seconds: int, mark: StartMark
) -> StartMark:
    """Records that the run exists, so that watching it before its first event needs no question to Temporal.
    Returns the first mark made for the run (the run's own), which a duplicate StartRun answers with."""
    earlier = await client.set(_started_key(prefix, run_id), mark.encode(), ex=ttl_seconds, nx=True, get=True)
    return mark if earlier is None else StartMark.decode(earlier)


async def start_mark(client: redis.Redis, prefix: str, run_id: str) -> StartMark | None:
    """The run's start mark; None when Redis has none (never marked, or expired)."""
    value = await client.get(_started_key(prefix, run_id))
    return None if value is None else StartMark.decode(value)


async def is_known(client: redis.Redis, prefix: str, run_id: str) -> bool:
    """Whether Redis knows the run: it has its stream, or the mark of its start."""
    return bool(await client.exists(stream_key(prefix, run_id), _started_key(prefix, run_id)))


async def is_pending_approval(client: redis.Redis, prefix: str, run_id: str, approval_id: str) -> bool:
    return bool(await client.hexists(_pending_key(prefix, run_id), approval_id))


async def approval_run(client: redis.Redis, prefix: str, run_id: str, approval_id: str) -> str | None:
    """The workflow id of the sub-agent's run that asked for an approval in the run's stream; None for the run's own
    approvals (or when Redis no longer knows)."""
    value: Any = await client.hget(_approval_runs_key(prefix, run_id), approval_id)
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)


async def pending_approvals(client: redis.Redis, prefix: str, run_id: str) -> list[pb.RunEvent]:
    """The approval_requested events still waiting for an answer, in sequence order."""
    sequences: Any = await client.hvals(_pending_key(prefix, run_id))
    events = []
    for sequence in sorted(int(s) for s in sequences):
        events += _decode(await client.xrange(stream_key(prefix, run_id), min=f"{sequence}-0", max=f"{sequence}-0"))
    return events
