"""A job is its record (the FSM hash, holding its spec and its state changes), its payload and its result;
its state changes are published only while someone watches it (WatchJob)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import all_keys, pair, spec
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.app import App
from lingua_scheduler.server.store import Lease
from lingua_sdk import pb, pb_grpc


async def job_keys(redis: Any, job_id: str) -> set[str]:
    base = f"{keys.PREFIX}job:{job_id}:"
    return {k.decode().removeprefix(base) for k in await all_keys(redis, base + "*")}


async def assign(stub: pb_grpc.SchedulerStub, node: str = "n1") -> pb.Assignment:
    reply = await stub.Assign(pb.AssignRequest(node_id=node, pairs=[pair()], max_jobs=1, wait=Duration(seconds=2)))
    assert len(reply.assignments) == 1
    return reply.assignments[0]


async def test_a_queued_job_is_its_record_and_payload_and_a_long_spec_keeps_it_compact(
        stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    plain, with_payload = (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(payload=b"", payload_ref="session://s1/0"), spec(utterance_index=1, payload=b"pcm")]))).results
    assert await job_keys(redis, plain.job_id) == {"fsm"}  # no meta, no events list
    assert await job_keys(redis, with_payload.job_id) == {"fsm", "payload"}
    record = await redis.hgetall(keys.JobKeys.of(plain.job_id).fsm)
    assert not [f for f in record if f.startswith(b"h")]  # no state change stored: the submit is the record
    # A spec of several pieces (trace context: more than the 4 pieces a claim reads with the record) comes
    # back whole, and the record stays a listpack (no hash value over 64 bytes).
    long = spec(utterance_index=2, payload=b"", payload_ref="session://s1/2/" + "p" * 200,
                trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "v=" + "t" * 200})
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[long]))).results[0].job_id
    fsm = keys.JobKeys.of(job_id).fsm
    assert len(long.SerializeToString()) > 4 * 64 and await redis.hexists(fsm, "spec+6")
    assert await redis.object("encoding", fsm) in (b"listpack", b"ziplist")  # ziplist: Redis 6.2
    assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).spec == long
    for _ in range(3):
        a = await assign(stub)
        if a.job_id == job_id:
            break
    assert a.spec == long
    assert await redis.object("encoding", fsm) in (b"listpack", b"ziplist")


async def test_a_job_without_a_payload_says_so_in_its_record(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """`np`: claim and finish skip the payload key of a job that has none (no GET, no DEL)."""
    plain, with_payload = (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(payload=b"", payload_ref="session://s1/0"), spec(utterance_index=1, payload=b"pcm")]))).results
    assert await redis.hget(keys.JobKeys.of(plain.job_id).fsm, "np") == b"1"
    assert not await redis.hexists(keys.JobKeys.of(with_payload.job_id).fsm, "np")
    assigned = {a.job_id: a for a in [await assign(stub) for _ in range(2)]}
    assert assigned[plain.job_id].spec.payload == b"" and assigned[plain.job_id].spec.payload_ref == "session://s1/0"
    assert assigned[with_payload.job_id].spec.payload == b"pcm"  # no `np` (as in records written before it): read
    for a in assigned.values():
        await stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, node_id="n1",
                                               lease_token=a.lease_token, result=pb.JobResult(text_asr="x")))
        assert await job_keys(redis, a.job_id) == {"fsm"}  # the payload dropped where there was one; the result inline


async def test_a_finished_job_is_its_record_and_a_long_result_both_expiring(
        app: App, stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    long = pb.JobResult(text_asr="x", text_translated="y" * (wire.PIECE * wire.RESULT_PIECES))
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(payload=b"pcm")]))).results[0].job_id
    a = await assign(stub)
    await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=a.attempt, node_id="n1", lease_token=a.lease_token,
                                           result=long))
    assert await job_keys(redis, job_id) == {"fsm", "result"}  # too long for the record: a key of its own
    jk = keys.JobKeys.of(job_id)
    assert not await redis.hexists(jk.fsm, "r")
    fsm_ttl, result_ttl = await redis.pttl(jk.fsm), await redis.pttl(jk.result)
    assert result_ttl > app.settings.retention_ms - 5_000 and abs(fsm_ttl - result_ttl) < 1_000  # one expiry
    assert await redis.object("encoding", jk.fsm) in (b"listpack", b"ziplist")
    assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).result == long
    # A cancel's state change (its error with it) is longer than a hash value may be in a listpack: stored
    # in pieces, so the record stays one, and read back whole.
    cancelled = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=1)]))).results[0].job_id
    await stub.CancelJob(pb.CancelJobRequest(job_id=cancelled))
    fsm = keys.JobKeys.of(cancelled).fsm
    assert await redis.hexists(fsm, "h2+2") and await redis.object("encoding", fsm) in (b"listpack", b"ziplist")
    (_, last) = [e async for e in stub.WatchJob(pb.WatchJobRequest(job_id=cancelled))]
    assert last.error == pb.JobError(code="LINGUA_CANCELLED", message="cancelled by client") and last.version == 2


async def test_a_long_error_message_keeps_the_record_a_listpack(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """A node's error message is any length: the record keeps it in its change's pieces (and names that
    change in `err`), never as one long value that would turn the hash into a hashtable for good."""
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(max_attempts=2)]))).results[0].job_id
    fsm = keys.JobKeys.of(job_id).fsm
    for attempt, retryable in ((1, True), (2, False)):  # a requeue (attempt left), then the job's end
        a = await assign(stub)
        assert a.attempt == attempt
        error = pb.JobError(code=f"MODEL_OOM_{attempt}", message=f"attempt {attempt}: " + "out of memory " * 20,
                            retryable=retryable)
        await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=a.attempt, node_id="n1",
                                               lease_token=a.lease_token, error=error))
        assert await redis.object("encoding", fsm) in (b"listpack", b"ziplist")
        job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
        assert job.last_error == error  # whole, the latest one
    assert job.state == pb.JOB_STATE_FAILED


async def test_an_unwatched_job_publishes_nothing(app: App, stub: pb_grpc.SchedulerStub) -> None:
    # Two jobs of one session: one slot, so what Redis publishes for them reaches a subscriber in order.
    unwatched, watched = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(utterance_index=0), spec(utterance_index=1)]))).results]
    async with app.dispatcher.watching(keys.JobKeys.of(unwatched).channel) as quiet, \
            app.dispatcher.watching(keys.JobKeys.of(watched).channel) as heard:
        watch = stub.WatchJob(pb.WatchJobRequest(job_id=watched))
        assert (await watch.read()).version == 1  # it is watched from here on
        a = await assign(stub)
        assert a.job_id == unwatched
        await stub.Complete(pb.CompleteRequest(job_id=unwatched, attempt=a.attempt, node_id="n1",
                                               lease_token=a.lease_token, result=pb.JobResult(text_asr="x")))
        await stub.CancelJob(pb.CancelJobRequest(job_id=watched, reason="enough"))
        assert b'"cancelled"' in await asyncio.wait_for(heard.get(), 10)  # published after the other's changes
        assert quiet.qsize() == 0
        assert (await watch.read()).state == pb.JOB_STATE_CANCELLED
    done = await stub.GetJob(pb.GetJobRequest(job_id=unwatched))
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.version == 3  # (its changes happened)


async def test_a_watch_started_mid_life_sees_what_a_watch_from_the_start_saw(stub: pb_grpc.SchedulerStub) -> None:
    """Read from the record (the submit derived from it, the others stored compactly) or heard as they
    happened: the same events, once each, in order, errors and times included."""
    submitted = (await stub.Submit(pb.SubmitRequest(jobs=[spec(max_attempts=3)]))).results[0]
    job_id = submitted.job_id
    early = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
    first = await early.read()
    created = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).created_at
    expected = pb.JobEvent(job_id=job_id, state=pb.JOB_STATE_QUEUED, version=1, attempt=0, node_id="",
                           event="submit", at=created)
    assert first == expected
    a = await assign(stub)
    await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", leases=[
        pb.JobLease(job_id=job_id, attempt=a.attempt, lease_token=a.lease_token)]))
    await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=a.attempt, node_id="n1", lease_token=a.lease_token,
                                           error=pb.JobError(code="OOM", message="gpu \"7\"\n", retryable=True)))
    late = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
    late_events = [await late.read() for _ in range(4)]  # submit, assign, start, fail: read from the record
    await stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="stop"))
    early_events = [first]
    while (event := await early.read()) is not grpc.aio.EOF:
        early_events.append(event)
    while (event := await late.read()) is not grpc.aio.EOF:
        late_events.append(event)
    assert [e.version for e in early_events] == [1, 2, 3, 4, 5]
    assert [e.event for e in early_events] == ["submit", "assign", "start", "fail", "cancel"]
    assert early_events[3].error == pb.JobError(code="OOM", message="gpu \"7\"\n", retryable=True)
    assert early_events[4].error.code == "LINGUA_CANCELLED" and early_events[4].error.message == "stop"
    assert late_events == early_events
    replay = [e async for e in stub.WatchJob(pb.WatchJobRequest(job_id=job_id))]  # all from the record
    assert replay == early_events


async def test_a_finished_job_an_earlier_version_wrote_is_watched_to_its_end(
        stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """Its record has no state changes (they were in an events list, not read): WatchJob shows its submit
    and its current state, and ends, rather than waiting for changes that will never come."""
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    a = await assign(stub)
    await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=a.attempt, node_id="n1", lease_token=a.lease_token,
                                           result=pb.JobResult(text_asr="x")))
    await redis.hdel(keys.JobKeys.of(job_id).fsm, "h2", "h3")
    job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
    events = [e async for e in stub.WatchJob(pb.WatchJobRequest(job_id=job_id))]
    assert [(e.version, e.event, e.state) for e in events] == [(1, "submit", pb.JOB_STATE_QUEUED),
                                                               (3, "complete", pb.JOB_STATE_SUCCEEDED)]
    assert events[1].at == job.updated_at and events[1].node_id == "n1" and events[1].attempt == 1


async def test_watching_marks_only_a_job_that_may_still_change(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    queued, done = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(utterance_index=0), spec(utterance_index=1)]))).results]
    await stub.CancelJob(pb.CancelJobRequest(job_id=done))
    assert [e.state async for e in stub.WatchJob(pb.WatchJobRequest(job_id=done))][-1] == pb.JOB_STATE_CANCELLED
    await redis.script_flush()  # as after a Redis restart: the mark is loaded again and retried
    watch = stub.WatchJob(pb.WatchJobRequest(job_id=queued))
    await watch.read()
    assert await redis.hget(keys.JobKeys.of(queued).fsm, "w") == b"1"
    assert await redis.hget(keys.JobKeys.of(done).fsm, "w") is None  # read only: nothing will change
    watch.cancel()


async def test_a_queued_record_holds_only_what_says_something(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """No field that is empty or zero while queued (each costs bytes in every queued job's listpack): no
    `att`, `ev`, `updated`, `node`, `tok`, `lease`, `started`, `avoid`, no `pref` without a preferred node;
    GetJob reads their absence as attempt 0, the submit, the creation time, no node and no lease. Long
    names are short (`c` created, `m` max attempts), the digest 16 hex digits."""
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(utterance_index=100, payload=b"", payload_ref="session://s1/100")]))).results[0].job_id
    record = await redis.hgetall(keys.JobKeys.of(job_id).fsm)
    assert set(record) == {b"state", b"ver", b"m", b"dl", b"xto", b"c", b"qs", b"sess", b"utt", b"dg", b"np", b"spec"}
    assert len(record[b"dg"]) == 16
    job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
    assert (job.state, job.version, job.attempt, job.node_id) == (pb.JOB_STATE_QUEUED, 1, 0, "")
    assert job.updated_at == job.created_at and not job.HasField("lease_deadline")
    await stub.CancelJob(pb.CancelJobRequest(job_id=job_id))  # a job never claimed ends without them too
    record = await redis.hgetall(keys.JobKeys.of(job_id).fsm)
    assert not {b"att", b"node", b"tok", b"lease", b"started"} & set(record) and record[b"state"] == b"cancelled"
    # A claimed job's lease says nothing once it finished: 0, not a time (2 bytes instead of 10).
    (done,) = await finished_jobs(stub, [pb.JobResult()])
    assert await redis.hget(keys.JobKeys.of(done).fsm, "lease") == b"0"
    assert not (await stub.GetJob(pb.GetJobRequest(job_id=done))).HasField("lease_deadline")


async def finished_jobs(stub: pb_grpc.SchedulerStub, results: list[pb.JobResult]) -> list[str]:
    """Jobs of session s1 (utterances 0, 1, ...), each completed with its result; their ids."""
    ids = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(utterance_index=i) for i in range(len(results))]))).results]
    for _ in results:
        a = await assign(stub)
        await stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, node_id="n1",
                                               lease_token=a.lease_token, result=results[ids.index(a.job_id)]))
    return ids


async def read_everywhere(stub: pb_grpc.SchedulerStub, ids: list[str]) -> list[list[pb.JobResult]]:
    """Each job's result as GetJob, ListJobs and WatchSession give it."""
    got = [(await stub.GetJob(pb.GetJobRequest(job_id=i))).result for i in ids]
    listed = {j.job_id: j.result for j in (await stub.ListJobs(pb.ListJobsRequest(tenant_id="acme"))).jobs}
    seen: dict[str, pb.JobResult] = {}
    watch = stub.WatchSession(pb.WatchSessionRequest(tenant_id="acme", session_id="s1"))
    while len(seen) < len(ids):
        seen.update((j.job_id, j.result) for j in (await asyncio.wait_for(watch.read(), 10)).jobs)
    watch.cancel()
    return [got, [listed[i] for i in ids], [seen[i] for i in ids]]


async def test_a_short_result_is_kept_in_the_record(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """A result of up to RESULT_PIECES pieces is the record's `r` (in pieces: the record stays a listpack),
    expiring with it: no result key. GetJob, ListJobs and WatchSession read it there, a longer one in its key."""
    short = pb.JobResult(text_asr="ni hao", text_translated="hello", tts_audio_ref="s3://tts/x.opus")
    pieced = pb.JobResult(text_translated="z" * (wire.PIECE * (wire.RESULT_PIECES - 1)))  # several pieces
    long = pb.JobResult(text_translated="y" * (wire.PIECE * wire.RESULT_PIECES))
    empty = pb.JobResult()
    ids = await finished_jobs(stub, [short, pieced, long, empty])
    for job_id in ids[:2] + ids[3:]:
        assert await job_keys(redis, job_id) == {"fsm"} and await redis.hexists(keys.JobKeys.of(job_id).fsm, "r")
    assert await redis.hexists(keys.JobKeys.of(ids[1]).fsm, f"r+{wire.RESULT_PIECES - 1}")
    assert await job_keys(redis, ids[2]) == {"fsm", "result"}
    for job_id in ids:
        assert await redis.object("encoding", keys.JobKeys.of(job_id).fsm) in (b"listpack", b"ziplist")
    for results in await read_everywhere(stub, ids):
        assert results == [short, pieced, long, empty]


async def test_a_repeated_completion_compares_the_result_stored_in_either_place(
        stub: pb_grpc.SchedulerStub) -> None:
    for result in (pb.JobResult(text_asr="x"), pb.JobResult(text_asr="x" * 300)):
        job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=len(result.text_asr))]))).results[0].job_id
        a = await assign(stub)
        request = pb.CompleteRequest(job_id=job_id, attempt=a.attempt, node_id="n1", lease_token=a.lease_token,
                                     result=result)
        await stub.Complete(request)
        assert (await stub.Complete(request)).state == pb.JOB_STATE_SUCCEEDED  # the same result: a repeat
        request.result.text_translated = "other"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Complete(request)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_records_an_earlier_version_wrote_are_read(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """An upgrade meets records of the earlier layout: every field written while queued (empty ones
    included) under its long name, a 32-digit digest, and a result in the result key. A repeat submit finds
    them; they are claimed, completed, failed, retried and read as before."""
    old_result = pb.JobResult(text_asr="from before")
    done = (await finished_jobs(stub, [old_result]))[0]
    jk = keys.JobKeys.of(done)
    r = await redis.hget(jk.fsm, "r")
    await redis.hdel(jk.fsm, "r")  # as the earlier version kept it: in the result key
    await redis.set(jk.result, r, px=await redis.pttl(jk.fsm))
    queued, failing = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(utterance_index=1), spec(utterance_index=2)]))).results]
    for job_id in (queued, failing):
        fsm = keys.JobKeys.of(job_id).fsm
        h = await redis.hgetall(fsm)
        await redis.hdel(fsm, "c", "m")
        await redis.hset(fsm, mapping={"created": h[b"c"], "maxatt": h[b"m"], "att": 0, "ev": "submit",
                                       "updated": h[b"c"], "node": "", "tok": "", "lease": 0, "started": 0,
                                       "pref": "", "avoid": ",", "dg": h[b"dg"] + b"0123456789abcdef"})
    again = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=1)]))).results[0]
    assert (again.job_id, again.created) == (queued, False)  # the 32-digit digest matched
    a = await assign(stub)
    assert a.job_id == queued and a.attempt == 1
    assert (await stub.GetJob(pb.GetJobRequest(job_id=queued))).lease_deadline == a.lease_deadline  # held: shown
    b = await assign(stub)
    await stub.Complete(pb.CompleteRequest(job_id=failing, attempt=1, node_id="n1", lease_token=b.lease_token,
                                           error=pb.JobError(code="BAD", retryable=False)))
    retried = await stub.RetryJob(pb.RetryJobRequest(job_id=failing, max_attempts=5))
    job = await stub.GetJob(pb.GetJobRequest(job_id=failing))
    assert (retried.state, job.attempt, job.max_attempts) == (pb.JOB_STATE_QUEUED, 0, 5)
    assert job.created_at.ToMilliseconds() == int(await redis.hget(keys.JobKeys.of(failing).fsm, "created"))
    c = await assign(stub)  # failed again; a retry keeping the limit keeps the one the last retry set
    await stub.Complete(pb.CompleteRequest(job_id=failing, attempt=1, node_id="n1", lease_token=c.lease_token,
                                           error=pb.JobError(code="BAD", retryable=False)))
    await stub.RetryJob(pb.RetryJobRequest(job_id=failing))
    assert (await stub.GetJob(pb.GetJobRequest(job_id=failing))).max_attempts == 5
    new_result = pb.JobResult(text_asr="from now")
    await stub.Complete(pb.CompleteRequest(job_id=queued, attempt=1, node_id="n1", lease_token=a.lease_token,
                                           result=new_result))
    for results in await read_everywhere(stub, [done, queued]):
        assert results == [old_result, new_result]
    token = (await redis.hget(jk.fsm, "tok")).decode()
    request = pb.CompleteRequest(job_id=done, attempt=1, node_id="n1", lease_token=token, result=old_result)
    assert (await stub.Complete(request)).state == pb.JOB_STATE_SUCCEEDED  # a repeat: the key's result matched


async def test_an_earlier_attempts_start_does_not_bound_a_new_claims_lease(app: App, redis: Any) -> None:
    """`started` is written by the ack only (a claim leaves it): while the job is assigned again, the
    previous attempt's start says nothing, so shortening the new claim's lease ignores it."""
    store = app.store
    (job,) = await store.submit([spec(execution_timeout=Duration(seconds=30))])
    (claim,) = await store.claim("n1", [(job.job_id, "t1")])
    await redis.hset(keys.JobKeys.of(job.job_id).fsm, "started", 1_000)  # an attempt acked long ago
    (touched,) = await store.touch("n1", [Lease(job.job_id, "t1")], mode="shorten", lease_ms=5_000)
    assert touched.lease > 1_000 + 30_000 and touched.lease <= claim.lease
