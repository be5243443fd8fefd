"""Dispatch: claims work from Redis for the nodes whose streams (or long-polls) this instance holds.

Pull, not push: nothing is routed to "the instance that owns a node". Each local consumer (a node
stream with free slots, or a unary Assign waiting) claims for itself. A Redis pub/sub wake-up names
the job just queued, so the claim usually costs one round trip; a slow poll (peek, then claim) backs
up lost wake-ups. Another task sweeps the timers (leases, deadlines, retries) of this instance's share
of the shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import ResponseError

from . import keys, wire
from .errors import ScriptCode, StreamOverflow
from .settings import Settings
from .store import Claim, Lease, Store
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `event` was set (time to stop). Stopping this way, rather than
    by cancelling, never interrupts a Redis call halfway (which can leak its connection)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def finish(tasks: list[asyncio.Task[Any]] | set[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Wait for tasks told to stop; cancel those still running after `timeout`."""
    tasks = list(tasks)
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


MAX_AVOIDED = 256  # jobs remembered per consumer as keeping away from it (the oldest are forgotten)


def new_lease_token() -> str:
    """A claim's lease token: unique, and unguessable (it is the capability to act on the lease)."""
    return secrets.token_hex(12)


class Consumer:
    """A local taker of work: a node stream, or one unary Assign call."""

    def __init__(self, node_id: str, pools: list[str], capacity: Callable[[], int]) -> None:
        self.node_id = node_id
        self.pools = pools
        self.capacity = capacity
        self.hints: deque[str] = deque(maxlen=64)
        self.wake = asyncio.Event()
        self.reserved_until = 0.0  # a job held back from this node becomes claimable then (ms)
        self.avoided: dict[str, float] = {}  # job id -> until (ms): jobs that keep away from this node
        # Claims sent to Redis whose reply has not been handled (job id -> lease token): after a lost
        # reply they are claimed again with the same token (adopted), or released when nobody takes them.
        self.pending: dict[str, str] = {}

    def avoids(self, job_id: str, now_ms: float) -> bool:
        until = self.avoided.get(job_id)
        if until is not None and until <= now_ms:
            del self.avoided[job_id]
            return False
        return until is not None

    def avoid(self, job_id: str, until: float, now_ms: float) -> None:
        """Remember that `job_id` keeps away from this consumer until `until` (bounded: expired entries
        go first, then the oldest)."""
        if len(self.avoided) >= MAX_AVOIDED:
            for stale in [j for j, u in self.avoided.items() if u <= now_ms]:
                del self.avoided[stale]
            while len(self.avoided) >= MAX_AVOIDED:
                del self.avoided[next(iter(self.avoided))]
        self.avoided[job_id] = until

    def avoiding(self, now_ms: float) -> int:
        """How many jobs keep away from this consumer now."""
        return sum(1 for u in self.avoided.values() if u > now_ms)

    def hint(self, job_id: str) -> None:
        self.hints.append(job_id)
        self.wake.set()


class Inbox(asyncio.Queue[bytes]):
    """A watcher's messages heard on its channel, at most `maxsize`: a watcher that falls further
    behind (its client does not read) is ended with RESOURCE_EXHAUSTED at its next read (it resumes
    from what it has seen) rather than its backlog growing."""

    overflowed = False

    def offer(self, data: bytes) -> None:
        try:
            self.put_nowait(data)
        except asyncio.QueueFull:
            self.overflowed = True

    def _check(self) -> None:
        if self.overflowed:
            raise StreamOverflow(f"the watch fell more than {self.maxsize} messages behind; resume it")

    async def get(self) -> bytes:
        self._check()
        return await super().get()

    def get_nowait(self) -> bytes:
        self._check()
        return super().get_nowait()


class Dispatcher:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.consumers: dict[str, list[Consumer]] = {}  # pool -> consumers
        # node id -> callback(verb, args) for messages to nodes held here (set by NodeSessions)
        self.node_listeners: Any = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._pubsub: Any = None
        self._watches: dict[str, set[Inbox]] = {}  # channel -> watchers' inboxes (WatchJob, WatchSession)
        self._confirmed: dict[str, asyncio.Event] = {}  # channel -> set once subscribed
        self._shards: list[int] = list(range(settings.partitions))  # what this instance sweeps
        self._shared_at = -float("inf")
        self._timer_errors = ThrottledWarning(log)
        # Redis down: not a line per sweep or per resubscription attempt.
        self._sweep_errors = ThrottledWarning(log, interval_s=10)
        self._listen_errors = ThrottledWarning(log, interval_s=10)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._listen(ready), name="dispatch-listen"),
            asyncio.create_task(self._sweep_forever(), name="dispatch-sweep"),
        ]
        await ready.wait()

    async def stop(self) -> None:
        self._stopping.set()
        if not self._tasks:
            return  # never started, or stopped already
        self._tasks[0].cancel()  # the subscription only waits for messages: cancelling it is safe
        await finish(self._tasks)
        self._tasks = []

    def add(self, consumer: Consumer) -> None:
        for pool in consumer.pools:
            self.consumers.setdefault(pool, []).append(consumer)

    def remove(self, consumer: Consumer) -> None:
        for pool in consumer.pools:
            group = self.consumers.get(pool, [])
            if consumer in group:
                group.remove(consumer)
            if not group:
                self.consumers.pop(pool, None)

    # -- claiming -------------------------------------------------------------------------------

    async def claim_for(self, consumer: Consumer, want: int) -> list[Claim]:
        """Claim up to `want` jobs for the consumer: hints first, else the oldest queued of its pools.

        Every claim carries a fresh lease token and is recorded in `consumer.pending` until its reply
        is handled. If a reply is lost (an error, a timeout, a cancel), the next call claims those
        jobs again with the same tokens first: Redis answers the same assignment for a claim that went
        through, so it is adopted, not lost. See release_pending() for a consumer that goes away."""
        got: list[Claim] = []
        now_ms = time.time() * 1000
        if consumer.pending:
            got = [c for c in await self._claim(consumer, list(consumer.pending.items()), now_ms)
                   if c.code == ScriptCode.APPLIED]
        for _ in range(4):
            need = want - len(got)
            if need <= 0:
                break
            candidates: list[str] = []
            while consumer.hints and len(candidates) < need:
                job_id = consumer.hints.popleft()
                if job_id not in candidates and not consumer.avoids(job_id, now_ms):
                    candidates.append(job_id)
            if not candidates:
                candidates = await self._oldest(consumer, need, now_ms)
            candidates = [j for j in candidates if j not in consumer.pending]  # claimed by this call already
            if not candidates:
                break
            tokens = [(job_id, new_lease_token()) for job_id in candidates]
            got += [c for c in await self._claim(consumer, tokens, now_ms) if c.code == ScriptCode.APPLIED]
        for claim in got:  # handed to the caller now (no await between this and the caller taking them)
            del consumer.pending[claim.job_id]
        return got

    async def _claim(self, consumer: Consumer, tokens: list[tuple[str, str]], now_ms: float) -> list[Claim]:
        consumer.pending.update(tokens)
        sent = asyncio.ensure_future(self.store.claim(consumer.node_id, tokens))
        try:
            claims = await asyncio.shield(sent)
        except asyncio.CancelledError:
            # The caller gave up (a deadline, a closed stream). Let the claim's reply arrive (bounded),
            # so a release that follows is sent after the claim, not racing it on another connection.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(sent, self.settings.ack_timeout_ms / 1000)
            raise
        for claim in claims:
            if claim.code != ScriptCode.APPLIED:
                consumer.pending.pop(claim.job_id, None)
            if claim.code in (ScriptCode.AVOIDED, ScriptCode.RESERVED):
                if claim.code == ScriptCode.AVOIDED:
                    consumer.avoid(claim.job_id, claim.reserved_until, now_ms)
                consumer.reserved_until = max(consumer.reserved_until, claim.reserved_until)
            consumer.hints.extend(
                j for j in claim.candidates if j != claim.job_id and not consumer.avoids(j, now_ms)
            )
        return claims

    async def release_pending(self, consumer: Consumer) -> None:
        """The consumer is going away with claims whose replies it never handled: put back whichever
        went through (their attempts given back; a claim that did not go through is left alone)."""
        if not consumer.pending:
            return
        leases = [Lease(job_id, token) for job_id, token in consumer.pending.items()]
        consumer.pending.clear()
        try:
            await self.store.release(consumer.node_id, leases)
        except Exception as err:  # Redis is down: the ack timeout takes them back
            log.warning("node %s: releasing %d unanswered claims failed (%r); their ack timeout covers them",
                        consumer.node_id, len(leases), err)

    async def _oldest(self, consumer: Consumer, count: int, now_ms: float) -> list[str]:
        """The next `count` queued jobs across the consumer's partitions: highest priority first, then the
        partitions in turn, each in its own (fair share) order. A pass is a partition's own virtual time,
        so passes of two partitions are not compared."""
        tags = [t for pool in consumer.pools for t in self.store.tags_of_pool(pool)]
        peeked = await self.store.peek(tags, count + consumer.avoiding(now_ms))
        merged = heapq.merge(*([(wire.queue_band(score), rank, job_id) for rank, (job_id, score) in enumerate(found)]
                               for found in peeked.values()))
        out: list[str] = []
        for _band, _rank, job_id in merged:
            if consumer.avoids(job_id, now_ms):
                continue
            out.append(job_id)
            if len(out) >= count:
                break
        return out

    async def wait_for_work(self, consumer: Consumer, timeout: float) -> None:
        """Sleep until a wake-up for the consumer's pools, a reservation ends, or the poll interval."""
        poll = self.settings.poll_interval_ms / 1000 * random.uniform(0.8, 1.2)
        delay = min(timeout, poll)
        if consumer.reserved_until:
            delay = min(delay, max(0.0, consumer.reserved_until / 1000 - time.time()) + 0.001)
            consumer.reserved_until = 0
        if consumer.hints and consumer.capacity() > 0:
            return
        consumer.wake.clear()
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: wait_for can swallow a cancel that races the wake-up.
            async with asyncio.timeout(delay):
                await consumer.wake.wait()

    # -- pub/sub --------------------------------------------------------------------------------

    async def _listen(self, ready: asyncio.Event) -> None:
        """Wake-ups (a job was queued) and messages for nodes held here (cancels)."""
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                await pubsub.psubscribe(keys.wake_channel("*"), keys.node_channel("*"))
                if self._watches:
                    await pubsub.subscribe(*self._watches)
                self._pubsub = pubsub
                ready.set()
                wake_prefix = len(keys.wake_channel(""))
                node_prefix = len(keys.node_channel(""))
                async for message in pubsub.listen():
                    kind = message["type"]
                    channel = message["channel"].decode()
                    if kind == "message":
                        for inbox in self._watches.get(channel, ()):
                            inbox.offer(message["data"])
                    elif kind == "subscribe" and channel in self._confirmed:
                        self._confirmed[channel].set()
                    elif kind == "pmessage":
                        data = message["data"].decode()
                        if channel.startswith(keys.wake_channel("")):
                            self._on_wake(channel[wake_prefix:], data)
                        else:
                            self._on_node_message(channel[node_prefix:], data)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                ready.set()
                self._listen_errors("wake-up subscription lost (%r); polling covers it, resubscribing", err)
                await asyncio.sleep(0.5)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    @contextlib.asynccontextmanager
    async def watching(self, channel: str) -> AsyncIterator[Inbox]:
        """An inbox of the messages published on `channel`, over this instance's one shared
        subscription (no connection per watcher). Returns once the subscription is confirmed, so
        nothing published after that is missed; if the subscription is down, the caller's backstop
        timeout covers it."""
        inbox = Inbox(self.settings.stream_outbox_max)
        group = self._watches.setdefault(channel, set())
        first = not group
        group.add(inbox)
        try:
            if first:
                self._confirmed[channel] = asyncio.Event()
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self._pubsub.subscribe(channel)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._confirmed[channel].wait()
            yield inbox
        finally:
            group.discard(inbox)
            if not group:
                del self._watches[channel]
                self._confirmed.pop(channel, None)
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self._pubsub.unsubscribe(channel)

    def _on_wake(self, pool: str, data: str) -> None:
        job_id, preferred = wire.parse_wake(data)
        group = [c for c in self.consumers.get(pool, ()) if c.capacity() > 0]
        if not group:
            return
        chosen = next((c for c in group if c.node_id == preferred), None) or random.choice(group)
        chosen.hint(job_id)

    def _on_node_message(self, node_id: str, data: str) -> None:
        verb, args = wire.parse_node_message(data)
        listener = self.node_listeners.get(node_id)
        if listener is not None:
            listener(verb, args)

    # -- timers ---------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while not await sleep_unless(self._stopping, self.settings.sweep_interval_ms / 1000 * random.uniform(0.5, 1.5)):
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._sweep_errors("timer sweep failed: %r", err)
        with contextlib.suppress(Exception):  # leaving: the other instances take this one's shards at once
            await self.store.share_sweep(self.settings.instance_id, self._live_ms(), alive=False)

    def _live_ms(self) -> int:
        return 3 * self.settings.instance_heartbeat_ms

    async def my_shards(self) -> list[int]:
        """The shards this instance sweeps: those whose number modulo the live instance count is its
        rank among them (refreshed every --instance-heartbeat-ms; all of them when Redis cannot say)."""
        if time.monotonic() - self._shared_at >= self.settings.instance_heartbeat_ms / 1000:
            live = await self.store.share_sweep(self.settings.instance_id, self._live_ms())
            me = self.settings.instance_id
            rank, count = (live.index(me), len(live)) if me in live else (0, 1)
            self._shards = [s for s in range(self.settings.partitions) if s % count == rank]
            self._shared_at = time.monotonic()
        return self._shards

    async def sweep_once(self, shards: list[int] | None = None) -> int:
        """Fire every due timer of this instance's shards (or of `shards`); returns how many were acted on."""
        due = await self.store.due_timers(await self.my_shards() if shards is None else shards,
                                          int(time.time() * 1000) + 1)
        fired = 0
        for member in due:
            try:
                if await self.store.fire_timer(member) is not None:
                    fired += 1
            except ResponseError as err:  # one bad record must not stop the timers behind it
                self._timer_errors("timer %s failed: %r", member, err)
        return fired
