"""Dispatch per instance (issue 11): one task claims for every stream of an instance, a burst of
wake-ups for many idle streams is claimed in one pipelined round trip, and the instance holds a
bounded number of Redis connections whatever the number of streams. Real Redis (and Redis Cluster),
real gRPC streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.duration_pb2 import Duration
from helpers import pair, spec, until
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.app import App, connect_redis
from lingua_scheduler.server.calls import submit_call
from lingua_scheduler.server.dispatch import Consumer, heard, new_lease_token
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Claim, Store
from lingua_sdk import pb, pb_grpc
from simnode import Behaviour, SimNode

HOLD = Behaviour(processing_s=lambda: 600.0)  # a node that keeps its jobs (acks, heartbeats, no result)


@contextlib.asynccontextmanager
async def fleet(app: App, count: int, behaviour: Behaviour | None = None, concurrency: int = 4,
                channels: int = 4, prefix: str = "n") -> AsyncIterator[list[SimNode]]:
    """`count` raw NodeSession streams over a few shared channels, all registered."""
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for _ in range(channels)]
    nodes = [SimNode(chans[i % channels], f"{prefix}{i}", [("zh", "en")], concurrency, behaviour) for i in range(count)]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
        for ch in chans:
            await ch.close()


async def settled(store: Store, job_ids: list[str], timeout: float = 30.0) -> Counter[str]:
    """The jobs' final states, once none is queued or held any more (polled: Redis announces no such thing)."""
    states: dict[str, str] = {}
    left = list(job_ids)
    deadline = time.monotonic() + timeout
    while left:
        assert time.monotonic() < deadline, f"{len(left)} jobs not finished"
        for job_id in left:
            states[job_id] = (await store.record(job_id)).state
        left = [j for j in left if states[j] in ("queued", "assigned", "running")]
        if left:
            await asyncio.sleep(0.02)
    return Counter(states.values())


def count_claims(store: Store) -> list[int]:
    """Instrument (not replace) the app's Store.claim_many: the size of every round trip of claims."""
    sizes: list[int] = []
    real = store.claim_many

    async def counted(items: list[tuple[str, str, str]], hint_count: int = 8) -> list[Claim | Exception]:
        sizes.append(len(items))
        return await real(items, hint_count)

    store.claim_many = counted  # type: ignore[method-assign]
    return sizes


async def client_ids(redis: Any) -> dict[str, set[int]]:
    """Client connection ids per Redis server (one server, or every node of the cluster)."""
    if hasattr(redis, "get_nodes"):
        return {node.name: {c["id"] for c in await redis.client_list(target_nodes=node)}
                for node in redis.get_nodes()}
    return {"redis": {c["id"] for c in await redis.client_list()}}


async def test_many_streams_are_served_within_the_redis_connection_bound(
        make_app: AppFactory, settings: Settings, store: Store, backend: str) -> None:
    """300 streams, 300 jobs, an instance allowed 6 Redis connections: every job succeeds, no call
    fails for want of a connection, and Redis never sees more than the bound from the instance (per
    node on a cluster, where the pub/sub and a topology refresh may add one each)."""
    redis = connect_redis(settings)  # the sampler's own client: one connection per server, used in turn
    await redis.ping()  # (a cluster client learns its nodes)
    await client_ids(redis)
    ours = await client_ids(redis)  # this test's connections (the store's and the sampler's)
    app = await make_app(redis_max_connections=6)
    peak: Counter[str] = Counter()
    sampling = True

    async def sample() -> None:
        while sampling:
            for server, ids in (await client_ids(redis)).items():
                peak[server] = max(peak[server], len(ids - ours.get(server, set())))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch, fleet(app, 300) as nodes:
        stub = pb_grpc.SchedulerStub(ch)
        submitted = await asyncio.gather(*(
            stub.Submit(pb.SubmitRequest(jobs=[spec(session_id=f"s{b}", utterance_index=i) for i in range(30)]))
            for b in range(10)))
        job_ids = [r.job_id for s in submitted for r in s.results]
        states = await settled(store, job_ids)
    sampling = False
    await sampler
    await redis.aclose()
    assert states == Counter(succeeded=300), states
    bound = 6 if backend == "single" else 6 + 2
    assert 0 < max(peak.values()) <= bound, peak
    assert sum(1 for n in nodes if n.received) > 6  # spread over the streams, not one stream's loop


async def submit_at_once(app: App, redis: Any, specs: list[pb.JobSpec]) -> None:
    """Submit jobs in one MULTI/EXEC: Redis runs them together and publishes their wake-ups in one
    write, so they reach the instance as one burst whatever the machine's load (a plain pipeline may
    reach Redis, and come back, as a few reads)."""
    await app.store.scripts.load(redis, "submit_job")
    async with redis.pipeline(transaction=True) as pipe:
        for job in specs:
            pipe.execute_command("EVALSHA", *app.store.scripts.args(submit_call([app.store._submit_job(job)])))
        await pipe.execute()


@pytest.mark.single_redis  # (one MULTI/EXEC over many partitions)
async def test_a_burst_of_wake_ups_for_idle_streams_is_claimed_in_one_round_trip(make_app: AppFactory, redis: Any) -> None:
    """60 idle streams (4 slots each), then 20 jobs at once: their 20 wake-ups are claimed in one
    pipelined round trip, one job per stream (in turn, not all to the first stream). Then 120 jobs in
    one Submit, which come back as a few bursts: a round trip per burst, not per job, and still in turn."""
    app = await make_app(poll_interval_ms=600_000)  # no slow poll during the bursts
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch, fleet(app, 60, HOLD) as nodes:
        await until(lambda: not app.dispatcher.local["zh:en"].unknown)  # the cold start's peek is done
        sizes = count_claims(app.store)
        await submit_at_once(app, redis, [spec(session_id=f"s{i}") for i in range(20)])
        await until(lambda: sum(len(n.received) for n in nodes) == 20)
        assert sizes == [20], sizes
        assert sorted(len(n.received) for n in nodes) == [0] * 40 + [1] * 20
        sizes.clear()
        await pb_grpc.SchedulerStub(ch).Submit(pb.SubmitRequest(jobs=[spec(session_id=f"t{i}") for i in range(120)]))
        await until(lambda: sum(len(n.received) for n in nodes) == 140)
        assert sum(sizes) == 120 and len(sizes) <= 12, sizes
        # In turn: the 40 that had none got two, the 20 that had one got two more.
        assert sorted(len(n.received) for n in nodes) == [2] * 40 + [3] * 20, Counter(len(n.received) for n in nodes)


async def test_a_stream_with_more_free_slots_gets_more(make_app: AppFactory) -> None:
    app = await make_app(poll_interval_ms=600_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch, \
            fleet(app, 1, HOLD, concurrency=4, prefix="wide") as (wide,), \
            fleet(app, 1, HOLD, concurrency=1, prefix="narrow") as (narrow,):
        await pb_grpc.SchedulerStub(ch).Submit(pb.SubmitRequest(jobs=[spec(session_id=f"s{i}") for i in range(6)]))
        await until(lambda: len(wide.received) + len(narrow.received) == 5)
        assert (len(wide.received), len(narrow.received)) == (4, 1)
        assert app.store.settings.partitions and len(app.dispatcher.local["zh:en"].hints) >= 1  # the 6th waits


async def test_waiting_assigns_get_one_job_each(make_app: AppFactory) -> None:
    """Unary Assign long-polls are consumers of the same dispatch task: three waiting calls, three
    jobs in one Submit, one job each; a call that gets nothing ends at its wait."""
    app = await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        waits = [asyncio.ensure_future(stub.Assign(pb.AssignRequest(
            node_id=f"poller-{i}", pairs=[pair()], max_jobs=2, wait=Duration(seconds=10)))) for i in range(3)]
        await until(lambda: "zh:en" in app.dispatcher.local and len(app.dispatcher.local["zh:en"].ready) == 3)
        await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id=f"s{i}") for i in range(3)]))
        answers = await asyncio.gather(*waits)
        assert sorted(len(a.assignments) for a in answers) == [1, 1, 1]
        assert len({a.assignments[0].job_id for a in answers}) == 3
        started = time.monotonic()
        empty = await stub.Assign(pb.AssignRequest(node_id="late", pairs=[pair()], wait=Duration(nanos=200_000_000)))
        assert not empty.assignments and time.monotonic() - started >= 0.2
        assert "zh:en" not in app.dispatcher.local  # the ended calls left nothing behind


async def test_a_claim_made_for_a_stream_that_has_gone_is_released_with_its_attempt(
        make_app: AppFactory, settings: Settings, store: Store) -> None:
    """The dispatch task sends a claim; the consumer goes away while the reply is on its way (Redis
    busy): the claim lands, is handed to no one, and release_pending() gives it back, attempt and all."""
    app = await make_app(poll_interval_ms=600_000)
    handed: list[Claim] = []
    wanted = [0]
    consumer = Consumer("gone-1", ["zh:en"], lambda: wanted[0], handed.extend)
    app.dispatcher.add(consumer)
    jobs = await store.submit([spec(session_id="s", utterance_index=i, max_attempts=1) for i in range(8)])
    local = app.dispatcher.local["zh:en"]
    await until(lambda: len(local.hints) == 8)  # heard: enough to claim without peeking first
    blocker, probe = connect_redis(settings), connect_redis(settings)
    fsm = keys.JobKeys.of(jobs[0].job_id).fsm  # (the jobs' node, on a cluster)
    for client in (blocker, probe):
        await client.hget(fsm, "state")  # connected (a cluster client has learnt its slots) before timing
    busy = asyncio.create_task(blocker.eval(BUSY, 1, fsm, 500_000))
    while True:  # wait until Redis stops answering
        try:
            await asyncio.wait_for(probe.hget(fsm, "state"), 0.05)
        except TimeoutError:
            break
    wanted[0] = 1
    app.dispatcher.ready(consumer)
    await until(lambda: consumer.round is not None)  # the claim is sent and waits behind the script
    app.dispatcher.remove(consumer)
    await app.dispatcher.release_pending(consumer)  # waits for the claim's reply, then releases
    await busy
    for client in (blocker, probe):
        await client.aclose()
    records = [await store.record(j.job_id) for j in jobs]
    assert not handed and not consumer.pending
    assert all((r.state, r.attempt) == ("queued", 0) for r in records), records
    assert sum(r.event == "release" for r in records) == 1  # claimed once, for no one, and given back


async def test_claims_whose_replies_were_lost_are_adopted_by_the_dispatch_task(app: App, store: Store) -> None:
    """A claim that went through in Redis but whose reply the dispatch task never handled (its round
    trip failed) is claimed again with the same token: the consumer gets that very assignment."""
    (job,) = await store.submit([spec()])
    handed: list[Claim] = []
    consumer = Consumer("n1", ["zh:en"], lambda: 0, handed.extend)  # wants nothing new
    token = new_lease_token()
    (first,) = await store.claim("n1", [(job.job_id, token)])  # went through; the reply was lost
    consumer.pending[job.job_id] = token
    app.dispatcher.add(consumer)
    app.dispatcher._unsettled.add(consumer)
    app.dispatcher.ready(consumer)
    await until(lambda: bool(handed))
    (claim,) = handed
    assert (claim.job_id, claim.token, claim.attempt, claim.code) == (job.job_id, token, 1, ScriptCode.APPLIED)
    assert not consumer.pending and (await store.record(job.job_id)).attempt == first.attempt == 1


async def test_a_wake_up_no_scheduler_sent_is_ignored(app: App, redis: Any, stub: pb_grpc.SchedulerStub) -> None:
    async with fleet(app, 1) as (node,):
        await redis.publish(keys.wake_channel("zh:en"), wire.wake("not-a-job-id", ""))
        job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
        await node.wait_for(lambda: job_id in node.completed)


BUSY = """local s = redis.call('TIME')
redis.call('HGET', KEYS[1], 'state')
repeat local n = redis.call('TIME') until (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > tonumber(ARGV[1])"""


async def test_a_paused_reply_to_a_claim_sent_before_a_resume_does_not_pause_again(make_app: AppFactory) -> None:
    """A claim answered POOL_PAUSED marks the pool paused here, unless a resume was heard since it was
    sent: that reply speaks of the pause before it, and would leave the pool idle until the slow poll."""
    app = await make_app(poll_interval_ms=600_000)
    consumer = Consumer("n1", ["zh:en"], lambda: 0, lambda claims: None)
    app.dispatcher.add(consumer)
    local = app.dispatcher.local["zh:en"]
    app.dispatcher._on_pool_message("zh:en", wire.PAUSE)
    assert local.paused
    sent = local.resumes  # a claim goes out now (sent before the pause was heard, say) ...
    app.dispatcher._on_pool_message("zh:en", wire.RESUME)  # ... a resume is heard ...
    assert not local.paused
    local.claim_paused(sent)  # ... then the claim's POOL_PAUSED reply: old news
    assert not local.paused
    local.claim_paused(local.resumes)  # a claim sent after the resume that finds it paused: paused again
    assert local.paused
    app.dispatcher.remove(consumer)


@pytest.mark.single_redis
async def test_watches_started_together_share_one_subscribe(app: App, redis: Any) -> None:
    """Watchers that start in one turn of the event loop (a client's batch of WatchJobs) are subscribed
    with one SUBSCRIBE, and those that end together with one UNSUBSCRIBE; each hears its own channel."""

    async def calls() -> Counter[str]:
        stats = await redis.info("commandstats")
        return Counter({name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                        for name in ("subscribe", "unsubscribe")})

    async def subscribers() -> list[int]:
        return [n for _, n in await redis.pubsub_numsub(*channels)]

    async def unsubscribed() -> bool:
        return not any(await subscribers())

    channels = [f"lingua:test:together:{i}" for i in range(10)]
    before = await calls()
    async with contextlib.AsyncExitStack() as stack:
        inboxes = await asyncio.gather(*[stack.enter_async_context(app.dispatcher.watching(c)) for c in channels])
        assert await subscribers() == [1] * len(channels)  # each confirmed when its watch began
        for c in channels:
            await redis.publish(c, c)
        for c, inbox in zip(channels, inboxes, strict=True):
            assert await inbox.get() == c.encode()
    await until(unsubscribed, what="channels unsubscribed")
    assert await calls() - before == Counter(subscribe=1, unsubscribe=1)


async def test_a_watch_begun_as_another_ends_on_its_channel_hears_it(app: App, redis: Any) -> None:
    """The end of one watch and the start of the next on the same channel, asked in one turn: the last
    word counts, the channel stays subscribed and the new watch hears it."""
    channel = "lingua:test:again"
    async with app.dispatcher.watching(channel):
        pass
    async with app.dispatcher.watching(channel) as inbox:
        await redis.publish(channel, "again")
        assert await inbox.get() == b"again"


@pytest.mark.single_redis
async def test_heard_gives_what_listen_gives(redis: Any) -> None:
    """dispatch.heard() reads a subscription as redis-py's PubSub.listen() does (kind, channel, data),
    confirmations included, for channels and patterns alike."""
    got: dict[str, list[tuple[str, Any, Any]]] = {}
    for name in ("listen", "heard"):
        pubsub = redis.pubsub()
        await pubsub.subscribe("lingua:test:heard")
        await pubsub.psubscribe("lingua:test:heard:*")
        await redis.publish("lingua:test:heard", "a")
        await redis.publish("lingua:test:heard:x", b"\x00b")
        await pubsub.unsubscribe("lingua:test:heard")
        stream = (((m["type"], m["channel"], m["data"]) async for m in pubsub.listen()) if name == "listen"
                  else heard(pubsub))
        got[name] = [item async for item in _first(stream, 5)]
        await pubsub.aclose()
    assert got["heard"] == got["listen"] == [
        ("subscribe", b"lingua:test:heard", 1), ("psubscribe", b"lingua:test:heard:*", 2),
        ("message", b"lingua:test:heard", b"a"), ("pmessage", b"lingua:test:heard:x", b"\x00b"),
        ("unsubscribe", b"lingua:test:heard", 1)]


async def _first(items: AsyncIterator[Any], count: int) -> AsyncIterator[Any]:
    async for item in items:
        yield item
        count -= 1
        if count == 0:
            return
