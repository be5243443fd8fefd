"""Fair share between tenants inside a pool (lua/submit_job-n.lua, lua/claim_job-n.lua): tenants take
turns within a priority, weighted; priority still comes first. Claims go through the real claim path
(Dispatcher.claim_for: hints from claim replies, else a peek of the partitions), on real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import spec
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.dispatch import Consumer, Dispatcher
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Claim, Lease, Store
from lingua_scheduler.server.tenants import TenantConfig, TenantLimits, Tenants
from lingua_sdk import AsyncClient, JobResult, Node, pb

POOL = "zh:en"


@pytest.fixture
def make_store(redis: Any, settings: Settings) -> Any:
    def make(partitions: int = 1, **tenants: TenantLimits) -> Store:
        config = TenantConfig(TenantLimits(), tuple(tenants.items()))
        return Store(redis, dataclasses.replace(settings, partitions=partitions), tenants=Tenants(config=config))
    return make


async def submit(store: Store, tenant: str, count: int, *, sessions: int = 50, start: int = 0,
                 priority: int = 0) -> list[str]:
    """`count` jobs of `tenant`, over `sessions` sessions, in batches of 500."""
    ids: list[str] = []
    specs = [spec(tenant_id=tenant, session_id=f"{tenant}-{i % sessions}", utterance_index=i, priority=priority)
             for i in range(start, start + count)]
    for i in range(0, len(specs), 500):
        ids += [s.job_id for s in await store.submit(specs[i:i + 500])]
    return ids


def tenant_of(claim: Claim) -> str:
    return pb.JobSpec.FromString(claim.meta).tenant_id


async def dispatch(dispatcher: Dispatcher, consumer: Consumer, count: int) -> list[Claim]:
    """The next `count` assignments, one claim_for at a time (a node with one free slot, whose feed loop
    calls again at once while it holds hints: a round may end empty on hints that went stale)."""
    out: list[Claim] = []
    for _ in range(10 * count):
        out += await dispatcher.claim_for(consumer, 1)
        if len(out) == count:
            return out
    raise AssertionError(f"nothing to claim after {len(out)} assignments")


@pytest.mark.single_redis  # 10,000 jobs: one backend is enough (the cluster runs the smaller tests below)
async def test_a_burst_of_one_tenant_does_not_hold_back_another(make_store: Any, settings: Settings) -> None:
    store = make_store()
    dispatcher, consumer = Dispatcher(store, store.settings), Consumer("n1", [POOL], capacity=lambda: 1)
    await submit(store, "A", 10_000)
    b_first = await submit(store, "B", 10)
    order = [tenant_of(c) for c in await dispatch(dispatcher, consumer, 20)]
    assert order.count("B") == 10, order  # B's 10 among the next 20, not after A's 10,000
    # Again in the middle of A's backlog, with the node's hints full of A's jobs: B's next 10 jobs
    # (submitted now) still go within a few assignments.
    await dispatch(dispatcher, consumer, 500)
    await submit(store, "B", 10, start=10)
    order = [tenant_of(c) for c in await dispatch(dispatcher, consumer, 30)]
    assert order.count("B") == 10, order
    assert order.index("B") <= 3 and len(order) - order[::-1].index("B") <= 25, order
    assert b_first  # (their ids: the first batch was created)


async def test_weights_share_dispatch(make_store: Any) -> None:
    store = make_store(A=TenantLimits(weight=3))
    dispatcher, consumer = Dispatcher(store, store.settings), Consumer("n1", [POOL], capacity=lambda: 1)
    await submit(store, "A", 400)
    await submit(store, "B", 400)
    await submit(store, "C", 400)
    window = Counter(tenant_of(c) for c in await dispatch(dispatcher, consumer, 250))
    assert abs(window["A"] - 150) <= 3 and abs(window["B"] - 50) <= 3 and abs(window["C"] - 50) <= 3, window


async def take_heads(store: Store, count: int) -> list[str]:
    """The queue's order: claim its head `count` times (the store's peek and claim)."""
    out = []
    for i in range(count):
        ((job_id, _score),) = (await store.peek(store.tags_of_pool(POOL), 1)).popitem()[1]
        (c,) = await store.claim("n1", [(job_id, f"tok{i}")])
        out.append(c.job_id)
    return out


async def test_priority_still_comes_first(make_store: Any) -> None:
    """A higher priority goes before any lower one, whoever's; within a priority tenants take turns, each
    tenant's jobs in order."""
    store = make_store()
    low_a = await submit(store, "A", 30, sessions=1)
    high_a = await submit(store, "A", 5, sessions=1, start=100, priority=5)
    low_b = await submit(store, "B", 5, sessions=1)
    order = await take_heads(store, 40)
    assert order[:5] == high_a
    assert [j for j in order if j in low_a] == low_a  # A's own jobs in the order submitted
    assert order[5:15:2] == low_a[:5] and order[6:15:2] == low_b  # then A and B in turn


async def test_a_job_claimed_out_of_turn_does_not_push_newcomers_back(make_store: Any) -> None:
    """A wake-up names the newest job, so a node may claim a job from the end of a backlog; the band's
    clock moves only to the head, so a tenant that joins next is still served next."""
    store = make_store()
    dispatcher, consumer = Dispatcher(store, store.settings), Consumer("n1", [POOL], capacity=lambda: 1)
    a = await submit(store, "A", 1_000)
    (c,) = await store.claim("n2", [(a[-1], "tok")])  # out of turn
    assert tenant_of(c) == "A"
    await submit(store, "B", 3, sessions=1)
    order = [tenant_of(c) for c in await dispatch(dispatcher, consumer, 7)]
    assert order.count("B") == 3, order  # B and A in turn from A's head on, not after A's 1,000


async def test_an_emptied_queue_evens_tenants_out(make_store: Any, redis: Any) -> None:
    """A tenant that used the pool alone is not made to wait for the time it used it."""
    store = make_store()
    dispatcher, consumer = Dispatcher(store, store.settings), Consumer("n1", [POOL], capacity=lambda: 1)
    await submit(store, "A", 200)
    await dispatch(dispatcher, consumer, 200)
    await submit(store, "B", 10, sessions=1)
    await submit(store, "A", 10, sessions=1, start=1000)
    order = [tenant_of(c) for c in await dispatch(dispatcher, consumer, 20)]
    assert order[:10].count("A") == 5, order
    # What is left of the fair-share key: the band's clock and the two tenants' passes, and it expires.
    fair = keys.PartitionKeys.of(keys.partition_tag(POOL, 0)).fair
    await submit(store, "C", 1, sessions=1)  # one submit in 8 prunes the passes the clock went by
    members = {m.decode(): score for m, score in await redis.zrange(fair, 0, -1, withscores=True)}
    assert set(members) <= {"c9", "t9:A", "t9:B", "t9:C", "e"} and "c9" in members, members
    # "e" holds minus when the key expires: what a submit reads instead of the key's PTTL.
    ttl, now_ms = await redis.pttl(fair), (await redis.time())[0] * 1000
    assert ttl > 0 and abs(-members["e"] - (now_ms + ttl)) < 2_000, (members["e"], ttl)


async def test_a_requeued_job_keeps_its_place(make_store: Any) -> None:
    store = make_store()
    dispatcher, consumer = Dispatcher(store, store.settings), Consumer("n1", [POOL], capacity=lambda: 1)
    await submit(store, "A", 20, sessions=1)
    (first,) = await dispatch(dispatcher, consumer, 1)
    await submit(store, "B", 20, sessions=1)
    await store.release("n1", [Lease(first.job_id, first.token)])  # back to the queue (its node never got it)
    (again,) = await dispatch(dispatcher, Consumer("n2", [POOL], capacity=lambda: 1), 1)
    assert again.job_id == first.job_id


async def test_partitions_take_turns(make_store: Any) -> None:
    """Passes are a partition's own virtual time: a consumer's peek takes the partitions in turn within a
    priority instead of comparing them (a partition whose clock ran far would otherwise wait for all
    the others' queues)."""
    store = make_store(partitions=2)
    tags = store.tags_of_pool(POOL)
    # Partition 0 has run 300 jobs; partition 1 none. Then both get 20 new ones.
    busy = [s for s in (f"s{i}" for i in range(200)) if keys.partition_for("A", s, 2) == 0][:5]
    idle = [s for s in (f"s{i}" for i in range(200)) if keys.partition_for("A", s, 2) == 1][:5]
    old = await store.submit([spec(tenant_id="A", session_id=busy[i % 5], utterance_index=i) for i in range(300)])
    for s in old:
        (c,) = await store.claim("n0", [(s.job_id, "t" + s.job_id[-8:])])
        assert c.job_id == s.job_id
    await store.submit([spec(tenant_id="A", session_id=busy[i % 5], utterance_index=1000 + i) for i in range(20)])
    await store.submit([spec(tenant_id="A", session_id=idle[i % 5], utterance_index=1000 + i) for i in range(20)])
    dispatcher = Dispatcher(store, store.settings)
    picked = await dispatcher._oldest(Consumer("n1", [POOL], capacity=lambda: 1), 10, 0)
    assert Counter(keys.tag_of(j) for j in picked) == {tags[0]: 5, tags[1]: 5}, picked


@pytest.mark.single_redis
@pytest.mark.parametrize("connected", ["after A's backlog", "during A's backlog"])
async def test_a_node_serves_the_newcomer_within_a_few_jobs(make_app: Any, tmp_path: Path, connected: str) -> None:
    """End to end: a real Node (the SDK's runtime) working through A's backlog over NodeSession gets B's
    jobs, submitted mid-way, within a few assignments. Connected during A's submits, the dispatcher has
    heard of A's jobs first (wake-ups): it still pairs in queue order, not as heard."""
    backlog = 10_000 if connected == "during A's backlog" else 2_000
    app = await make_app(partitions=4)
    order: list[str] = []
    reached = {100: asyncio.Event()}  # A's 100th job dispatched: time to submit B's
    b_done = asyncio.Event()

    async def handle(assignment: Any) -> JobResult:
        order.append(assignment.spec.tenant_id)
        if len(order) in reached:
            reached[len(order)].set()
        if order.count("B") == 10:
            b_done.set()
        return JobResult(text_asr="ok")

    target = f"127.0.0.1:{app.port}"
    job = dict(src_lang="zh", tgt_lang="en", payload_ref="s3://audio/x.opus")
    async with AsyncClient(target) as client:
        node = Node(target, node_id="gpu-1", pairs=["zh:en"], concurrency=4, handler=handle, handle_signals=False)
        running = asyncio.create_task(node.run()) if connected == "during A's backlog" else None
        for i in range(0, backlog, 500):
            await client.submit_many([dict(job, tenant_id="A", session_id=f"a{j % 20}", utterance_index=j)
                                      for j in range(i, i + 500)])
        running = running or asyncio.create_task(node.run())
        try:
            await asyncio.wait_for(reached[100].wait(), 30)
            at = len(order)
            await client.submit_many([dict(job, tenant_id="B", session_id="b", utterance_index=j) for j in range(10)])
            # Counted from when B's jobs exist: A's jobs the node took while the Submit was on its way (a
            # loaded machine's Submit takes a few ms, the node's handler none) say nothing of fair share.
            submitted = len(order)
            await asyncio.wait_for(b_done.wait(), 30)
        finally:
            node.stop()
            await asyncio.wait_for(running, 10)
    # Fair share is per partition (docs/design.md, "Fair share"): B's one session sits in one of the 4
    # partitions, where B and A alternate, and the dispatcher takes the partitions in turn. So B's first
    # job goes within a turn of the partitions (plus the jobs already on their way to the node), and
    # each next one within about two turns: B's 10 within ~2 x 4 x 10 assignments, not after the
    # thousands of A's backlog.
    first_b, last_b = order.index("B", at) + 1, len(order) - order[::-1].index("B")
    assert first_b - submitted <= 2 * 4 + 4, (at, submitted, first_b, order[at:first_b])
    assert last_b - submitted <= 2 * 4 * 10 + 8, (at, submitted, last_b, order[at:last_b])


async def test_scores_stay_in_their_band(make_store: Any, redis: Any) -> None:
    """Passes are integers in a double: a band far on starts again when empty, and a pass that would
    leave its band is clamped (priority never breaks)."""
    store = make_store()
    pk = keys.PartitionKeys.of(keys.partition_tag(POOL, 0))
    band = 9  # priority 0
    low = band * wire.QUEUE_BAND
    await submit(store, "A", 1, sessions=1)
    await redis.zadd(pk.fair, {f"c{band}": low + wire.FAIR_RESET + 5})  # far on, and A's job still queued
    (second,) = await submit(store, "A", 1, sessions=1, start=1)
    assert await redis.zscore(pk.queue, second) == low + wire.FAIR_RESET + 5 + wire.FAIR_STEP  # not started again
    await take_heads(store, 2)  # the band is empty now
    await submit(store, "B", 1, sessions=1)
    assert await redis.zscore(pk.fair, f"c{band}") == low  # started again from the band's bottom
    band_members = await redis.zrangebyscore(pk.fair, low, low + wire.QUEUE_BAND - 1)  # not "e" (negative)
    assert band_members == [f"c{band}".encode(), f"t{band}:B".encode()]
    await redis.zadd(pk.fair, {f"t{band}:B": low + wire.QUEUE_BAND - 10})
    (last,) = await submit(store, "B", 1, sessions=1, start=1)
    assert await redis.zscore(pk.queue, last) == low + wire.QUEUE_BAND - 1
    (high,) = await submit(store, "B", 1, sessions=1, start=2, priority=1)
    assert await redis.zscore(pk.queue, high) < await redis.zscore(pk.queue, last)  # the next band's jobs first


async def test_a_claim_out_of_turn_moves_the_clock_to_its_bands_head(make_store: Any, redis: Any) -> None:
    """The claim reads its band's head from the queue heads it returns when they start in the band, and
    looks the band up only when a band of higher priority comes first."""
    store = make_store()
    pk = keys.PartitionKeys.of(keys.partition_tag(POOL, 0))
    a = await submit(store, "A", 4, sessions=1)  # priority 0: band 9
    (b,) = await submit(store, "B", 1, sessions=1, start=10, priority=5)  # band 4: first in the queue
    scores = [await redis.zscore(pk.queue, job_id) for job_id in a]
    assert await redis.zscore(pk.fair, "c9") < scores[0] < scores[1] < scores[2] < scores[3]

    async def claim(job_id: str) -> float:
        (c,) = await store.claim("n1", [(job_id, "tok-" + job_id[-4:])])
        assert c.code == ScriptCode.APPLIED
        return await redis.zscore(pk.fair, "c9")

    assert await claim(a[3]) == scores[0]  # out of turn, behind a band of higher priority: the band's head
    await claim(b)
    assert await claim(a[0]) == scores[0]  # in turn: at the clock, which stays
    assert await claim(a[2]) == scores[1]  # out of turn, the band first in the queue: its head
    assert await claim(a[1]) == scores[1]
