"""GetStats' counts (server/stats.py): kept by the scripts at every transition, so they match what was
done, on one Redis and on a cluster."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import spec, until
from lingua_scheduler.fsm import Event
from lingua_scheduler.server import keys, listing
from lingua_scheduler.server.dispatch import Dispatcher
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.operations import Operations
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.stats import Stats
from lingua_scheduler.server.store import Lease, Store
from lingua_sdk import pb


async def test_counts_follow_every_transition(store: Store, redis: Any) -> None:
    ids = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(5)])]
    await store.submit([spec(src_lang="en", tgt_lang="de")])
    claims = await store.claim("n1", [(job_id, f"t{i}") for i, job_id in enumerate(ids[:3])])
    assert [c.job_id for c in claims] == ids[:3]
    await store.touch("n1", [Lease(ids[0], "t0")])  # ack: running
    await store.complete(ids[0], "n1", "t0", pb.JobResult(text_translated="ok"))
    await store.fail(ids[1], "n1", "t1", pb.JobError(code="E", retryable=True))  # back to queued (backoff)
    await store.fail(ids[2], "n1", "t2", pb.JobError(code="E"))  # failed for good
    await store.cancel(ids[3], "not needed")

    snap = await Stats(store)._read()
    zh = snap.pools["zh:en"]
    assert zh.jobs == {"queued": 2, "assigned": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 1,
                       "expired": 0}
    assert snap.pools["en:de"].jobs["queued"] == 1
    assert zh.submitted_per_second == pytest.approx(5 / 60, rel=0.1)
    assert zh.finished_per_second == pytest.approx(3 / 60, rel=0.1)
    assert 0 <= zh.oldest_queued_age_ms < 60_000 and not zh.paused

    await Operations(store).retry(ids[2], deadline_ms=0, max_attempts=0, reason="again")
    await Operations(store).set_paused("zh:en", True)
    zh = (await Stats(store)._read()).pools["zh:en"]
    assert (zh.jobs["queued"], zh.jobs["failed"], zh.paused) == (3, 0, True)
    (c,) = await store.claim("n1", [(ids[4], "t4")])  # paused: not claimed, the counts stay
    assert c.code == ScriptCode.POOL_PAUSED
    assert (await Stats(store)._read()).pools["zh:en"].jobs["assigned"] == 0
    await store.transition(ids[4], Event.EXPIRE, error=pb.JobError(code="LINGUA_DEADLINE_EXCEEDED"))
    zh = (await Stats(store)._read()).pools["zh:en"]
    assert (zh.jobs["queued"], zh.jobs["expired"]) == (2, 1)


async def test_index_entries_leave_with_their_own_jobs(redis: Any, settings: Settings) -> None:
    """One job with a far deadline keeps its own entries, not every later job's: a short job's entries go
    when its forget timer fires, as its record expires; the index keys have no time to live."""
    store = Store(redis, dataclasses.replace(settings, retention_ms=50))
    now_ms = int(time.time() * 1000)
    (far,) = await store.submit([spec(utterance_index=0, deadline=Timestamp(seconds=now_ms // 1000 + 20 * 3600))])
    (near,) = await store.submit([spec(utterance_index=1, deadline=Timestamp(seconds=now_ms // 1000 + 1))])
    await store.cancel(near.job_id, "not needed")
    tag = keys.tag_of(far.job_id)
    shard = keys.shard_of_tag(tag)
    indexes = (keys.PartitionKeys.of(tag).jobs, keys.tenant_jobs(shard, "acme"))
    for key in indexes:
        assert await redis.pttl(key) == -1
    fsm = keys.JobKeys.of(near.job_id).fsm

    async def near_gone() -> bool:
        return not await redis.exists(fsm)

    await until(near_gone, 5, "the cancelled job's record to expire")
    assert await Dispatcher(store, store.settings).sweep_once([int(shard.strip("{}"))]) == 1  # its forget timer
    for key in indexes:
        assert await redis.zscore(key, listing.member_of(far.job_id)) is not None
        assert await redis.zscore(key, listing.member_of(near.job_id)) is None, key


async def test_listing_forgets_entries_whose_job_is_gone(store: Store, redis: Any) -> None:
    (job,) = await store.submit([spec()])
    tag = keys.tag_of(job.job_id)
    ghost = tag + "01ARZ3NDEKTSV4RRFFQ69G5FAV"  # an entry written before entries expired with their jobs
    index = keys.PartitionKeys.of(tag).jobs
    await redis.zadd(index, {listing.member_of(ghost): 0})
    views, cursor = await listing.Listing(store).page(listing.Filter(pool="zh:en"), 10, None)
    assert ([v.record.job_id for v in views], cursor) == ([job.job_id], None)
    assert await redis.zscore(index, listing.member_of(ghost)) is None
    assert await redis.zscore(index, listing.member_of(job.job_id)) is not None


async def test_a_sparse_filter_pages_on_past_its_scan_budget(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter the indexes do not serve (RUNNING) is checked job by job, at most SCAN_BUDGET a call: a
    page may come back short with a token, and following the tokens finds every match, newest first."""
    from lingua_scheduler.server import listing

    first = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(2)])]
    for i, job_id in enumerate(first):
        (c,) = await store.claim("n1", [(job_id, f"t{i}")])
        assert c.code == ScriptCode.APPLIED
        await store.touch("n1", [Lease(job_id, f"t{i}")])
    await store.submit([spec(utterance_index=i) for i in range(2, 30)])
    monkeypatch.setattr(listing, "SCAN_BUDGET", 10)
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        views, cursor = await listing.Listing(store).page(listing.Filter(state="running"), 50, cursor)
        pages.append([v.record.job_id for v in views])
        if cursor is None:
            break
    assert pages[0] == []  # the 10 newest are queued: a short page, and a token to go on
    assert [j for page in pages for j in page] == sorted(first, key=lambda j: j[-26:], reverse=True)
    assert len(pages) >= 3


async def test_held_counts_cannot_drift(store: Store, redis: Any) -> None:
    """ASSIGNED and RUNNING count the partition's held zset: a job that was held before the zset existed
    (an upgrade) leaving it takes nothing from the count, so later claims are counted right."""
    a, b = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(2)])]
    (c,) = await store.claim("n1", [(a, "ta")])
    assert c.code == ScriptCode.APPLIED
    await store.touch("n1", [Lease(a, "ta")])  # running
    held = keys.PartitionKeys.of(keys.tag_of(a)).held
    assert await redis.zscore(held, a) == 1
    await redis.zrem(held, a)  # as if claimed and acked before the upgrade
    await store.complete(a, "n1", "ta", pb.JobResult(text_translated="ok"))
    (c,) = await store.claim("n1", [(b, "tb")])
    assert c.code == ScriptCode.APPLIED
    zh = (await Stats(store)._read()).pools["zh:en"]
    assert (zh.jobs["assigned"], zh.jobs["running"], zh.jobs["succeeded"]) == (1, 0, 1)
    await store.touch("n1", [Lease(b, "tb")])
    zh = (await Stats(store)._read()).pools["zh:en"]
    assert (zh.jobs["assigned"], zh.jobs["running"]) == (0, 1)


async def test_a_pool_whose_jobs_are_gone_leaves_the_stats_and_the_gauges(redis: Any, settings: Settings) -> None:
    """Any pair a client submits to becomes a pool; once its jobs are past the retention it is listed
    no more (GetStats, ListJobs, the gauges), and a later submit deletes it from the shard's pools."""
    from lingua_scheduler.server.stats import PoolGauges

    store = Store(redis, dataclasses.replace(settings, retention_ms=50))
    now_s = int(time.time())
    (job,) = await store.submit([spec(src_lang="xx", tgt_lang="yy", deadline=Timestamp(seconds=now_s + 1))])
    await store.cancel(job.job_id, "not needed")
    gauges = PoolGauges(Stats(store))
    await gauges.refresh()
    assert "xx:yy" in gauges.latest.pools  # type: ignore[union-attr]
    assert any(s.labels == {"pool": "xx:yy"} for m in gauges.collect() for s in m.samples)
    pools = keys.ShardKeys.of(keys.shard_of_tag(keys.tag_of(job.job_id))).pools

    async def gone() -> bool:
        gauges.stats.invalidate()
        await gauges.refresh()
        return not any(s.labels.get("pool") == "xx:yy" for m in gauges.collect() for s in m.samples)

    await until(gone, 10, "the pool to leave the gauges")  # (its cancel counted in a 1 s done bucket first)
    assert await redis.zscore(pools, "xx:yy") is not None  # read no more, still stored: the next submits trim
    views, _ = await listing.Listing(store).page(listing.Filter(), 10, None)
    assert views == []
    for i in range(400):  # until a submit of that shard trims its pools (one in 8)
        (other,) = await store.submit([spec(session_id=f"s{i}")])
        if keys.shard_of_tag(keys.tag_of(other.job_id)) == keys.shard_of_tag(keys.tag_of(job.job_id)) \
                and ord(other.job_id[-1]) % 8 == 0:
            break
    assert await redis.zscore(pools, "xx:yy") is None
