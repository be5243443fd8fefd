"""What this instance keeps of the shared figures that no script needs exactly, so the scripts skip it.

Submits and finishes per second (GetStats' rates, server/buckets.py's rate buckets): the instance sees
every submit_job and finish_job reply it gets, so it counts them here and adds them to the same rate
bucket hashes about once per FLUSH_S, all of them in one pipelined round trip (HINCRBY per pool and
figure, PEXPIREAT per bucket), instead of an HINCRBY in every script call. A count reaches Redis at
most ~FLUSH_S late (GetStats through this instance flushes first); an instance that dies loses what it
had not flushed, at most its last second's submits and finishes in the minute's rate. Ended jobs by
state stay counted in finish_job: RetryJob counts a job out of its bucket there, exactly.

Each shard's pools zset (keys.ShardKeys.pools: until when a job of a pool may live) is written by
submit_job only when the job may outlive what this instance saw it write within POOLS_KNOWN_S
(submit_job's ARGV[17]); a busy pool's entry is written about once per second per instance and shard.

Each session's index (keys.session_jobs: its jobs by utterance) lives as long as its longest-lived job
record and up to an eighth longer; submit_job reads its PTTL only when the job may outlive what this
instance saw the key's expiry to be within SESSIONS_KNOWN_S (submit_job's ARGV[19]), for the last
SESSIONS_KEPT sessions it submitted to. A session submitting several times per second costs a PTTL about
once per second per instance. A failover that loses the key's expiry (or the key: the next ZADD makes one
without expiry) goes unseen by the submits trusting the instance's figure, at most SESSIONS_KNOWN_S after
the instance saw it; an unplanned failover takes longer than that to promote a replica (Sentinel's
down-after-milliseconds, a cluster's node-timeout), and a planned one loses no writes, so in practice no
submit trusts a figure from before one. Should one (a failover faster than a second), the session's next
submit after that second gives the key its expiry again; a session that never submits again keeps a key
without expiry (its members: a few dozen bytes per job).

Queued counts of the versions before (a `waiting` zset per partition) are folded into the partitions'
count hashes at start: fold_waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from . import buckets, keys
from .calls import FoldWaiting
from .scripts import Scripts
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)

FLUSH_S = 1.0  # how late a count may reach Redis (on a live instance)
POOLS_KNOWN_S = 1.0  # how long a pools zset score this instance saw written is trusted (a failover may lose it)
SESSIONS_KNOWN_S = 1.0  # how long a session index's expiry this instance saw is trusted (the same reason)
SESSIONS_KEPT = 10_000  # the sessions whose index expiry is remembered (the latest submitted to)
FOLD_CHUNK = 1_000  # waiting zset entries folded per script call at start


class Rates:
    """Submits and finishes per pool counted here and flushed to the rate buckets; the pools zset scores seen."""

    def __init__(self, redis: Any, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts
        self._counts: dict[str, dict[str, int]] = {}  # rate bucket key -> "<pool>|<figure>" -> count
        self._expiry: dict[str, int] = {}  # rate bucket key -> when it expires (ms)
        self._pools: dict[str, tuple[int, float]] = {}  # partition tag -> (pools zset score, monotonic seen)
        self._sessions: dict[str, tuple[int, float]] = {}  # session index key -> (expiry ms, monotonic seen)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._errors = ThrottledWarning(log, interval_s=10)

    # -- counts ---------------------------------------------------------------------------------

    def submitted(self, job_id: str) -> None:
        self._count(job_id, "submitted")

    def finished(self, job_id: str) -> None:
        self._count(job_id, "finished")

    def _count(self, job_id: str, figure: str) -> None:
        tag = keys.tag_of(job_id)
        key, expiry = buckets.rate(keys.shard_of_tag(tag), buckets.now_ms())
        fields = self._counts.get(key)
        if fields is None:
            fields = self._counts[key] = {}
            self._expiry[key] = expiry
        field = f"{keys.pool_of_tag(tag)}|{figure}"
        fields[field] = fields.get(field, 0) + 1

    async def flush(self) -> None:
        """Add the counts gathered so far to Redis: one pipelined round trip. Kept for the next try on failure."""
        counts, expiry, self._counts, self._expiry = self._counts, self._expiry, {}, {}
        if not counts:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in counts.items():
                    for field, n in fields.items():
                        pipe.hincrby(key, field, n)
                    pipe.pexpireat(key, expiry[key])
                await pipe.execute()
        except Exception as err:
            self._errors("adding submits and finishes to the rate buckets failed (%r); retrying", err)
            for key, fields in counts.items():
                mine = self._counts.setdefault(key, {})
                self._expiry.setdefault(key, expiry[key])
                for field, n in fields.items():
                    mine[field] = mine.get(field, 0) + n
            raise

    # -- the pools zset -------------------------------------------------------------------------

    def pools_known(self, tag: str) -> int | None:
        """The score of the partition's pool in its shard's pools zset as submit_job wrote it within
        POOLS_KNOWN_S (a lower bound of the score now), None when not seen that lately."""
        seen = self._pools.get(tag)
        if seen is None or time.monotonic() - seen[1] > POOLS_KNOWN_S:
            return None
        return seen[0]

    def pooled(self, tag: str, score: int) -> None:
        """submit_job wrote `score` for the partition's pool (0: it did not write)."""
        if score:  # (ZADD GT: the score is at least this from now on, unless a failover loses the entry)
            self._pools[tag] = (score, time.monotonic())

    # -- the session indexes' expiry ------------------------------------------------------------

    def session_known(self, key: str) -> int | None:
        """When the session index `key` expires as submit_job wrote or read it within SESSIONS_KNOWN_S, None
        when not seen that lately."""
        seen = self._sessions.get(key)
        if seen is None or time.monotonic() - seen[1] > SESSIONS_KNOWN_S:
            return None
        return seen[0]

    def session_kept(self, key: str, until: int) -> None:
        """submit_job wrote or read `until` as the session index's expiry (0: it did neither). The latest
        SESSIONS_KEPT sessions are remembered (insertion order: the oldest seen goes first)."""
        if until:
            self._sessions.pop(key, None)
            self._sessions[key] = (until, time.monotonic())
            if len(self._sessions) > SESSIONS_KEPT:
                del self._sessions[next(iter(self._sessions))]

    # -- the earlier versions' waiting zsets ----------------------------------------------------

    async def fold_waiting(self, partitions: int) -> int:
        """Fold every partition's waiting zset (versions before the queued counts) into its counts, before
        this instance serves; the entries folded. A pool with a queued job is in its shard's pools zset; two
        round trips find the partitions that still have such a zset (none, once the upgrade is done)."""
        shards = [keys.shard_tag(p) for p in range(partitions)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrange(keys.ShardKeys.of(shard).pools, 0, -1)
            pools = await pipe.execute()
        tags = [f"{pool.decode()}:{shard}" for shard, names in zip(shards, pools, strict=True) for pool in names]
        if not tags:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.exists(keys.waiting_before(tag))
            found = await pipe.execute()
        folded = 0
        for tag in (tag for tag, n in zip(tags, found, strict=True) if n):
            left = 1
            while left:
                done, left = await self.scripts.call(self.redis, FoldWaiting(tag, FOLD_CHUNK).call())
                folded += int(done)
        if folded:
            log.info("folded %d queued jobs of the earlier version's waiting zsets into the queued counts", folded)
        return folded

    # -- the flush task -------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rates-flush")

    async def stop(self) -> None:
        """Stop the task; a last flush."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_S):
                    await self._stopping.wait()
            with contextlib.suppress(Exception):  # logged (throttled) by flush; kept for the next one
                await self.flush()
            self.forget_stale()

    def forget_stale(self) -> None:
        """Drop the pools zset scores no longer trusted (older than POOLS_KNOWN_S): a partition submitted to
        once (an invented pair) costs nothing here after a second."""
        now = time.monotonic()
        for tag in [tag for tag, (_, seen) in self._pools.items() if now - seen > POOLS_KNOWN_S]:
            del self._pools[tag]
