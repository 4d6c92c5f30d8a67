"""The Redis layout of a run's transcript: its own messages (its user message, then the assistant and tool messages),
kept out of Temporal's history.

A model round sends the model the run's whole transcript, and carrying it in every round's activity input made a
run's history grow with the square of its rounds. Instead the worker keeps the transcript in a Redis list, and each
round's input carries only the messages new since the round before and where they start in the transcript.

The workflow still learns every message once, from the activities' results, so Redis is a cache of what Temporal
holds: a transcript that is shorter than where the new messages start was lost (expired, flushed, failed over), and
the workflow sends it again. Writing the new messages from their start over whatever the list has there makes every
write safe to retry; it also overwrites messages that a run reset in Temporal no longer has.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as redis

Message = dict[str, Any]

# KEYS: the transcript. ARGV: ttl, where the messages start, then the messages, encoded. Returns the whole
# transcript after the write, or false when it holds fewer messages than the start (it was lost).
_WRITE = """
local start = tonumber(ARGV[2])
local stored = redis.call('LLEN', KEYS[1])
if stored < start then return false end
if start == 0 then
  redis.call('DEL', KEYS[1])
elseif stored > start then
  redis.call('LTRIM', KEYS[1], 0, start - 1)
end
for i = 3, #ARGV do
  redis.call('RPUSH', KEYS[1], ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('LRANGE', KEYS[1], 0, -1)
"""


def transcript_key(prefix: str, run_id: str) -> str:
    # The run's hash tag, as in run_stream: a run's keys live on one cluster node.
    return f"{prefix}run:{{{run_id}}}:transcript"


class TranscriptLostError(Exception):
    """Redis holds fewer of the run's messages than the round continues from."""

    def __init__(self, run_id: str, start: int) -> None:
        super().__init__(f"Redis lost the transcript of run {run_id!r}: it holds fewer than the {start} messages sent")


class TranscriptStore:
    """Runs' transcripts in Redis."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._write = client.register_script(_WRITE)

    async def write(self, run_id: str, start: int, messages: list[Message], *, ttl_seconds: int) -> list[Message]:
        """Writes ``messages`` as the transcript's from index ``start`` on, and returns the whole transcript.

        TranscriptLostError when the transcript holds fewer than ``start`` messages; ``start`` 0 always succeeds.
        """
        if ttl_seconds < 1:
            raise ValueError("ttl_seconds must be positive")  # EXPIRE 0 would delete the transcript
        payloads = [json.dumps(message) for message in messages]
        stored = await self._write(keys=[transcript_key(self._prefix, run_id)], args=[ttl_seconds, start, *payloads])
        if stored is None:
            raise TranscriptLostError(run_id, start)
        return [json.loads(item) for item in stored]

    async def delete(self, run_id: str) -> None:
        """Drops the transcript of a run that has ended: nothing reads it again."""
        await self._client.delete(transcript_key(self._prefix, run_id))
