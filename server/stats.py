"""GetStats' figures and the cluster-wide gauges, read from Redis (never one process's counts), cached.

The scripts keep the counts as they change state, so a read costs a few small reads per shard, not a
count of keys: QUEUED is the sum of each partition's queued counts (a hash: the second a job entered
QUEUED -> how many such jobs are queued; its lowest field: when the oldest queued job entered, so the
oldest age is from that second's start, at most 1 s more than the job's own wait), ASSIGNED and
RUNNING are ZCOUNTs of each partition's held zset (a job enters it on a claim, is rescored on its ack,
leaves on a requeue or finish: idempotent, so no count drifts), jobs that ended (by state) and
submits/finishes per second come from time buckets (server/buckets.py; submits and finishes are
counted by each instance and flushed each second, server/rates.py: this instance's own are flushed
before a read). Nodes, capacity and in-flight come from the node registry as ListNodes shows it.
A snapshot is reused for SNAPSHOT_TTL_S, so scrapes and dashboards do not hammer Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..fsm import JobState
from . import buckets, keys, wire
from .calls import ReadClock
from .operations import pause_of
from .store import Store, _s

SNAPSHOT_TTL_S = 1.0
STATES = [s for s in JobState if s != JobState.NEW]
HELD_STATES = (JobState.ASSIGNED, JobState.RUNNING)


@dataclass
class PoolFigures:
    pool: str
    jobs: dict[str, int] = field(default_factory=lambda: {str(s): 0 for s in STATES})
    nodes: int = 0
    capacity: int = 0
    in_flight: int = 0
    submitted_per_second: float = 0.0
    finished_per_second: float = 0.0
    paused: bool = False
    paused_reason: str = ""
    paused_at_ms: int = 0
    oldest_queued_age_ms: int = 0

    @property
    def active(self) -> bool:
        """Worth showing: it has jobs (now, or ended within the retention), live nodes, or a pause."""
        return bool(self.nodes or self.paused or any(self.jobs.values()))


@dataclass(frozen=True, slots=True)
class Snapshot:
    as_of_ms: int  # Redis time
    pools: dict[str, PoolFigures]


class Stats:
    """Cached snapshots of every pool's figures. `nodes` is the NodeSessions (its registry), or None."""

    def __init__(self, store: Store, nodes: Any = None) -> None:
        self.store = store
        self.redis = store.redis
        self.settings = store.settings
        self.nodes = nodes
        self._snapshot: Snapshot | None = None
        self._taken = -float("inf")
        self._lock = asyncio.Lock()

    async def snapshot(self) -> Snapshot:
        """The figures, read at most SNAPSHOT_TTL_S ago (concurrent callers share one read)."""
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._taken >= SNAPSHOT_TTL_S:
                self._snapshot = await self._read()
                self._taken = time.monotonic()
            return self._snapshot

    def invalidate(self) -> None:
        """A change made through this instance (an admin call): its next snapshot is read afresh."""
        self._snapshot = None

    async def _read(self) -> Snapshot:
        s = self.settings
        shards = [keys.shard_tag(i) for i in range(s.partitions)]
        now = buckets.now_ms()
        rate_keys = {shard: buckets.rate_keys(shard, now) for shard in shards}
        with contextlib.suppress(Exception):  # (Redis down: the read below says so)
            await self.store.rates.flush()
        done_keys = {shard: buckets.done_keys(shard, now, s.retention_ms) for shard in shards}
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(keys.ShardKeys.of(shard).pools, now, "+inf")  # pools with jobs left
                for key in rate_keys[shard] + done_keys[shard]:
                    pipe.hgetall(key)
            read, redis_now, registered = await asyncio.gather(
                pipe.execute(), self.store.scripts.call(self.redis, ReadClock().call()),
                self.nodes.registry.entries(s.node_listed_ms()) if self.nodes is not None else _none())
        redis_now = int(redis_now)
        pools: dict[str, PoolFigures] = {}

        def figures(pool: str) -> PoolFigures:
            found = pools.get(pool)
            if found is None:
                found = pools[pool] = PoolFigures(pool)
            return found

        per_shard: dict[str, list[str]] = {}
        i = 0
        window_start = (now // buckets.RATE_BUCKET_MS - buckets.RATE_WINDOW_MS // buckets.RATE_BUCKET_MS) \
            * buckets.RATE_BUCKET_MS
        covered_s = max(1.0, (now - window_start) / 1000)
        for shard in shards:
            members = read[i]
            i += 1
            per_shard[shard] = sorted(_s(p) for p in members)
            for pool in per_shard[shard]:
                figures(pool)
            for _ in rate_keys[shard]:
                for name, count in read[i].items():
                    pool, _, what = _s(name).rpartition("|")
                    if what == "submitted":
                        figures(pool).submitted_per_second += int(count) / covered_s
                    else:
                        figures(pool).finished_per_second += int(count) / covered_s
                i += 1
            for _ in done_keys[shard]:
                for name, count in read[i].items():
                    pool, _, state = _s(name).rpartition("|")
                    figures(pool).jobs[state] = figures(pool).jobs.get(state, 0) + int(count)
                i += 1
        for entry in registered or []:
            for pool in entry.pools:
                f = figures(pool)
                f.nodes += 1
                f.capacity += entry.max_concurrency
                f.in_flight += entry.in_flight
        # Queued jobs and the oldest's age per partition, and the pause state (reason, since) per pool: one more round trip.
        names = sorted(pools)
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in names:
                for tag in self.store.tags_of_pool(pool):
                    pk = keys.PartitionKeys.of(tag)
                    pipe.hgetall(pk.queued)
                    pipe.hmget(pk.paused, "reason", "at")
                    pipe.zcount(pk.held, wire.HELD_ASSIGNED, wire.HELD_ASSIGNED)
                    pipe.zcount(pk.held, wire.HELD_RUNNING, wire.HELD_RUNNING)
            found = await pipe.execute()
        i = 0
        for pool in names:
            f = pools[pool]
            for state in (JobState.QUEUED, *HELD_STATES):
                f.jobs[state] = 0
            oldest: int | None = None  # the second the oldest queued job entered QUEUED
            paused = []
            for _ in range(s.partitions):
                for second, count in found[i].items():
                    f.jobs[JobState.QUEUED] += int(count)
                    oldest = int(second) if oldest is None else min(oldest, int(second))
                paused.append(found[i + 1])
                f.jobs[JobState.ASSIGNED] += int(found[i + 2])
                f.jobs[JobState.RUNNING] += int(found[i + 3])
                i += 4
            p = pause_of(pool, paused)
            f.paused, f.paused_reason, f.paused_at_ms = p.paused, p.reason, p.at_ms
            f.oldest_queued_age_ms = max(0, redis_now - oldest * 1000) if oldest is not None else 0
        return Snapshot(redis_now, pools)


async def _none() -> None:
    return None


class PoolGauges(Collector):
    """The cluster-wide gauges on /metrics, from the cached snapshot (App.http.before_scrape refreshes it):
    lingua_queue_depth{pool}, lingua_jobs_in_state{pool,state}, lingua_nodes{pool},
    lingua_pool_capacity{pool}, lingua_pool_in_flight{pool}, lingua_pool_paused{pool},
    lingua_queue_oldest_age_seconds{pool}."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.latest: Snapshot | None = None

    async def refresh(self) -> None:
        self.latest = await self.stats.snapshot()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("lingua_queue_depth", "Jobs queued (waiting for a node, in retry backoff too), "
                                  "read from Redis: the same on every instance", labels=["pool"])
        in_state = GaugeMetricFamily("lingua_jobs_in_state", "Jobs by state: now for queued, assigned and running; "
                                     "ended within the retention for the terminal states", labels=["pool", "state"])
        nodes = GaugeMetricFamily("lingua_nodes", "Live nodes serving the pool (as ListNodes counts them)",
                                  labels=["pool"])
        capacity = GaugeMetricFamily("lingua_pool_capacity", "Sum of max_concurrency of the pool's live nodes",
                                     labels=["pool"])
        in_flight = GaugeMetricFamily("lingua_pool_in_flight", "Jobs the pool's live nodes hold now",
                                      labels=["pool"])
        paused = GaugeMetricFamily("lingua_pool_paused", "1 while the pool is paused (PausePool): nothing is "
                                   "dispatched", labels=["pool"])
        oldest = GaugeMetricFamily("lingua_queue_oldest_age_seconds", "How long the pool's oldest queued job has "
                                   "waited, from the start of the second it entered QUEUED (0 when none is queued)",
                                   labels=["pool"])
        for pool, f in sorted((self.latest.pools if self.latest else {}).items()):
            if not f.active:
                continue  # (a pool seen once, long gone: no series)
            depth.add_metric([pool], f.jobs[JobState.QUEUED])
            for state in STATES:
                in_state.add_metric([pool, str(state)], f.jobs.get(state, 0))
            nodes.add_metric([pool], f.nodes)
            capacity.add_metric([pool], f.capacity)
            in_flight.add_metric([pool], f.in_flight)
            paused.add_metric([pool], 1 if f.paused else 0)
            oldest.add_metric([pool], f.oldest_queued_age_ms / 1000)
        yield from (depth, in_state, nodes, capacity, in_flight, paused, oldest)
