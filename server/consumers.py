"""The consumers of work an instance dispatches to (node streams, waiting Assigns), and what it
knows of each pool: who waits for work, in turn, and which queued jobs it has heard of. No I/O:
server/dispatch.py claims with them."""

from __future__ import annotations

import asyncio
import heapq
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from . import keys
from .store import Claim
from .wire import queue_band

MAX_AVOIDED = 256  # jobs remembered per consumer as keeping away from it (the oldest are forgotten)
MAX_HINTS = 1024  # queued job ids remembered per pool (past it they are forgotten, the queue peeked)


def new_lease_token() -> str:
    """A claim's lease token: unique, and unguessable (it is the capability to act on the lease)."""
    return secrets.token_hex(12)


class Consumer:
    """A local taker of work: a node stream, or one unary Assign call.

    `capacity()` is how many more jobs it takes now. The dispatch task hands it the claims it made for
    it with `deliver(claims)`, synchronously (nothing runs between the reply and the hand-over); a
    consumer without `deliver` is only claimed for by claim_for()."""

    __slots__ = ("avoided", "capacity", "deliver", "gone", "hints", "node_id", "pending", "pools", "round", "serving")

    def __init__(self, node_id: str, pools: list[str], capacity: Callable[[], int],
                 deliver: Callable[[list[Claim]], None] | None = None) -> None:
        self.node_id = node_id
        self.pools = pools
        self.capacity = capacity
        self.deliver = deliver
        self.hints: list[str] = []  # job ids claim_for() tries before peeking
        self.avoided: dict[str, float] = {}  # job id -> until (ms): jobs that keep away from this node
        # Claims sent to Redis whose reply has not been handled (job id -> lease token): after a lost
        # reply they are claimed again with the same token (adopted), or released when nobody takes them.
        self.pending: dict[str, str] = {}
        self.serving = False  # added to the dispatcher (and not removed yet)
        self.gone = False  # removed from the dispatcher: nothing more is handed to it
        self.round: asyncio.Future[None] | None = None  # the dispatch round trip carrying claims for it

    def wants(self) -> int:
        """How many jobs the dispatch task may claim for it now (claims on their way count as taken)."""
        return self.capacity() - len(self.pending) if self.serving and self.deliver is not None else 0

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
        """A job for claim_for() to try first."""
        self.hints.append(job_id)


def in_turn(partitions: Iterable[Iterable[tuple[str, float]]]) -> Iterator[tuple[str, float]]:
    """(job id, queue score) sequences, each one partition's in its queue order, merged (lazily): highest
    priority band first, then the partitions in turn. A score's pass is its partition's own virtual time
    (server/wire.py), so passes of two partitions are never compared."""
    ranked = heapq.merge(*(((queue_band(score), rank, job_id, score) for rank, (job_id, score) in enumerate(found))
                           for found in partitions))
    return ((job_id, score) for _band, _rank, job_id, score in ranked)


def _drain(heap: list[tuple[float, str]]) -> Iterator[tuple[str, float]]:
    """A heap of (score, job id) popped in order (score, then job id) as (job id, score)."""
    while heap:
        score, job_id = heapq.heappop(heap)
        yield job_id, score


class LocalPool:
    """A pool as this instance dispatches it: its consumers waiting for work, in turn, and the queued
    jobs it has heard of. Exists while the pool has a local consumer."""

    __slots__ = ("by_node", "count", "held", "hints", "marks", "paused", "ready", "resumes", "unknown")

    def __init__(self) -> None:
        # Consumers that may want work, oldest first: served from the front, sent to the back once
        # served (round robin). One found wanting nothing leaves it until Dispatcher.ready() again.
        self.ready: OrderedDict[Consumer, None] = OrderedDict()
        self.by_node: dict[str, Consumer] = {}  # node id -> its consumer here (a session's preferred node)
        self.count = 0  # local consumers of the pool
        # Queued jobs heard of, oldest heard first: job id -> (its session's node, "" for any; its queue
        # score, None while unknown; its partition tag). Paired in queue order (in_order()), not as heard.
        self.hints: dict[str, tuple[str, float | None, str]] = {}
        self.held: dict[str, float] = {}  # job id -> until (ms): held back for its session's node (code -9)
        self.unknown = True  # the queue may hold jobs missing from `hints`: peek it
        self.marks = 0  # times `unknown` was set: a peek sent before the latest one cannot clear it
        # The pool is paused (PausePool: a claim answered POOL_PAUSED, or the pool channel said so): no
        # peeks, no claims until ResumePool is heard (or the slow poll tries once, should that be lost).
        self.paused = False
        self.resumes = 0  # ResumePool heard: a claim sent before the latest one says nothing of the pause now

    def claim_paused(self, resumes: int) -> None:
        """A claim sent when `resumes` resumes had been heard found the pool paused."""
        if resumes == self.resumes:
            self.paused = True  # nothing more until ResumePool is heard

    def mark_unknown(self) -> None:
        self.unknown = True
        self.marks += 1

    def hear(self, job_id: str, preferred: str = "", score: float | None = None) -> None:
        """A queued job. Bounded: past MAX_HINTS (a burst) what was heard is forgotten and the queue is
        peeked again, so the jobs kept are the queue's heads in its order, not the burst's newest."""
        known = self.hints.get(job_id)
        if known is None and len(self.hints) >= MAX_HINTS:
            self.hints.clear()
            self.mark_unknown()
        if known is None:
            self.hints[job_id] = (preferred, score, keys.tag_of(job_id))
        else:
            self.hints[job_id] = (preferred or known[0], known[1] if score is None else score, known[2])

    def in_order(self) -> Iterator[tuple[str, str]]:
        """The jobs heard of as (job id, preferred node), in the queue's order as far as known: highest
        priority first, then the partitions in turn, each in its own (fair share) order, since a
        queue score is a partition's own virtual time (server/wire.py). So a tenant's backlog heard
        first does not go before another tenant's next job. Jobs of unknown score go last, as heard.
        Lazy: a pass that pairs a few jobs of a long queue heard of costs a heapify, not a sort."""
        by_tag: dict[str, list[tuple[float, str]]] = {}
        unknown: list[tuple[str, str]] = []
        for job_id, (preferred, score, tag) in self.hints.items():
            if score is None:
                unknown.append((job_id, preferred))
            else:
                by_tag.setdefault(tag, []).append((score, job_id))
        for heap in by_tag.values():
            heapq.heapify(heap)
        for job_id, _score in in_turn(_drain(heap) for heap in by_tag.values()):
            yield job_id, self.hints[job_id][0]  # (the caller pairs without awaiting: hints stay as they are)
        yield from unknown

    def wanted(self, free: Callable[[Consumer], int]) -> bool:
        """Whether a consumer here wants work (those at the front that want none leave the turn)."""
        while self.ready:
            if free(next(iter(self.ready))) > 0:
                return True
            self.ready.popitem(last=False)
        return False


def pass_want(wants: dict[Consumer, int], consumer: Consumer) -> int:
    """What `consumer` wants in this pass (asked once per pass, then counted down as jobs are paired)."""
    n = wants.get(consumer)
    if n is None:
        n = wants[consumer] = consumer.wants()
    return n
