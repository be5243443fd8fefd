"""Dispatch: claims work from Redis for the nodes whose streams (or long-polls) this instance holds.

Pull, not push: nothing is routed to "the instance that owns a node". Each instance claims for its own
consumers (node streams with free slots, unary Assigns waiting), all of them from one dispatch task,
so its Redis work grows with jobs, not with streams. A Redis pub/sub wake-up names the job just queued
(and its session's node), a freed slot puts a consumer back in its pools' turn; a pass pairs the jobs
the instance knows of with the consumers that want work (the session's node first, then in turn, one
job each before anyone gets a second) and sends all those claims in one pipelined round trip. A pool's
queue is peeked (one pipeline for all such pools) only while the instance may not know all its jobs: a
cold start, a claim reply that shows more queue heads, and the slow poll that backs up lost wake-ups.
Another task sweeps the timers (leases, deadlines, retries) of this instance's share of the shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError

from . import keys, logs, wire

# Consumer, MAX_AVOIDED and new_lease_token are re-exported: callers import them from here.
from .consumers import MAX_AVOIDED as MAX_AVOIDED
from .consumers import Consumer as Consumer
from .consumers import LocalPool, in_turn, pass_want
from .consumers import new_lease_token as new_lease_token
from .errors import ScriptCode, StreamOverflow
from .settings import Settings
from .store import SET_ASIDE_MS, Claim, Lease, Store, is_timer
from .throttle import ThrottledWarning
from .tracing import Tracing

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


PEEK_COUNT = 64  # queue heads read per partition when a pool is peeked
HINT_COUNT = 8  # queue heads each claim call's reply carries (in its last claim's): the next candidates
MAX_BATCH = 512  # claims per pass (one pipelined round trip); the rest wait for the next pass
MAX_GATHER_TURNS = 8  # event-loop turns a pass waits while wake-ups keep coming in (see _gather_wake_ups)
SWEEP_READ = 200  # due timers read per shard at a time

# One claim of a pass: (consumer, job id, lease token, pool it was paired in; "" for one sent again).
Item = tuple[Consumer, str, str, str]


# Errors of Redis as a whole: a script's error carries "@user_script" whatever its cause, so these go first.
_REDIS_WIDE = (OutOfMemoryError, ReadOnlyError, BusyLoadingError)
_REDIS_WIDE_PREFIXES = ("NOREPLICAS", "MISCONF", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "LOADING", "OOM",
                        "READONLY")


def record_error(err: ResponseError) -> bool:
    """Whether a script's error is one record's (a value of another type, a script failing on what it read),
    not Redis' as a whole (out of memory, a replica or a failover, a slot on the move, a busy script)."""
    text = str(err)
    if isinstance(err, _REDIS_WIDE) or text.startswith(_REDIS_WIDE_PREFIXES):
        return False
    return text.startswith("WRONGTYPE") or "user_script" in text


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


async def heard(pubsub: Any) -> AsyncIterator[tuple[str, Any, Any]]:
    """What pubsub.listen() gives, as (kind, channel, data), without building its dict or passing a
    published message through redis-py's handling (which only wraps it: no handlers are registered
    here): ~5 us of every wake-up and announcement heard. Confirmations (subscribe, unsubscribe) go
    through it, which keeps its record of what is subscribed."""
    while pubsub.subscribed:
        response = await pubsub.parse_response(block=True)
        if response is None:
            continue  # a health check's answer
        kind = response[0].decode() if isinstance(response[0], bytes) else response[0]
        if kind == "pmessage":
            yield kind, response[2], response[3]
        elif kind == "message":
            yield kind, response[1], response[2]
        elif (message := await pubsub.handle_message(response)) is not None:
            yield message["type"], message["channel"], message["data"]


class Dispatcher:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.local: dict[str, LocalPool] = {}  # pool -> how it is dispatched here (pools with a local consumer)
        # node id -> callback(verb, args) for messages to nodes held here (set by NodeSessions)
        self.node_listeners: Any = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._kick = asyncio.Event()  # something for the dispatch task to look at
        self._poll_at = 0.0  # monotonic time of the next slow poll
        self._heard = 0  # wake-ups heard so far
        self._unsettled: set[Consumer] = set()  # consumers whose claims' replies were lost: sent again first
        self._due: set[str] = set()  # pools the next pass looks at (a pass costs what is due, not every pool)
        self._holding: set[str] = set()  # pools with jobs held back for their session's node
        self._pubsub: Any = None
        self._watches: dict[str, set[Inbox]] = {}  # channel -> watchers' inboxes (WatchJob, WatchSession)
        self._confirmed: dict[str, asyncio.Event] = {}  # channel -> set once subscribed
        # channel -> subscribed (True) or not, for the next SUBSCRIBE / UNSUBSCRIBE (_subscribe)
        self._subscribing: dict[str, bool] = {}
        self._subscriber: asyncio.Task[None] | None = None  # sending them
        self._shards: list[int] = list(range(settings.partitions))  # what this instance sweeps
        self._shared_at = -float("inf")
        self._timer_errors = ThrottledWarning(log)
        # Redis down: not a line per sweep or per resubscription attempt.
        self._sweep_errors = ThrottledWarning(log, interval_s=10)
        self._listen_errors = ThrottledWarning(log, interval_s=10)
        self._dispatch_errors = ThrottledWarning(log, interval_s=10)
        self._release_errors = ThrottledWarning(log, interval_s=10)
        self._layout_errors = ThrottledWarning(log, interval_s=60, level=logging.ERROR)
        self.tracing: Tracing | None = None  # set by the app when tracing is on (server/tracing.py)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._listen(ready), name="dispatch-listen"),
            asyncio.create_task(self._sweep_forever(), name="dispatch-sweep"),
            asyncio.create_task(self._dispatch_forever(), name="dispatch-claims"),
        ]
        await ready.wait()

    async def stop(self) -> None:
        self._stopping.set()
        self._kick.set()
        if not self._tasks:
            return  # never started, or stopped already
        self._tasks[0].cancel()  # the subscription only waits for messages: cancelling it is safe
        if self._subscriber is not None:  # a round of SUBSCRIBEs: cancelled and awaited with the others
            self._subscriber.cancel()
            self._tasks.append(self._subscriber)
        await finish(self._tasks)
        self._tasks = []

    # -- consumers ------------------------------------------------------------------------------

    def add(self, consumer: Consumer) -> None:
        """Serve `consumer` from the next pass on (its pools' wake-ups are kept for it from now on)."""
        consumer.serving = True
        for pool in consumer.pools:
            local = self.local.get(pool)
            if local is None:
                local = self.local[pool] = LocalPool()  # new here: its queue is peeked (a cold start)
            local.count += 1
            local.by_node[consumer.node_id] = consumer
            local.ready[consumer] = None
            self._due.add(pool)
        self._kick.set()

    def ready(self, consumer: Consumer) -> None:
        """`consumer` may want more (a slot was freed): back in its pools' turn, and a pass soon for
        those that have work."""
        kick = False
        for pool in consumer.pools:
            local = self.local.get(pool)
            if local is not None and consumer.serving:
                local.ready[consumer] = None
                if local.hints or local.unknown:
                    self._due.add(pool)
                    kick = True
        if kick:
            self._kick.set()

    def remove(self, consumer: Consumer) -> None:
        """Nothing more for `consumer`. Claims on their way to it: see release_pending()."""
        was_serving, consumer.serving, consumer.gone = consumer.serving, False, True
        self._unsettled.discard(consumer)
        if not was_serving:
            return
        for pool in consumer.pools:
            local = self.local.get(pool)
            if local is None:
                continue
            local.ready.pop(consumer, None)
            if local.by_node.get(consumer.node_id) is consumer:
                del local.by_node[consumer.node_id]
            local.count -= 1
            if local.count <= 0:
                del self.local[pool]

    # -- claiming for one consumer, in the caller's task ------------------------------------------

    async def claim_for(self, consumer: Consumer, want: int) -> list[Claim]:
        """Claim up to `want` jobs for the consumer now, in the caller's task (Assign's first try):
        its hints first, else the oldest queued of its pools. Streams are served by the dispatch task.

        Every claim carries a fresh lease token and is recorded in `consumer.pending` until its reply
        is handled. If a reply is lost (an error, a timeout, a cancel), the next call claims those
        jobs again with the same tokens first: Redis answers the same assignment for a claim that went
        through, so it is adopted, not lost. See release_pending() for a consumer that goes away."""
        got: list[Claim] = []
        now_ms = time.time() * 1000
        if consumer.pending:
            got = await self._claim(consumer, list(consumer.pending.items()), now_ms)
        for _ in range(4):
            need = want - len(got)
            if need <= 0:
                break
            candidates: list[str] = []
            while consumer.hints and len(candidates) < need:
                job_id = consumer.hints.pop(0)
                if job_id not in candidates and not consumer.avoids(job_id, now_ms):
                    candidates.append(job_id)
            if not candidates:
                candidates = await self._oldest(consumer, need, now_ms)
            candidates = [j for j in candidates if j not in consumer.pending]  # claimed by this call already
            if not candidates:
                break
            got += await self._claim(consumer, [(job_id, new_lease_token()) for job_id in candidates], now_ms)
        for claim in got:  # handed to the caller now (no await between this and the caller taking them)
            del consumer.pending[claim.job_id]
        return got

    async def _claim(self, consumer: Consumer, tokens: list[tuple[str, str]], now_ms: float) -> list[Claim]:
        """claim_for's round trip: the claims that applied (still in `consumer.pending`)."""
        resumes = {pool: local.resumes for pool in consumer.pools if (local := self.local.get(pool)) is not None}
        sent = asyncio.ensure_future(self._send([(consumer, job_id, token, "") for job_id, token in tokens], now_ms))
        try:
            replies = await asyncio.shield(sent)
        except asyncio.CancelledError:
            # The caller gave up (a deadline, a closed stream). Let the claim's reply arrive (bounded),
            # so a release that follows is sent after the claim, not racing it on another connection.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(sent, self.settings.ack_timeout_ms / 1000)
            raise
        got = []
        for claim in replies:
            if isinstance(claim, Exception):
                continue
            pool = keys.pool_of_tag(keys.tag_of(claim.job_id))
            if claim.code == ScriptCode.POOL_PAUSED and (local := self.local.get(pool)) is not None:
                local.claim_paused(resumes.get(pool, -1))  # not peeked again until ResumePool is heard
            if claim.code == ScriptCode.APPLIED:
                got.append(claim)
            consumer.hints.extend(
                j for j in claim.candidates if j != claim.job_id and not consumer.avoids(j, now_ms)
            )
        del consumer.hints[:-64]
        return got

    async def _oldest(self, consumer: Consumer, count: int, now_ms: float) -> list[str]:
        """The `count` oldest queued jobs (highest priority first) across the consumer's pools."""
        pools = [pool for pool in consumer.pools if not ((local := self.local.get(pool)) and local.paused)]
        if not pools:
            return []
        marks = {pool: local.marks for pool in pools if (local := self.local.get(pool)) is not None}
        peeked = await self._peek(pools, count + consumer.avoiding(now_ms))
        for pool, mark in marks.items():  # found nothing queued: the dispatch task need not peek it again
            local = self.local.get(pool)
            if local is not None and local.marks == mark and not peeked[pool][0]:
                local.unknown = False
        out: list[str] = []
        for job_id, _score in in_turn(found for found, _ in peeked.values()):
            if consumer.avoids(job_id, now_ms):
                continue
            out.append(job_id)
            if len(out) >= count:
                break
        return out

    async def release_pending(self, consumer: Consumer) -> None:
        """The consumer is going away with claims whose replies it never handled: put back whichever
        went through (their attempts given back; a claim that did not go through is left alone)."""
        if consumer.round is not None:
            # A dispatch round trip carries claims for it: let their replies arrive first (bounded), so
            # the release follows the claims instead of racing them on another connection.
            await asyncio.wait([consumer.round], timeout=self.settings.ack_timeout_ms / 1000)
        if not consumer.pending:
            return
        leases = [Lease(job_id, token) for job_id, token in consumer.pending.items()]
        consumer.pending.clear()
        try:
            await self.store.release(consumer.node_id, leases)
        except Exception as err:  # Redis is down: the ack timeout takes them back
            self._release_errors("node %s: releasing %d unanswered claims failed (%r); their ack timeout covers them",
                                 consumer.node_id, len(leases), err, extra=logs.fields(node_id=consumer.node_id))

    # -- shared by both ---------------------------------------------------------------------------

    async def _peek(self, pools: list[str], count: int) -> dict[str, tuple[list[tuple[str, float]], bool]]:
        """The first `count` (job id, queue score) of each partition of `pools`, merged per pool, and
        whether that is the pool's whole queue (no partition had `count`): one pipelined round trip.
        Merged: highest priority first, then the partitions in turn, each in its own (fair share)
        order. A pass is a partition's own virtual time, so passes of two partitions are not compared."""
        tags = {pool: self.store.tags_of_pool(pool) for pool in pools}
        peeked = await self.store.peek([t for ts in tags.values() for t in ts], count)
        return {pool: (list(in_turn(peeked[t] for t in ts)), all(len(peeked[t]) < count for t in ts))
                for pool, ts in tags.items()}

    async def _send(self, items: list[Item], now_ms: float) -> list[Claim | Exception]:
        """One pipelined round trip of claims. Each is in its consumer's `pending` until its reply is
        handled: when the round trip fails they stay there, to be claimed again with the same tokens
        (adopted) or released."""
        for consumer, job_id, token, _ in items:
            consumer.pending[job_id] = token
        started = time.time_ns()
        replies = await self.store.claim_many([(job_id, c.node_id, token) for c, job_id, token, _ in items])
        if self.tracing is not None:
            self.tracing.claimed([(c.node_id, claim) for (c, _, _, _), claim in zip(items, replies, strict=True)], started)
        for (consumer, job_id, _, _), claim in zip(items, replies, strict=True):
            if isinstance(claim, Exception):  # this one failed in Redis (a damaged record): not claimed
                consumer.pending.pop(job_id, None)
                self._dispatch_errors("claiming job %s failed: %r", job_id, claim,
                                      extra=logs.fields(job_id, consumer.node_id))
                continue
            if claim.code != ScriptCode.APPLIED:
                consumer.pending.pop(job_id, None)
            if claim.code == ScriptCode.AVOIDED:
                consumer.avoid(job_id, claim.reserved_until, now_ms)
        return replies

    # -- the dispatch task --------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while not self._stopping.is_set():
            await self._gather_wake_ups()
            self._kick.clear()
            try:
                await self.dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Redis down: claims whose replies were lost are sent again next time
                self._dispatch_errors("dispatch failed (%r); retrying", err)
                await sleep_unless(self._stopping, self.settings.poll_interval_ms / 1000)
                continue
            if self._kick.is_set():
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_for()):
                    await self._kick.wait()

    async def _gather_wake_ups(self) -> None:
        """Let the wake-ups that already reached this process in before a pass: a few turns of the
        event loop while more keep coming, so a burst read at once is claimed in one round trip.
        Microseconds; a lone wake-up waits for nothing. (Wake-ups heard while a pass's round trip is
        on its way go together in the next one.)"""
        for _ in range(MAX_GATHER_TURNS):
            heard = self._heard
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # one turn to poll the socket, one for the listener to run
            if self._heard == heard:
                return

    def _idle_for(self) -> float:
        """Seconds until the slow poll or the end of the first hold on a job, whichever is first."""
        wait = self._poll_at - time.monotonic()
        held = [until for pool in self._holding if (local := self.local.get(pool)) for until in local.held.values()]
        if held:
            wait = min(wait, (min(held) - time.time() * 1000) / 1000 + 0.001)
        return max(wait, 0.0)

    async def dispatch_once(self) -> int:
        """One pass over the pools with something to do: peek those whose queue this instance may not
        know (one round trip for all), pair their jobs with the consumers that want work, and send
        every claim, of every pool and consumer, in one pipelined round trip. Returns how many claims
        were handed to consumers."""
        now = time.monotonic()
        now_ms = time.time() * 1000
        polling = now >= self._poll_at
        if polling:  # the slow poll: a job whose wake-up was lost is found here
            self._poll_at = now + self.settings.poll_interval_ms / 1000 * random.uniform(0.8, 1.2)
            for local in self.local.values():
                local.mark_unknown()
                local.paused = False  # a resume whose message was lost: one claim finds out
            self._due.update(self.local)
        for pool in list(self._holding):  # holds that ended: those jobs may go to anyone now
            holder = self.local.get(pool)
            if holder is None:
                self._holding.discard(pool)
                continue
            ended = [j for j, until in holder.held.items() if until <= now_ms]
            for job_id in ended:
                del holder.held[job_id]
            if ended:
                self._due.add(pool)
            if not holder.held:
                self._holding.discard(pool)
        wants: dict[Consumer, int] = {}  # what each consumer looked at in this pass still wants
        free = functools.partial(pass_want, wants)
        # Claims whose replies were lost go first, with their tokens: adopted if they went through.
        items: list[Item] = [(c, job_id, token, "") for c in self._unsettled for job_id, token in c.pending.items()]
        self._unsettled.clear()
        due = [(pool, self.local[pool]) for pool in self._due if pool in self.local and not self.local[pool].paused]
        self._due.clear()
        peek = [(pool, local) for pool, local in due
                if local.unknown and (polling or len(local.hints) - len(local.held) < HINT_COUNT) and local.wanted(free)]
        if peek:
            await self._learn(peek)
        sending = {job_id for _, job_id, _, _ in items}
        for pool, local in due:
            if self.local.get(pool) is not local:
                continue  # its last consumer left meanwhile
            room = MAX_BATCH - len(items)
            if room <= 0:
                self._due.add(pool)
                self._kick.set()
                continue
            items += self._pair(pool, local, wants, sending, room, now_ms)
        if not items:
            return 0
        resumes = {pool: self.local[pool].resumes for _, _, _, pool in items if pool in self.local}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for c, _, _, _ in items:
            c.round = done
        try:
            replies = await self._send(items, now_ms)
        except BaseException:
            self._unsettled.update(c for c, _, _, _ in items if not c.gone and c.pending)
            raise
        finally:
            done.set_result(None)
            for c, _, _, _ in items:
                if c.round is done:
                    c.round = None
        return self._settle(items, replies, resumes)

    async def _learn(self, peek: list[tuple[str, LocalPool]]) -> None:
        """Peek the queues of these pools (one round trip) and remember what they hold. A peek that
        read a whole queue also shows which remembered jobs are no longer queued."""
        marks = [(local.marks, set(local.hints)) for _, local in peek]
        peeked = await self._peek([pool for pool, _ in peek], PEEK_COUNT)
        for (pool, local), (mark, before) in zip(peek, marks, strict=True):
            found, whole = peeked[pool]
            if whole:
                queued = {job_id for job_id, _ in found}
                for job_id in before - queued:  # claimed by someone else (or gone) since it was heard of
                    local.hints.pop(job_id, None)
                    local.held.pop(job_id, None)
                if local.marks == mark:
                    local.unknown = False
            for job_id, score in found:
                local.hear(job_id, score=score)

    def _pair(self, pool: str, local: LocalPool, wants: dict[Consumer, int], sending: set[str],
              room: int, now_ms: float) -> list[Item]:
        """Pair the pool's known jobs, in queue order (LocalPool.in_order), with its consumers that want work: a job
        goes to its session's node when that one is here with a free slot; otherwise to the next
        consumer in turn, each getting one before any gets a second (so a consumer with more free
        slots gets more only when there are more jobs than consumers). Held-back jobs wait for their
        node; a job that keeps away from a consumer goes to another."""
        free = functools.partial(pass_want, wants)
        out: list[Item] = []
        taken: list[Consumer] = []  # taken from the front of the turn in this pass, in turn order
        last: dict[Consumer, int] = {}  # consumer -> when it got its last job of this pass
        cycle = 0

        def next_consumer(job_id: str) -> Consumer | None:
            nonlocal cycle
            while local.ready:  # someone not served in this pass yet
                c, _ = local.ready.popitem(last=False)
                if free(c) <= 0:
                    continue  # wants nothing: out of the turn until it is ready() again
                taken.append(c)
                if not c.avoids(job_id, now_ms):
                    return c
            for _ in range(len(taken)):  # everyone had one: again, while slots are left
                c = taken[cycle % len(taken)]
                cycle += 1
                if free(c) > 0 and not c.avoids(job_id, now_ms):
                    return c
            return None

        for job_id, preferred in local.in_order():
            if len(out) >= room:
                self._due.add(pool)  # the rest next pass
                self._kick.set()
                break
            if job_id in sending:
                continue
            chosen = local.by_node.get(preferred) if preferred else None
            if chosen is None or free(chosen) <= 0 or chosen.avoids(job_id, now_ms):
                chosen = None if job_id in local.held else next_consumer(job_id)
            if chosen is None:
                if not local.ready and not any(free(c) > 0 for c in taken):
                    break  # nobody here wants work
                continue
            wants[chosen] = free(chosen) - 1
            last[chosen] = len(out)
            out.append((chosen, job_id, new_lease_token(), pool))
            sending.add(job_id)
        # Back in the turn: those taken that got nothing keep their place in front; those that got a
        # job go to the back, the one served last, last (see _settle for those whose claim failed).
        for c in reversed(taken):
            if c not in last and free(c) > 0:
                local.ready[c] = None
                local.ready.move_to_end(c, last=False)
        for c in sorted(last, key=last.__getitem__):
            if free(c) > 0:
                local.ready[c] = None
                local.ready.move_to_end(c)
        return out

    def _settle(self, items: list[Item], replies: list[Claim | Exception], resumes: dict[str, int]) -> int:
        """Learn from a pass's replies and hand the claims that applied to their consumers (`resumes`:
        each pool's LocalPool.resumes when they were sent)."""
        handed: dict[Consumer, list[Claim]] = {}
        for (c, job_id, _, pool), claim in zip(items, replies, strict=True):
            local = self.local.get(pool) if pool else None
            if local is not None:
                self._due.add(pool)  # another pass: more jobs, or other consumers for these
                if not isinstance(claim, Exception) and claim.code == ScriptCode.POOL_PAUSED:
                    local.claim_paused(resumes.get(pool, -1))
                if isinstance(claim, Exception) or claim.code not in (ScriptCode.RESERVED, ScriptCode.AVOIDED):
                    local.hints.pop(job_id, None)  # claimed, or not claimable (any more)
                    local.held.pop(job_id, None)
                elif claim.code == ScriptCode.RESERVED:
                    local.held[job_id] = claim.reserved_until
                    self._holding.add(pool)
                if not isinstance(claim, Exception):
                    for next_id, score in zip(claim.candidates, claim.scores, strict=True):
                        local.hear(next_id, score=score)
                    if len(claim.candidates) >= HINT_COUNT:
                        local.mark_unknown()  # more queued than the reply shows
            if not isinstance(claim, Exception) and claim.code == ScriptCode.APPLIED:
                handed.setdefault(c, []).append(claim)
        count = 0
        for c, claims in handed.items():
            if c.gone:
                continue  # its stream went away meanwhile: release_pending() puts these back
            for claim in claims:
                del c.pending[claim.job_id]
            if c.deliver is not None:  # (always: the dispatch task claims only for those that take deliveries)
                c.deliver(claims)
            count += len(claims)
        for c, _, _, _ in items:
            if not c.gone and c.wants() > 0:
                self.ready(c)
        self._kick.set()
        return count

    # -- pub/sub --------------------------------------------------------------------------------

    async def _listen(self, ready: asyncio.Event) -> None:
        """Wake-ups (a job was queued) and messages for nodes held here (cancels)."""
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                await pubsub.psubscribe(keys.wake_channel("*"), keys.node_channel("*"), keys.pool_channel("*"))
                self._subscribing.clear()  # what is watched now is subscribed here
                if self._watches:
                    await pubsub.subscribe(*self._watches)
                self._pubsub = pubsub
                ready.set()
                for local in self.local.values():  # wake-ups may have been lost while unsubscribed
                    local.mark_unknown()
                self._due.update(self.local)
                self._kick.set()
                wake_prefix = len(keys.wake_channel(""))
                node_prefix = len(keys.node_channel(""))
                pool_prefix = len(keys.pool_channel(""))
                async for kind, raw_channel, raw_data in heard(pubsub):
                    channel = raw_channel.decode()
                    if kind == "message":
                        for inbox in self._watches.get(channel, ()):
                            inbox.offer(raw_data)
                    elif kind == "subscribe" and channel in self._confirmed:
                        self._confirmed[channel].set()
                    elif kind == "pmessage":
                        data = raw_data.decode()
                        if channel.startswith(keys.wake_channel("")):
                            self._on_wake(channel[wake_prefix:], data)
                        elif channel.startswith(keys.pool_channel("")):
                            self._on_pool_message(channel[pool_prefix:], data)
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
                self._subscribe(channel, True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._confirmed[channel].wait()
            yield inbox
        finally:
            group.discard(inbox)
            if not group:
                del self._watches[channel]
                self._confirmed.pop(channel, None)
                self._subscribe(channel, False)

    def _subscribe(self, channel: str, subscribed: bool) -> None:
        """Have `channel` subscribed (or unsubscribed) on the shared subscription. The channels asked for
        together (a client's batch of WatchJobs starting, or their jobs ending) share one SUBSCRIBE and
        one UNSUBSCRIBE (_send_subscriptions): a command per channel cost ~2.5x a channel's share of a
        shared one. While the subscription is down nothing is sent: the listener subscribes every
        watched channel when it is back."""
        if self._pubsub is None:
            return
        self._subscribing[channel] = subscribed  # the last word counts (a watch ended, another began)
        if self._subscriber is None:
            self._subscriber = asyncio.create_task(self._send_subscriptions(), name="dispatch-subscribe")

    async def _send_subscriptions(self) -> None:
        """Send what _subscribe() asked for (it runs after the turn that asked), the last word for each
        channel, in rounds: a round that subscribed waits for Redis to confirm it (as its watchers do)
        before the next one goes, so what is asked meanwhile (the next WatchJobs of a burst, arriving
        over several turns) shares the next round; with nothing in flight, a round goes at once."""
        try:
            while self._subscribing and (pubsub := self._pubsub) is not None:
                asked, self._subscribing = self._subscribing, {}
                with contextlib.suppress(Exception):  # (the subscription lost: the listener subscribes again)
                    if off := [channel for channel, on in asked.items() if not on]:
                        await pubsub.unsubscribe(*off)
                    if on := [channel for channel, on in asked.items() if on]:
                        await pubsub.subscribe(*on)
                        confirmed = self._confirmed.get(on[-1])  # Redis confirms in order: the last one last
                        if confirmed is not None:
                            async with asyncio.timeout(1.0):
                                await confirmed.wait()
        finally:
            self._subscriber = None

    def _on_wake(self, pool: str, data: str) -> None:
        local = self.local.get(pool)
        if local is None:
            return  # no consumer of this pool here
        try:
            wakes = wire.parse_wakes(data)  # one per job of a submit call
            for job_id, _, _ in wakes:
                keys.tag_of(job_id)
        except ValueError:
            self._listen_errors("ignoring a wake-up no scheduler sent: %r", data)
            return
        for job_id, preferred, score in wakes:
            local.hear(job_id, preferred, score)
        self._due.add(pool)
        self._heard += len(wakes)
        self._kick.set()

    def _on_pool_message(self, pool: str, data: str) -> None:
        """PausePool / ResumePool on any instance: stop claiming from the pool, or dispatch its queue now."""
        local = self.local.get(pool)
        if local is None:
            return  # no consumer of this pool here: a claim finds out when one comes
        local.paused = data == wire.PAUSE
        if not local.paused:
            local.resumes += 1
            local.mark_unknown()
            self._due.add(pool)
            self._kick.set()

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
        rank among them (refreshed every --instance-heartbeat-ms, with the stored partition count:
        Store.keep_partitions; all of them when Redis cannot say)."""
        if time.monotonic() - self._shared_at >= self.settings.instance_heartbeat_ms / 1000:
            try:  # first: Redis restarted empty gets the count back before this instance is listed live
                other = await self.store.keep_partitions()
            except Exception as err:  # (its key's node down: the sweep goes on; share_sweep tells)
                other = None
                self._sweep_errors("storing the partition count again failed: %r", err)
            if other is not None:
                self._layout_errors(
                    "this instance runs with %d partition(s) but Redis now holds %s (key %s): an instance started "
                    "while Redis had lost the count stored its own; instances that disagree split idempotency keys "
                    "and refuse each other's job ids: restart the instances whose count differs (docs/deployment.md, "
                    "\"Changing the partition count\")", self.settings.partitions, other.decode(errors="replace"),
                    keys.PARTITIONS)
            live = await self.store.share_sweep(self.settings.instance_id, self._live_ms())
            me = self.settings.instance_id
            rank, count = (live.index(me), len(live)) if me in live else (0, 1)
            self._shards = [s for s in range(self.settings.partitions) if s % count == rank]
            self._shared_at = time.monotonic()
        return self._shards

    async def sweep_once(self, shards: list[int] | None = None) -> int:
        """Fire every due timer of this instance's shards (or of `shards`); returns how many were acted on."""
        shards = await self.my_shards() if shards is None else shards
        forget, fired = wire.FORGET + ":", 0
        tried: set[str] = set()  # timers fired in this sweep (one left due is not fired again on a re-read)
        while True:
            now_ms = int(time.time() * 1000)
            due = await self.store.due_timers(shards, now_ms + 1, SWEEP_READ)
            # What cannot be acted on (a member no scheduler wrote, a record that fails its script: not an error
            # of Redis as a whole, record_error) is set aside, due again SET_ASIDE_MS later: left at the head of
            # its shard's timers, enough of them would hold back every timer due after them (each read brings
            # the same first SWEEP_READ).
            readable = [is_timer(m) for _, m in due]
            aside = [t for t, ok in zip(due, readable, strict=True) if not ok]
            good = [t for t, ok in zip(due, readable, strict=True) if ok] if aside else due
            # Forget timers (one per finished job, due as its record expires) go in one round trip, a call per shard.
            forgets = [(key, m) for key, m in good if m.startswith(forget)]
            others = [(key, m) for key, m in good if not m.startswith(forget) and m not in tried]
            tried.update(m for _, m in others)
            forgot = 0
            if forgets:
                try:
                    forgot = len(await self.store.forget([m for _, m in forgets]))
                except ResponseError as err:  # must not stop the other timers
                    self._timer_errors("forget timers failed: %r", err)
                    if record_error(err):
                        aside += forgets
            for key, member in others:
                try:
                    if await self.store.fire_timer(member) is not None:
                        fired += 1
                except ResponseError as err:  # one bad record must not stop the timers behind it
                    self._timer_errors("timer %s failed: %r", member, err)
                    if record_error(err):
                        aside.append((key, member))
            if aside:
                try:
                    await self.store.set_aside(aside, now_ms + SET_ASIDE_MS)
                except ResponseError as err:
                    self._timer_errors("setting %d timers aside failed: %r", len(aside), err)
                    return fired + forgot
            fired += forgot
            # Every finished job has a forget timer: at a high finish rate more may be due than one read per
            # shard brings. Read again at once while a read brought a shard's worth and each read removes some
            # (its forgets were all acted on, or some were set aside), so they never hold back the timers due
            # after them.
            if len(due) < SWEEP_READ or not (aside or (forgets and forgot == len(forgets))):
                return fired
