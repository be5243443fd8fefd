"""Every documented return code of every Lua script, produced against a real Redis."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import spec, until
from lingua_scheduler.fsm import Event, JobState, dests_of, fixed_dest, is_repeat, sources_of
from lingua_scheduler.server import buckets, keys, wire
from lingua_scheduler.server.calls import (
    DrainNode,
    Fence,
    FinishJob,
    ForgetJob,
    Outcome,
    PausePool,
    PromoteJob,
    RegisterNode,
    ReleaseNode,
    RequeueJob,
    RetryJob,
    TouchJob,
    forget_call,
)
from lingua_scheduler.server.errors import AlreadyExists, ScriptCode
from lingua_scheduler.server.operations import Operations
from lingua_scheduler.server.scripts import Call, Scripts, constants, lua_code, parts, prelude
from lingua_scheduler.server.store import Changed, Lease, Store
from lingua_sdk import pb
from redis.exceptions import NoScriptError

LUA = Path(__file__).resolve().parent.parent / "server" / "lua"


def documented_codes(name: str) -> set[int]:
    text = next(LUA.glob(f"{name}-*.lua")).read_text()
    output = text.split("Output:", 1)[1].split("]]", 1)[0]
    return {int(c) for c in re.findall(r"\{(-?\d+)", output)}


async def queued(store: Store, **overrides: Any) -> str:
    return (await store.submit([spec(**overrides)]))[0].job_id


async def claimed(store: Store, node: str = "n1", token: str = "tok1", **overrides: Any) -> str:
    job_id = await queued(store, **overrides)
    (c,) = await store.claim(node, [(job_id, token)])
    assert c.code == ScriptCode.APPLIED
    return job_id


def finish_call(job_id: str, **kw: Any) -> Call:
    a: dict[str, Any] = dict(event="complete", dest="succeeded", version=None, node="n1", token="tok1", result=b"r",
                             guard="")
    a.update(kw)
    return FinishJob(job_id, a["event"], a["dest"], Fence(a["node"], a["token"], a["version"]),
                     Outcome(result=a["result"]), 60_000, a["guard"]).call()


def requeue_call(job_id: str, **kw: Any) -> Call:
    a: dict[str, Any] = dict(event="fail", version=None, node="n1", token="tok1", guard="")
    a.update(kw)
    return RequeueJob(job_id, a["event"], "queued", Fence(a["node"], a["token"], a["version"]),
                      Outcome("E", "m", True), guard=a["guard"]).call()


def touch_call(job_id: str, node: str = "n1", token: str = "tok1", mode: str = "ack") -> Call:
    return TouchJob(job_id, node, token, 1000, mode).call()


async def test_submit_codes(store: Store) -> None:
    first = await store.submit([spec()])
    again = await store.submit([spec(trace_id="another")])  # trace_id may differ between repeats
    assert first[0].created and not again[0].created
    assert first[0].job_id == again[0].job_id
    with pytest.raises(AlreadyExists, match=re.escape(first[0].job_id)):
        await store.submit([spec(payload=b"other")])
    assert documented_codes("submit_job") == {1, 0, -11}


async def test_claim_codes(store: Store, redis: Any) -> None:
    seen = set()
    job_id = await queued(store)
    (c,) = await store.claim("n1", [(job_id, "tok1")])
    seen.add(c.code)
    assert c.code == ScriptCode.APPLIED and c.attempt == 1 and c.payload == b"audio" and c.token == "tok1"
    (again,) = await store.claim("n1", [(job_id, "tok1")])  # a repeat of the claim: the same assignment
    assert (again.code, again.attempt, again.lease, again.payload) == (c.code, 1, c.lease, b"audio")
    (c,) = await store.claim("n2", [(job_id, "tok2")])
    seen.add(c.code)
    assert c.code == ScriptCode.NOT_IN_QUEUE
    # A queue entry whose job vanished is dropped.
    tag = keys.tag_of(job_id)
    ghost = tag + "01GHOST"
    await redis.zadd(keys.PartitionKeys.of(tag).queue, {ghost: 1})
    (c,) = await store.claim("n1", [(ghost, "tok3")])
    seen.add(c.code)
    assert c.code == ScriptCode.JOB_NOT_FOUND
    assert await redis.zscore(keys.PartitionKeys.of(tag).queue, ghost) is None
    # A queue entry whose job is not queued any more is dropped.
    await redis.zadd(keys.PartitionKeys.of(tag).queue, {job_id: 1})
    (c,) = await store.claim("n1", [(job_id, "tok4")])
    seen.add(c.code)
    assert c.code == ScriptCode.INVALID_TRANSITION
    # A job that avoids this node.
    avoided = await claimed(store, utterance_index=1)
    await store.transition(avoided, Event.UNAVAILABLE, node="n1", token="tok1", avoid=True,
                           error=pb.JobError(code="LINGUA_MODEL_UNAVAILABLE", retryable=True))
    await store.fire_timer(wire.retry_timer(avoided))  # backoff may still run: promote when due
    await redis.zadd(keys.PartitionKeys.of(tag).queue, {avoided: 1})
    (c,) = await store.claim("n1", [(avoided, "tok5")])
    seen.add(c.code)
    assert c.code == ScriptCode.AVOIDED
    # A session's next job is held back for the node that served it.
    reserved = await queued(store, utterance_index=2)
    (c,) = await store.claim("n9", [(reserved, "tok6")])
    seen.add(c.code)
    assert c.code == ScriptCode.RESERVED and c.reserved_until > 0
    # A paused pool: nothing is claimed, and no candidates come back (the dispatcher waits for a resume).
    paused = await queued(store, utterance_index=3)
    await Operations(store).set_paused(keys.pool_of_tag(tag), True, "maintenance")
    (c,) = await store.claim("n1", [(paused, "tok7")])
    seen.add(c.code)
    assert c.code == ScriptCode.POOL_PAUSED and c.candidates == []
    assert (await store.record(paused)).state == JobState.QUEUED
    await Operations(store).set_paused(keys.pool_of_tag(tag), False)
    (c,) = await store.claim("n1", [(paused, "tok8")])
    assert c.code == ScriptCode.APPLIED
    assert {int(s) for s in seen} == documented_codes("claim_job")


async def test_touch_codes(store: Store) -> None:
    job_id = await claimed(store)
    call = store.scripts.call
    r = await call(store.redis, touch_call(job_id))
    assert r[0] == ScriptCode.APPLIED and r[2] == b"running"
    r = await call(store.redis, touch_call(job_id))
    assert r[0] == ScriptCode.ALREADY
    r = await call(store.redis, touch_call(job_id, token="tok2"))
    assert r[0] == ScriptCode.STALE_LEASE
    r = await call(store.redis, touch_call(job_id, node="n2"))
    assert r[0] == ScriptCode.NOT_LEASE_HOLDER
    r = await call(store.redis, touch_call(keys.tag_of(job_id) + "01GHOST"))
    assert r[0] == ScriptCode.JOB_NOT_FOUND
    await store.cancel(job_id, "")
    r = await call(store.redis, touch_call(job_id))
    assert r[0] == ScriptCode.INVALID_TRANSITION and r[1] == b"cancelled"
    assert documented_codes("touch_job") == {1, 0, -1, -2, -4, -5}


async def test_finish_codes(store: Store) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    for kw, expected in [
        (dict(token="tok2"), ScriptCode.STALE_LEASE),
        (dict(node="n2"), ScriptCode.NOT_LEASE_HOLDER),
        (dict(version=99), ScriptCode.VERSION_MISMATCH),
        (dict(event="submit", dest="queued"), ScriptCode.INVALID_TRANSITION),  # submit does not fire from assigned
        (dict(guard="deadline"), ScriptCode.NOT_DUE),
        (dict(guard="lease"), ScriptCode.NOT_DUE),
        ({}, ScriptCode.APPLIED),
        ({}, ScriptCode.ALREADY),
        (dict(result=b"other"), ScriptCode.RESULT_CONFLICT),
    ]:
        (r,) = await call(store.redis, finish_call(job_id, **kw))  # one job's call: a list of one reply
        assert r[0] == expected, kw
        seen.add(r[0])
    (r,) = await call(store.redis, finish_call(keys.tag_of(job_id) + "01GHOST"))
    seen.add(r[0])
    assert r[0] == ScriptCode.JOB_NOT_FOUND
    assert seen == documented_codes("finish_job")


async def test_a_batch_of_completions_answers_each_job_as_a_call_of_its_own(store: Store, redis: Any) -> None:
    """complete_many: one finish_job call per shard, all in one round trip. Each job's outcome is the one a
    call of its own gives, in the order given (a job twice: the second sees the first); a job whose
    commands fail fails alone. The keys the jobs share are left as job by job calls leave them."""
    one, other = "s1", next(f"s{i}" for i in range(2, 99) if store.shard_of("acme", f"s{i}") != store.shard_of("acme", "s1"))
    ok, ok2, repeat, conflict, stale, broken = [await claimed(store, session_id=one, utterance_index=i) for i in range(6)]
    elsewhere = await claimed(store, session_id=other)
    r, r2 = pb.JobResult(text_translated="r"), pb.JobResult(text_translated="r2")
    await store.complete(repeat, "n1", "tok1", r)
    await store.complete(conflict, "n1", "tok1", r)
    await redis.hdel(keys.JobKeys.of(broken).fsm, "dl")  # a record no version wrote: its finish fails midway
    ghost = keys.tag_of(ok) + "01GHOST"
    items = [(ok, "tok1", r), (stale, "tok0", r), (elsewhere, "tok1", r), (repeat, "tok1", r), (conflict, "tok1", r2),
             (ghost, "tok1", r), (broken, "tok1", r), (ok2, "tok1", r2), (ok, "tok1", r)]
    out = await store.complete_many("n1", [(Lease(j, t), res) for j, t, res in items])
    assert [o.code if isinstance(o, Changed) else type(o).__name__ for o in out] == [
        ScriptCode.APPLIED, "StaleLease", ScriptCode.APPLIED, ScriptCode.ALREADY, "ResultConflict", "JobNotFound",
        "ResponseError", ScriptCode.APPLIED, ScriptCode.ALREADY]
    assert [o.job_id for o in out if isinstance(o, Changed)] == [ok, elsewhere, repeat, ok2, ok]
    for job_id, result in ((ok, r), (ok2, r2), (elsewhere, r)):
        view = await store.get(job_id, lambda tenant: True)
        assert (view.record.state, view.result) == ("succeeded", result)
    shard = keys.shard_of_tag(keys.tag_of(ok))
    timers = {m.decode() for m in await redis.zrange(keys.shard_timers(shard), 0, -1)}
    for job_id in (ok, ok2):  # its lease and deadline timers gone, its forget timer there
        assert [t for t in timers if job_id in t] == [wire.forget_timer(job_id, "acme")]
    assert {wire.lease_timer(stale, "tok1"), wire.deadline_timer(stale)} <= timers
    held = keys.PartitionKeys.of(keys.tag_of(ok)).held
    assert {m.decode() for m in await redis.zrange(held, 0, -1)} == {stale, broken}
    done = 0
    for key in buckets.done_keys(shard, buckets.now_ms(), store.settings.retention_ms):
        done += int(await redis.hget(key, "zh:en|succeeded") or 0)
    assert done == 4  # repeat, conflict, then ok and ok2: counted once each


async def test_requeue_codes(store: Store) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    for kw, expected in [
        (dict(token="tok2"), ScriptCode.STALE_LEASE),
        (dict(node="n2"), ScriptCode.NOT_LEASE_HOLDER),
        (dict(version=99), ScriptCode.VERSION_MISMATCH),
        (dict(event="submit"), ScriptCode.INVALID_TRANSITION),
        (dict(guard="lease"), ScriptCode.NOT_DUE),
        ({}, ScriptCode.APPLIED),
        ({}, ScriptCode.ALREADY),
    ]:
        r = await call(store.redis, requeue_call(job_id, **kw))
        assert r[0] == expected, kw
        seen.add(r[0])
    r = await call(store.redis, requeue_call(keys.tag_of(job_id) + "01GHOST"))
    seen.add(r[0])
    assert seen == documented_codes("requeue_job")


async def test_promote_codes(store: Store, redis: Any) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    tag = keys.tag_of(job_id)
    pk = keys.PartitionKeys.of(tag)
    seen.add((await call(redis, PromoteJob(job_id).call()))[0])  # no retry timer
    await redis.zadd(pk.timers, {wire.retry_timer(job_id): 1})
    seen.add((await call(redis, PromoteJob(job_id).call()))[0])  # job is assigned, not queued
    await store.fail(job_id, "n1", "tok1", pb.JobError(code="E", retryable=True))
    await redis.zadd(pk.timers, {wire.retry_timer(job_id): 1})  # make the backoff due now
    r = await call(redis, PromoteJob(job_id).call())
    seen.add(r[0])
    assert r[0] == ScriptCode.APPLIED and await redis.zscore(pk.queue, job_id) is not None
    ghost = tag + "01GHOST"
    await redis.zadd(pk.timers, {wire.retry_timer(ghost): 1})
    seen.add((await call(redis, PromoteJob(ghost).call()))[0])
    assert seen == documented_codes("promote_job")


async def test_registry_codes(store: Store, redis: Any) -> None:
    call, key = store.scripts.call, keys.node("n1")

    def register(token: str, renew: bool = False) -> Call:
        return RegisterNode("n1", token, renew, 10_000, (("maxc", 1),)).call()

    assert (await call(redis, register("t1")))[0] == 1
    assert (await call(redis, register("t1", renew=True)))[0] == 1
    assert (await call(redis, register("t2")))[1] == b"t1"
    assert (await call(redis, register("t1", renew=True)))[0] == -5
    assert (await call(redis, ReleaseNode("n1", "t1").call()))[0] == -5
    assert (await call(redis, ReleaseNode("n1", "t2").call()))[0] == 1
    assert await redis.exists(key) == 0
    # An entry that expired (a Redis outage longer than the TTL) is taken back by a renewal: nobody
    # replaced the stream.
    assert list(await call(redis, register("t2", renew=True))) == [1, b"", 0]
    assert await redis.hget(key, "session") == b"t2"
    assert documented_codes("register_node") == {1, -5} and documented_codes("release_node") == {1, -5}
    # A drain request (DrainNode) stays with the entry until its deadline: renewals and registrations are
    # told, and the entry outlives its stream (held by none, until the deadline) so that the node, back
    # before then, drains again. After the deadline the node serves again: a supervisor restarting a
    # drained node is not drained for ever.
    assert list(await call(redis, DrainNode("n1", 1_000).call())) == [1]
    assert list(await call(redis, register("t2", renew=True))) == [1, b"t2", 1]
    assert (await call(redis, ReleaseNode("n1", "t2").call()))[0] == 1
    assert await redis.hmget(key, ["session", "draining"]) == [b"", b"1"]
    assert 0 < await redis.pttl(key) <= 1_000  # kept until the request's deadline, not a TTL more
    assert list(await call(redis, DrainNode("n1", 1_000).call())) == [0]  # held by no stream: not registered
    assert list(await call(redis, register("t3"))) == [1, b"", 1]
    deadline = int(await redis.hget(key, "drainreq"))

    async def past_deadline() -> bool:
        seconds, micros = await redis.time()
        return seconds * 1000 + micros // 1000 >= deadline

    await until(past_deadline, timeout=5, what="the drain request's deadline")
    assert list(await call(redis, register("t4"))) == [1, b"t3", 0]  # the request is over
    assert await redis.hget(key, "drainreq") is None
    assert (await call(redis, ReleaseNode("n1", "t4").call()))[0] == 1 and await redis.exists(key) == 0
    assert list(await call(redis, DrainNode("ghost", 1_000).call())) == [0]
    assert documented_codes("drain_node") == {1, 0}


async def test_key_count_is_checked_and_noscript_is_retried(store: Store, redis: Any) -> None:
    with pytest.raises(ValueError, match="takes 3 keys"):
        store.scripts.args(Call("touch_job", ["a"], []))
    job_id = await queued(store)
    await redis.script_flush()  # as after a Redis restart
    (c,) = await store.claim("n1", [(job_id, "tok1")])
    assert c.code == ScriptCode.APPLIED
    await redis.script_flush()
    with pytest.raises(NoScriptError):  # the cache really is empty
        await redis.evalsha(*store.scripts.args(touch_call(job_id)))
    assert (await store.touch("n1", [Lease(job_id, "tok1")]))[0].code == ScriptCode.APPLIED


def test_every_script_has_a_header_and_declares_its_keys() -> None:
    for path in sorted(LUA.glob("*.lua")):
        source = path.read_text()
        count = path.stem.rpartition("-")[2]
        header = source.split("]]", 1)[0]
        assert header.startswith("--[["), path.name
        assert "Output:" in header, path.name
        if count == "n":  # as many keys as the call gives: the header says how they are laid out
            assert "file name `-n`" in header and "KEYS[1]" in header, path.name
            continue
        numkeys = int(count)
        for n in range(1, numkeys + 1):
            assert f"KEYS[{n}]" in header, (path.name, n)
        assert f"KEYS[{numkeys + 1}]" not in source, path.name


def test_each_script_gets_the_prelude_parts_it_uses() -> None:
    """A script is whole prelude parts in prelude order + its file; a part left out is one it never names."""
    every = [constants(p.text) for p in parts(prelude())]
    names = [p.names for p in parts(prelude())]
    sizes = set()
    for script in Scripts():
        body = constants((LUA / f"{script.name}-{script.numkeys or 'n'}.lua").read_text())
        assert script.source.endswith(body), script.name
        head, code = script.source[: -len(body)], lua_code(script.source)
        used = [text for text in every if text in head]
        assert head == "".join(used), script.name
        for text, defined in zip(every, names, strict=True):
            if text not in used:
                assert not any(re.search(rf"(?<![\w.]){n}\b", code) for n in defined), (script.name, defined)
        assert re.search(r"(?<![\w.])(S|E|FIXED)[.[]", code) is None, script.name  # written out as strings
        sizes.add(len(used))
    assert 2 < max(sizes) < len(every)  # the parts differ by script, none takes them all
    with pytest.raises(KeyError):
        constants("S.unknown")


def test_no_script_retypes_a_state_or_event_name() -> None:
    """States and events reach the scripts only through the prelude generated from the machine."""
    names = {str(s) for s in JobState} | {str(e) for e in Event}
    for path in sorted(LUA.glob("*.lua")):
        body = path.read_text().split("]]", 1)[1]  # the header may name them in words
        quoted = set(re.findall(r'"([a-z_]+)"', body))
        assert not quoted & names, (path.name, quoted & names)


async def test_prelude_agrees_with_the_machine_and_wire(redis: Any) -> None:
    """The Lua rules and names run against Redis and compared with fsm/ and server/wire.py."""
    probe = prelude() + """
local out = {}
for _, event in ipairs(ARGV) do
  for _, state in ipairs({S.new, S.queued, S.assigned, S.running, S.succeeded, S.failed, S.cancelled, S.expired}) do
    table.insert(out, event .. "|" .. state .. "|" .. tostring(allowed(event, state)) .. "|"
      .. tostring(is_repeat(state, event, event)) .. "|" .. (FIXED[event] or ""))
  end
end
table.insert(out, lease_member("zh:en:{0}J", "tok") .. "|" .. deadline_member("J") .. "|" .. retry_member("J")
  .. "|" .. wake_message("J", "n1", 4503599627370495) .. WAKES_SEP .. wake_message("K", "", 7))
table.insert(out, forget_member("J", "acme\0s:1", S.failed) .. "|" .. forget_member("J", nil, NOT_ENDED_INDEXED))
return out
"""
    rows = [r.decode() for r in await redis.eval(probe, 0, *[str(e) for e in Event])]
    assert rows.pop().split("|") == [wire.forget_timer("J", "acme", "failed"), wire.forget_timer("J", "")]
    members = rows.pop()
    assert members.split("|") == [wire.lease_timer("zh:en:{0}J", "tok"), wire.deadline_timer("J"),
                                  wire.retry_timer("J"), wire.wake("J", "n1", 2.0 ** 52 - 1) + wire.WAKES_SEP
                                  + wire.wake("K", "", 7)]
    assert wire.parse_wakes(members.split("|")[-1]) == [("J", "n1", 2.0 ** 52 - 1), ("K", "", 7.0)]  # exact scores
    for row in rows:
        event, state, allowed, repeat, fixed = row.split("|")
        assert (allowed == "true") == (JobState(state) in sources_of(event)), row
        assert (repeat == "true") == is_repeat(state, event, event), row
        try:
            assert fixed == fixed_dest(event), row
        except ValueError:
            assert fixed == "", row


async def test_scripts_accept_exactly_what_the_machine_allows(store: Store, redis: Any) -> None:
    """For every event a script applies and every state, the script's verdict is the machine's."""
    job_id = await claimed(store)
    jk = keys.JobKeys.of(job_id)
    for state in JobState:
        if state == JobState.NEW:
            continue
        for event in Event:
            dests = dests_of(event)
            if event in (Event.SUBMIT, Event.ASSIGN, Event.START):
                continue  # covered by the claim, touch and submit tests (they fire from one state)
            await redis.hset(jk.fsm, mapping={"state": str(state), "ev": "", "ver": 5, "lease": 1, "dl": 1})
            if JobState.QUEUED in dests:
                r = await store.scripts.call(redis, RequeueJob(job_id, event, "queued", Fence(), Outcome()).call())
            else:
                (r,) = await store.scripts.call(redis, FinishJob(job_id, event, str(dests[0]), Fence(), Outcome(),
                                                                 60_000).call())
            assert (r[0] == ScriptCode.APPLIED) == (state in sources_of(event)), (event, state, r)
            if r[0] != ScriptCode.APPLIED:
                assert r[0] == ScriptCode.INVALID_TRANSITION and r[1] == str(state).encode()


async def test_retry_codes(store: Store, redis: Any) -> None:
    call, seen = store.scripts.call, set()
    job_id = await claimed(store)
    await store.fail(job_id, "n1", "tok1", pb.JobError(code="E", message="fatal"))
    rec = await store.record(job_id)
    assert rec.state == JobState.FAILED

    def retry(version: int, target: str = job_id) -> Call:
        tag = keys.tag_of(target)
        assert rec.done_bucket  # the finish named the done bucket that counts the job
        return RetryJob(target, version, rec.state, rec.done_bucket, keys.idempotency(tag, "acme", "s1", "u:0:en"),
                        keys.session_jobs(keys.shard_of_tag(tag), "acme", "s1"), "acme", 0, 86_400_000, 0, "why",
                        60_000).call()

    seen.add((await call(redis, retry(rec.version + 5)))[0])
    r = await call(redis, retry(rec.version))
    seen.add(r[0])
    assert r[0] == ScriptCode.APPLIED and r[1] == b"queued" and r[2] == rec.version + 1
    after = await store.record(job_id)
    assert (after.attempt, after.max_attempts, after.state) == (0, rec.max_attempts, JobState.QUEUED)
    assert after.deadline - after.updated == rec.deadline - rec.created  # as far ahead as the first deadline was
    assert await redis.pttl(keys.JobKeys.of(job_id).fsm) == -1  # no longer expiring
    assert await redis.zscore(keys.PartitionKeys.of(keys.tag_of(job_id)).queue, job_id) is not None
    r = await call(redis, retry(after.version))
    seen.add(r[0])
    assert r[0] == ScriptCode.INVALID_TRANSITION and r[1] == b"queued"
    seen.add((await call(redis, retry(1, keys.tag_of(job_id) + "01GHOST")))[0])
    assert seen == documented_codes("retry_job") == {1, -1, -2, -3}


async def test_forget_codes(store: Store, redis: Any) -> None:
    """forget_job acts only when it removes the timer itself (1), else changes nothing: no timer (0), or
    one not due by Redis' clock (-10: a sweeper whose own clock runs ahead)."""
    (job,) = await store.submit([spec()])
    job_id = job.job_id
    tag = keys.tag_of(job_id)
    pk, shard = keys.PartitionKeys.of(tag), keys.shard_of_tag(tag)
    member = wire.forget_timer(job_id, "acme")
    forget = forget_call([ForgetJob(member, job_id, "acme", wire.NOT_ENDED_INDEXED)])
    assert await store.scripts.call(redis, forget) == [0]  # no such timer: the entries stay
    assert await redis.zcard(pk.jobs) == 1 and await redis.zcard(keys.tenant_jobs(shard, "acme")) == 1
    await store.cancel(job_id, "")
    member = wire.forget_timer(job_id, "acme", "cancelled")
    assert await redis.zscore(pk.timers, member) is not None
    forget = forget_call([ForgetJob(member, job_id, "acme", "cancelled")])
    assert await store.scripts.call(redis, forget) == [-10]  # due when the record expires, a retention away
    assert await redis.zcard(pk.jobs) == 1 and await redis.zscore(pk.timers, member) is not None
    await redis.zadd(pk.timers, {member: 1})  # due now
    assert [await store.scripts.call(redis, forget) for _ in range(2)] == [[1], [0]]
    for key in (pk.jobs, keys.tenant_jobs(shard, "acme"), keys.ended_jobs(shard, "cancelled")):
        assert await redis.exists(key) == 0, key


async def forgets_of_one_shard(store: Store, redis: Any) -> tuple[list[ForgetJob], list[str], str]:
    """Four jobs of one shard and partition (two tenants), three cancelled; the forgets of a sweep that names
    the first twice and the fourth's (never written) timer, with the first two timers due now and the
    third not: (forgets, job ids, the partition tag)."""
    beta = next(f"s{i}" for i in range(100) if store.shard_of("beta", f"s{i}") == store.shard_of("acme", "s"))
    jobs = await store.submit([spec(tenant_id=t, session_id=sess, utterance_index=i)
                               for i, (t, sess) in enumerate([("acme", "s"), ("acme", "s"), ("beta", beta), ("beta", beta)])])
    ids = [j.job_id for j in jobs]
    assert len({keys.tag_of(j) for j in ids}) == 1  # one pool, one shard: one partition
    tag = keys.tag_of(ids[0])
    for job_id in ids[:3]:
        await store.cancel(job_id, "")
    tenants = ["acme", "acme", "beta"]
    members = [wire.forget_timer(j, t, "cancelled") for j, t in zip(ids, tenants, strict=False)]
    await redis.zadd(keys.PartitionKeys.of(tag).timers, {members[0]: 1, members[1]: 1})  # due now
    forgets = [ForgetJob(m, j, t, "cancelled") for m, j, t in zip(members, ids, tenants, strict=False)]
    forgets += [forgets[0], ForgetJob(wire.forget_timer(ids[3], "beta"), ids[3], "beta", wire.NOT_ENDED_INDEXED)]
    return forgets, ids, tag


async def test_a_forget_call_answers_each_timer_in_its_place_and_acts_once(store: Store, redis: Any) -> None:
    """One forget_job call for a sweep's timers of a shard: a timer named twice acts once, one not yet due
    and one gone change nothing; the entries of the jobs that act leave every index, the others' stay."""
    forgets, ids, tag = await forgets_of_one_shard(store, redis)
    pk, shard = keys.PartitionKeys.of(tag), keys.shard_of_tag(tag)
    assert await store.scripts.call(redis, forget_call(forgets)) == [1, 1, -10, 0, 0]
    left = {m.decode().split(" ")[0] for m in await redis.zrange(pk.jobs, 0, -1)}
    assert left == {j[-26:] for j in ids[2:]}  # the third (not due) and the fourth (running) stay
    assert await redis.zcard(keys.ended_jobs(shard, "cancelled")) == 1
    assert await redis.zcard(keys.tenant_jobs(shard, "acme")) == 0
    assert await redis.zcard(keys.tenant_jobs(shard, "beta")) == 2
    assert await redis.zscore(pk.timers, forgets[2].member) is not None
    assert await redis.zscore(pk.timers, forgets[0].member) is None
    assert await store.forget([forgets[0].member, forgets[1].member]) == []  # gone already: nothing again
    await redis.zadd(pk.timers, {forgets[2].member: 1})
    assert await store.forget([forgets[2].member]) == [ids[2]]  # through the store: the job ids that left


@pytest.mark.single_redis
async def test_a_forget_call_reads_the_timers_once_and_writes_each_key_once(store: Store, redis: Any) -> None:
    forgets, _, _ = await forgets_of_one_shard(store, redis)

    async def calls() -> Counter[str]:
        stats = await redis.info("commandstats")
        return Counter({c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("zmscore", "zrem", "time")})

    before = await calls()
    await store.scripts.call(redis, forget_call(forgets))
    # One ZMSCORE and one TIME; one ZREM each for the timers, the pool's index, acme's index, the ended index.
    assert await calls() - before == Counter(zmscore=1, time=1, zrem=4)


async def test_pause_codes(store: Store, redis: Any) -> None:
    tag = keys.partition_tag("zh:en", 0)
    paused = await store.scripts.call(redis, PausePool(tag, True, "why").call())
    assert paused[0] == 1 and paused[1] == b"why" and paused[2] > 0
    again = await store.scripts.call(redis, PausePool(tag, True).call())
    assert list(again) == list(paused)  # idempotent: reason and time kept
    assert (await store.scripts.call(redis, PausePool(tag, False).call()))[0] == 0
    assert not await redis.exists(keys.PartitionKeys.of(tag).paused)
    assert documented_codes("pause_pool") == {1, 0}
