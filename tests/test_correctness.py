"""Issue 8's defects, each reproduced against real Redis and real gRPC: every test failed on the code
before the fix (lease tokens per claim, timers that cannot be lost, identities that cannot collide)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import all_keys, pair, set_maxmemory, spec, until
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.app import App, connect_redis
from lingua_scheduler.server.calls import ForgetJob, forget_call
from lingua_scheduler.server.dispatch import MAX_AVOIDED, SWEEP_READ, Consumer, Dispatcher
from lingua_scheduler.server.errors import AlreadyExists, ScriptCode
from lingua_scheduler.server.node import Session
from lingua_scheduler.server.operations import Operations
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import SET_ASIDE_MS, Lease, Store, idempotency_key
from lingua_sdk import pb, pb_grpc
from redis.exceptions import ResponseError
from simnode import SimNode


def lease(a: pb.Assignment) -> pb.JobLease:
    return pb.JobLease(job_id=a.job_id, attempt=a.attempt, lease_token=a.lease_token)


async def until_event(stub: pb_grpc.SchedulerStub, job_id: str, name: str, timeout: float = 10.0) -> pb.JobEvent:
    """The first event called `name` in the job's history (WatchJob replays it, then follows)."""

    async def run() -> pb.JobEvent:
        async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            if event.event == name:
                return event
        raise AssertionError(f"job {job_id} finished without a {name!r} event")

    return await asyncio.wait_for(run(), timeout)


async def submit(stub: pb_grpc.SchedulerStub, **overrides: Any) -> str:
    return (await stub.Submit(pb.SubmitRequest(jobs=[spec(**overrides)]))).results[0].job_id


async def next_message(call: Any, want: str) -> pb.SchedulerMessage:
    """The next scheduler message that carries `want` (a repeated field with entries)."""
    while True:
        m = await asyncio.wait_for(call.read(), 10)
        assert m is not grpc.aio.EOF, "the stream closed"
        if len(getattr(m, want)):
            return m


# 1. A lost claim reply loses no attempt.
BUSY = """local s = redis.call('TIME')
repeat local n = redis.call('TIME') until (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > tonumber(ARGV[1])"""


async def claim_losing_the_reply(store: Store, settings: Settings, dispatcher: Dispatcher, consumer: Consumer) -> None:
    """Send a claim while Redis is busy (a long script, as DEBUG SLEEP would), then give up on it as a
    deadline or a closed stream does: Redis runs the claim afterwards, the caller never sees the reply."""
    blocker, probe = connect_redis(settings), connect_redis(settings)
    busy = asyncio.create_task(blocker.eval(BUSY, 0, 700_000))
    while True:  # wait until Redis stops answering
        try:
            await asyncio.wait_for(probe.ping(), 0.05)
        except TimeoutError:
            break
    claiming = asyncio.create_task(dispatcher.claim_for(consumer, 1))
    for _ in range(20):  # a few loop steps: the claim is sent and waits for its reply
        await asyncio.sleep(0)
    assert consumer.pending and not claiming.done()
    claiming.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await claiming
    await busy
    for client in (blocker, probe):
        await client.aclose()


@pytest.mark.single_redis
async def test_a_claim_whose_reply_was_lost_is_released_with_its_attempt(store: Store, settings: Settings) -> None:
    (job,) = await store.submit([spec(max_attempts=1)])
    dispatcher, consumer = Dispatcher(store, settings), Consumer("n1", ["zh:en"], capacity=lambda: 1)
    consumer.hint(job.job_id)
    await claim_losing_the_reply(store, settings, dispatcher, consumer)
    rec = await store.record(job.job_id)
    assert (rec.state, rec.node, rec.token) == ("assigned", "n1", consumer.pending[job.job_id])  # it went through
    await dispatcher.release_pending(consumer)  # the stream or long-poll went away: nobody got it
    rec = await store.record(job.job_id)
    assert (rec.state, rec.attempt, rec.event) == ("queued", 0, "release") and not consumer.pending
    (again,) = await store.claim("n2", [(job.job_id, "tok")])
    assert again.code == ScriptCode.APPLIED and again.attempt == 1  # its one attempt is still there


@pytest.mark.single_redis
async def test_a_claim_whose_reply_was_lost_is_adopted_by_the_next_claim(store: Store, settings: Settings) -> None:
    (job,) = await store.submit([spec(max_attempts=1)])
    dispatcher, consumer = Dispatcher(store, settings), Consumer("n1", ["zh:en"], capacity=lambda: 1)
    consumer.hint(job.job_id)
    await claim_losing_the_reply(store, settings, dispatcher, consumer)
    token = consumer.pending[job.job_id]
    (claim,) = await dispatcher.claim_for(consumer, 1)  # the stream's next round: adopted, not lost
    assert (claim.job_id, claim.token, claim.attempt, claim.payload) == (job.job_id, token, 1, b"audio")
    assert not consumer.pending and (await store.record(job.job_id)).attempt == 1


async def test_a_repeated_claim_with_its_token_is_adopted(store: Store) -> None:
    (job,) = await store.submit([spec()])
    (first,) = await store.claim("n1", [(job.job_id, "tok-a")])
    (again,) = await store.claim("n1", [(job.job_id, "tok-a")])  # the caller never saw the first reply
    assert first.code == again.code == ScriptCode.APPLIED
    assert (again.attempt, again.lease, again.token) == (first.attempt, first.lease, "tok-a")
    (other,) = await store.claim("n2", [(job.job_id, "tok-b")])
    assert other.code == ScriptCode.NOT_IN_QUEUE
    assert (await store.record(job.job_id)).attempt == 1  # one claim, one attempt


# 2. What is swept does not depend on what a process remembers: an instance that never saw a pool sweeps
# its timers (the shards are 0..partitions-1, stored in Redis; timers are per shard, not per pool).
async def test_an_instance_that_never_saw_a_pool_sweeps_its_timers(make_app: AppFactory, redis: Any) -> None:
    first = await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        job_id = await submit(stub)
        (a,) = (await stub.Assign(pb.AssignRequest(node_id="gone", pairs=[pair()], max_jobs=1))).assignments
    await first.stop(grace=0)
    assert await redis.zcard(keys.INSTANCES) == 0  # it left: the next instance sweeps every shard at once
    second = await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        expired = await until_event(stub, job_id, "ack_timeout")  # never acknowledged: attempt given back
        assert expired.error.code == "LINGUA_ACK_TIMEOUT" and expired.attempt == a.attempt - 1


# 4. In-flight is tracked per lease: a late message about an earlier claim changes nothing.
async def test_a_late_heartbeat_for_an_earlier_claim_does_not_cancel_the_current_one(
        stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    call = stub.NodeSession()
    await call.write(pb.NodeMessage(register=pb.Register(node_id="solo", max_concurrency=1, pairs=[pair()])))
    assert (await call.read()).HasField("registered")
    job_id = await submit(stub)
    first = (await next_message(call, "assignments")).assignments[0]
    await call.write(pb.NodeMessage(unavailable=[lease(first)]))  # requeued; the only node gets it again
    assert (await next_message(call, "confirmed")).confirmed[0].state == pb.JOB_STATE_QUEUED
    second = (await next_message(call, "assignments")).assignments[0]
    assert (second.job_id, second.attempt) == (job_id, 2) and second.lease_token != first.lease_token
    await call.write(pb.NodeMessage(heartbeats=[lease(first)]))  # late: attempt 1's lease
    m = await next_message(call, "refused")
    assert "stale" in m.refused[0].error_message and not m.cancels
    assert (m.refused[0].reason, m.refused[0].lease_token) == ("STALE_LEASE", first.lease_token)  # matched by token
    fsm = await redis.hgetall(keys.JobKeys.of(job_id).fsm)
    assert (fsm[b"state"], fsm[b"att"], fsm[b"node"]) == (b"assigned", b"2", b"solo")
    await call.write(pb.NodeMessage(acks=[lease(second)], completions=[
        pb.Completion(lease=lease(second), result=pb.JobResult(text_asr="second"))]))
    confirmed = (await next_message(call, "confirmed")).confirmed
    assert [(c.job_id, c.ok, c.state, c.lease_token) for c in confirmed] == [
        (job_id, True, pb.JOB_STATE_SUCCEEDED, second.lease_token)]
    await call.done_writing()


async def test_a_completion_the_store_refused_keeps_its_slot(app: App, stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """A completion Redis refuses (out of memory: STORE_UNAVAILABLE) leaves the job in flight on its node:
    the slot stays taken (no second job beside it on a node of concurrency 1) until the result is stored."""
    call = stub.NodeSession()
    await call.write(pb.NodeMessage(register=pb.Register(node_id="solo", max_concurrency=1, pairs=[pair()])))
    assert (await call.read()).HasField("registered")
    job_id = await submit(stub)
    a = (await next_message(call, "assignments")).assignments[0]
    session = app.nodes.sessions["solo"]
    assert session.free_slots() == 0
    done = pb.NodeMessage(acks=[lease(a)], completions=[pb.Completion(lease=lease(a), result=pb.JobResult(text_asr="x"))])
    await set_maxmemory(redis, "1")  # our private Redis: writes now fail with OOM
    try:
        await call.write(done)
        m = await asyncio.wait_for(call.read(), 10)
        assert [(r.job_id, r.reason, r.lease_token) for r in m.refused] == [(job_id, "STORE_UNAVAILABLE", a.lease_token)], m
        assert session.free_slots() == 0 and session.holds(job_id, a.lease_token)
    finally:
        await set_maxmemory(redis, "0")
    await call.write(done)  # sent again: stored now, and the slot is free
    confirmed = (await next_message(call, "confirmed")).confirmed
    assert [(c.job_id, c.state) for c in confirmed] == [(job_id, pb.JOB_STATE_SUCCEEDED)]
    assert session.free_slots() == 1
    await call.done_writing()


# 5. A slow sweeper cannot delete a newer claim's lease timer.
async def test_a_stale_lease_timer_never_removes_the_current_one(store: Store, redis: Any) -> None:
    (job,) = await store.submit([spec()])
    timers = keys.PartitionKeys.of(keys.tag_of(job.job_id)).timers
    await store.claim("n1", [(job.job_id, "tok-1")])
    stale = wire.lease_timer(job.job_id, "tok-1")  # a sweeper read this member, then stalled
    await store.fail(job.job_id, "n1", "tok-1", pb.JobError(code="OOM", retryable=True))
    await redis.zadd(timers, {wire.retry_timer(job.job_id): 0})  # backoff over
    await store.fire_timer(wire.retry_timer(job.job_id))
    (c,) = await store.claim("n2", [(job.job_id, "tok-2")])
    assert c.code == ScriptCode.APPLIED and c.attempt == 2
    assert await store.fire_timer(stale) is None  # the stalled sweeper resumes
    assert await redis.zscore(timers, wire.lease_timer(job.job_id, "tok-2")) is not None
    assert await redis.zscore(timers, stale) is None
    assert (await store.record(job.job_id)).state == "assigned"


# 6 and 7. Identities cannot collide, and a repeat must ask for the same work.
async def test_idempotency_identities_do_not_collide(stub: pb_grpc.SchedulerStub) -> None:
    a = await submit(stub, session_id="sess2", idempotency_key="k:X")
    b = await submit(stub, session_id="sess2:k", idempotency_key="X")
    assert keys.tag_of(a) == keys.tag_of(b)  # one partition: only the identity's encoding tells them apart
    assert a != b


async def test_a_repeat_submit_with_other_content_is_already_exists(stub: pb_grpc.SchedulerStub) -> None:
    job_id = await submit(stub, idempotency_key="req-1", priority=1)
    assert await submit(stub, idempotency_key="req-1", priority=1, trace_id="retry-2") == job_id
    for change in (dict(payload=b"other"), dict(priority=5), dict(max_attempts=7), dict(src_lang="ja")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await submit(stub, **{"idempotency_key": "req-1", "priority": 1, **change})
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, change
        assert job_id in (err.value.details() or "") and "jobs[0]" in (err.value.details() or "")
    assert "in pair zh:en (src_lang differs" in (err.value.details() or "")
    # A key is per target language: another one is another job, and its repeat finds it.
    de = await submit(stub, idempotency_key="req-1", priority=1, tgt_lang="de")
    assert de != job_id and await submit(stub, idempotency_key="req-1", priority=1, tgt_lang="de") == de


async def expire_record(redis: Any, job_id: str) -> None:
    """The job's record expires (as retention ends it), and with it an identity key naming it."""
    jk = keys.JobKeys.of(job_id)
    for key in (jk.fsm, jk.payload, jk.result):
        await redis.pexpireat(key, 1)  # a time past: expired now
    for key in await all_keys(redis, keys.PREFIX + "idem:*"):
        if (await redis.get(key) or b"").startswith(job_id.encode() + b" "):
            await redis.pexpireat(key, 1)


# Issue 13: the default identity (utterance and target language) is the session's index plus the digest in the
# record, not a key per job; same answers as with the key.
async def test_a_default_identity_has_no_key_and_answers_as_before(store: Store, redis: Any) -> None:
    first = spec(session_id="call:7", utterance_index=3)  # session ids may hold ':'
    (job,) = await store.submit([first])
    assert job.created and await all_keys(redis, keys.PREFIX + "idem:*") == []
    assert not await redis.exists(idempotency_key(keys.tag_of(job.job_id), first))
    (c,) = await store.claim("n1", [(job.job_id, "tok1")])
    assert c.code == ScriptCode.APPLIED
    (again,) = await store.submit([spec(session_id="call:7", utterance_index=3, trace_id="retry-2")])
    assert (again.job_id, again.created, again.state) == (job.job_id, False, "assigned")  # its state, as today
    for change in (dict(payload=b"other"), dict(priority=5), dict(max_attempts=7)):
        with pytest.raises(AlreadyExists, match=re.escape(job.job_id)):
            await store.submit([spec(session_id="call:7", utterance_index=3, **change)])
    # Per target language: another one is another job, and its repeat finds it; another source language
    # with this target is this identity with other content (issue 8 point 7), in a batch too.
    (de,) = await store.submit([spec(session_id="call:7", utterance_index=3, tgt_lang="de")])
    assert de.created and de.job_id != job.job_id
    assert (await store.submit([spec(session_id="call:7", utterance_index=3, tgt_lang="de")]))[0].job_id == de.job_id
    for batch in ([spec(session_id="call:7", utterance_index=3, src_lang="ja")],
                  [spec(session_id="call:7", utterance_index=4), spec(session_id="call:7", utterance_index=3, src_lang="ja")]):
        with pytest.raises(AlreadyExists, match=re.escape(f"jobs[{len(batch) - 1}]: job {job.job_id}") + ".*in pair zh:en"):
            await store.submit(batch)
    assert (await store.submit([spec(session_id="call:7", utterance_index=3, src_lang="ja", tgt_lang="fr")]))[0].created
    # Another session (a prefix of this one's id), another utterance: other identities.
    assert (await store.submit([spec(session_id="call", utterance_index=3)]))[0].created
    assert not (await store.submit([spec(session_id="call:7", utterance_index=4)]))[0].created  # the batch's above
    assert await all_keys(redis, keys.PREFIX + "idem:*") == []


async def test_a_default_identity_ends_with_its_record(store: Store, redis: Any) -> None:
    (first,) = await store.submit([spec(utterance_index=9)])
    await expire_record(redis, first.job_id)  # retention over: its id stays in the session's index
    (second,) = await store.submit([spec(utterance_index=9, payload=b"other")])
    assert second.created and second.job_id != first.job_id
    (again,) = await store.submit([spec(utterance_index=9, payload=b"other")])
    assert (again.job_id, again.created, again.state) == (second.job_id, False, "queued")


async def test_explicit_keys_and_default_identities_stay_apart(store: Store, redis: Any) -> None:
    (keyed,) = await store.submit([spec(utterance_index=5, idempotency_key="req-5")])
    assert len(await all_keys(redis, keys.PREFIX + "idem:*")) == 1  # an explicit key keeps its key
    (default,) = await store.submit([spec(utterance_index=5)])
    assert default.created and default.job_id != keyed.job_id  # the keyed job is not the utterance's identity
    assert (await store.submit([spec(utterance_index=5)]))[0].job_id == default.job_id
    assert (await store.submit([spec(utterance_index=5, idempotency_key="req-5")]))[0].job_id == keyed.job_id
    with pytest.raises(AlreadyExists, match=re.escape(keyed.job_id)):
        await store.submit([spec(utterance_index=5, idempotency_key="req-5", payload=b"other")])
    # In another source language, the key is the keyed job's and the utterance the default one's: both conflict.
    for utterance in (5, 9):  # the key is the identity: at any utterance
        with pytest.raises(AlreadyExists, match=re.escape(keyed.job_id) + ".*in pair zh:en"):
            await store.submit([spec(utterance_index=utterance, idempotency_key="req-5", src_lang="ja")])
    with pytest.raises(AlreadyExists, match=re.escape(default.job_id)):
        await store.submit([spec(utterance_index=5, src_lang="ja")])
    (other_key,) = await store.submit([spec(utterance_index=5, idempotency_key="req-6", src_lang="ja")])
    assert other_key.created  # another key: another identity


async def test_a_retried_job_keeps_its_identity(store: Store, redis: Any) -> None:
    retention = store.settings.retention_ms
    specs = [spec(utterance_index=11), spec(utterance_index=12, idempotency_key="req-12")]
    jobs = await store.submit(specs)
    for job in jobs:
        (c,) = await store.claim("n1", [(job.job_id, "tok-" + job.job_id)])
        await store.fail(job.job_id, "n1", c.token, pb.JobError(code="E", message="fatal"))
        assert await redis.pttl(keys.JobKeys.of(job.job_id).fsm) > 0  # ended: its record expires
        far = int(time.time() * 1000) + 3_600_000
        await Operations(store).retry(job.job_id, deadline_ms=far, max_attempts=0, reason="again")
        assert await redis.pttl(keys.JobKeys.of(job.job_id).fsm) == -1  # and the default identity with it
    # The explicit key lives until the new deadline + retention, as the record will at least.
    ttl = await redis.pttl(idempotency_key(keys.tag_of(jobs[1].job_id), specs[1]))
    assert 3_600_000 + retention - 60_000 < ttl <= 3_600_000 + retention
    again = await store.submit(specs)
    assert [(a.job_id, a.created, a.state) for a in again] == [(j.job_id, False, "queued") for j in jobs]


async def test_a_default_identity_from_before_dg_is_still_found(store: Store, redis: Any) -> None:
    """Records written before the digest moved into them had a key for their default identity too."""
    old = spec(utterance_index=20)
    # Keyed jobs of the same utterances: records without `dg` too, but no default identity's key.
    (first,) = await store.submit([spec(utterance_index=20, idempotency_key="req-20")])
    (job,) = await store.submit([old])
    (other,) = await store.submit([spec(utterance_index=21, idempotency_key="req-21")])
    for made in (first, job, other):
        await redis.hdel(keys.JobKeys.of(made.job_id).fsm, "dg")
    key = idempotency_key(keys.tag_of(job.job_id), old)
    await redis.set(key, f"{job.job_id} {store._submit_job(old).digest}")
    assert (await store.submit([old]))[0].job_id == job.job_id
    with pytest.raises(AlreadyExists, match=re.escape(job.job_id)):
        await store.submit([spec(utterance_index=20, payload=b"other")])
    # An earlier keyed job has no default identity's key naming it: not the utterance's job.
    (fresh,) = await store.submit([spec(utterance_index=21)])
    assert fresh.created and fresh.job_id != other.job_id


# 8. A registry entry that expired during an outage is taken back, not treated as a replacement.
async def test_a_node_whose_registry_entry_expired_keeps_its_stream(
        app: App, stub: pb_grpc.SchedulerStub, channel: grpc.aio.Channel, redis: Any) -> None:
    node = await SimNode(channel, "survivor", [("zh", "en")]).start()
    await redis.delete(keys.node("survivor"))  # as if its TTL ran out while Redis was unreachable
    deadline = time.monotonic() + 10
    while not await redis.exists(keys.node("survivor")):  # the next renewal (every node_ttl / 3)
        assert time.monotonic() < deadline, "the renewal never took the entry back"
        await asyncio.sleep(0.05)
    assert not node.closed.is_set() and not node.errors
    assert [n.node_id for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes] == ["survivor"]
    job_id = await submit(stub)
    await node.wait_for(lambda: job_id in node.completed)
    await node.stop()


# 9. Release and lease shrink are two calls: the grace must outlast a heartbeat, with margin.
def test_settings_refuse_a_stream_grace_not_longer_than_the_heartbeat_interval() -> None:
    with pytest.raises(ValueError, match="stream_grace_ms must be at least twice heartbeat_interval_ms"):
        Settings(heartbeat_interval_ms=1_000, stream_grace_ms=1_999).validate()
    Settings(heartbeat_interval_ms=1_000, stream_grace_ms=2_000).validate()


# 13. Keys and caches that only grew.
async def test_affinity_bindings_older_than_their_ttl_are_deleted(store: Store, redis: Any) -> None:
    (old,) = await store.submit([spec(session_id="old-call")])
    await store.claim("n1", [(old.job_id, "tok-1")])
    pk = keys.PartitionKeys.of(keys.tag_of(old.job_id))
    field = keys.session_field("acme", "old-call")
    assert await redis.hexists(pk.affinity, field)
    await redis.zadd(pk.affinity_at, {field: 1})  # bound long ago (more than --affinity-ttl-ms)
    (new,) = await store.submit([spec(session_id="new-call")])
    assert keys.tag_of(new.job_id) == keys.tag_of(old.job_id)  # the same partition (2 partitions in tests)
    await store.claim("n1", [(new.job_id, "tok-8")])  # one claim in 8 sweeps: those whose token ends in 0 or 8
    assert not await redis.hexists(pk.affinity, field) and await redis.zscore(pk.affinity_at, field) is None
    assert await redis.hexists(pk.affinity, keys.session_field("acme", "new-call"))


async def test_affinity_keys_expire_a_ttl_after_their_newest_binding(store: Store, redis: Any) -> None:
    """Only claims delete old bindings: a partition no longer claimed from would keep its bindings for ever,
    so both keys expire --affinity-ttl-ms after the newest binding (issue 8 point 13)."""
    ttl = store.settings.affinity_ttl_ms
    (job,) = await store.submit([spec(session_id="soon-idle")])
    pk = keys.PartitionKeys.of(keys.tag_of(job.job_id))
    await store.claim("n1", [(job.job_id, "tok-1")])
    assert await redis.hexists(pk.affinity, keys.session_field("acme", "soon-idle"))
    for key in (pk.affinity, pk.affinity_at):
        assert ttl - 5_000 < await redis.pttl(key) <= ttl, key
    # As if bound a quarter of the TTL ago: the next claim by its node binds again, and moves them on.
    field, created = keys.session_field("acme", "soon-idle"), int(await redis.hget(keys.JobKeys.of(job.job_id).fsm, "c"))
    await redis.hset(pk.affinity, field, f"n1|{created - ttl // 4}")
    for key in (pk.affinity, pk.affinity_at):
        await redis.pexpire(key, 10_000)
    (later,) = await store.submit([spec(session_id="soon-idle", utterance_index=1)])
    (claim,) = await store.claim("n1", [(later.job_id, "tok-3")])
    assert claim.code == ScriptCode.APPLIED and (await redis.hget(pk.affinity, field) or b"") > f"n1|{created}".encode()
    for key in (pk.affinity, pk.affinity_at):
        assert ttl - 5_000 < await redis.pttl(key) <= ttl, key


async def test_a_claim_by_the_bound_node_rewrites_the_binding_only_once_it_is_an_eighth_old(
        store: Store, redis: Any) -> None:
    """The session's binding is rewritten by a claim unless the job prefers the claiming node and the
    binding submit read (`pat`) is younger than an eighth of --affinity-ttl-ms; the pruning still sees it."""
    ttl = store.settings.affinity_ttl_ms
    (first,) = await store.submit([spec(session_id="bound")])
    await store.claim("n1", [(first.job_id, "tok-1")])
    pk = keys.PartitionKeys.of(keys.tag_of(first.job_id))
    field = keys.session_field("acme", "bound")
    created = int(await redis.hget(keys.JobKeys.of(first.job_id).fsm, "c"))

    async def bind(at: int) -> None:
        await redis.hset(pk.affinity, field, f"n1|{at}")
        await redis.zadd(pk.affinity_at, {field: at})

    async def claim_next(utterance: int, node: str = "n1") -> str:
        (job,) = await store.submit([spec(session_id="bound", utterance_index=utterance)])
        await store.claim(node, [(job.job_id, f"tok-{utterance}1")])
        return job.job_id

    young = created - ttl // 16  # bound a sixteenth of the time to live ago: left as it is
    await bind(young)
    job_id = await claim_next(1)
    assert await redis.hget(keys.JobKeys.of(job_id).fsm, "pref") == b"n1"
    assert await redis.hget(pk.affinity, field) == f"n1|{young}".encode()
    assert await redis.zscore(pk.affinity_at, field) == young
    old = created - ttl // 4  # a quarter old (still in force): rewritten by its own node's claim
    await bind(old)
    await claim_next(2)
    node, at = (await redis.hget(pk.affinity, field)).decode().split("|")
    assert node == "n1" and int(at) >= created and await redis.zscore(pk.affinity_at, field) == int(at)
    await redis.hdel(pk.affinity, field)  # no binding (a job without `pref`): its claim binds
    await claim_next(3, node="n2")
    assert (await redis.hget(pk.affinity, field)).startswith(b"n2|")


def test_a_consumers_avoid_list_is_bounded() -> None:
    consumer = Consumer("n1", ["zh:en"], capacity=lambda: 1)
    now = time.time() * 1000
    for i in range(MAX_AVOIDED * 3):
        consumer.avoid(f"job-{i}", now + 60_000, now)
    assert len(consumer.avoided) == MAX_AVOIDED and consumer.avoids(f"job-{MAX_AVOIDED * 3 - 1}", now)
    assert consumer.avoiding(now) == MAX_AVOIDED and consumer.avoiding(now + 60_001) == 0


async def test_a_record_without_a_lease_token_still_moves(store: Store, redis: Any) -> None:
    """Records written before lease tokens (no `tok` field) can still be cancelled, expired, requeued."""
    (job,) = await store.submit([spec()])
    await store.claim("n1", [(job.job_id, "tok-1")])
    await redis.hdel(keys.JobKeys.of(job.job_id).fsm, "tok")
    assert (await store.cancel(job.job_id, "upgrade")).state == "cancelled"


async def test_a_lease_token_is_good_for_one_claim(store: Store) -> None:
    (job,) = await store.submit([spec()])
    await store.claim("n1", [(job.job_id, "tok-1")])
    await store.release("n1", [Lease(job.job_id, "tok-1")])
    (again,) = await store.claim("n1", [(job.job_id, "tok-1")])  # a late repeat of the released claim
    assert again.code == ScriptCode.NOT_IN_QUEUE and (await store.record(job.job_id)).state == "queued"


async def test_a_released_lease_is_fenced_by_its_token(store: Store) -> None:
    (job,) = await store.submit([spec()])
    await store.claim("n1", [(job.job_id, "tok-1")])
    (wrong,) = await store.release("n1", [Lease(job.job_id, "tok-x")])
    assert isinstance(wrong, Exception) and "stale" in str(wrong)
    (ok,) = await store.release("n1", [Lease(job.job_id, "tok-1")])
    assert not isinstance(ok, Exception) and ok.state == "queued"
    assert (await store.record(job.job_id)).attempt == 0


async def test_assignments_never_written_to_a_stream_are_released(app: App, store: Store) -> None:
    """A stream that closes with assignments still in its outbox: no node saw them, so they go back to
    the queue with their attempts given back (not node_lost after the grace)."""
    (job,) = await store.submit([spec(max_attempts=1)])
    (c,) = await store.claim("n1", [(job.job_id, "tok-1")])
    session = Session(app.nodes, pb.Register(node_id="n1", max_concurrency=1, pairs=[pair()]), ["zh:en"])
    session.in_flight[job.job_id] = Lease(job.job_id, c.token, c.attempt)
    session.unsent.add(job.job_id)
    await app.nodes._closed(session)
    rec = await store.record(job.job_id)
    assert (rec.state, rec.attempt, rec.event) == ("queued", 0, "release") and not session.in_flight


# Issue 13, part 5: ListJobs' indexes hold members only; each finished job has one forget timer in its
# shard's timers, due when its record expires, which takes its entries out of every index.
def index_keys(job_id: str, tenant: str = "acme") -> tuple[str, str]:
    """The job's pool index and its tenant's index."""
    tag = keys.tag_of(job_id)
    return keys.PartitionKeys.of(tag).jobs, keys.tenant_jobs(keys.shard_of_tag(tag), tenant)


def member(job_id: str) -> bytes:
    return f"{job_id[-26:]} {job_id[:-26]}".encode()


async def redis_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return seconds * 1000 + micros // 1000


async def test_an_index_holds_its_jobs_members_only_without_a_time_to_live(store: Store, redis: Any) -> None:
    made = [j.job_id for j in await store.submit([spec(utterance_index=i) for i in range(3)])]
    await store.cancel(made[1], "not needed")
    shard = keys.shard_of_tag(keys.tag_of(made[0]))  # one session: one shard
    pool_index, tenant_index = index_keys(made[0])
    ended = keys.ended_jobs(shard, "cancelled")
    for key, jobs in ((pool_index, made), (tenant_index, made), (ended, [made[1]])):
        assert sorted(await redis.zrange(key, 0, -1)) == sorted(member(j) for j in jobs), key
        assert await redis.pttl(key) == -1, key  # its entries leave when their jobs do, not with the key
    # The cancelled job's forget timer is due when its record expires, and names what the forget needs.
    timers = keys.PartitionKeys.of(keys.tag_of(made[1])).timers
    due = await redis.zscore(timers, wire.forget_timer(made[1], "acme", "cancelled"))
    record_expiry = await redis_ms(redis) + await redis.pttl(keys.JobKeys.of(made[1]).fsm)
    assert due is not None and abs(due - record_expiry) < 1_000
    assert wire.parse_timer(wire.forget_timer(made[1], "acme", "cancelled")) == wire.Timer(
        wire.FORGET, made[1], tenant="acme", ended="cancelled")


async def test_a_finished_job_leaves_every_index_when_its_forget_timer_fires(redis: Any, settings: Settings) -> None:
    store = Store(redis, dataclasses.replace(settings, retention_ms=100))
    dispatcher = Dispatcher(store, store.settings)
    soon = (await redis_ms(redis)) + 300  # deadline: max(finish, deadline) + retention is when a record expires
    deadline = Timestamp()
    deadline.FromMilliseconds(soon)
    done, failed, cancelled, alive = [j.job_id for j in await store.submit(
        [spec(utterance_index=i, deadline=deadline) for i in range(3)] + [spec(utterance_index=3)])]
    await store.claim("n1", [(done, "t1"), (failed, "t2")])
    await store.complete(done, "n1", "t1", pb.JobResult(text_asr="ok"))
    await store.fail(failed, "n1", "t2", pb.JobError(code="BAD", retryable=False))
    await store.cancel(cancelled, "")
    shard = keys.shard_of_tag(keys.tag_of(done))
    pool_index, tenant_index = index_keys(done)
    for_ended = {"failed": failed, "cancelled": cancelled}
    for state, job_id in for_ended.items():
        assert await redis.zrange(keys.ended_jobs(shard, state), 0, -1) == [member(job_id)]

    async def records_gone() -> bool:  # then their forget timers are due (by Redis's clock, and this machine's)
        return await redis.exists(*(keys.JobKeys.of(j).fsm for j in (done, failed, cancelled))) == 0

    await until(records_gone, timeout=10, what="the finished jobs' records expire")
    assert await dispatcher.sweep_once([int(shard.strip("{}"))]) == 3  # the sweep fires what is due
    for key in (pool_index, tenant_index):
        assert await redis.zrange(key, 0, -1) == [member(alive)], key
    for state in for_ended:
        assert await redis.exists(keys.ended_jobs(shard, state)) == 0
    timers = keys.PartitionKeys.of(keys.tag_of(done)).timers
    assert [m for m in await redis.zrange(timers, 0, -1) if m.startswith(b"x:")] == []


async def test_junk_timer_members_are_skipped_and_the_other_timers_still_fire(store: Store, redis: Any) -> None:
    """Members no scheduler wrote in a shard's timers (a forget timer whose job id carries no partition, an
    unknown kind) are left alone by the sweep: the due timers beside them still fire."""
    (job,) = await store.submit([spec()])
    job_id = job.job_id
    timers = keys.PartitionKeys.of(keys.tag_of(job_id)).timers
    await store.cancel(job_id, "")
    forget = wire.forget_timer(job_id, "acme", "cancelled")
    junk = ["x:foo acme -", "x:zh:en{0}01J acme -", "q:whatever"]
    await redis.zadd(timers, {forget: 1, **{m: 1 for m in junk}})  # all due now
    shard = int(keys.shard_of_tag(keys.tag_of(job_id)).strip("{}"))
    assert await Dispatcher(store, store.settings).sweep_once([shard]) == 1
    assert await redis.zscore(timers, forget) is None
    assert sorted(m.decode() for m in await redis.zrange(timers, 0, -1) if not m.startswith(b"d:")) == sorted(junk)
    assert await store.forget(junk) == [] and await store.fire_timer(junk[0]) is None
    now_ms = int(time.time() * 1000)
    for m in junk:  # set aside: due again a minute on, no longer before the timers due after them
        assert now_ms + SET_ASIDE_MS - 5_000 < await redis.zscore(timers, m) <= now_ms + SET_ASIDE_MS, m


async def test_a_shards_worth_of_timers_that_cannot_fire_does_not_hold_back_the_rest(store: Store, redis: Any) -> None:
    """More due members than one read brings that cannot be acted on (no scheduler wrote them; a record
    its script fails on) ahead of a real lease timer: the sweep sets them aside and the lease still fires."""
    (job,) = await store.submit([spec()])
    await store.claim("n1", [(job.job_id, "t1")])
    timers = keys.PartitionKeys.of(keys.tag_of(job.job_id)).timers
    damaged = keys.tag_of(job.job_id) + "01J0000000000000000000DAMG"
    await redis.set(keys.JobKeys.of(damaged).fsm, "not a hash")  # its scripts fail: WRONGTYPE
    await redis.zadd(timers, {f"q:junk-{i}": 1 for i in range(SWEEP_READ + 20)} | {wire.lease_timer(damaged, "t"): 1})
    await store.touch("n1", [Lease(job.job_id, "t1")], mode="shorten", lease_ms=0)  # due now, after all of them
    shard = int(keys.shard_of_tag(keys.tag_of(job.job_id)).strip("{}"))
    await Dispatcher(store, store.settings).sweep_once([shard])
    assert (await store.record(job.job_id)).state == "queued"
    assert await redis.zcount(timers, "-inf", int(time.time() * 1000)) == 0  # every one set aside or fired
    assert await redis.zcard(timers) >= SWEEP_READ + 21  # set aside, not removed


def test_errors_of_redis_as_a_whole_are_not_a_records() -> None:
    """A script's error text carries "@user_script" whatever its cause (Redis 7): only WRONGTYPE and a script's
    own runtime error are a record's."""
    from lingua_scheduler.server.dispatch import record_error
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    tail = " script: 0a1b, on @user_script:12."
    assert record_error(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value" + tail))
    assert record_error(ResponseError("user_script:12: attempt to perform arithmetic on a nil value"))
    for err in (OutOfMemoryError("command not allowed when used memory > 'maxmemory'." + tail),
                ReadOnlyError("You can't write against a read only replica." + tail),
                ResponseError("NOREPLICAS Not enough good replicas to write." + tail),
                ResponseError("BUSY Redis is busy running a script."), ResponseError("TRYAGAIN Multiple keys" + tail)):
        assert not record_error(err), err


async def test_a_sweep_while_redis_refuses_writes_sets_nothing_aside(store: Store, redis: Any) -> None:
    """An error of Redis as a whole (out of memory) is not one record's: the due timer stays due (not set
    aside a minute) and fires at the first sweep after Redis is back."""
    (job,) = await store.submit([spec()])
    await store.claim("n1", [(job.job_id, "t1")])
    await store.touch("n1", [Lease(job.job_id, "t1")], mode="shorten", lease_ms=0)
    timers, member = keys.PartitionKeys.of(keys.tag_of(job.job_id)).timers, wire.lease_timer(job.job_id, "t1")
    due = await redis.zscore(timers, member)
    shard = int(keys.shard_of_tag(keys.tag_of(job.job_id)).strip("{}"))
    sweeper = Dispatcher(store, store.settings)
    set_aside = store.set_aside

    async def redis_back_first(*args: Any) -> None:  # Redis recovers between the refusal and the set-aside
        await set_maxmemory(redis, "0")
        await set_aside(*args)

    store.set_aside = redis_back_first  # type: ignore[method-assign]
    await set_maxmemory(redis, "1")
    try:
        assert await sweeper.sweep_once([shard]) == 0
        assert await redis.zscore(timers, member) == due
    finally:
        await set_maxmemory(redis, "0")
        store.set_aside = set_aside  # type: ignore[method-assign]
    assert await sweeper.sweep_once([shard]) == 1
    assert (await store.record(job.job_id)).state == "queued"


async def test_an_index_key_of_another_type_fails_only_the_jobs_with_an_entry_there(store: Store, redis: Any) -> None:
    """One forget_job call for three jobs of a shard whose tenants' indexes are one good, one a string (no
    scheduler wrote it): the job indexed there gets an error in its place, the others leave every index."""
    tenants = ["acme", "bad", "zed"]
    sessions = [next(f"s{i}" for i in range(200) if store.shard_of(t, f"s{i}") == store.shard_of("acme", "s0"))
                for t in tenants]
    ids = [j.job_id for j in await store.submit([spec(tenant_id=t, session_id=sess, utterance_index=0)
                                                 for t, sess in zip(tenants, sessions, strict=True)])]
    shard = keys.shard_of_tag(keys.tag_of(ids[0]))
    timers = keys.PartitionKeys.of(keys.tag_of(ids[0])).timers
    for job_id in ids:
        await store.cancel(job_id, "")
    members = [wire.forget_timer(j, t, "cancelled") for j, t in zip(ids, tenants, strict=True)]
    await redis.zadd(timers, {m: 1 for m in members})
    await redis.delete(keys.tenant_jobs(shard, "bad"))
    await redis.set(keys.tenant_jobs(shard, "bad"), "not an index")
    replies = await store.scripts.call(redis, forget_call(
        [ForgetJob(m, j, t, "cancelled") for m, j, t in zip(members, ids, tenants, strict=True)]))
    assert replies[0] == 1 and replies[2] == 1
    assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
    for tenant in ("acme", "zed"):
        assert await redis.exists(keys.tenant_jobs(shard, tenant)) == 0, tenant
    assert await redis.zcard(keys.PartitionKeys.of(keys.tag_of(ids[0])).jobs) == 0  # every job left the pool's
    assert await redis.exists(keys.ended_jobs(shard, "cancelled")) == 0
    assert [m for m in await redis.zrange(timers, 0, -1) if m.startswith(b"x:")] == []


async def test_a_retry_between_a_refused_expiry_and_its_cleanup_keeps_the_new_deadline_timer(
        store: Store, redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweeper fires a failed job's due deadline timer: the expiry is refused (the job is failed), and
    before the sweeper removes the timer a RetryJob puts the job back with a new deadline timer under the
    same member. The sweeper's cleanup must leave that one (issue 8 point 5, deadline timers)."""
    (job,) = await store.submit([spec()])
    job_id, timers, deadline = job.job_id, keys.PartitionKeys.of(keys.tag_of(job.job_id)).timers, wire.deadline_timer(job.job_id)
    await store.claim("n1", [(job_id, "t1")])
    await store.fail(job_id, "n1", "t1", pb.JobError(code="BAD", retryable=False))
    await redis.zadd(timers, {deadline: 1})  # due: the sweeper reads it
    refused_then = store.transition

    async def retry_in_between(*args: Any, **kwargs: Any) -> Any:
        try:
            return await refused_then(*args, **kwargs)
        finally:
            await Operations(store).retry(job_id, deadline_ms=0, max_attempts=0, reason="again")

    monkeypatch.setattr(store, "transition", retry_in_between)
    assert await store.fire_timer(deadline) is None
    monkeypatch.undo()
    assert (await store.record(job_id)).state == "queued"
    assert (await redis.zscore(timers, deadline) or 0) > time.time() * 1000  # its new deadline, kept
    await store.cancel(job_id, "")
    await redis.zadd(timers, {deadline: 1})  # and a due one whose job refuses is still removed
    assert await store.fire_timer(deadline) is None and await redis.zscore(timers, deadline) is None


async def test_a_retry_between_finish_and_forget_keeps_the_entries(store: Store, redis: Any) -> None:
    (job,) = await store.submit([spec()])
    job_id = job.job_id
    await store.claim("n1", [(job_id, "t1")])
    await store.fail(job_id, "n1", "t1", pb.JobError(code="BAD", retryable=False))
    forget = wire.forget_timer(job_id, "acme", "failed")
    timers = keys.PartitionKeys.of(keys.tag_of(job_id)).timers
    assert await redis.zscore(timers, forget) is not None  # a sweeper reads it now, and stalls
    await Operations(store).retry(job_id, deadline_ms=0, max_attempts=0, reason="again")
    assert await redis.zscore(timers, forget) is None
    assert await store.fire_timer(forget) is None  # the stalled sweeper resumes: nothing to act on
    shard = keys.shard_of_tag(keys.tag_of(job_id))
    for key in index_keys(job_id):
        assert await redis.zrange(key, 0, -1) == [member(job_id)], key
    assert await redis.exists(keys.ended_jobs(shard, "failed")) == 0
    assert await redis.zscore(timers, wire.deadline_timer(job_id)) is not None
    await store.cancel(job_id, "")  # it ends again: another forget timer, for its new state
    assert await redis.zscore(timers, wire.forget_timer(job_id, "acme", "cancelled")) is not None


async def test_two_instances_firing_one_forget_act_once(store: Store, redis: Any, settings: Settings) -> None:
    (job,) = await store.submit([spec()])
    await store.cancel(job.job_id, "")
    forget = wire.forget_timer(job.job_id, "acme", "cancelled")
    timers = keys.PartitionKeys.of(keys.tag_of(job.job_id)).timers
    assert await store.forget([forget]) == []  # not due by Redis' clock (a retention away): nothing done
    await redis.zadd(timers, {forget: 1})  # due now
    other = Store(redis, settings)  # another instance
    fired = await asyncio.gather(store.fire_timer(forget), other.fire_timer(forget), store.forget([forget]))
    assert sum(1 for f in fired if f) == 1
    for key in (*index_keys(job.job_id), keys.ended_jobs(keys.shard_of_tag(keys.tag_of(job.job_id)), "cancelled")):
        assert await redis.exists(key) == 0, key


async def test_a_backlog_of_forgets_is_swept_at_once(redis: Any, settings: Settings) -> None:
    """More forget timers due in a shard than one read brings: the sweep reads again at once, so they do
    not hold back the timers due after them (the lease that ran out here)."""

    store = Store(redis, dataclasses.replace(settings, retention_ms=1))
    seconds, micros = await redis.time()
    deadline = Timestamp()
    deadline.FromMilliseconds(seconds * 1000 + micros // 1000 + 500)
    made = [j.job_id for j in await store.submit(
        [spec(utterance_index=i, deadline=deadline) for i in range(SWEEP_READ + 50)])]  # one session: one shard
    await asyncio.gather(*(store.cancel(j, "") for j in made))
    (held,) = await store.submit([spec(utterance_index=SWEEP_READ + 50)])
    await store.claim("n1", [(held.job_id, "t1")])

    async def records_gone() -> bool:
        return await redis.exists(*(keys.JobKeys.of(j).fsm for j in made)) == 0

    await until(records_gone, timeout=20, what="the records expire")
    # Its lease is over now: its timer is due after every forget, beyond the first read of the shard.
    await store.touch("n1", [Lease(held.job_id, "t1")], mode="shorten", lease_ms=0)
    shard = int(keys.shard_of_tag(keys.tag_of(held.job_id)).strip("{}"))
    assert await Dispatcher(store, store.settings).sweep_once([shard]) == len(made) + 1
    assert (await store.record(held.job_id)).state == "queued"  # its lease timer fired in the same sweep
    assert await redis.zrange(index_keys(held.job_id)[0], 0, -1) == [member(held.job_id)]
