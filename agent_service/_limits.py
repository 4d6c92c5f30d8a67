"""Per-principal limits of one server process: open streams, and the rate of StartRun calls.

Each answers RESOURCE_EXHAUSTED with the delay after which a retry can succeed, in the message and as a
google.rpc.RetryInfo detail. They count per process: behind a load balancer, a principal may hold its limit on
each replica. A server that authenticates no one (loopback dev and tests) has no principals and sets no limits.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from agent_service._auth import Principal
from agent_service._errors import ApiError

# When a principal holds all its streams, nothing says when one ends: this is the retry delay suggested.
STREAM_RETRY_SECONDS = 1.0
# Buckets kept; past this many, the least recently used is forgotten (its principal starts again with a full one).
_MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Limits:
    """``max_streams`` open StreamRun calls per principal, and StartRun at ``starts_per_second`` per principal
    with bursts of up to ``start_burst``; 0 turns a limit off."""

    def __init__(self, *, max_streams: int, starts_per_second: float, start_burst: int) -> None:
        self.max_streams = max_streams
        self.starts_per_second = starts_per_second
        self.start_burst = max(1, start_burst)
        self._streams: dict[str, int] = {}
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first

    def take_start(self, caller: Principal) -> None:
        """Takes one StartRun from the caller's bucket, or raises RESOURCE_EXHAUSTED saying when to retry."""
        if not caller.authenticated or self.starts_per_second <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(caller.key)
        if bucket is None:
            bucket = self._buckets[caller.key] = _Bucket(self.start_burst, now)
            if len(self._buckets) > _MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller.key)
        bucket.tokens = min(self.start_burst, bucket.tokens + (now - bucket.updated) * self.starts_per_second)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return
        wait = (1 - bucket.tokens) / self.starts_per_second
        # Rounded up to whole milliseconds, so that a retry after the delay given finds the token there.
        wait = math.ceil(wait * 1000) / 1000
        raise ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{caller.subject!r} starts runs faster than {self.starts_per_second:g} per second (bursts of "
            f"{self.start_burst}); retry in {wait:.3f} s",
            retry_after=wait,
        )

    @contextlib.contextmanager
    def stream(self, caller: Principal) -> Iterator[None]:
        """Holds one of the caller's streams while the block runs, or raises RESOURCE_EXHAUSTED."""
        if not caller.authenticated or self.max_streams <= 0:
            yield
            return
        held = self._streams.get(caller.key, 0)
        if held >= self.max_streams:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller.subject!r} already holds {held} open streams on this server, its limit; close one, or "
                f"retry in {STREAM_RETRY_SECONDS:g} s (or on another replica)",
                retry_after=STREAM_RETRY_SECONDS,
            )
        self._streams[caller.key] = held + 1
        try:
            yield
        finally:
            left = self._streams[caller.key] - 1
            if left:
                self._streams[caller.key] = left
            else:
                del self._streams[caller.key]
