"""WatchSession end to end (real gRPC, real Redis and Redis Cluster): a session's finished jobs in
utterance order over one stream, across instances, resumable; plus its ordering rules alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import pair, spec
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.session import SessionOrder
from lingua_scheduler.server.store import JobRecord, JobView
from lingua_sdk import pb, pb_grpc


def stub_for(app: Any) -> tuple[grpc.aio.Channel, pb_grpc.SchedulerStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, pb_grpc.SchedulerStub(channel)


class Stream:
    """A WatchSession call read in the background: `events` fills as the server sends."""

    def __init__(self, stub: pb_grpc.SchedulerStub, from_index: int = 0, tgt_lang: str = "",
                 session_id: str = "s1") -> None:
        self.call = stub.WatchSession(pb.WatchSessionRequest(tenant_id="acme", session_id=session_id,
                                                             from_index=from_index, tgt_lang=tgt_lang))
        self.events: asyncio.Queue[pb.SessionEvent] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.call:
            self.events.put_nowait(event)

    async def jobs(self, count: int, timeout: float = 10.0) -> list[pb.Job]:
        """The next `count` jobs delivered (from as many events as it takes)."""
        out: list[pb.Job] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                out += (await self.events.get()).jobs
        assert len(out) == count, f"more jobs than expected: {[j.spec.utterance_index for j in out]}"
        return out

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


@contextlib.asynccontextmanager
async def watching(stub: pb_grpc.SchedulerStub, **kw: Any) -> AsyncIterator[Stream]:
    stream = Stream(stub, **kw)
    try:
        yield stream
    finally:
        await stream.close()


async def submit(stub: pb_grpc.SchedulerStub, *utterances: int, **kw: Any) -> list[str]:
    reply = await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=u, **kw) for u in utterances]))
    return [r.job_id for r in reply.results]


async def assign(stub: pb_grpc.SchedulerStub, count: int, tgt: str = "en") -> dict[int, pb.Assignment]:
    """`count` assignments to node n1, by utterance index."""
    got: dict[int, pb.Assignment] = {}
    while len(got) < count:
        reply = await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair("zh", tgt)], max_jobs=count - len(got),
                                                   wait=Duration(seconds=2)))
        got.update({a.spec.utterance_index: a for a in reply.assignments})
    return got


async def complete(stub: pb_grpc.SchedulerStub, a: pb.Assignment, **outcome: Any) -> None:
    if not outcome:
        outcome = dict(result=pb.JobResult(text_translated=f"hello {a.spec.utterance_index}"))
    await stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, lease_token=a.lease_token,
                                           node_id="n1", **outcome))


def indices(jobs: list[pb.Job]) -> list[int]:
    return [j.spec.utterance_index for j in jobs]


async def test_results_come_in_utterance_order_when_jobs_finish_out_of_order(stub: pb_grpc.SchedulerStub) -> None:
    ids = await submit(stub, 0, 1, 2, 3)
    held = await assign(stub, 4)
    async with watching(stub) as stream:
        for u in (3, 1, 2):  # 1, 2 and 3 wait for 0
            await complete(stub, held[u])
        await complete(stub, held[0])
        jobs = await stream.jobs(4)
    assert indices(jobs) == [0, 1, 2, 3]
    assert [j.job_id for j in jobs] == ids
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in jobs)
    assert [j.result.text_translated for j in jobs] == [f"hello {u}" for u in range(4)]
    assert not any(j.spec.payload for j in jobs)


async def test_a_job_in_a_pool_new_to_the_session_holds_later_utterances(make_app: AppFactory) -> None:
    """Utterance 0 is the session's first job of a pair (zh:fr) that appears after the stream opened; a
    later utterance finishing first in another pool must wait for it, and it must not be lost."""
    app = await make_app(ack_timeout_ms=30_000, lease_ms=30_000)  # the held job must not expire meanwhile
    channel, stub = stub_for(app)
    async with channel, watching(stub) as stream:
        await submit(stub, 0, tgt_lang="fr")
        await submit(stub, 1)
        held_en, held_fr = await assign(stub, 1), await assign(stub, 1, tgt="fr")
        await complete(stub, held_en[1])
        with pytest.raises(TimeoutError):
            await stream.jobs(1, timeout=1.0)  # held back behind utterance 0
        await complete(stub, held_fr[0])
        jobs = await stream.jobs(2)
        assert indices(jobs) == [0, 1] and [j.spec.tgt_lang for j in jobs] == ["fr", "en"]


async def test_failed_cancelled_and_expired_jobs_are_delivered_and_never_block(stub: pb_grpc.SchedulerStub) -> None:
    await submit(stub, 0)
    await submit(stub, 1, 3)
    # Utterance 2 goes zh -> de, a pool no node serves: it expires at its deadline.
    soon = Timestamp()
    soon.FromMilliseconds(int(time.time() * 1000) + 400)
    await submit(stub, 2, tgt_lang="de", deadline=soon)
    async with watching(stub) as stream:
        held = await assign(stub, 3)
        await stub.CancelJob(pb.CancelJobRequest(job_id=held.pop(0).job_id, reason="user left"))
        await complete(stub, held[3])
        await complete(stub, held[1], error=pb.JobError(code="BAD_AUDIO", message="unreadable", retryable=False))
        jobs = await stream.jobs(4)
    assert indices(jobs) == [0, 1, 2, 3]
    assert [j.state for j in jobs] == [pb.JOB_STATE_CANCELLED, pb.JOB_STATE_FAILED, pb.JOB_STATE_EXPIRED,
                                       pb.JOB_STATE_SUCCEEDED]
    assert jobs[1].last_error.code == "BAD_AUDIO" and jobs[2].spec.tgt_lang == "de"


async def test_watch_on_one_instance_sees_jobs_submitted_and_finished_on_another(make_app: AppFactory) -> None:
    a, b = await make_app(), await make_app()
    (ca, sa), (cb, sb) = stub_for(a), stub_for(b)
    try:
        async with watching(sb) as stream:
            await submit(sa, 0, 1)
            held = await assign(sa, 2)
            await complete(sa, held[1])
            await complete(sa, held[0])
            jobs = await stream.jobs(2)
        assert indices(jobs) == [0, 1]
    finally:
        await ca.close()
        await cb.close()


async def test_resume_from_index_after_the_stream_is_dropped(stub: pb_grpc.SchedulerStub) -> None:
    await submit(stub, 0, 1, 2, 3)
    held = await assign(stub, 4)
    async with watching(stub) as stream:
        await complete(stub, held[0])
        await complete(stub, held[1])
        first: list[pb.Job] = []
        while len(first) < 2:
            event = await asyncio.wait_for(stream.events.get(), 10)
            first += event.jobs
    assert indices(first) == [0, 1] and event.resume_index == 2  # utterance 2 is still running
    await complete(stub, held[3])  # finished while nobody watches
    async with watching(stub, from_index=event.resume_index) as again:
        await complete(stub, held[2])
        jobs = await again.jobs(2)
    assert indices(jobs) == [2, 3]


async def test_resume_index_names_the_first_undelivered_utterance(stub: pb_grpc.SchedulerStub) -> None:
    await submit(stub, 0, 1, 2)
    held = await assign(stub, 3)
    async with watching(stub) as stream:
        await complete(stub, held[2])
        await complete(stub, held[0])
        event = await asyncio.wait_for(stream.events.get(), 10)
        assert indices(list(event.jobs)) == [0] and event.resume_index == 1  # 2 waits for 1
        await complete(stub, held[1])
        jobs = list((await asyncio.wait_for(stream.events.get(), 10)).jobs)
    assert indices(jobs) == [1, 2]  # released together: one message


async def test_holes_are_skipped_and_a_passed_index_is_not_delivered(stub: pb_grpc.SchedulerStub) -> None:
    await submit(stub, 0, 5)
    held = await assign(stub, 2)
    async with watching(stub) as stream:
        await complete(stub, held[5])  # nothing exists below 5 but 0
        await complete(stub, held[0])
        assert indices(await stream.jobs(2)) == [0, 5]
        await submit(stub, 3, 7)  # 3 is below the stream's resume index (6) now: passed
        late = await assign(stub, 2)
        await complete(stub, late[3])
        await complete(stub, late[7])
        event = await asyncio.wait_for(stream.events.get(), 10)
    assert indices(list(event.jobs)) == [7] and event.resume_index == 8


async def test_several_target_languages_are_ordered_by_utterance_or_alone(stub: pb_grpc.SchedulerStub) -> None:
    await submit(stub, 0, 1)
    await submit(stub, 0, 1, tgt_lang="de")
    en, de = await assign(stub, 2), await assign(stub, 2, tgt="de")
    async with watching(stub) as both, watching(stub, tgt_lang="en") as english:
        await complete(stub, en[0])
        await complete(stub, en[1])  # English 1 waits for German 0 on the whole-session stream
        assert indices(await english.jobs(2)) == [0, 1]
        await complete(stub, de[1])
        await complete(stub, de[0])
        jobs = await both.jobs(4)
    # English 0 went out at once; German 1 and English 1 waited for German 0, then came together.
    assert [(j.spec.utterance_index, j.spec.tgt_lang) for j in jobs] == [(0, "en"), (0, "de"), (1, "de"), (1, "en")]


async def test_a_session_index_expires_with_its_jobs(stub: pb_grpc.SchedulerStub, redis: Any, settings: Any) -> None:
    (job_id,) = await submit(stub, 4)
    key = keys.session_jobs(keys.shard_of_tag(keys.tag_of(job_id)), "acme", "s1")  # every pool of the session
    assert await redis.zscore(key, job_id) == 4
    ttl, lives = await redis.pttl(key), settings.default_job_ttl_ms + settings.retention_ms
    assert lives < ttl <= lives + lives // 8  # as long as its job's record, and up to an eighth longer


@pytest.mark.parametrize("request_fields, field", [
    (dict(session_id="s1"), "tenant_id"),
    (dict(tenant_id="ac me", session_id="s1"), "tenant_id"),
    (dict(tenant_id="acme"), "session_id"),
    (dict(tenant_id="acme", session_id="s 1"), "session_id"),
    (dict(tenant_id="acme", session_id="s1", from_index=-1), "from_index"),
    (dict(tenant_id="acme", session_id="s1", tgt_lang="English"), "tgt_lang"),
])
async def test_bad_requests_are_refused_naming_the_field(stub: pb_grpc.SchedulerStub, request_fields: dict[str, Any],
                                                         field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.WatchSession(pb.WatchSessionRequest(**request_fields)):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:")


# -- the ordering rules alone (no I/O) -------------------------------------------------------------


def view(utterance: int, state: str, tgt: str = "en") -> JobView:
    record = JobRecord(f"zh:{tgt}:{{0}}{utterance:026d}", state, 1, 1, 3, "", "", 0, 0, 0, 0, "", "", "", False, "acme")
    return JobView(record, pb.JobSpec(utterance_index=utterance, tgt_lang=tgt), None, None)


def learn(order: SessionOrder, *views: JobView) -> None:
    for v in views:
        order.learn(v.record.job_id, v.spec.utterance_index, v)


def test_order_holds_later_jobs_behind_an_unfinished_one() -> None:
    order = SessionOrder(cursor=0)
    learn(order, view(0, "running"), view(1, "succeeded"), view(2, "failed"))
    assert order.take() == [] and order.cursor == 0
    learn(order, view(0, "cancelled"))
    assert [v.spec.utterance_index for v in order.take()] == [0, 1, 2]
    assert order.cursor == 3 and order.take() == []


def test_order_is_per_utterance_across_languages_and_skips_passed_indices() -> None:
    order = SessionOrder(cursor=2)
    learn(order, view(1, "succeeded"))  # below from_index
    learn(order, view(2, "succeeded", "en"), view(2, "running", "de"), view(3, "succeeded", "en"))
    assert [(v.spec.utterance_index, v.spec.tgt_lang) for v in order.take()] == [(2, "en")]
    assert order.cursor == 2  # German 2 still runs
    learn(order, view(2, "expired", "de"))
    assert [(v.spec.utterance_index, v.spec.tgt_lang) for v in order.take()] == [(2, "de"), (3, "en")]
    assert order.cursor == 4
    learn(order, view(3, "succeeded", "de"))  # passed while nobody knew of it
    assert order.take() == []


def test_an_announcement_of_several_lines_names_each_job() -> None:
    """finish_job sends a line per message; a reader takes several, so a later release may send them at once."""
    one = wire.session_done("zh:en:{0}A", 3, "succeeded")
    assert wire.parse_session_done(one) == [wire.SessionDone("zh:en:{0}A", 3, "succeeded")]
    two = wire.SESSION_LINES.join([one, wire.session_done("zh:en:{0}B", 4, "failed")])
    assert [(d.job_id, d.utterance_index) for d in wire.parse_session_done(two)] == [("zh:en:{0}A", 3), ("zh:en:{0}B", 4)]
    with pytest.raises(ValueError):
        wire.parse_session_done(one + wire.SESSION_LINES + "junk")
