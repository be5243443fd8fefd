"""Issue 11: pools and sweeps that cost what they carry. Timers live per shard (shared by every pool), so
sweeping reads one key per shard whatever the number of pools, nothing is kept for a pool once its queue
is empty, and the live instances split the shards between them."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from helpers import all_keys, spec, until
from lingua_scheduler.server import keys
from lingua_scheduler.server.dispatch import Dispatcher
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Store


async def commands(redis: Any) -> int:
    """Commands Redis has run so far (every primary of a cluster)."""
    if hasattr(redis, "get_primaries"):
        per_node = await redis.info("stats", target_nodes=redis.get_primaries())
        return sum(int(node["total_commands_processed"]) for node in per_node.values())
    return int((await redis.info("stats"))["total_commands_processed"])


async def test_invented_pools_cost_nothing_after_they_empty(store: Store, redis: Any, settings: Settings) -> None:
    soon = Timestamp()
    soon.FromMilliseconds(time.time_ns() // 1_000_000 + 200)
    invented = [f"{a}{b}" for a in "bcdfghjk" for b in "aeiou"]  # 40 made-up source languages
    jobs = await store.submit([spec(src_lang=src, tgt_lang="xx", session_id=f"s{i}", deadline=soon)
                               for i, src in enumerate(invented)])
    dispatcher = Dispatcher(store, settings)  # not started: this test drives its sweep

    async def all_expired() -> bool:
        await dispatcher.sweep_once()
        return all([(await store.record(j.job_id)).state == "expired" for j in jobs])

    await until(all_expired)
    assert await all_keys(redis, "lingua:v1:queue:*") == []  # no queue, no affinity: nothing per pool
    assert await all_keys(redis, "lingua:v1:affinity*") == []
    before = await commands(redis)
    sweeps = 20
    for _ in range(sweeps):
        await dispatcher.sweep_once()
    spent = await commands(redis) - before
    # One ZRANGEBYSCORE per shard per sweep, plus at most one sign of life per sweep and the INFO calls:
    # the 40 pools cost nothing.
    assert spent <= sweeps * (settings.partitions + 1) + 2, spent


async def test_live_instances_share_the_shards(store: Store, redis: Any, settings: Settings) -> None:
    fast = dataclasses.replace(settings, partitions=4, instance_heartbeat_ms=100)
    one = Dispatcher(Store(redis, fast), dataclasses.replace(fast, instance_id="one"))
    two = Dispatcher(Store(redis, fast), dataclasses.replace(fast, instance_id="two"))
    assert await one.my_shards() == [0, 1, 2, 3]  # alone: every shard

    async def split() -> bool:
        a, b = await one.my_shards(), await two.my_shards()
        return sorted(a + b) == [0, 1, 2, 3] and len(a) == len(b) == 2

    await until(split)  # two live instances: each sweeps half, together all
    await store.share_sweep("two", 300, alive=False)  # "two" stops cleanly: "one" takes over at the next refresh

    async def alone() -> bool:
        return await one.my_shards() == [0, 1, 2, 3]

    await until(alone)
    await until(split)  # "two" is back
    # "two" dies without a word: once it has been silent for 3 heartbeats, "one" sweeps everything again.
    await until(alone)
    assert await redis.zrange(keys.INSTANCES, 0, -1) == [b"one"]


async def test_a_job_of_a_stopped_instance_share_is_swept_by_the_others(make_app: Any, redis: Any) -> None:
    """Two instances, one stops: every lease of every shard still expires (the other takes its share)."""
    first = await make_app(partitions=2)
    second = await make_app(partitions=2)
    store = first.store
    jobs = await store.submit([spec(session_id=f"s{i}", utterance_index=i) for i in range(8)])
    assert {keys.tag_of(j.job_id) for j in jobs} == {"zh:en:{0}", "zh:en:{1}"}  # both shards hold jobs
    claims = await store.claim("gone", [(j.job_id, f"tok{i}") for i, j in enumerate(jobs)])
    assert all(c.token for c in claims)
    await first.stop(grace=0)

    async def requeued() -> bool:  # each lease ran out and was taken back: queued again
        return all([(await second.store.record(j.job_id)).state == "queued" for j in jobs])

    await until(requeued)
