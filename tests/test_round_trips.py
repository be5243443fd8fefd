"""The hot paths cost one Redis round trip: watched with MONITOR on the private Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import pair, spec, until
from lingua_scheduler.server import keys
from lingua_scheduler.server.dispatch import Dispatcher
from lingua_scheduler.server.registry import NodeEntry, Registry
from lingua_scheduler.server.session import BACKSTOP_S
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Store
from lingua_sdk import pb, pb_grpc

SETUP = {"HELLO", "CLIENT", "SELECT", "ECHO", "PING"}  # connection setup and health checks


class Monitor:
    """Commands Redis executes, split into those sent by clients and those run inside Lua scripts."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.client: Counter[str] = Counter()
        self.lua: Counter[str] = Counter()
        self.shas: Counter[str] = Counter()  # clients' EVALSHAs by script SHA
        self.changed = asyncio.Event()

    async def seen(self, name: str, count: int) -> None:
        """Wait until clients sent `count` commands `name` (an event, not a guess)."""
        while self.client[name] < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[Monitor]:
        self.client.clear()
        self.lua.clear()
        self.shas.clear()
        marker = "lingua-monitor-end"
        async with self.redis.monitor() as m:
            async def consume() -> None:
                async for cmd in m.listen():
                    name = cmd["command"].split(" ", 1)[0].upper()
                    if marker in cmd["command"]:
                        return
                    if name in SETUP:
                        continue
                    (self.lua if cmd.get("client_type") == "lua" else self.client)[name] += 1
                    if name == "EVALSHA" and cmd.get("client_type") != "lua":
                        self.shas[cmd["command"].split(" ", 2)[1]] += 1
                    self.changed.set()
            task = asyncio.create_task(consume())
            await asyncio.sleep(0)
            yield self
            await self.redis.echo(marker)
            await asyncio.wait_for(task, 5)


@pytest.mark.single_redis
async def test_commands_per_rpc(make_app: AppFactory, redis: Any) -> None:
    app = await make_app(sweep_interval_ms=600_000, poll_interval_ms=600_000)
    mon = Monitor(redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=100)]))  # scripts loaded
        async with mon.watch():
            job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
        assert mon.client == Counter(EVALSHA=1), mon.client
        async with mon.watch():
            await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=i) for i in range(1, 11)]))
        assert mon.client == Counter(EVALSHA=1), mon.client  # one call for the jobs of a partition
        # Per job its record and payload; one command per key for the rest, one wake-up message for all.
        assert mon.lua["HSET"] == 10 and mon.lua["SET"] == 10 and mon.lua["PUBLISH"] == 1, mon.lua
        assert mon.lua["ZADD"] <= 7 and sum(mon.lua.values()) <= 20 + 14, mon.lua

        # A waiting Assign is woken by the submit's notification and claims the named job directly.
        async with mon.watch():
            waiting = asyncio.ensure_future(stub.Assign(pb.AssignRequest(
                node_id="n2", pairs=[pair("en", "de")], max_jobs=1, wait=Duration(seconds=5))))
            await mon.seen("ZRANGE", app.settings.partitions)  # it found nothing and waits
        async with mon.watch():
            woken = (await stub.Submit(pb.SubmitRequest(jobs=[spec(src_lang="en", tgt_lang="de")]))).results[0]
            got = await waiting
        assert got.assignments[0].job_id == woken.job_id
        assert mon.client == Counter(EVALSHA=2), mon.client  # submit, claim (a new pool costs nothing more)

        async with mon.watch():
            await stub.Heartbeat(pb.HeartbeatRequest(node_id="n2", leases=[
                pb.JobLease(job_id=woken.job_id, attempt=1, lease_token=got.assignments[0].lease_token)]))
        assert mon.client == Counter(EVALSHA=1), mon.client
        async with mon.watch():
            await stub.Complete(pb.CompleteRequest(job_id=woken.job_id, attempt=1, node_id="n2",
                                                   lease_token=got.assignments[0].lease_token, result=pb.JobResult()))
        assert mon.client == Counter(EVALSHA=1), mon.client
        async with mon.watch():
            await stub.GetJob(pb.GetJobRequest(job_id=job_id))
        assert mon.client == Counter(HGETALL=1), mon.client  # the record (spec in it)
        async with mon.watch():
            await stub.GetJob(pb.GetJobRequest(job_id=woken.job_id))
        assert mon.client == Counter(HGETALL=1), mon.client  # a short result is in the record too
        # A cold Assign (no notification) peeks every partition of the pool in one pipeline, then claims.
        async with mon.watch():
            await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair()], max_jobs=1))
        assert mon.client == Counter(ZRANGE=app.settings.partitions, EVALSHA=1), mon.client


@pytest.mark.single_redis
async def test_admin_calls_round_trips(make_app: AppFactory, redis: Any) -> None:
    """CancelSession reads the session's index, then its jobs' records (one pipeline), then cancels them
    all (one finish_job call: a session's jobs share a shard); GetStats within a second of the last read
    costs Redis nothing (cached snapshot); a ListJobs filter on FAILED reads only the failed jobs' index."""
    app = await make_app(sweep_interval_ms=600_000, poll_interval_ms=600_000)
    mon = Monitor(redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=i) for i in range(20)]))
        async with mon.watch():
            done = await stub.CancelSession(pb.CancelSessionRequest(tenant_id="acme", session_id="s1"))
        assert len(done.cancelled_job_ids) == 20
        assert mon.client == Counter(ZRANGE=1, HGETALL=20, EVALSHA=1), mon.client
        assert mon.lua["PUBLISH"] == 20 and mon.lua["TIME"] == 1, mon.lua  # an announcement per job
        await stub.GetStats(pb.GetStatsRequest())
        async with mon.watch():
            await stub.GetStats(pb.GetStatsRequest())
        assert mon.client == Counter(), mon.client
        async with mon.watch():
            listed = await stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_FAILED))
        assert list(listed.jobs) == []
        # One (empty) failed-jobs index per shard, nothing else: the 20 cancelled jobs are not read.
        assert mon.client == Counter(ZREVRANGEBYLEX=app.settings.partitions), mon.client


@pytest.mark.single_redis
async def test_a_sweep_forgets_the_due_jobs_of_a_shard_in_one_call(redis: Any, settings: Settings) -> None:
    """Forget timers (a finished job's, due as its record expires) cost the sweep one round trip for them
    all, one script call per shard: it reads the timers (due by Redis' clock), then removes them and the
    jobs' index entries with one command per key."""
    store = Store(redis, dataclasses.replace(settings, retention_ms=1))
    seconds, micros = await redis.time()
    deadline = Timestamp()
    deadline.FromMilliseconds(seconds * 1000 + micros // 1000 + 200)
    made = [j.job_id for j in await store.submit([spec(utterance_index=i, deadline=deadline) for i in range(5)])]
    for job_id in made:
        await store.cancel(job_id, "")  # each in the cancelled jobs' index too

    async def records_gone() -> bool:
        return await redis.exists(*(keys.JobKeys.of(j).fsm for j in made)) == 0

    await until(records_gone, timeout=10, what="the records expire")
    mon = Monitor(redis)
    async with mon.watch():
        assert await Dispatcher(store, store.settings).sweep_once(list(range(settings.partitions))) == 5
    assert mon.client == Counter(ZRANGEBYSCORE=settings.partitions, EVALSHA=1), mon.client  # one session: one shard
    # The timers' due times checked by Redis' clock (ZMSCORE, TIME), then one ZREM each of the timers, the
    # pool's, the tenant's and the ended index's entries.
    assert mon.lua == Counter(ZMSCORE=1, TIME=1, ZREM=4), mon.lua


def _lease(a: pb.Assignment) -> pb.JobLease:
    return pb.JobLease(job_id=a.job_id, attempt=a.attempt, lease_token=a.lease_token)


async def _next(call: Any, want: str) -> pb.SchedulerMessage:
    """The node stream's next scheduler message that carries `want` (a repeated field with entries); pings
    on the way are answered."""
    while True:
        m = await asyncio.wait_for(call.read(), 10)
        assert m is not grpc.aio.EOF, "the stream closed"
        if m.HasField("ping"):
            await call.write(pb.NodeMessage(pong=pb.Pong(id=m.ping.id)))
        if len(getattr(m, want)):
            return m


@pytest.mark.single_redis
async def test_a_nodes_completions_of_one_shard_are_one_finish_call(make_app: AppFactory, redis: Any) -> None:
    """One node message with four completions of one session (one shard): a stale token, a repeat, two
    successes. One finish_job call answers each on its own, and announces each finished job (a WatchSession
    reader has both sooner than its backstop re-read)."""
    app = await make_app(ack_timeout_ms=60_000)  # the node never acks: complete is allowed from assigned
    mon = Monitor(redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        call = stub.NodeSession()
        await call.write(pb.NodeMessage(register=pb.Register(node_id="batch", max_concurrency=4, pairs=[pair()])))
        # The stale one is the session's last utterance: an unfinished job holds later ones back in WatchSession.
        ids = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(
            jobs=[spec(utterance_index=i) for i in range(4)]))).results]
        assert len({keys.shard_of_tag(keys.tag_of(j)) for j in ids}) == 1
        held: dict[str, pb.Assignment] = {}
        while len(held) < 4:
            held.update((a.job_id, a) for a in (await _next(call, "assignments")).assignments)
        b, c, d, a = (held[j] for j in ids)
        await call.write(pb.NodeMessage(unavailable=[_lease(a)]))  # requeued, and back with another token
        await _next(call, "confirmed")
        again = (await _next(call, "assignments")).assignments[0]
        assert again.job_id == a.job_id and again.lease_token != a.lease_token
        watch = stub.WatchSession(pb.WatchSessionRequest(tenant_id="acme", session_id="s1"))
        results = {j: pb.JobResult(text_translated=f"r{i}") for i, j in enumerate(ids)}
        await call.write(pb.NodeMessage(completions=[pb.Completion(lease=_lease(b), result=results[b.job_id])]))
        await _next(call, "confirmed")
        assert [j.job_id for j in (await asyncio.wait_for(watch.read(), 10)).jobs] == [b.job_id]

        async with mon.watch():
            await call.write(pb.NodeMessage(completions=[
                pb.Completion(lease=_lease(x), result=results[x.job_id]) for x in (a, b, c, d)]))
            m = await _next(call, "confirmed")
            seen: list[str] = []
            async with asyncio.timeout(BACKSTOP_S / 2):  # not the backstop: both were announced
                while len(seen) < 2:
                    seen += [j.job_id for j in (await watch.read()).jobs]
        assert seen == [c.job_id, d.job_id]
        assert [(r.job_id, r.reason, r.lease_token) for r in m.refused] == [(a.job_id, "STALE_LEASE", a.lease_token)]
        assert [(x.job_id, x.ok, x.state) for x in m.confirmed] == [
            (j.job_id, True, pb.JOB_STATE_SUCCEEDED) for j in (b, c, d)]  # b: a repeat, confirmed again
        assert mon.shas[app.store.scripts["finish_job"].sha] == 1, mon.shas
        assert mon.lua["PUBLISH"] == 2, mon.lua  # c and d, each in a message readable by an earlier version
        for x in (b, c, d):
            assert (await stub.GetJob(pb.GetJobRequest(job_id=x.job_id))).result == results[x.job_id]
        rec = await app.store.record(a.job_id)
        assert (rec.state, rec.token, rec.attempt) == ("assigned", again.lease_token, 2)
        watch.cancel()
        call.cancel()


@pytest.mark.single_redis
async def test_a_registry_renewal_round_is_one_round_trip_of_four_commands_per_node(redis: Any,
                                                                                     settings: Settings) -> None:
    """An idle fleet's Redis cost is its renewals (every node, each --node-ttl-ms / 3): a round is one
    pipelined round trip, one register_node call per node, which reads the entry once (HMGET), then TIME,
    HSET and PEXPIRE."""
    store = Store(redis, settings)
    registry = Registry(redis, store.scripts, settings.node_ttl_ms)
    entries = [(NodeEntry(f"n{i}", ["zh:en"], 4, 0, "inst", {}, "v1", 1, False), f"tok{i}") for i in range(5)]
    for entry, token in entries:
        await registry.register(entry, token)
    mon = Monitor(redis)
    async with mon.watch():
        assert await registry.renew_many(entries) == [token for _, token in entries]
    assert mon.client == Counter(EVALSHA=5), mon.client
    assert mon.lua == Counter(HMGET=5, TIME=5, HSET=5, PEXPIRE=5), mon.lua
