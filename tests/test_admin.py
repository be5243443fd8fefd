"""The admin calls end to end (issue 12 part 4): real schedulers, real node streams (scripts/simnode.py),
one Redis and a Redis Cluster. Each call's effect and its refusals."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import grpc
import pytest
from conftest import AppFactory
from helpers import spec, until, watch_until
from lingua_scheduler.server import keys
from lingua_scheduler.server.app import App
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc
from simnode import Behaviour, SimNode

ZH_EN = [("zh", "en"), ("en", "de")]


def stub_of(channel: grpc.aio.Channel) -> pb_grpc.SchedulerStub:
    return pb_grpc.SchedulerStub(channel)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


def counts(stats: pb.PoolStats) -> dict[str, int]:
    return {pb.JobState.Name(c.state).removeprefix("JOB_STATE_").lower(): c.count for c in stats.jobs}


async def pool_stats(stub: pb_grpc.SchedulerStub, pool: str = "zh:en") -> pb.PoolStats:
    (found,) = (await stub.GetStats(pb.GetStatsRequest(pool=pool))).pools
    return found


async def test_pause_then_submit_dispatches_nothing_and_resume_dispatches_at_once(make_app: AppFactory) -> None:
    # The slow poll never comes within the test: only the resume's message can dispatch the held jobs.
    app = await make_app(poll_interval_ms=60_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        await pause_then_resume(stub_of(channel), channel)


async def pause_then_resume(stub: pb_grpc.SchedulerStub, channel: grpc.aio.Channel) -> None:
    node = await SimNode(channel, "n1", ZH_EN, max_concurrency=8).start()
    try:
        paused = await stub.PausePool(pb.PausePoolRequest(pool="zh:en", reason="model upgrade"))
        assert paused.paused and paused.reason == "model upgrade" and paused.paused_at.seconds > 0
        again = await stub.PausePool(pb.PausePoolRequest(pool="zh:en"))  # idempotent: when and why are kept
        assert (again.paused, again.reason, again.paused_at) == (True, "model upgrade", paused.paused_at)
        held = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
            spec(utterance_index=i) for i in range(3)]))).results]
        # A job of another pool the same idle node serves goes through: dispatch runs, the paused pool waits.
        other = (await stub.Submit(pb.SubmitRequest(jobs=[spec(src_lang="en", tgt_lang="de")]))).results[0].job_id
        await watch_until(stub, other, pb.JOB_STATE_SUCCEEDED)
        assert [r.job_id for r in node.received] == [other]
        stats = await pool_stats(stub)
        assert stats.paused and counts(stats)["queued"] == 3
        assert (stats.paused_reason, stats.paused_at) == ("model upgrade", paused.paused_at)
        # A unary Assign finds nothing in a paused pool either.
        got = await stub.Assign(pb.AssignRequest(node_id="n2", pairs=[pb.LanguagePair(src_lang="zh", tgt_lang="en")],
                                                 max_jobs=3))
        assert list(got.assignments) == []

        resumed = await stub.ResumePool(pb.ResumePoolRequest(pool="zh:en"))
        assert not resumed.paused and not resumed.HasField("paused_at")
        assert not (await stub.ResumePool(pb.ResumePoolRequest(pool="zh:en"))).paused  # idempotent
        stats = await pool_stats(stub)
        assert not stats.paused and stats.paused_reason == "" and not stats.HasField("paused_at")
        for job_id in held:
            await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED, timeout=5)
        assert sorted(r.job_id for r in node.received) == sorted([other, *held])
    finally:
        await node.stop()


async def test_pause_refusals(stub: pb_grpc.SchedulerStub, make_app: AppFactory) -> None:
    for pool in ("", "zh", "zh:zh", "ZH:en", "zh:en:x"):
        code, details = await code_of(stub.PausePool(pb.PausePoolRequest(pool=pool)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "pool" in details, pool
    code, details = await code_of(stub.PausePool(pb.PausePoolRequest(pool="zh:en", reason="x" * 1025)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "reason" in details
    only = await make_app(pools="zh:en")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{only.port}") as ch:
        code, details = await code_of(stub_of(ch).PausePool(pb.PausePoolRequest(pool="en:de")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not served here" in details
    assert not (await pool_stats(stub)).paused  # nothing was paused by the refusals


async def test_a_pool_paused_in_any_partition_is_paused(stub: pb_grpc.SchedulerStub, redis: Any,
                                                        settings: Settings) -> None:
    """Pause and resume write the partitions one by one: a pause that reached only some (cut short) still
    holds those, so the pool shows paused; a resume clears every partition, a pause sets every one."""
    await stub.Submit(pb.SubmitRequest(jobs=[spec()]))  # (the unfiltered GetStats lists pools with jobs)
    await stub.PausePool(pb.PausePoolRequest(pool="zh:en", reason="upgrade"))
    paused = [keys.PartitionKeys.of(tag).paused for tag in keys.partition_tags("zh:en", settings.partitions)]
    await redis.delete(paused[0])  # as if the pause had reached only the other partitions
    stats = await pool_stats(stub)
    assert (stats.paused, stats.paused_reason) == (True, "upgrade")
    (listed,) = [p for p in (await stub.GetStats(pb.GetStatsRequest())).pools if p.pool == "zh:en"]
    assert listed.paused
    again = await stub.PausePool(pb.PausePoolRequest(pool="zh:en"))
    assert (again.paused, again.reason) == (True, "upgrade")
    assert all([await redis.exists(key) for key in paused])
    await redis.delete(paused[0])
    assert not (await stub.ResumePool(pb.ResumePoolRequest(pool="zh:en"))).paused
    assert not any([await redis.exists(key) for key in paused])
    assert not (await pool_stats(stub)).paused


async def test_pause_on_one_instance_holds_the_others(make_app: AppFactory) -> None:
    """The pause lives in Redis and is checked by the claim script: a node on another instance gets
    nothing either, and a resume there dispatches at once (no slow poll within the test)."""
    a, b = await make_app(poll_interval_ms=60_000), await make_app(poll_interval_ms=60_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ca, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as cb:
        node = await SimNode(cb, "n1", ZH_EN).start()
        try:
            await stub_of(ca).PausePool(pb.PausePoolRequest(pool="zh:en"))
            held = (await stub_of(ca).Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
            other = (await stub_of(ca).Submit(pb.SubmitRequest(jobs=[spec(src_lang="en", tgt_lang="de")]))
                     ).results[0].job_id
            await watch_until(stub_of(ca), other, pb.JOB_STATE_SUCCEEDED)
            assert [r.job_id for r in node.received] == [other]
            await stub_of(ca).ResumePool(pb.ResumePoolRequest(pool="zh:en"))
            await watch_until(stub_of(cb), held, pb.JOB_STATE_SUCCEEDED, timeout=5)
        finally:
            await node.stop()


async def test_retry_a_failed_job_runs_again_and_succeeds(stub: pb_grpc.SchedulerStub,
                                                         channel: grpc.aio.Channel) -> None:
    failing = await SimNode(channel, "bad", ZH_EN, behaviour=Behaviour(fatal_rate=1.0)).start()
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(max_attempts=2)]))).results[0].job_id
    await watch_until(stub, job_id, pb.JOB_STATE_FAILED)
    await failing.stop()
    failed = await stub.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))
    assert failed.spec.payload == b"audio"  # kept for a retry
    listed = await stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_FAILED))
    assert [j.job_id for j in listed.jobs] == [job_id]

    retried = await stub.RetryJob(pb.RetryJobRequest(job_id=job_id, reason="model fixed", max_attempts=5))
    assert (retried.state, retried.attempt, retried.max_attempts) == (pb.JOB_STATE_QUEUED, 0, 5)
    assert retried.last_error.code == "SIM_FATAL"  # the last error of any attempt stays
    assert retried.node_id == "" and not retried.HasField("lease_deadline")  # nothing of an attempt that is over
    code, details = await code_of(stub.RetryJob(pb.RetryJobRequest(job_id=job_id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "queued" in details
    assert (await stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_FAILED))).jobs == []

    good = await SimNode(channel, "good", ZH_EN).start()
    try:
        events = await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
        retry = next(e for e in events if e.event == "retry")
        assert retry.state == pb.JOB_STATE_QUEUED and (retry.error.code, retry.error.message) == ("LINGUA_RETRIED", "model fixed")
        assert [r.job_id for r in good.received] == [job_id]
        done = await stub.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))
        assert done.attempt == 1 and not done.spec.payload  # dropped at success
        code, details = await code_of(stub.RetryJob(pb.RetryJobRequest(job_id=job_id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "succeeded" in details
    finally:
        await good.stop()
    code, _ = await code_of(stub.RetryJob(pb.RetryJobRequest(job_id="zh:en:{0}01JDZ000000000000000000000")))
    assert code == grpc.StatusCode.NOT_FOUND
    for bad in (pb.RetryJobRequest(job_id="nope"), pb.RetryJobRequest(job_id=job_id, max_attempts=-1),
                pb.RetryJobRequest(job_id=job_id, reason="x" * 1025)):
        code, _ = await code_of(stub.RetryJob(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_retry_an_expired_job_with_a_new_deadline(stub: pb_grpc.SchedulerStub, channel: grpc.aio.Channel) -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    soon = Timestamp()
    soon.GetCurrentTime()
    soon.FromMilliseconds(soon.ToMilliseconds() + 200)
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(deadline=soon)]))).results[0].job_id
    await watch_until(stub, job_id, pb.JOB_STATE_EXPIRED)
    later = Timestamp()
    later.GetCurrentTime()
    later.FromMilliseconds(later.ToMilliseconds() + 60_000)
    assert (await stub.RetryJob(pb.RetryJobRequest(job_id=job_id, deadline=later))).state == pb.JOB_STATE_QUEUED
    node = await SimNode(channel, "n1", ZH_EN).start()
    try:
        await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
    finally:
        await node.stop()


async def test_cancel_session_cancels_queued_and_running_jobs(stub: pb_grpc.SchedulerStub,
                                                              channel: grpc.aio.Channel) -> None:
    node = await SimNode(channel, "n1", ZH_EN, max_concurrency=1, behaviour=Behaviour(processing_s=lambda: 60)).start()
    try:
        ids = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
            spec(utterance_index=i) for i in range(4)]))).results]
        other = (await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="s2")]))).results[0].job_id
        await stub.CancelJob(pb.CancelJobRequest(job_id=ids[3]))
        await node.wait_for(lambda: len(node.received) == 1)
        running = node.received[0].job_id
        await watch_until(stub, running, pb.JOB_STATE_RUNNING)
        done = await stub.CancelSession(pb.CancelSessionRequest(tenant_id="acme", session_id="s1", reason="hung up"))
        assert sorted(done.cancelled_job_ids) == sorted(ids[:3]) and done.already_finished == 1
        await node.wait_for(lambda: [c.job_id for c in node.cancels] == [running])
        for job_id in ids[:3]:
            job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
            assert job.state == pb.JOB_STATE_CANCELLED and job.last_error.message == "hung up"
        assert (await stub.GetJob(pb.GetJobRequest(job_id=other))).state != pb.JOB_STATE_CANCELLED
        again = await stub.CancelSession(pb.CancelSessionRequest(tenant_id="acme", session_id="s1"))
        assert list(again.cancelled_job_ids) == [] and again.already_finished == 4
    finally:
        await node.stop()
    for bad, field in ((pb.CancelSessionRequest(session_id="s1"), "tenant_id"),
                       (pb.CancelSessionRequest(tenant_id="acme"), "session_id"),
                       (pb.CancelSessionRequest(tenant_id="ac me", session_id="s1"), "tenant_id"),
                       (pb.CancelSessionRequest(tenant_id="acme", session_id="s 1"), "session_id"),
                       (pb.CancelSessionRequest(tenant_id="acme", session_id="s" * 129), "session_id")):
        code, details = await code_of(stub.CancelSession(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details


async def test_drain_node_held_by_another_instance(make_app: AppFactory) -> None:
    a, b = await make_app(), await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ca, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as cb:
        node = await SimNode(ca, "n1", ZH_EN, behaviour=Behaviour(processing_s=lambda: 0.3)).start()
        job_id = (await stub_of(cb).Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
        await node.wait_for(lambda: len(node.received) == 1)
        info = await stub_of(cb).DrainNode(pb.DrainNodeRequest(node_id="n1"))  # asked on the other instance
        assert info.node_id == "n1" and info.draining and info.instance_id == a.settings.instance_id
        await node.wait_for(lambda: node.drained)  # the node is told (so it does not reconnect for more)
        await watch_until(stub_of(cb), job_id, pb.JOB_STATE_SUCCEEDED)  # it finishes what it holds
        await node.wait_for(lambda: node.closed.is_set())  # then its stream closes, OK
        assert node.status == grpc.StatusCode.OK
        later = (await stub_of(cb).Submit(pb.SubmitRequest(jobs=[spec(utterance_index=1)]))).results[0].job_id
        assert (await stub_of(cb).GetJob(pb.GetJobRequest(job_id=later))).state == pb.JOB_STATE_QUEUED
        assert [r.job_id for r in node.received] == [job_id]
        await node.stop()
        # The request is stored with the node's entry: back on the other instance (within the entry's
        # time to live), without asking to drain, the node is drained again and gets nothing.
        again = await SimNode(cb, "n1", ZH_EN).start()
        await again.wait_for(lambda: again.drained)
        await again.wait_for(lambda: again.closed.is_set())
        assert again.status == grpc.StatusCode.OK and again.received == []
        await again.stop()
        code, _ = await code_of(stub_of(cb).DrainNode(pb.DrainNodeRequest(node_id="ghost")))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = await code_of(stub_of(cb).DrainNode(pb.DrainNodeRequest()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_jobs_pages_newest_first_and_filters(stub: pb_grpc.SchedulerStub) -> None:
    made = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(session_id=f"s{i % 2}", utterance_index=i) for i in range(7)]))).results]
    made += [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(tenant_id="beta", src_lang="en", tgt_lang="de", utterance_index=i) for i in range(3)]))).results]

    async def every(**filters: Any) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            page = await stub.ListJobs(pb.ListJobsRequest(page_size=3, page_token=token, **filters))
            assert len(page.jobs) <= 3
            out += [j.job_id for j in page.jobs]
            token = page.next_page_token
            if not token:
                return out

    def newest_first(ids: list[str]) -> list[str]:
        return sorted(ids, key=lambda j: j[-26:], reverse=True)

    assert await every() == newest_first(made)
    assert await every(pool="en:de") == newest_first(made[7:])
    assert await every(tenant_id="beta") == newest_first(made[7:])
    assert await every(tenant_id="acme", session_id="s1") == newest_first(made[1:7:2])
    assert await every(state=pb.JOB_STATE_QUEUED, pool="zh:en") == newest_first(made[:7])
    await stub.CancelJob(pb.CancelJobRequest(job_id=made[2]))
    assert await every(state=pb.JOB_STATE_CANCELLED) == [made[2]]
    assert await every(state=pb.JOB_STATE_CANCELLED, tenant_id="beta") == []
    first = await stub.ListJobs(pb.ListJobsRequest())
    assert len(first.jobs) == 10 and first.next_page_token == "" and not first.jobs[0].spec.payload
    for bad, field in ((pb.ListJobsRequest(page_size=501), "page_size"), (pb.ListJobsRequest(page_size=-1), "page_size"),
                       (pb.ListJobsRequest(session_id="s1"), "tenant_id"), (pb.ListJobsRequest(pool="zh"), "pool"),
                       (pb.ListJobsRequest(page_token="!!"), "page_token"), (pb.ListJobsRequest(state=42), "state"),
                       (pb.ListJobsRequest(tenant_id="a" * 65), "tenant_id"),
                       (pb.ListJobsRequest(tenant_id="ac/me"), "tenant_id"),
                       (pb.ListJobsRequest(tenant_id="acme", session_id="s\n1"), "session_id")):
        code, details = await code_of(stub.ListJobs(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, bad


async def test_list_jobs_reads_indexes_an_earlier_version_wrote(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    """Before forget timers, each entry had an expiry marker '~<time> <member>' beside it and each key a
    sentinel '}' (both sort after every member): ListJobs still lists the members only, and drops the
    entry of a job that is gone."""
    made = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
        spec(utterance_index=i) for i in range(2)]))).results]
    tag = keys.tag_of(made[0])
    gone = tag + "01JDZ000000000000000000000"  # an old job whose record expired
    for key in (keys.PartitionKeys.of(tag).jobs, keys.tenant_jobs(keys.shard_of_tag(tag), "acme")):
        old = [f"{j[-26:]} {j[:-26]}" for j in [*made, gone]]
        await redis.zadd(key, {m: 0 for m in [*old, *(f"~01JDZ00000 {m}" for m in old), "}"]})
        await redis.pexpire(key, 3_600_000)
    for filters in ({}, {"tenant_id": "acme"}, {"pool": "zh:en"}):
        listed = await stub.ListJobs(pb.ListJobsRequest(**filters))
        assert [j.job_id for j in listed.jobs] == sorted(made, reverse=True) and not listed.next_page_token, filters
    assert await redis.zscore(keys.PartitionKeys.of(tag).jobs, f"{gone[-26:]} {tag}") is None


async def test_get_stats_and_the_pool_gauges(make_app: AppFactory) -> None:
    app: App = await make_app(http_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = stub_of(ch)
        node = await SimNode(ch, "n1", ZH_EN, max_concurrency=4).start()
        try:
            ids = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[
                spec(utterance_index=i) for i in range(4)]))).results]
            for job_id in ids:
                await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
            await stub.PausePool(pb.PausePoolRequest(pool="zh:en"))
            queued = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=9)]))).results[0].job_id
            await stub.CancelJob(pb.CancelJobRequest(job_id=(await stub.Submit(pb.SubmitRequest(jobs=[
                spec(utterance_index=10)]))).results[0].job_id))

            async def settled() -> bool:
                s = await pool_stats(stub)
                return counts(s) == {"queued": 1, "assigned": 0, "running": 0, "succeeded": 4, "failed": 0,
                                     "cancelled": 1, "expired": 0} and s.nodes == 1
            await until(settled, what="GetStats to show what was done")
            s = await pool_stats(stub)
            assert (s.pool, s.nodes, s.capacity, s.in_flight, s.paused) == ("zh:en", 1, 4, 0, True)
            assert s.submitted_per_second == pytest.approx(6 / 60, rel=0.2)
            assert s.finished_per_second == pytest.approx(5 / 60, rel=0.2)
            assert s.oldest_queued_age.ToMilliseconds() >= 0
            every = await stub.GetStats(pb.GetStatsRequest())
            assert {p.pool for p in every.pools} == {"zh:en", "en:de"} and every.as_of.seconds > 0
            assert (await pool_stats(stub, "fr:en")).jobs[0].count == 0  # a pool with nothing: zeros
            code, _ = await code_of(stub.GetStats(pb.GetStatsRequest(pool="zh")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT

            assert app.http is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{app.http.port}/metrics") as reply:
                    text = await reply.text()

            def gauge(name: str, **labels: str) -> float:
                inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
                found = re.search(rf"^{name}{{{re.escape(inner)}}} (\S+)$", text, re.M)
                assert found, f"{name}{{{inner}}} not on /metrics"
                return float(found.group(1))

            assert gauge("lingua_queue_depth", pool="zh:en") == 1
            assert gauge("lingua_jobs_in_state", pool="zh:en", state="succeeded") == 4
            assert gauge("lingua_jobs_in_state", pool="zh:en", state="cancelled") == 1
            assert gauge("lingua_nodes", pool="zh:en") == 1
            assert gauge("lingua_pool_capacity", pool="zh:en") == 4
            assert gauge("lingua_pool_in_flight", pool="zh:en") == 0
            assert gauge("lingua_pool_paused", pool="zh:en") == 1 and gauge("lingua_pool_paused", pool="en:de") == 0
            assert gauge("lingua_queue_oldest_age_seconds", pool="zh:en") > 0  # its one queued job waits
            assert gauge("lingua_queue_oldest_age_seconds", pool="en:de") == 0
            await stub.ResumePool(pb.ResumePoolRequest(pool="zh:en"))
            await watch_until(stub, queued, pb.JOB_STATE_SUCCEEDED)
        finally:
            await node.stop()
