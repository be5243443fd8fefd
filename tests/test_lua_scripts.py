"""Every documented return code of every Lua script, produced against a real Redis."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from helpers import spec
from lingua_scheduler.server import keys
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.proto import scheduler_pb2 as pb
from lingua_scheduler.server.scripts import Scripts
from lingua_scheduler.server.store import Store
from redis.exceptions import NoScriptError

LUA = Path(__file__).resolve().parent.parent / "server" / "lua"


def documented_codes(name: str) -> set[int]:
    text = next(LUA.glob(f"{name}-*.lua")).read_text()
    output = text.split("Output:", 1)[1].split("]]", 1)[0]
    return {int(c) for c in re.findall(r"\{(-?\d+)", output)}


async def queued(store: Store, **overrides: Any) -> str:
    return (await store.submit([spec(**overrides)]))[0].job_id


async def claimed(store: Store, node: str = "n1", **overrides: Any) -> str:
    job_id = await queued(store, **overrides)
    (c,) = await store.claim(node, [job_id])
    assert c.code == ScriptCode.APPLIED
    return job_id


def finish_args(store: Store, job_id: str, **kw: Any) -> tuple[list[str], list[Any]]:
    a = dict(event="complete", allow=",assigned,running,", dest="succeeded", version="", node="n1", attempt=1,
             has_result=1, result=b"r", guard="")
    a.update(kw)
    return store._finish_keys(job_id), [job_id, a["event"], a["allow"], a["dest"], a["version"], a["node"],
                                        a["attempt"], a["has_result"], a["result"], "", "", 0, 60_000, a["guard"]]


def requeue_args(job_id: str, **kw: Any) -> tuple[list[str], list[Any]]:
    a = dict(event="fail", allow=",assigned,running,", version="", node="n1", attempt=1, guard="")
    a.update(kw)
    jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(keys.tag_of(job_id))
    return [jk.fsm, jk.events, pk.queue, pk.timers], [
        job_id, a["event"], a["allow"], "queued", a["version"], a["node"], a["attempt"], 0, "E", "m", 1, 0,
        a["guard"], "wake"]


def touch_args(job_id: str, node: str = "n1", attempt: int = 1, mode: str = "ack") -> tuple[list[str], list[Any]]:
    jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(keys.tag_of(job_id))
    return [jk.fsm, jk.events, pk.timers], [job_id, node, attempt, 1000, mode, "assigned", "running"]


async def test_submit_codes(store: Store) -> None:
    first = await store.submit([spec()])
    again = await store.submit([spec(payload=b"other")])
    assert first[0].created and not again[0].created
    assert first[0].job_id == again[0].job_id
    assert documented_codes("submit_job") == {1, 0}


async def test_claim_codes(store: Store, redis: Any) -> None:
    seen = set()
    job_id = await queued(store)
    (c,) = await store.claim("n1", [job_id])
    seen.add(c.code)
    assert c.code == ScriptCode.APPLIED and c.attempt == 1 and c.payload == b"audio"
    (c,) = await store.claim("n2", [job_id])
    seen.add(c.code)
    assert c.code == ScriptCode.NOT_IN_QUEUE
    # A queue entry whose job vanished is dropped.
    tag = keys.tag_of(job_id)
    ghost = tag + "01GHOST"
    await redis.zadd(keys.PartitionKeys.of(tag).queue, {ghost: 1})
    (c,) = await store.claim("n1", [ghost])
    seen.add(c.code)
    assert c.code == ScriptCode.JOB_NOT_FOUND
    assert await redis.zscore(keys.PartitionKeys.of(tag).queue, ghost) is None
    # A queue entry whose job is not queued any more is dropped.
    await redis.zadd(keys.PartitionKeys.of(tag).queue, {job_id: 1})
    (c,) = await store.claim("n1", [job_id])
    seen.add(c.code)
    assert c.code == ScriptCode.INVALID_TRANSITION
    # A job that avoids this node.
    avoided = await claimed(store, utterance_index=1)
    await store.transition(avoided, "unavailable", node="n1", attempt=1, avoid=True,
                           error=pb.JobError(code="LINGUA_MODEL_UNAVAILABLE", retryable=True))
    await store.fire_timer("r:" + avoided)  # backoff may still run: promote when due
    await redis.zadd(keys.PartitionKeys.of(tag).queue, {avoided: 1})
    (c,) = await store.claim("n1", [avoided])
    seen.add(c.code)
    assert c.code == ScriptCode.AVOIDED
    # A session's next job is held back for the node that served it.
    reserved = await queued(store, utterance_index=2)
    (c,) = await store.claim("n9", [reserved])
    seen.add(c.code)
    assert c.code == ScriptCode.RESERVED and c.reserved_until > 0
    assert {int(s) for s in seen} == documented_codes("claim_job")


async def test_touch_codes(store: Store) -> None:
    job_id = await claimed(store)
    call = store.scripts.call
    r = await call(store.redis, "touch_job", *touch_args(job_id))
    assert r[0] == ScriptCode.APPLIED and r[2] == b"running"
    r = await call(store.redis, "touch_job", *touch_args(job_id))
    assert r[0] == ScriptCode.ALREADY
    r = await call(store.redis, "touch_job", *touch_args(job_id, attempt=2))
    assert r[0] == ScriptCode.STALE_ATTEMPT
    r = await call(store.redis, "touch_job", *touch_args(job_id, node="n2"))
    assert r[0] == ScriptCode.NOT_LEASE_HOLDER
    r = await call(store.redis, "touch_job", *touch_args(keys.tag_of(job_id) + "01GHOST"))
    assert r[0] == ScriptCode.JOB_NOT_FOUND
    await store.cancel(job_id, "")
    r = await call(store.redis, "touch_job", *touch_args(job_id))
    assert r[0] == ScriptCode.INVALID_TRANSITION and r[1] == b"cancelled"
    assert documented_codes("touch_job") == {1, 0, -1, -2, -4, -5}


async def test_finish_codes(store: Store) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    for kw, expected in [
        (dict(attempt=2), ScriptCode.STALE_ATTEMPT),
        (dict(node="n2"), ScriptCode.NOT_LEASE_HOLDER),
        (dict(version="99"), ScriptCode.VERSION_MISMATCH),
        (dict(allow=",running,"), ScriptCode.INVALID_TRANSITION),
        (dict(guard="deadline"), ScriptCode.NOT_DUE),
        (dict(guard="lease"), ScriptCode.NOT_DUE),
        ({}, ScriptCode.APPLIED),
        ({}, ScriptCode.ALREADY),
        (dict(result=b"other"), ScriptCode.RESULT_CONFLICT),
    ]:
        r = await call(store.redis, "finish_job", *finish_args(store, job_id, **kw))
        assert r[0] == expected, kw
        seen.add(r[0])
    r = await call(store.redis, "finish_job", *finish_args(store, keys.tag_of(job_id) + "01GHOST"))
    seen.add(r[0])
    assert r[0] == ScriptCode.JOB_NOT_FOUND
    assert seen == documented_codes("finish_job")


async def test_requeue_codes(store: Store) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    for kw, expected in [
        (dict(attempt=2), ScriptCode.STALE_ATTEMPT),
        (dict(node="n2"), ScriptCode.NOT_LEASE_HOLDER),
        (dict(version="99"), ScriptCode.VERSION_MISMATCH),
        (dict(allow=",running,"), ScriptCode.INVALID_TRANSITION),
        (dict(guard="lease"), ScriptCode.NOT_DUE),
        ({}, ScriptCode.APPLIED),
        ({}, ScriptCode.ALREADY),
    ]:
        r = await call(store.redis, "requeue_job", *requeue_args(job_id, **kw))
        assert r[0] == expected, kw
        seen.add(r[0])
    r = await call(store.redis, "requeue_job", *requeue_args(keys.tag_of(job_id) + "01GHOST"))
    seen.add(r[0])
    assert seen == documented_codes("requeue_job")


async def test_promote_codes(store: Store, redis: Any) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    tag = keys.tag_of(job_id)
    jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(tag)
    args = ([jk.fsm, pk.queue, pk.timers], [job_id, "wake", "queued"])
    seen.add((await call(redis, "promote_job", *args))[0])  # no retry timer
    await redis.zadd(pk.timers, {"r:" + job_id: 1})
    seen.add((await call(redis, "promote_job", *args))[0])  # job is assigned, not queued
    await store.fail(job_id, "n1", 1, pb.JobError(code="E", retryable=True))
    await redis.zadd(pk.timers, {"r:" + job_id: 1})  # make the backoff due now
    r = await call(redis, "promote_job", *args)
    seen.add(r[0])
    assert r[0] == ScriptCode.APPLIED and await redis.zscore(pk.queue, job_id) is not None
    ghost = tag + "01GHOST"
    await redis.zadd(pk.timers, {"r:" + ghost: 1})
    seen.add((await call(redis, "promote_job", [keys.JobKeys.of(ghost).fsm, pk.queue, pk.timers],
                         [ghost, "wake", "queued"]))[0])
    assert seen == documented_codes("promote_job")


async def test_registry_codes(store: Store, redis: Any) -> None:
    call, key = store.scripts.call, [keys.node("n1")]
    assert (await call(redis, "register_node", key, ["t1", "register", 10_000, "maxc", 1]))[0] == 1
    assert (await call(redis, "register_node", key, ["t1", "renew", 10_000]))[0] == 1
    assert (await call(redis, "register_node", key, ["t2", "register", 10_000]))[1] == b"t1"
    assert (await call(redis, "register_node", key, ["t1", "renew", 10_000]))[0] == -5
    assert (await call(redis, "release_node", key, ["t1"]))[0] == -5
    assert (await call(redis, "release_node", key, ["t2"]))[0] == 1
    assert await redis.exists(key[0]) == 0
    assert documented_codes("register_node") == {1, -5} and documented_codes("release_node") == {1, -5}


async def test_key_count_is_checked_and_noscript_is_retried(store: Store, redis: Any) -> None:
    with pytest.raises(ValueError, match="takes 3 keys"):
        store.scripts.args("touch_job", ["a"], [])
    job_id = await queued(store)
    await redis.script_flush()  # as after a Redis restart
    (c,) = await store.claim("n1", [job_id])
    assert c.code == ScriptCode.APPLIED
    await redis.script_flush()
    with pytest.raises(NoScriptError):  # the cache really is empty
        await redis.evalsha(store.scripts["touch_job"].sha, 3, *touch_args(job_id)[0], *touch_args(job_id)[1])
    assert (await store.touch("n1", [(job_id, 1)]))[0].code == ScriptCode.APPLIED


def test_every_script_has_a_header_and_declares_its_keys() -> None:
    for script in Scripts():
        header = script.source.split("]]", 1)[0]
        assert header.startswith("--[["), script.name
        for n in range(1, script.numkeys + 1):
            assert f"KEYS[{n}]" in header, (script.name, n)
        assert f"KEYS[{script.numkeys + 1}]" not in script.source, script.name
        assert "Output:" in header and "local rcall = redis.call" in script.source
