"""End to end through real gRPC servers on one real Redis: the core flows of the Scheduler service."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import all_keys, pair, spec
from lingua_scheduler.server import keys
from lingua_scheduler.server.app import App
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc


def stub_for(app: App) -> tuple[grpc.aio.Channel, pb_grpc.SchedulerStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, pb_grpc.SchedulerStub(channel)


async def snapshot(redis: Any) -> dict[bytes, bytes]:
    """Every key and its serialized value: equal snapshots mean nothing changed."""
    return {k: await redis.dump(k) for k in await all_keys(redis) if k != keys.INSTANCES.encode()}  # not job data


async def assign_one(stub: pb_grpc.SchedulerStub, node: str = "n1", wait_s: int = 2) -> pb.Assignment:
    reply = await stub.Assign(pb.AssignRequest(node_id=node, pairs=[pair()], max_jobs=1,
                                               wait=Duration(seconds=wait_s)))
    assert len(reply.assignments) == 1
    return reply.assignments[0]


async def test_walkthrough_submit_assign_complete_read(stub: pb_grpc.SchedulerStub) -> None:
    """The README's grpcurl walk-through, through the generated stub."""
    submitted = await stub.Submit(pb.SubmitRequest(jobs=[spec(payload=b"", payload_ref="session://s1/0")]))
    job_id = submitted.results[0].job_id
    assert submitted.results[0].created and submitted.results[0].state == pb.JOB_STATE_QUEUED
    a = await assign_one(stub)
    assert (a.job_id, a.attempt, a.spec.payload_ref) == (job_id, 1, "session://s1/0")
    assert a.lease_token
    done = await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, lease_token=a.lease_token, node_id="n1",
                                                  result=pb.JobResult(
        text_asr="ni hao", text_translated="hello", tts_audio_ref="s3://b/o.opus", tts_format="opus")))
    assert done.state == pb.JOB_STATE_SUCCEEDED
    job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.node_id == "n1" and job.attempt == 1
    assert job.result.text_translated == "hello" and job.spec.session_id == "s1"


async def test_payload_dropped_at_terminal_and_result_kept_for_retention(
        stub: pb_grpc.SchedulerStub, redis: Any, app: App) -> None:
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(payload=b"pcm")]))).results[0].job_id
    jk = keys.JobKeys.of(job_id)
    got = await stub.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))
    assert got.spec.payload == b"pcm" and await redis.ttl(jk.fsm) == -1
    a = await assign_one(stub)
    assert a.spec.payload == b"pcm"
    await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, lease_token=a.lease_token, node_id="n1",
                                           result=pb.JobResult(text_asr="x")))
    assert await redis.exists(jk.payload) == 0
    assert await redis.exists(jk.result) == 0  # a short result is kept in the record (`r`), expiring with it
    retention_s = app.settings.retention_ms / 1000
    ttl = await redis.ttl(jk.fsm)
    assert retention_s - 5 < ttl <= app.settings.default_job_ttl_ms / 1000 + retention_s
    assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).result == pb.JobResult(text_asr="x")


async def test_submit_is_idempotent_across_two_instances(make_app: AppFactory, redis: Any) -> None:
    a, b = await make_app(), await make_app()
    (ca, sa), (cb, sb) = stub_for(a), stub_for(b)
    request = pb.SubmitRequest(jobs=[spec(idempotency_key="req-42")])
    replies = await asyncio.gather(*[(sa if i % 2 else sb).Submit(request) for i in range(50)])
    ids = {r.results[0].job_id for r in replies}
    assert len(ids) == 1
    assert sum(r.results[0].created for r in replies) == 1
    assert len(await all_keys(redis, "lingua:v1:job:*:fsm")) == 1
    # Without a key, tenant + session + utterance + tgt_lang is the identity.
    again = await sa.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=7), spec(utterance_index=7)]))
    assert again.results[0].job_id == again.results[1].job_id
    other = await sb.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=7, tgt_lang="fr")]))
    assert other.results[0].job_id != again.results[0].job_id
    await ca.close()
    await cb.close()


async def test_complete_race_has_one_winner(make_app: AppFactory, redis: Any) -> None:
    a, b = await make_app(), await make_app()
    (ca, sa), (cb, sb) = stub_for(a), stub_for(b)
    for round_ in range(10):
        job_id = (await sa.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=round_)]))).results[0].job_id
        got = await assign_one(sa)
        assert got.job_id == job_id

        async def complete(stub: pb_grpc.SchedulerStub, text: str, job_id: str = job_id,
                           token: str = got.lease_token) -> str:
            try:
                await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, node_id="n1", lease_token=token,
                                                       result=pb.JobResult(text_translated=text)))
                return text
            except grpc.aio.AioRpcError as err:
                assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)
                return ""

        outcomes = await asyncio.gather(complete(sa, "from-a"), complete(sb, "from-b"))
        winners = [o for o in outcomes if o]
        assert len(winners) == 1
        job = await sb.GetJob(pb.GetJobRequest(job_id=job_id))
        assert job.result.text_translated == winners[0] and job.state == pb.JOB_STATE_SUCCEEDED
        assert job.version == 3  # submit, assign, complete: the loser changed nothing
    await ca.close()
    await cb.close()


async def test_foreign_node_and_stale_lease_change_nothing(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    a = await assign_one(stub, "n1")
    before = await snapshot(redis)
    # Another node with the right token, the right node with another token (any attempt number).
    for node, attempt, token in (("n2", 1, a.lease_token), ("n1", 1, "f" * 24), ("n1", 2, "0" * 24)):
        for outcome in (dict(result=pb.JobResult(text_asr="x")), dict(error=pb.JobError(code="OOM", retryable=True))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=attempt, lease_token=token, node_id=node,
                                                       **outcome))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    beat = await stub.Heartbeat(pb.HeartbeatRequest(node_id="n2", leases=[
        pb.JobLease(job_id=job_id, attempt=1, lease_token=a.lease_token)]))
    assert not beat.leases[0].ok and beat.leases[0].error_code == "FAILED_PRECONDITION"
    beat = await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", leases=[
        pb.JobLease(job_id=job_id, attempt=1, lease_token="f" * 24)]))
    assert not beat.leases[0].ok and "stale" in beat.leases[0].error_message
    assert await snapshot(redis) == before


async def test_watch_job_sees_every_change_made_on_another_instance(make_app: AppFactory) -> None:
    a, b = await make_app(), await make_app()
    (ca, sa), (cb, sb) = stub_for(a), stub_for(b)
    job_id = (await sa.Submit(pb.SubmitRequest(jobs=[spec(max_attempts=2)]))).results[0].job_id
    events: list[pb.JobEvent] = []
    first = asyncio.Event()

    async def watch() -> None:
        async for event in sa.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            events.append(event)
            first.set()

    watcher = asyncio.create_task(watch())
    await first.wait()
    # Every change below goes through instance B.
    x = await assign_one(sb, "n1")
    await sb.Heartbeat(pb.HeartbeatRequest(node_id="n1", leases=[
        pb.JobLease(job_id=job_id, attempt=x.attempt, lease_token=x.lease_token)]))
    await sb.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, node_id="n1", lease_token=x.lease_token,
                                         error=pb.JobError(code="OOM", message="gpu", retryable=True)))
    y = await assign_one(sb, "n2", wait_s=5)  # after the retry backoff
    await sb.Complete(pb.CompleteRequest(job_id=job_id, attempt=y.attempt, node_id="n2", lease_token=y.lease_token,
                                         result=pb.JobResult(text_asr="ok")))
    await asyncio.wait_for(watcher, 10)
    S = pb
    assert [e.state for e in events] == [S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING,
                                         S.JOB_STATE_QUEUED, S.JOB_STATE_ASSIGNED, S.JOB_STATE_SUCCEEDED]
    assert [e.version for e in events] == list(range(1, 7))
    assert [e.event for e in events] == ["submit", "assign", "start", "fail", "assign", "complete"]
    assert events[3].error.code == "OOM" and events[4].node_id == "n2" and events[4].attempt == 2
    # Watching a finished job replays its history and ends.
    replay = [e async for e in sb.WatchJob(pb.WatchJobRequest(job_id=job_id))]
    assert [e.version for e in replay] == list(range(1, 7))
    await ca.close()
    await cb.close()


def _past() -> Timestamp:
    ts = Timestamp()
    ts.FromSeconds(int(time.time()) - 10)
    return ts


BIG = b"x" * 1_048_577
JOB = "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZZ"
TOKEN = "ab" * 12
INVALID: list[tuple[str, Any, grpc.StatusCode, str]] = [
    ("Submit", pb.SubmitRequest(), grpc.StatusCode.INVALID_ARGUMENT, "jobs"),
    ("Submit", pb.SubmitRequest(jobs=[spec(tenant_id="")]), grpc.StatusCode.INVALID_ARGUMENT, "jobs[0].tenant_id"),
    ("Submit", pb.SubmitRequest(jobs=[spec(), spec(tenant_id="a b")]), grpc.StatusCode.INVALID_ARGUMENT,
     "jobs[1].tenant_id"),
    ("Submit", pb.SubmitRequest(jobs=[spec(session_id="")]), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
    ("Submit", pb.SubmitRequest(jobs=[spec(utterance_index=-1)]), grpc.StatusCode.INVALID_ARGUMENT,
     "utterance_index"),
    ("Submit", pb.SubmitRequest(jobs=[spec(src_lang="ZH")]), grpc.StatusCode.INVALID_ARGUMENT, "src_lang"),
    ("Submit", pb.SubmitRequest(jobs=[spec(tgt_lang="")]), grpc.StatusCode.INVALID_ARGUMENT, "tgt_lang"),
    ("Submit", pb.SubmitRequest(jobs=[spec(tgt_lang="e{n}")]), grpc.StatusCode.INVALID_ARGUMENT, "tgt_lang"),
    ("Submit", pb.SubmitRequest(jobs=[spec(priority=10)]), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    ("Submit", pb.SubmitRequest(jobs=[spec(max_attempts=-1)]), grpc.StatusCode.INVALID_ARGUMENT, "max_attempts"),
    ("Submit", pb.SubmitRequest(jobs=[spec(deadline=_past())]), grpc.StatusCode.INVALID_ARGUMENT, "deadline"),
    ("Submit", pb.SubmitRequest(jobs=[spec(payload_ref="s3://x")]), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    ("Submit", pb.SubmitRequest(jobs=[spec(payload=b"")]), grpc.StatusCode.INVALID_ARGUMENT, "payload"),
    ("Submit", pb.SubmitRequest(jobs=[spec(payload=b"", payload_ref="no uri")]), grpc.StatusCode.INVALID_ARGUMENT,
     "payload_ref"),
    ("Submit", pb.SubmitRequest(jobs=[spec(payload=BIG)]), grpc.StatusCode.RESOURCE_EXHAUSTED, "jobs[0].payload"),
    ("Submit", pb.SubmitRequest(jobs=[spec(idempotency_key="a b")]), grpc.StatusCode.INVALID_ARGUMENT,
     "idempotency_key"),
    ("Submit", pb.SubmitRequest(jobs=[spec(trace_id="t" * 129)]), grpc.StatusCode.INVALID_ARGUMENT, "trace_id"),
    ("Submit", pb.SubmitRequest(jobs=[spec(execution_timeout=Duration(seconds=-1))]),
     grpc.StatusCode.INVALID_ARGUMENT, "execution_timeout"),
    ("Submit", pb.SubmitRequest(jobs=[spec()] * 501), grpc.StatusCode.RESOURCE_EXHAUSTED, "batch cap"),
    ("GetJob", pb.GetJobRequest(), grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ("GetJob", pb.GetJobRequest(job_id="nope"), grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ("GetJob", pb.GetJobRequest(job_id="zh:en:{9}01J"), grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ("GetJob", pb.GetJobRequest(job_id=JOB), grpc.StatusCode.NOT_FOUND, "not found"),
    ("CancelJob", pb.CancelJobRequest(), grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ("CancelJob", pb.CancelJobRequest(job_id=JOB, reason="r" * 1025), grpc.StatusCode.INVALID_ARGUMENT, "reason"),
    ("CancelJob", pb.CancelJobRequest(job_id=JOB), grpc.StatusCode.NOT_FOUND, "not found"),
    ("Assign", pb.AssignRequest(pairs=[pair()]), grpc.StatusCode.INVALID_ARGUMENT, "node_id"),
    ("Assign", pb.AssignRequest(node_id="n1"), grpc.StatusCode.INVALID_ARGUMENT, "pairs"),
    ("Assign", pb.AssignRequest(node_id="n1", pairs=[pair("zh", "")]), grpc.StatusCode.INVALID_ARGUMENT,
     "pairs[0].tgt_lang"),
    ("Assign", pb.AssignRequest(node_id="n1", pairs=[pair()], max_jobs=101), grpc.StatusCode.INVALID_ARGUMENT,
     "max_jobs"),
    ("Assign", pb.AssignRequest(node_id="n1", pairs=[pair()], wait=Duration(seconds=61)),
     grpc.StatusCode.INVALID_ARGUMENT, "wait"),
    ("Heartbeat", pb.HeartbeatRequest(node_id="n1"), grpc.StatusCode.INVALID_ARGUMENT, "leases"),
    ("Heartbeat", pb.HeartbeatRequest(node_id="n1", leases=[pb.JobLease(job_id=JOB, lease_token=TOKEN)]),
     grpc.StatusCode.INVALID_ARGUMENT, "leases[0].attempt"),
    ("Heartbeat", pb.HeartbeatRequest(node_id="n1", leases=[pb.JobLease(job_id=JOB, attempt=1)]),
     grpc.StatusCode.INVALID_ARGUMENT, "leases[0].lease_token"),
    ("Complete", pb.CompleteRequest(job_id=JOB, attempt=1, node_id="n1", result=pb.JobResult()),
     grpc.StatusCode.INVALID_ARGUMENT, "lease_token"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, attempt=1, node_id="n1", result=pb.JobResult()),
     grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, job_id=JOB, node_id="n1", result=pb.JobResult()),
     grpc.StatusCode.INVALID_ARGUMENT, "attempt"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, job_id=JOB, attempt=1, result=pb.JobResult()),
     grpc.StatusCode.INVALID_ARGUMENT, "node_id"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, job_id=JOB, attempt=1, node_id="n1"), grpc.StatusCode.INVALID_ARGUMENT,
     "outcome"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, job_id=JOB, attempt=1, node_id="n1", error=pb.JobError()),
     grpc.StatusCode.INVALID_ARGUMENT, "error.code"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, job_id=JOB, attempt=1, node_id="n1", error=pb.JobError(code="LINGUA_X")),
     grpc.StatusCode.INVALID_ARGUMENT, "error.code"),
    ("Complete", pb.CompleteRequest(lease_token=TOKEN, job_id=JOB, attempt=1, node_id="n1", result=pb.JobResult(tts_audio=BIG)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "result.tts_audio"),
    ("Complete", pb.CompleteRequest(job_id=JOB, attempt=1, node_id="n1", lease_token=TOKEN, result=pb.JobResult()),
     grpc.StatusCode.NOT_FOUND, "not found"),
]


async def test_invalid_requests_name_the_field_and_change_nothing(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=99)]))  # something to leave untouched
    before = await snapshot(redis)
    for method, request, code, text in INVALID:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, method)(request)
        assert err.value.code() == code, (method, request)
        assert text in (err.value.details() or ""), (method, err.value.details())
    for request, code in ((pb.WatchJobRequest(), grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.WatchJobRequest(job_id=JOB), grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchJob(request):
                pass
        assert err.value.code() == code
    assert await snapshot(redis) == before


async def test_cancel(stub: pb_grpc.SchedulerStub) -> None:
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    job = await stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="user hung up"))
    assert job.state == pb.JOB_STATE_CANCELLED and job.last_error.message == "user hung up"
    again = await stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
    assert again.version == job.version  # a repeat answers the job as it is
    assert (await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair()]))).assignments == []
    done = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=1)]))).results[0].job_id
    a = await assign_one(stub)
    await stub.Complete(pb.CompleteRequest(job_id=done, attempt=a.attempt, lease_token=a.lease_token, node_id="n1",
                                           result=pb.JobResult()))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelJob(pb.CancelJobRequest(job_id=done))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lingua.scheduler.v1.Scheduler"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"lingua.scheduler.v1.Scheduler", "grpc.health.v1.Health"} <= names


async def start_process(settings: Settings) -> tuple[asyncio.subprocess.Process, int]:
    """The real server as its own process (python -m lingua_scheduler.server); returns it and its port."""
    where = ["--redis-cluster", settings.redis_cluster] if settings.redis_cluster else ["--redis-url", settings.redis_url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", *where,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"listening on" in line, line
    return proc, int(line.split(b":")[-1])


async def test_server_process_killed_and_replaced_loses_nothing(settings: Settings, redis: Any) -> None:
    proc, port = await start_process(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        ids = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(
            jobs=[spec(utterance_index=i) for i in range(3)]))).results]
        running = await assign_one(stub)
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", leases=[
            pb.JobLease(job_id=running.job_id, attempt=1, lease_token=running.lease_token)]))
        assigned = await assign_one(stub)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    proc, port = await start_process(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.SchedulerStub(ch)
            states = {i: (await stub.GetJob(pb.GetJobRequest(job_id=i))).state for i in ids}
            assert states[running.job_id] == pb.JOB_STATE_RUNNING
            assert states[assigned.job_id] == pb.JOB_STATE_ASSIGNED
            (queued,) = [i for i in ids if states[i] == pb.JOB_STATE_QUEUED]
            for held in (running, assigned):
                await stub.Complete(pb.CompleteRequest(job_id=held.job_id, attempt=1, node_id="n1",
                                                       lease_token=held.lease_token,
                                                       result=pb.JobResult(text_asr="after restart")))
            last = await assign_one(stub, "n2")
            assert last.job_id == queued
            await stub.Complete(pb.CompleteRequest(job_id=queued, attempt=1, node_id="n2", lease_token=last.lease_token,
                                                   result=pb.JobResult()))
            for i in ids:
                assert (await stub.GetJob(pb.GetJobRequest(job_id=i))).state == pb.JOB_STATE_SUCCEEDED
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


@pytest.mark.single_redis
async def test_ctrl_c_in_a_terminal_leaves_the_embedded_redis_up_until_the_server_has_drained(tmp_path: Any) -> None:
    """A terminal's Ctrl-C is SIGINT to its whole foreground process group: the scheduler drains, and its
    embedded redis-server (a session of its own) is not signalled by it, only stopped by the scheduler after.
    Its log names the partition count in use (on a new, standalone Redis, 1 by default) and ends with `stopped`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)  # a terminal's group
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"listening on" in line, line
    os.killpg(proc.pid, signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err[-2000:]
    lines = err.decode().splitlines()
    assert any("listening on" in x and "1 partition(s)" in x for x in lines), lines
    assert any("--partitions auto: 1, this topology's count for a new deployment" in x for x in lines), lines
    assert lines[-1].endswith("lingua_scheduler: stopped"), lines[-3:]
    log = (tmp_path / "redis.log").read_text()
    assert "Received SIGINT" not in log, log[-2000:]
    assert "Received SIGTERM" in log, log[-2000:]  # stopped by the scheduler, once it had drained


async def test_embedded_redis_keeps_jobs_across_restarts_and_stops_with_the_server(tmp_path: Any) -> None:
    """No Redis URL: the server starts its own redis-server (AOF on) in --data-dir and stops it on exit."""

    async def start() -> tuple[asyncio.subprocess.Process, int]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on" in line, line
        return proc, int(line.split(b":")[-1])

    proc, port = await start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        job_id = (await pb_grpc.SchedulerStub(ch).Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert list(tmp_path.glob("appendonly*")), "AOF files in the data folder"
    assert not (tmp_path / "redis.sock").exists(), "the embedded redis-server stopped with the server"
    proc, port = await start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            job = await pb_grpc.SchedulerStub(ch).GetJob(pb.GetJobRequest(job_id=job_id))
            assert job.state == pb.JOB_STATE_QUEUED
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
