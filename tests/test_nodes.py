"""Nodes on real NodeSession streams: pools, leases, retries, affinity, cancels, bad messages."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.duration_pb2 import Duration
from helpers import pair, spec, until, watch_until
from lingua_scheduler.server import keys
from lingua_scheduler.server.app import App
from lingua_sdk import pb, pb_grpc
from simnode import Behaviour, SimNode


@pytest.fixture
async def ch(app: App) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


@pytest.fixture
def sched(ch: grpc.aio.Channel) -> pb_grpc.SchedulerStub:
    return pb_grpc.SchedulerStub(ch)


async def node(ch: grpc.aio.Channel, node_id: str, pairs: list[tuple[str, str]] | None = None, **kw: Any) -> SimNode:
    return await SimNode(ch, node_id, pairs or [("zh", "en")], **kw).start()


async def submit(stub: pb_grpc.SchedulerStub, **overrides: Any) -> str:
    return (await stub.Submit(pb.SubmitRequest(jobs=[spec(**overrides)]))).results[0].job_id


async def test_200_jobs_over_3_pools_and_4_nodes(ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    pools = [("zh", "en"), ("en", "zh"), ("ja", "en")]
    rng = random.Random(7)
    nodes = [
        await node(ch, "n-zh-en", [pools[0]], max_concurrency=3),
        await node(ch, "n-two", [pools[0], pools[1]], max_concurrency=2),
        await node(ch, "n-en-zh", [pools[1]], max_concurrency=3),
        await node(ch, "n-ja-en", [pools[2]], max_concurrency=2,
                   behaviour=Behaviour(processing_s=lambda: rng.uniform(0, 0.004))),
    ]
    jobs = [spec(session_id=f"s{i % 17}", utterance_index=i, src_lang=pools[i % 3][0], tgt_lang=pools[i % 3][1])
            for i in range(200)]
    replies = [r for b in range(0, 200, 50) for r in (await sched.Submit(pb.SubmitRequest(jobs=jobs[b:b + 50]))).results]
    for r in replies:
        job = (await watch_until(sched, r.job_id, pb.JOB_STATE_SUCCEEDED))[-1]
        served = {n.node_id: n.pairs for n in nodes}[job.node_id]
        got = await sched.GetJob(pb.GetJobRequest(job_id=r.job_id))
        assert (got.spec.src_lang, got.spec.tgt_lang) in served
        assert got.result.extra["node"] == job.node_id
    assert all(n.received for n in nodes) and not any(n.refused for n in nodes)
    for n in nodes:
        await n.stop()


async def test_killed_node_job_is_finished_elsewhere_and_late_result_refused(
        ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub, redis: Any) -> None:
    slow = await node(ch, "doomed", behaviour=Behaviour(processing_s=lambda: 30))
    job_id = await submit(sched)
    await slow.wait_for(lambda: bool(slow.received))
    await watch_until(sched, job_id, pb.JOB_STATE_RUNNING)
    await slow.crash()
    rescuer = await node(ch, "rescuer")
    events = await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED)
    assert events[-1].node_id == "rescuer" and events[-1].attempt == 2
    assert any(e.error.code == "LINGUA_NODE_LOST" or e.error.code == "LINGUA_LEASE_EXPIRED" for e in events)
    before = await redis.hgetall(keys.JobKeys.of(job_id).fsm)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sched.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, node_id="doomed",
                                                lease_token=slow.received[0].lease_token,
                                                result=pb.JobResult(text_asr="too late")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await redis.hgetall(keys.JobKeys.of(job_id).fsm) == before
    assert (await sched.GetJob(pb.GetJobRequest(job_id=job_id))).result.extra["node"] == "rescuer"
    await rescuer.stop()


async def test_silent_node_loses_its_job_after_the_lease(ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    silent = await node(ch, "silent", behaviour=Behaviour(processing_s=lambda: 30, heartbeat=False))
    job_id = await submit(sched)
    await silent.wait_for(lambda: bool(silent.received))
    await silent.wait_for(lambda: any(c.job_id == job_id for c in silent.cancels), 10)
    helper = await node(ch, "helper")
    events = await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED)
    lost = [e for e in events if e.event == "lease_expired"]
    assert lost and lost[0].node_id == "silent" and lost[0].error.code == "LINGUA_LEASE_EXPIRED"
    assert events[-1].node_id == "helper"
    await helper.stop()
    await silent.stop()


async def test_retry_with_backoff_then_failed_with_last_error(ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub,
                                                              app: App) -> None:
    flaky = await node(ch, "flaky", behaviour=Behaviour(fail_rate=1.0))
    job_id = await submit(sched, max_attempts=3)
    events = await watch_until(sched, job_id, pb.JOB_STATE_FAILED)
    assert [e.event for e in events] == ["submit", "assign", "start", "fail", "assign", "start", "fail",
                                         "assign", "start", "fail"]
    assert events[-1].attempt == 3 and events[-1].error.code == "SIM_FAIL"
    # The second and third assignments waited at least the backoff after each failure.
    for fail, reassign, backoff in ((events[3], events[4], 50), (events[6], events[7], 100)):
        assert reassign.at.ToMilliseconds() - fail.at.ToMilliseconds() >= backoff
    job = await sched.GetJob(pb.GetJobRequest(job_id=job_id))
    assert job.state == pb.JOB_STATE_FAILED and job.last_error.code == "SIM_FAIL" and job.attempt == 3
    fatal_node = await node(ch, "fatal", [("en", "de")], behaviour=Behaviour(fatal_rate=1.0))
    fatal = await submit(sched, src_lang="en", tgt_lang="de", max_attempts=3)
    events = await watch_until(sched, fatal, pb.JOB_STATE_FAILED)
    assert events[-1].attempt == 1 and events[-1].error.code == "SIM_FATAL"
    await flaky.stop()
    await fatal_node.stop()


async def test_session_affinity_holds_and_moves_when_the_node_leaves(
        ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    a, b = await node(ch, "a", max_concurrency=4), await node(ch, "b", max_concurrency=4)
    first = await submit(sched, session_id="talk", utterance_index=0)
    owner_id = (await watch_until(sched, first, pb.JOB_STATE_SUCCEEDED))[-1].node_id
    owner, other = (a, b) if owner_id == "a" else (b, a)
    for i in range(1, 11):
        job_id = await submit(sched, session_id="talk", utterance_index=i)
        assert (await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED))[-1].node_id == owner.node_id
    await owner.stop()
    moved = [await submit(sched, session_id="talk", utterance_index=i) for i in (11, 12, 13)]
    for job_id in moved:
        assert (await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED))[-1].node_id == other.node_id
    await other.stop()


async def test_cancel_reaches_the_node_on_another_instance(make_app: AppFactory) -> None:
    a, b = await make_app(), await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as cha, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as chb:
        worker = await node(cha, "w", behaviour=Behaviour(processing_s=lambda: 30))
        sb = pb_grpc.SchedulerStub(chb)
        job_id = await submit(sb)
        await watch_until(sb, job_id, pb.JOB_STATE_RUNNING)
        await sb.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="caller left"))
        await worker.wait_for(lambda: any(c.job_id == job_id for c in worker.cancels))
        assert job_id not in worker.working
        await worker.stop()


async def test_a_node_cannot_touch_another_nodes_job_or_an_old_attempt(
        ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub, redis: Any) -> None:
    holder = await node(ch, "holder", behaviour=Behaviour(processing_s=lambda: 30))
    job_id = await submit(sched)
    await watch_until(sched, job_id, pb.JOB_STATE_RUNNING)
    thief = await node(ch, "thief", [("xx", "yy")])
    before = await redis.hgetall(keys.JobKeys.of(job_id).fsm)
    await holder.wait_for(lambda: bool(holder.received))
    mine = holder.received[0].lease
    stale = pb.JobLease(job_id=job_id, attempt=1, lease_token="0" * 24)  # right attempt, another claim's token
    thief.send(pb.NodeMessage(acks=[mine], heartbeats=[mine]))
    await thief.wait_for(lambda: len(thief.refused) >= 2)
    thief.send(pb.NodeMessage(completions=[pb.Completion(lease=mine, result=pb.JobResult(text_asr="stolen"))],
                              unavailable=[mine]))
    await thief.wait_for(lambda: len(thief.refused) >= 4)
    assert {r.error_code for r in thief.refused} == {"FAILED_PRECONDITION"}
    holder.send(pb.NodeMessage(heartbeats=[stale]))
    await holder.wait_for(lambda: len(holder.refused) >= 1)
    holder.send(pb.NodeMessage(completions=[pb.Completion(lease=stale, result=pb.JobResult())]))
    await holder.wait_for(lambda: len(holder.refused) >= 2)
    assert all("stale" in r.error_message for r in holder.refused)
    after = await redis.hgetall(keys.JobKeys.of(job_id).fsm)
    assert {k: v for k, v in after.items() if k != b"lease"} == {k: v for k, v in before.items() if k != b"lease"}
    await holder.stop()
    await thief.stop()


async def test_malformed_node_messages_do_not_disturb_other_nodes(
        ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    good = await node(ch, "good")
    # A stream whose first message does not register is refused with a status, alone.
    call = sched.NodeSession()
    await call.write(pb.NodeMessage(acks=[pb.JobLease(job_id="x", attempt=1)]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "register" in (err.value.details() or "")
    for bad in (pb.Register(node_id="", max_concurrency=1, pairs=[pair()]),
                pb.Register(node_id="n", max_concurrency=0, pairs=[pair()]),
                pb.Register(node_id="n", max_concurrency=1),
                pb.Register(node_id="n", max_concurrency=1, pairs=[pair("ZH", "en")])):
        call = sched.NodeSession()
        await call.write(pb.NodeMessage(register=bad))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # On a registered stream, bad entries are refused one by one and the stream stays open.
    messy = await node(ch, "messy", [("xx", "yy")])
    messy.send(pb.NodeMessage(acks=[pb.JobLease(job_id="garbage", attempt=1), pb.JobLease(job_id="zh:en:{0}01J")],
                              completions=[pb.Completion(lease=pb.JobLease(job_id="zh:en:{0}01J", attempt=1))]))
    await messy.wait_for(lambda: len(messy.refused) >= 3)
    assert {r.error_code for r in messy.refused} == {"INVALID_ARGUMENT"}
    messy.send(pb.NodeMessage(register=pb.Register(node_id="messy", max_concurrency=1)))
    await messy.wait_for(lambda: bool(messy.errors))
    assert "only the first message" in messy.errors[0] and not messy.closed.is_set()
    job_id = await submit(sched)
    assert (await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED))[-1].node_id == "good"
    await good.stop()
    await messy.stop()


async def test_nodes_on_instance_a_get_jobs_submitted_on_b(make_app: AppFactory) -> None:
    a, b = await make_app(), await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as cha, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as chb:
        workers = [await node(cha, f"w{i}") for i in range(2)]
        sb = pb_grpc.SchedulerStub(chb)
        ids = [r.job_id for r in (await sb.Submit(pb.SubmitRequest(
            jobs=[spec(session_id=f"s{i}") for i in range(20)]))).results]
        for job_id in ids:
            assert (await watch_until(sb, job_id, pb.JOB_STATE_SUCCEEDED))[-1].node_id in ("w0", "w1")
        for w in workers:
            await w.stop()


async def test_newest_stream_of_a_node_id_wins_and_resumes_its_jobs(
        make_app: AppFactory) -> None:
    a, b = await make_app(), await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as cha, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as chb:
        sb = pb_grpc.SchedulerStub(chb)
        old = await node(cha, "twin", behaviour=Behaviour(processing_s=lambda: 30))
        job_id = await submit(sb)
        await watch_until(sb, job_id, pb.JOB_STATE_RUNNING)
        new = await node(chb, "twin")
        await old.wait_for(lambda: old.closed.is_set())
        assert any("replaced" in e for e in old.errors)
        # The new stream carries on with the job: same node id, same attempt.
        new.send(pb.NodeMessage(completions=[pb.Completion(lease=old.received[0].lease,
                                                           result=pb.JobResult(text_asr="resumed"))]))
        events = await watch_until(sb, job_id, pb.JOB_STATE_SUCCEEDED)
        assert events[-1].attempt == 1 and events[-1].node_id == "twin"
        listed = (await sb.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.node_id, n.instance_id) for n in listed] == [("twin", b.settings.instance_id)]
        await new.stop()


async def test_execution_timeout_takes_back_a_job_that_keeps_heartbeating(
        ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    stuck = await node(ch, "stuck", behaviour=Behaviour(processing_s=lambda: 30))
    job_id = await submit(sched, execution_timeout=Duration(nanos=400_000_000), max_attempts=1)
    events = await watch_until(sched, job_id, pb.JOB_STATE_FAILED)
    assert events[-1].event == "lease_expired" and events[-1].node_id == "stuck"
    started, ended = events[-2].at.ToMilliseconds(), events[-1].at.ToMilliseconds()
    assert 400 <= ended - started < 400 + 1_000  # the lease (1 s here) never reached past the timeout
    await stuck.wait_for(lambda: any(c.job_id == job_id for c in stuck.cancels))
    await stuck.stop()


async def test_deadline_expires_a_queued_job(sched: pb_grpc.SchedulerStub) -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    soon = Timestamp()
    soon.FromMilliseconds(int(asyncio.get_running_loop().time() * 0) + __import__("time").time_ns() // 1_000_000 + 300)
    job_id = await submit(sched, deadline=soon, src_lang="fi", tgt_lang="sv")
    events = await watch_until(sched, job_id, pb.JOB_STATE_EXPIRED)
    assert events[-1].error.code == "LINGUA_DEADLINE_EXCEEDED"


async def test_model_unavailable_sends_the_job_elsewhere(make_app: Any) -> None:
    # An avoid window long enough for the second node to register on a loaded CI machine: shorter, the
    # job may go back to "no-model" first (as designed: after the window any node may take it).
    app = await make_app(avoid_ms=1_500)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        await _model_unavailable(ch, pb_grpc.SchedulerStub(ch))


async def _model_unavailable(ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    without = await node(ch, "no-model", behaviour=Behaviour(unavailable_rate=1.0))
    job_id = await submit(sched)
    await without.wait_for(lambda: bool(without.received))
    with_model = await node(ch, "has-model")
    events = await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED)
    assert events[-1].node_id == "has-model"
    assert [e.node_id for e in events if e.event == "assign"].count("no-model") == 1
    assert any(e.error.code == "LINGUA_MODEL_UNAVAILABLE" for e in events)
    # Where no node has the model, the job keeps away from the node for a while, then fails for good.
    await with_model.stop()
    lonely = await submit(sched, session_id="other", max_attempts=2)
    events = await watch_until(sched, lonely, pb.JOB_STATE_FAILED)
    assert [e.node_id for e in events if e.event == "assign"] == ["no-model", "no-model"]
    assert events[-1].error.code == "LINGUA_MODEL_UNAVAILABLE" and events[-1].attempt == 2
    retry_gap = events[3].at.ToMilliseconds() - events[2].at.ToMilliseconds()
    assert retry_gap >= 1_500  # the avoid window
    await without.stop()


async def test_drain_finishes_work_then_closes(ch: grpc.aio.Channel, sched: pb_grpc.SchedulerStub) -> None:
    worker = await node(ch, "drainer", behaviour=Behaviour(processing_s=lambda: 0.2))
    job_id = await submit(sched)
    await worker.wait_for(lambda: bool(worker.received))
    await worker.drain()
    await worker.wait_for(lambda: worker.closed.is_set())
    assert worker.status == grpc.StatusCode.OK
    assert (await watch_until(sched, job_id, pb.JOB_STATE_SUCCEEDED))[-1].node_id == "drainer"
    await worker.stop()


async def test_a_node_that_reconnects_with_its_jobs_resumes_them(
        make_app: AppFactory, redis: Any) -> None:
    a, b = await make_app(), await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as cha, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as chb:
        sb = pb_grpc.SchedulerStub(chb)
        first = await node(cha, "phoenix", behaviour=Behaviour(processing_s=lambda: 30))
        job_id = await submit(sb)
        await watch_until(sb, job_id, pb.JOB_STATE_RUNNING)
        await first.crash()  # the stream drops; the node process keeps its work
        fsm = keys.JobKeys.of(job_id).fsm
        shrunk = asyncio.Event()

        async def lease_shrinks() -> None:  # instance A shrinks the lease to the stream grace (300 ms)
            while True:
                t, lease = await redis.time(), int(await redis.hget(fsm, "lease"))
                if lease - (t[0] * 1000 + t[1] // 1000) <= a.settings.stream_grace_ms:
                    return shrunk.set()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(lease_shrinks(), 5)
        held = first.received[0].lease
        again = await SimNode(chb, "phoenix", [("zh", "en")]).start(holding=[held])

        async def extended() -> bool:  # by the resume (the register's answer may come before it)
            t, lease = await redis.time(), int(await redis.hget(fsm, "lease"))
            return lease - (t[0] * 1000 + t[1] // 1000) > a.settings.stream_grace_ms

        await until(extended, timeout=5, what="the resumed lease extended past the stream grace")
        again.send(pb.NodeMessage(completions=[pb.Completion(lease=held,
                                                             result=pb.JobResult(text_asr="resumed"))]))
        events = await watch_until(sb, job_id, pb.JOB_STATE_SUCCEEDED)
        assert [e.event for e in events] == ["submit", "assign", "start", "complete"]  # never requeued
        assert events[-1].node_id == "phoenix" and events[-1].attempt == 1 and not again.refused
        await again.stop()


async def test_a_draining_node_that_reconnects_holding_nothing_is_let_go(sched: pb_grpc.SchedulerStub) -> None:
    """drain on the register message, nothing held: the stream ends at once (no new work, nothing to wait for)."""
    call = sched.NodeSession()
    await call.write(pb.NodeMessage(register=pb.Register(node_id="leaving", max_concurrency=1, pairs=[pair()]),
                                    drain=True))
    assert (await call.read()).HasField("registered")
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
