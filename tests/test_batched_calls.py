"""A Submit's jobs of a partition go to Redis in one submit_job call (lua/submit_job-n.lua), a dispatch
pass's claims of a partition in one claim_job call (lua/claim_job-n.lua): what each job gets is what it
would get alone, repeats inside the batch included, on real Redis."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from helpers import spec
from lingua_scheduler.fsm import Event
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server import store as store_module
from lingua_scheduler.server.calls import CALL_JOBS, Fence, FinishJob, FinishJobs, Outcome
from lingua_scheduler.server.errors import AlreadyExists, ScriptCode
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Lease, Store
from lingua_sdk import pb
from redis.exceptions import ResponseError


@pytest.fixture
def store(redis: Any, settings: Settings) -> Store:
    return Store(redis, dataclasses.replace(settings, partitions=2))


def tags(store: Store, specs: list[Any]) -> list[str]:
    return [store.partition_tag(s) for s in specs]


async def test_a_batch_over_partitions_with_repeats_answers_each_job_in_place(store: Store, redis: Any) -> None:
    specs = [spec(session_id=f"s{i % 4}", utterance_index=i, payload=b"") for i in range(8)]
    specs[0].payload_ref = "s3://a/0"
    for s in specs[1:]:
        s.payload_ref = "s3://a/x"
    keyed = spec(session_id="k", idempotency_key="key-1", payload=b"audio")
    batch = [*specs, specs[3], keyed, keyed, specs[0]]  # repeats of the batch's own jobs, default and keyed
    assert len(set(tags(store, batch))) == 2  # both partitions
    out = await store.submit(batch)
    assert [o.created for o in out] == [True] * 8 + [False, True, False, False]
    assert out[8].job_id == out[3].job_id and out[10].job_id == out[9].job_id and out[11].job_id == out[0].job_id
    assert [o.state for o in out] == ["queued"] * len(batch)
    ids = {o.job_id for o in out}
    assert len(ids) == 9
    for job_id in ids:  # each job once in its queue, with its record and the spec it was given
        assert await redis.zscore(keys.PartitionKeys.of(keys.tag_of(job_id)).queue, job_id) is not None
        assert (await redis.hget(keys.JobKeys.of(job_id).fsm, "state")) == b"queued"
    assert await redis.get(keys.JobKeys.of(out[9].job_id).payload) == b"audio"
    queued = 0
    for tag in set(tags(store, batch)):
        queued += sum(int(v) for v in (await redis.hgetall(keys.PartitionKeys.of(tag).queued)).values())
    assert queued == 9  # counted once each
    again = await store.submit(batch)  # a retry of the whole batch finds every job
    assert [o.job_id for o in again] == [o.job_id for o in out] and not any(o.created for o in again)


async def test_a_repeat_with_other_content_in_the_same_batch_is_refused_and_the_first_stays(store: Store,
                                                                                          redis: Any) -> None:
    first, changed = spec(utterance_index=1, payload=b"one"), spec(utterance_index=1, payload=b"two")
    with pytest.raises(AlreadyExists, match=r"jobs\[1\]: job .* already exists"):
        await store.submit([first, changed])
    (again,) = await store.submit([first])
    assert not again.created and await redis.get(keys.JobKeys.of(again.job_id).payload) == b"one"


async def test_tenants_take_turns_inside_one_call_as_across_calls(store: Store, redis: Any, settings: Settings) -> None:
    """Four jobs of tenant a then one of b in one call: b's job goes second in the queue (its pass is the
    band's clock + a step, as a's first), exactly as the same jobs submitted one call each."""
    def batch(session: str) -> list[Any]:
        return [spec(tenant_id=t, session_id=session, utterance_index=i) for i, t in enumerate("aaaab")]

    one = await store.submit(batch("one"))
    other = Store(redis, dataclasses.replace(settings, partitions=2))
    specs = batch("two")
    assert store.partition_tag(specs[0]) != store.partition_tag(batch("one")[0])  # a fresh fair share
    alone = [(await other.submit([s]))[0] for s in specs]

    async def order(results: list[Any]) -> list[str]:
        queue = keys.PartitionKeys.of(keys.tag_of(results[0].job_id)).queue
        by_id = {r.job_id: "ab"[i == 4] + str(i) for i, r in enumerate(results)}
        return [by_id[j.decode()] for j in await redis.zrange(queue, 0, -1)]

    assert await order(one) == await order(alone)
    assert (await order(one))[:2] in (["a0", "b4"], ["b4", "a0"])


async def test_a_batch_larger_than_one_call_is_split(store: Store, redis: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(store_module, "CALL_JOBS", 7)
    specs = [spec(session_id="big", utterance_index=i) for i in range(30)]
    out = await store.submit(specs + specs[:3])
    assert [o.created for o in out] == [True] * 30 + [False] * 3
    assert [o.job_id for o in out[30:]] == [o.job_id for o in out[:3]]
    queue = keys.PartitionKeys.of(keys.tag_of(out[0].job_id)).queue
    assert await redis.zcard(queue) == 30


async def test_claims_of_a_partition_go_in_one_call_and_a_damaged_record_fails_alone(store: Store, redis: Any) -> None:
    out = await store.submit([spec(session_id="c", utterance_index=i) for i in range(4)])
    ids = [o.job_id for o in out]
    await redis.hset(keys.JobKeys.of(ids[1]).fsm, "ver", "damaged")
    items = [(job_id, "n1", f"tok{i}") for i, job_id in enumerate(ids)]
    claims = await store.claim_many(items)
    assert isinstance(claims[1], Exception), claims[1]
    assert [c.code for i, c in enumerate(claims) if i != 1] == [ScriptCode.APPLIED] * 3  # type: ignore[union-attr]
    held = keys.PartitionKeys.of(keys.tag_of(ids[0])).held
    assert sorted(j.decode() for j in await redis.zrange(held, 0, -1)) == sorted(ids[:1] + ids[2:])
    queued = keys.PartitionKeys.of(keys.tag_of(ids[0])).queued
    assert sum(int(v) for v in (await redis.hgetall(queued)).values()) == 1  # the three counted out in one HINCRBY
    again = await store.claim_many([items[0], items[2]])  # repeats with the same tokens: the same assignments
    assert [(c.code, c.attempt) for c in again] == [(ScriptCode.APPLIED, 1)] * 2  # type: ignore[union-attr]
    assert await redis.zcard(held) == 3



async def test_a_claim_call_reads_the_queue_heads_and_moves_the_fair_clock_once(store: Store, redis: Any) -> None:
    """The next candidates come once, in the call's last reply, as the queue is after every claim of the
    call; the band's clock moves once, to the highest pass the call took while jobs of the band remain."""
    out = await store.submit([spec(session_id="h", utterance_index=i) for i in range(6)])
    ids = [o.job_id for o in out]
    pk = keys.PartitionKeys.of(keys.tag_of(ids[0]))
    scores = [await redis.zscore(pk.queue, j) for j in ids]
    band = int(scores[0] // wire.QUEUE_BAND)
    claims = await store.claim_many([(j, "n1", f"t{i}") for i, j in enumerate(ids[:3])])
    assert [c.code for c in claims] == [ScriptCode.APPLIED] * 3  # type: ignore[union-attr]
    assert [c.candidates for c in claims[:2]] == [[], []]  # type: ignore[union-attr]
    assert claims[2].candidates == ids[3:]  # type: ignore[union-attr]
    assert claims[2].scores == tuple(scores[3:])  # type: ignore[union-attr]
    assert await redis.zscore(pk.fair, f"c{band}") == scores[2]
    # Out of turn (the last job first): the clock goes no further than the band's head left behind.
    (late,) = await store.claim_many([(ids[5], "n1", "t5")])
    assert late.code == ScriptCode.APPLIED and late.candidates == ids[3:5]  # type: ignore[union-attr]
    assert await redis.zscore(pk.fair, f"c{band}") == scores[3]

async def test_a_claim_call_out_of_turn_moves_the_clock_to_the_head_left_behind(store: Store, redis: Any) -> None:
    """The clock moves once for the call: to the highest pass it took (the last job's, out of turn), held
    back to the band's head after every claim of the call, which is past the first job it also took (one
    claim at a time would leave it at that first job's pass)."""
    out = await store.submit([spec(session_id="o", utterance_index=i) for i in range(4)])
    ids = [o.job_id for o in out]
    pk = keys.PartitionKeys.of(keys.tag_of(ids[0]))
    scores = [await redis.zscore(pk.queue, j) for j in ids]
    band = int(scores[0] // wire.QUEUE_BAND)
    claims = await store.claim_many([(ids[3], "n1", "t3"), (ids[0], "n1", "t0")])
    assert [c.code for c in claims] == [ScriptCode.APPLIED] * 2  # type: ignore[union-attr]
    assert await redis.zscore(pk.fair, f"c{band}") == scores[1]


async def test_a_repeated_claim_is_answered_even_after_the_partition_was_paused(store: Store, redis: Any) -> None:
    """A dispatcher whose claim reply was lost claims again with the same token: after a PausePool too, the
    answer is the assignment it holds (its job is out of the queue already), not "paused"."""
    (out,) = await store.submit([spec(session_id="p")])
    (first,) = await store.claim_many([(out.job_id, "n1", "tok-1")])
    assert first.code == ScriptCode.APPLIED  # type: ignore[union-attr]
    await redis.hset(keys.PartitionKeys.of(keys.tag_of(out.job_id)).paused, mapping={"at": "1", "reason": "x"})
    (other,) = await store.submit([spec(session_id="p", utterance_index=1)])
    again, refused = await store.claim_many([(out.job_id, "n1", "tok-1"), (other.job_id, "n1", "tok-2")])
    assert again.code == ScriptCode.APPLIED and again.attempt == 1  # type: ignore[union-attr]
    assert refused.code == ScriptCode.POOL_PAUSED  # type: ignore[union-attr]


async def test_a_job_that_fails_in_a_call_fails_alone(store: Store, redis: Any) -> None:
    """A job whose writes Redis refuses (here its identity key is of another type) is an error in its place:
    the call's other jobs are created and queued whole, and a retry finds them so."""
    good = [spec(session_id="g", utterance_index=1), spec(session_id="g", utterance_index=2, idempotency_key="k-2")]
    bad = spec(session_id="g", utterance_index=3, idempotency_key="k-bad")
    assert store.partition_tag(bad) == store.partition_tag(good[0])  # one partition: one call
    await redis.hset(store._submit_job(bad).identity, "x", "1")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.submit([good[0], bad, good[1]])
    again = await store.submit(good)
    assert not any(o.created for o in again)
    for o in again:
        pk = keys.PartitionKeys.of(keys.tag_of(o.job_id))
        assert await redis.zscore(pk.queue, o.job_id) is not None
        assert await redis.zscore(pk.timers, wire.deadline_timer(o.job_id)) is not None
    assert sum(int(v) for v in (await redis.hgetall(pk.queued)).values()) == 2


async def test_stale_bindings_are_deleted_at_the_per_claim_rate(store: Store, redis: Any) -> None:
    """One claim in 8 (its token's last character) deletes up to 128 bindings past their time to live,
    whether the claims come one per call or many."""
    out = await store.submit([spec(session_id=f"s{i}") for i in range(20)])
    pk = keys.PartitionKeys.of(keys.tag_of(out[0].job_id))
    stale = {f"acme\x00old{i}": 1 for i in range(300)}  # bound at ms 1: long past the time to live
    await redis.zadd(pk.affinity_at, stale)
    await redis.hset(pk.affinity, mapping={k: "n0|1" for k in stale})
    claims = await store.claim_many([(o.job_id, "n1", f"tok{i:02d}0") for i, o in enumerate(out)])  # all sampled
    assert [c.code for c in claims] == [ScriptCode.APPLIED] * 20  # type: ignore[union-attr]
    served = sum(keys.tag_of(o.job_id) == keys.tag_of(out[0].job_id) for o in out)  # this partition's sessions
    assert await redis.zcard(pk.affinity_at) == served  # only the sessions just served are left


class _Errors:
    """What the scripts count in the metrics (server/metrics.py's RedisMetrics interface)."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def error(self, op: str, err: BaseException) -> None:
        self.errors.append((op, type(err).__name__))

    def observe(self, op: str, seconds: float) -> None:
        pass


async def test_a_job_that_fails_inside_a_call_is_counted_as_a_failed_call(store: Store, redis: Any) -> None:
    """The metrics count an error in place of a job's reply, on the pipelined and on the one-call path."""
    one, other = await store.submit([spec(session_id="m"), spec(session_id="m", utterance_index=1)])
    await store.claim("n1", [(one.job_id, "tok1"), (other.job_id, "tok2")])
    for job in (one, other):
        await redis.hdel(keys.JobKeys.of(job.job_id).fsm, "dl")  # a record no version wrote
    errors = _Errors()
    store.scripts.metrics = errors  # type: ignore[assignment]
    with pytest.raises(ResponseError):
        await store.transition(one.job_id, Event.FAIL, node="n1", token="tok1", error=pb.JobError(code="E"))
    (failed,) = await store.complete_many("n1", [(Lease(other.job_id, "tok2"), pb.JobResult())])
    assert isinstance(failed, ResponseError)
    assert errors.errors == [("finish_job", "ResponseError")] * 2


def test_a_finish_call_takes_jobs_of_one_shard_and_one_retention_only() -> None:
    """FinishJobs.call names one shard's timers and done bucket: a job of another shard (or another retention)
    in the same call is a programming error, refused before anything is sent."""
    def job(shard: int, retention_ms: int = 60_000) -> FinishJob:
        return FinishJob(f"{keys.partition_tag('zh:en', shard)}01JD000000000000000000000{shard}", "complete",
                         "succeeded", Fence("n1", "t"), Outcome(result=b"ok"), retention_ms)

    call = FinishJobs((job(1), job(1))).call()
    assert call.keys[0] == keys.shard_timers(keys.shard_tag(1)) and len(call.keys) == 2 + 7 * 2
    for other in (job(2), job(1, retention_ms=1)):
        with pytest.raises(ValueError, match="one shard and one retention"):
            FinishJobs((job(1), other)).call()
    assert len(FinishJobs(tuple(job(1) for _ in range(CALL_JOBS))).call().keys) == 2 + 7 * CALL_JOBS
    for count in (0, CALL_JOBS + 1):  # callers chunk: a call holds Redis for at most CALL_JOBS jobs
        with pytest.raises(ValueError, match=f"1 to {CALL_JOBS} jobs per call, not {count}"):
            FinishJobs(tuple(job(1) for _ in range(count))).call()
