"""The stream relay: one Redis subscription per server process follows every run that a client watches.

Watching a run costs no Redis connection and no Temporal polling of its own. The relay subscribes to a run's
channel while anyone watches it, parses each published event once, and hands it to every watcher of that run.
A watcher reads Redis itself only to catch up: at the start, after it fell behind (its inbox is bounded, so a slow
consumer never grows memory without bound nor slows the others), and after the relay lost its connection.

Whether a quiet run has ended without a terminal event in Redis (Redis lost it, or Temporal ended the run itself)
is asked of Temporal per run, not per watcher: one query for many runs, and only for runs that have been quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentrun.v1 import agent_service_pb2 as pb
from shared.events import is_terminal
from shared.run_stream import channel, decode_published, read_range

log = logging.getLogger("agentrun.relay")

# Events a watcher holds for its client; past this it drops them and reads its backlog from Redis.
INBOX_LIMIT = 256
# How many events a catching-up watcher reads from Redis at once.
CATCH_UP_BATCH = 512
# A run with no event for this long is among those the relay asks Temporal about; while it stays quiet, the
# interval doubles up to MAX_QUIET_CHECK_SECONDS. Sweeps look for such runs every SWEEP_SECONDS.
QUIET_SECONDS = 5.0
MAX_QUIET_CHECK_SECONDS = 60.0
SWEEP_SECONDS = 2.0
SWEEP_TIMEOUT_SECONDS = 10.0
# How long a new watcher waits for the relay to subscribe; Redis is unavailable past that.
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
# The subscription's connection is checked with a PING when it has been silent this long.
PING_SECONDS = 5.0
RECONNECT_BACKOFF_SECONDS = (0.05, 2.0)

EndedRuns = Callable[[list[str]], Awaitable[set[str]]]


class RelayUnavailable(Exception):
    """The relay cannot follow runs now: Redis is unreachable, or the server is shutting down."""


class Watch:
    """One client's view of one run."""

    def __init__(self, relay: StreamRelay, run: _Run) -> None:
        self._relay = relay
        self._run = run
        self._inbox: deque[pb.RunEvent] = deque()
        self._wake = asyncio.Event()
        # Read Redis before trusting the inbox: at the start, after an overflow and after a reconnect.
        self._catch_up = True
        # Redis was read and has nothing before this sequence that the inbox skips: the jump is a real gap.
        self._gap_confirmed_to = 0

    def _deliver(self, event: pb.RunEvent) -> None:
        if len(self._inbox) >= INBOX_LIMIT:
            self._inbox.clear()
            self._catch_up = True
        else:
            self._inbox.append(event)
        self._wake.set()

    def _resync(self) -> None:
        self._catch_up = True
        self._wake.set()

    async def follow(self, after: int) -> AsyncIterator[pb.RunEvent]:
        """The run's events after ``after``, in order, each once, until its terminal event.

        It returns without a terminal event when Temporal says the run has ended and Redis has no terminal event
        for it; the caller rebuilds that event from Temporal's record. A range that Redis no longer has shows up
        as a jump in the sequence numbers.
        """
        while True:
            if self._catch_up:
                self._catch_up = False
                events = await self._relay._read(self._run.run_id, after)
                if not events and self._inbox:
                    self._gap_confirmed_to = self._inbox[0].sequence  # Redis lost what came before it
                # A full batch means there is more to read before the inbox.
                self._catch_up = len(events) == CATCH_UP_BATCH
                for event in events:
                    yield event
                    after = event.sequence
                    if is_terminal(event):
                        return
                continue
            while self._inbox:
                event = self._inbox.popleft()
                if event.sequence <= after:
                    continue  # read from Redis already
                if event.sequence > after + 1 and event.sequence > self._gap_confirmed_to:
                    # Missed messages, or events that Redis lost: Redis says which.
                    self._inbox.appendleft(event)
                    self._catch_up = True
                    break
                yield event
                after = event.sequence
                if is_terminal(event):
                    return
            if self._catch_up:
                continue
            if self._run.ended:
                # Temporal says the run has ended: whatever Redis still has, then the caller's rebuilt end.
                while events := await self._relay._read(self._run.run_id, after):
                    for event in events:
                        yield event
                        after = event.sequence
                        if is_terminal(event):
                            return
                return
            if self._relay.closing:
                raise RelayUnavailable("the server is shutting down")
            await self._wake.wait()
            self._wake.clear()


class _Run:
    """A run that at least one client watches."""

    def __init__(self, run_id: str, channel: bytes) -> None:
        self.run_id = run_id
        self.channel = channel
        self.watches: set[Watch] = set()
        self.subscribed = asyncio.Event()
        self.ended = False
        self.heard_from()

    def heard_from(self) -> None:
        """The run published an event: ask Temporal about it only once it has been quiet again."""
        self.quiet_for = QUIET_SECONDS
        self.check_at = time.monotonic() + QUIET_SECONDS

    def checked(self) -> None:
        # A run that stays quiet (waiting for an approval, say) is asked about less and less often.
        self.quiet_for = min(self.quiet_for * 2, MAX_QUIET_CHECK_SECONDS)
        self.check_at = time.monotonic() + self.quiet_for


class StreamRelay:
    """Follows watched runs over one sharded pub/sub subscription and fans their events out in memory."""

    def __init__(self, redis_url: str, reader: redis.Redis, prefix: str, ended_runs: EndedRuns, *, name: str) -> None:
        # A client of its own, without retries: a dropped connection must surface here, because every watcher
        # has to catch up after it, which a silent reconnect would hide.
        self._subscriber = redis.Redis.from_url(
            redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=SUBSCRIBE_TIMEOUT_SECONDS, client_name=name
        )
        self._reader = reader
        self._prefix = prefix
        self._ended_runs = ended_runs
        self._runs: dict[str, _Run] = {}
        self._by_channel: dict[bytes, _Run] = {}
        self._connected = asyncio.Event()
        self._changes: asyncio.Queue[tuple[str, _Run]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._sweep_now = asyncio.Event()
        self.closing = False

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._subscription(), name="relay-subscription"),
            asyncio.create_task(self._sweeps(), name="relay-sweeps"),
        ]

    async def close(self) -> None:
        """Ends every watcher (they raise RelayUnavailable) and stops following runs."""
        self.closing = True
        for run in self._runs.values():
            for watch in run.watches:
                watch._wake.set()
        await asyncio.gather(*(_stop(task) for task in self._tasks))
        await self._subscriber.aclose()

    @property
    def watchers(self) -> int:
        return sum(len(run.watches) for run in self._runs.values())

    @contextlib.asynccontextmanager
    async def watch(self, run_id: str) -> AsyncIterator[Watch]:
        """Follows ``run_id`` while the block runs; raises RelayUnavailable when Redis cannot be reached."""
        if self.closing:
            raise RelayUnavailable("the server is shutting down")
        run = self._runs.get(run_id)
        if run is None:
            run = _Run(run_id, channel(self._prefix, run_id).encode())
            self._runs[run_id] = run
            self._by_channel[run.channel] = run
            self._changes.put_nowait(("subscribe", run))
        watch = Watch(self, run)
        run.watches.add(watch)
        try:
            try:
                await asyncio.wait_for(run.subscribed.wait(), SUBSCRIBE_TIMEOUT_SECONDS)
            except TimeoutError:
                raise RelayUnavailable("Redis is unavailable") from None
            yield watch
        finally:
            run.watches.discard(watch)
            if not run.watches and self._runs.get(run_id) is run:
                del self._runs[run_id]
                del self._by_channel[run.channel]
                self._changes.put_nowait(("unsubscribe", run))

    async def _read(self, run_id: str, after: int) -> list[pb.RunEvent]:
        """What Redis has after ``after``, in batches a watcher can send before it reads more."""
        return await read_range(self._reader, self._prefix, run_id, after, count=CATCH_UP_BATCH)

    async def _subscription(self) -> None:
        """Keeps one subscription to the channels of all watched runs, through outages."""
        backoff = RECONNECT_BACKOFF_SECONDS[0]
        reconnecting = False
        while True:
            try:
                async with self._subscriber.pubsub() as pubsub:
                    await pubsub.connect()
                    await self._subscribe_all(pubsub)
                    if reconnecting:
                        log.info("relay reconnected to Redis; %d runs catch up", len(self._runs))
                        for run in self._runs.values():
                            for watch in run.watches:
                                watch._resync()
                        # Redis may have lost terminal events while it was away.
                        self._sweep_now.set()
                    backoff = RECONNECT_BACKOFF_SECONDS[0]
                    await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
                if not reconnecting:
                    log.warning("relay lost Redis (%s); reconnecting", type(err).__name__)
                reconnecting = True
            except Exception:
                # Never stop following runs: start over, and let every watcher catch up.
                log.exception("relay subscription failed; reconnecting")
                reconnecting = True
            finally:
                self._connected.clear()
                for run in self._runs.values():
                    run.subscribed.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF_SECONDS[1])

    async def _subscribe_all(self, pubsub: Any) -> None:
        while not self._changes.empty():
            self._changes.get_nowait()  # a fresh subscription covers all watched runs
        runs = list(self._runs.values())
        for start in range(0, len(runs), 500):
            await pubsub.ssubscribe(*(run.channel for run in runs[start : start + 500]))
        self._connected.set()

    async def _listen(self, pubsub: Any) -> None:
        changes = asyncio.create_task(self._apply_changes(pubsub))
        try:
            silent_since = time.monotonic()
            pinged = False
            while True:
                if changes.done():
                    changes.result()  # a failed SSUBSCRIBE means the connection failed
                message = await pubsub.get_message(timeout=PING_SECONDS)
                if message is None:
                    if pinged and time.monotonic() - silent_since > 2 * PING_SECONDS:
                        raise redis.TimeoutError("the relay's subscription stopped answering")
                    if not pinged and pubsub.subscribed:  # a dead connection with no channel loses nothing
                        await pubsub.ping()
                        pinged = True
                    continue
                silent_since, pinged = time.monotonic(), False
                self._handle(message)
        finally:
            await _stop(changes)

    async def _apply_changes(self, pubsub: Any) -> None:
        while True:
            change, run = await self._changes.get()
            if change == "subscribe":
                await pubsub.ssubscribe(run.channel)
            elif run.run_id not in self._runs:  # nobody came back for it meanwhile
                await pubsub.sunsubscribe(run.channel)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        run = self._by_channel.get(message["channel"]) if kind in ("smessage", "ssubscribe") else None
        if run is None:
            return
        if kind == "ssubscribe":
            run.subscribed.set()
            return
        event = decode_published(message["data"])
        run.heard_from()
        for watch in run.watches:
            watch._deliver(event)

    async def _sweeps(self) -> None:
        """Asks Temporal which of the quiet runs have ended; right away for all runs after a reconnect."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), SWEEP_SECONDS)
            everything = self._sweep_now.is_set()
            self._sweep_now.clear()
            now = time.monotonic()
            due = [run for run in self._runs.values() if not run.ended and (everything or run.check_at <= now)]
            if not due:
                continue
            try:
                async with asyncio.timeout(SWEEP_TIMEOUT_SECONDS):
                    ended = await self._ended_runs([run.run_id for run in due])
            except Exception as err:
                log.warning("relay could not ask Temporal which runs ended: %s", type(err).__name__)
                continue
            for run in due:
                run.checked()
                if run.run_id in ended:
                    run.ended = True
                    for watch in run.watches:
                        watch._wake.set()


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancels ``task`` and waits until it has ended.

    Python 3.11's asyncio timeouts can swallow a cancellation that arrives just as their own timeout fires, and
    redis-py reads and writes under one; so the request is repeated until the task is done.
    The caller may itself be cancelled, again and again, while it waits (the relay's close stops its subscription
    this way while the subscription stops its own helper); it still waits for ``task`` to end, so no task is left
    pending and unreferenced, and then passes the cancellation on.
    """
    cancelled = False
    while not task.done():
        task.cancel()
        try:
            await asyncio.wait([task], timeout=0.1)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
