"""The shared figures that cost nothing per job (server/rates.py, keys.PartitionKeys.queued): queued
counts per second entered (no entry per job), submits and finishes per second counted by the instance
and flushed, the pools zset written about once per second per partition."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import spec
from lingua_scheduler.server import buckets, keys, rates
from lingua_scheduler.server.operations import Operations
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.stats import Stats
from lingua_scheduler.server.store import Lease, Store
from lingua_sdk import pb


async def _queued(redis: Any, tag: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (await redis.hgetall(keys.PartitionKeys.of(tag).queued)).items()}


async def _entered(redis: Any, job_id: str) -> bytes:
    """When the job entered QUEUED as its record tells: `updated`, else (never changed since) its creation `c`."""
    updated, created = await redis.hmget(keys.JobKeys.of(job_id).fsm, "updated", "c")
    return updated or created


async def test_queued_jobs_are_counted_per_second_not_per_job(store: Store, redis: Any) -> None:
    """Forty jobs submitted in one call take a field or two of the partition's count hash; each leaves
    it as it leaves QUEUED (claim, cancel, backoff and retry counted in again), and the key goes with the last."""
    ids = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(40)])]
    tag = keys.tag_of(ids[0])
    counts = await _queued(redis, tag)
    assert sum(counts.values()) == 40 and len(counts) <= 2
    assert not await redis.exists(keys.waiting_before(tag))  # no entry per job anywhere
    entered = {int(await _entered(redis, i)) // 1000 for i in ids}
    assert set(counts) == entered  # the field is the second the record says it entered QUEUED

    await store.claim("n1", [(job_id, f"t{i}") for i, job_id in enumerate(ids[:30])])
    for i in range(30, 40):
        await store.cancel(ids[i], "not needed")
    assert await _queued(redis, tag) == {}
    assert not await redis.exists(keys.PartitionKeys.of(tag).queued)

    await store.fail(ids[0], "n1", "t0", pb.JobError(code="E", retryable=True))  # queued again, in backoff
    await store.fail(ids[1], "n1", "t1", pb.JobError(code="E"))  # failed for good
    await Operations(store).retry(ids[1], deadline_ms=0, max_attempts=0, reason="again")  # queued again
    again = await _queued(redis, tag)
    assert sum(again.values()) == 2 and min(again) >= min(counts)
    snap = await Stats(store)._read()
    assert snap.pools["zh:en"].jobs["queued"] == 2


async def test_a_job_is_counted_out_of_the_second_it_entered_queued_not_its_creation(store: Store,
                                                                                     redis: Any) -> None:
    """A job queued again (requeue, backoff, RetryJob) entered QUEUED after its creation: its record's
    `updated` says when, and claim and finish count it out of that second, not of its creation's. (The
    seconds are moved by hand, as a requeue seconds later leaves them: no waiting for the clock.)"""
    claimed, cancelled, fresh = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(3)])]
    tag = keys.tag_of(claimed)
    pk = keys.PartitionKeys.of(tag)
    created = int(await _entered(redis, claimed))
    for job_id, back_s in ((claimed, 5), (cancelled, 7)):  # as if queued again 5 and 7 s after their creation
        entered = created + back_s * 1000
        await redis.hincrby(pk.queued, str(int(await _entered(redis, job_id)) // 1000), -1)
        await redis.hset(keys.JobKeys.of(job_id).fsm, "updated", entered)
        await redis.hincrby(pk.queued, str(entered // 1000), 1)
    assert sorted((await _queued(redis, tag)).values()) == [1, 1, 1]
    await store.claim("n1", [(claimed, "t0")])
    await store.cancel(cancelled, "not needed")
    assert await _queued(redis, tag) == {int(await _entered(redis, fresh)) // 1000: 1}  # only the fresh job's


async def test_the_oldest_age_counts_from_the_second_the_job_entered(store: Store, redis: Any) -> None:
    (job,) = await store.submit([spec()])
    entered = int(await _entered(redis, job.job_id))
    snap = await Stats(store)._read()
    age = snap.pools["zh:en"].oldest_queued_age_ms
    waited = snap.as_of_ms - entered
    assert waited <= age <= waited + 1000  # the second's start: at most 1 s more


async def test_a_job_never_counted_leaves_no_negative_count(store: Store, redis: Any) -> None:
    """A job that leaves QUEUED without being counted (its count lost) takes nothing below zero: the other
    jobs' counts and the figures stay whole."""
    ids = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(2)])]
    tag = keys.tag_of(ids[0])
    await redis.delete(keys.PartitionKeys.of(tag).queued)  # neither is counted now
    await store.claim("n1", [(ids[0], "t0")])
    assert await _queued(redis, tag) == {}
    (later,) = await store.submit([spec(utterance_index=5)])
    await store.cancel(ids[1], "not needed")  # uncounted, maybe in `later`'s second: it never goes below 0
    counts = await _queued(redis, tag)
    assert all(v > 0 for v in counts.values()) and sum(counts.values()) <= 1
    await store.cancel(later.job_id, "done")
    assert await _queued(redis, tag) == {}


async def test_the_earlier_waiting_zsets_are_folded_into_the_counts(store: Store, redis: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Upgrade: queued jobs an earlier version counted in a waiting zset (job id -> when it entered, ms)
    are counted in their seconds at start, in chunks; then leaving QUEUED counts them out exactly."""
    monkeypatch.setattr(rates, "FOLD_CHUNK", 3)
    ids = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(7)])]
    (other,) = await store.submit([spec(src_lang="en", tgt_lang="de", session_id="s2")])
    tags = {keys.tag_of(ids[0]), keys.tag_of(other.job_id)}
    before = {tag: await _queued(redis, tag) for tag in tags}
    for job_id in [*ids, other.job_id]:  # as the earlier version kept them
        tag = keys.tag_of(job_id)
        entered = int(await _entered(redis, job_id))
        await redis.zadd(keys.waiting_before(tag), {job_id: entered})
    for tag in tags:
        await redis.delete(keys.PartitionKeys.of(tag).queued)

    assert await store.rates.fold_waiting(store.settings.partitions) == 8
    assert {tag: await _queued(redis, tag) for tag in tags} == before
    for tag in tags:
        assert not await redis.exists(keys.waiting_before(tag))
    assert await store.rates.fold_waiting(store.settings.partitions) == 0  # another instance starting: nothing twice
    await store.claim("n1", [(job_id, f"t{i}") for i, job_id in enumerate(ids)])
    await store.cancel(other.job_id, "done")
    for tag in tags:
        assert await _queued(redis, tag) == {}


async def test_submits_and_finishes_per_second_are_flushed_by_the_instance(redis: Any, settings: Settings) -> None:
    """The scripts count no rate: the instance does, and its flush adds the counts to the shared buckets
    (another instance's GetStats sees them then, not before)."""
    mine, other = Store(redis, settings), Store(redis, settings)
    ids = [s.job_id for s in await mine.submit([spec(utterance_index=i) for i in range(3)])]
    await mine.cancel(ids[0], "not needed")
    shard = keys.shard_of_tag(keys.tag_of(ids[0]))
    rate_keys = buckets.rate_keys(shard, buckets.now_ms())
    assert not any([await redis.exists(key) for key in rate_keys])  # nothing written by the scripts
    seen = (await Stats(other)._read()).pools["zh:en"]
    assert seen.submitted_per_second == 0 and seen.finished_per_second == 0

    await mine.rates.flush()
    seen = (await Stats(other)._read()).pools["zh:en"]
    assert seen.submitted_per_second == pytest.approx(3 / 60, rel=0.1)
    assert seen.finished_per_second == pytest.approx(1 / 60, rel=0.1)
    (key,) = [key for key in rate_keys if await redis.exists(key)]
    assert 0 < await redis.pttl(key) <= buckets.RATE_WINDOW_MS + 3 * buckets.RATE_BUCKET_MS
    await mine.rates.flush()  # nothing more to add: the same figures
    assert (await Stats(other)._read()).pools["zh:en"].submitted_per_second == pytest.approx(3 / 60, rel=0.1)


async def test_the_pools_entry_is_written_once_per_second_unless_a_job_outlives_it(
        redis: Any, settings: Settings) -> None:
    store = Store(redis, settings)
    (first,) = await store.submit([spec(utterance_index=0)])
    tag = keys.tag_of(first.job_id)
    pools = keys.ShardKeys.of(keys.shard_of_tag(tag)).pools
    written = await redis.zscore(pools, "zh:en")
    deadline = int(await redis.hget(keys.JobKeys.of(first.job_id).fsm, "dl"))
    assert written >= deadline + settings.retention_ms  # (an eighth further)

    await redis.zrem(pools, "zh:en")  # gone: a submit that trusts what it saw does not write it again
    await store.submit([spec(utterance_index=1)])
    assert await redis.zscore(pools, "zh:en") is None
    far = Timestamp(seconds=int(written) // 1000 - settings.retention_ms // 1000 + 3600)
    await store.submit([spec(utterance_index=2, deadline=far)])  # a job that outlives what it saw
    assert await redis.zscore(pools, "zh:en") >= far.seconds * 1000 + settings.retention_ms

    await redis.zrem(pools, "zh:en")
    score, _ = store.rates._pools[tag]
    store.rates._pools[tag] = (score, time.monotonic() - rates.POOLS_KNOWN_S - 1)  # seen over a second ago
    await store.submit([spec(utterance_index=3)])
    assert await redis.zscore(pools, "zh:en") is not None
    fresh = Store(redis, dataclasses.replace(settings))  # another instance knows nothing: it writes
    await redis.zrem(pools, "zh:en")
    await fresh.submit([spec(utterance_index=4)])
    assert await redis.zscore(pools, "zh:en") is not None


async def test_the_session_index_expiry_is_read_once_per_second_and_a_lost_one_comes_back(
        redis: Any, settings: Settings) -> None:
    """submit_job reads the session index's PTTL only when the instance has not seen its expiry within
    SESSIONS_KNOWN_S; a key that lost its expiry (a failover) gets one from the session's next submit after."""
    store = Store(redis, settings)
    (first,) = await store.submit([spec(utterance_index=0)])
    index = keys.session_jobs(keys.shard_of_tag(keys.tag_of(first.job_id)), "acme", "s1")
    deadline = int(await redis.hget(keys.JobKeys.of(first.job_id).fsm, "dl"))
    assert await redis.pexpiretime(index) >= deadline + settings.retention_ms  # (an eighth further)
    known, _ = store.rates._sessions[index]
    assert known == await redis.pexpiretime(index)

    await redis.persist(index)  # a failover lost the expiry: a submit trusting what it saw lately leaves it
    await store.submit([spec(utterance_index=1)])  # (its job expires before what the instance saw)
    assert await redis.pttl(index) == -1
    far = Timestamp(seconds=known // 1000 - settings.retention_ms // 1000 + 3600)
    await store.submit([spec(utterance_index=2, deadline=far)])  # a job that outlives it: read, extended
    assert await redis.pexpiretime(index) >= far.seconds * 1000 + settings.retention_ms

    await redis.persist(index)
    await store.submit([spec(utterance_index=3)])
    assert await redis.pttl(index) == -1
    until, _ = store.rates._sessions[index]
    store.rates._sessions[index] = (until, time.monotonic() - rates.SESSIONS_KNOWN_S - 1)  # seen over a second ago
    (back,) = await store.submit([spec(utterance_index=4)])  # the session's next submit after the second
    deadline = int(await redis.hget(keys.JobKeys.of(back.job_id).fsm, "dl"))
    assert await redis.pexpiretime(index) >= deadline + settings.retention_ms
    fresh = Store(redis, dataclasses.replace(settings))  # another instance knows nothing: it reads
    await redis.persist(index)
    await fresh.submit([spec(utterance_index=5)])
    assert await redis.pttl(index) > 0


def test_the_sessions_remembered_are_bounded(redis: Any, settings: Settings) -> None:
    seen = rates.Rates(redis, Store(redis, settings).scripts)
    for i in range(rates.SESSIONS_KEPT + 5):
        seen.session_kept(f"s{i}", 1_000 + i)
    assert len(seen._sessions) == rates.SESSIONS_KEPT
    assert seen.session_known("s4") is None and seen.session_known(f"s{rates.SESSIONS_KEPT + 4}") is not None
    seen.session_kept("s10", 0)  # nothing written or read: nothing learned
    assert seen.session_known("s10") == 1_010


def test_the_pools_scores_seen_are_forgotten_once_no_longer_trusted(redis: Any, settings: Settings) -> None:
    """Each partition submitted to leaves a score here; one over POOLS_KNOWN_S old says nothing and goes
    at the next flush round, so invented pairs cost an instance nothing after a second."""
    seen = rates.Rates(redis, Store(redis, settings).scripts)
    for i in range(50):
        seen.pooled(f"x{i}:y:{{0}}", 1_000 + i)
    seen._pools["zh:en:{0}"] = (5, time.monotonic() - rates.POOLS_KNOWN_S - 1)
    seen.forget_stale()
    assert len(seen._pools) == 50 and seen.pools_known("x3:y:{0}") == 1_003
    for tag, (score, _) in list(seen._pools.items()):
        seen._pools[tag] = (score, time.monotonic() - rates.POOLS_KNOWN_S - 1)
    seen.forget_stale()
    assert seen._pools == {}


async def test_a_completed_job_is_counted_out_once_and_finished_once(store: Store, redis: Any) -> None:
    """A claimed job acked and completed: counted out of QUEUED once, finished once (rates)."""
    (job,) = await store.submit([spec()])
    await store.claim("n1", [(job.job_id, "t")])
    await store.touch("n1", [Lease(job.job_id, "t")])
    await store.complete(job.job_id, "n1", "t", pb.JobResult(text_translated="ok"))
    assert await _queued(redis, keys.tag_of(job.job_id)) == {}
    figures = (await Stats(store)._read()).pools["zh:en"]
    assert figures.finished_per_second == pytest.approx(1 / 60, rel=0.1)
    assert figures.jobs["succeeded"] == 1
