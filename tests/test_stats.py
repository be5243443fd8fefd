"""GetStats' counts (server/stats.py): kept by the scripts at every transition, so they match what was
done, on one Redis and on a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import spec
from lingua_scheduler.fsm import Event
from lingua_scheduler.server import keys
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.operations import Operations
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


async def test_index_keys_expire_with_their_jobs(store: Store, redis: Any) -> None:
    (job,) = await store.submit([spec()])
    tag = keys.tag_of(job.job_id)
    shard = keys.shard_of_tag(tag)
    span = int(await redis.get(keys.ShardKeys.of(shard).span))
    assert 0 < span <= store.settings.default_job_ttl_ms
    for key in (keys.PartitionKeys.of(tag).jobs, keys.tenant_jobs(shard, "acme")):
        assert 0 < await redis.pttl(key) <= span + store.settings.retention_ms
    assert await redis.smembers(keys.ShardKeys.of(shard).pools) == {b"zh:en"}


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
