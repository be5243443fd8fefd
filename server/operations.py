"""The Redis side of the admin calls that change things (server/admin.py validates and answers):
retrying a failed or expired job, cancelling a session's jobs, pausing and resuming a pool, draining
a node on whichever instance holds it. Every job change is a compare-and-set script, as in store.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from lingua_sdk import pb

from ..fsm import HELD, Event, TransitionRefused, decide, fixed_dest, sources_of
from . import buckets, keys, wire
from .calls import DrainNode, Fence, FinishJob, Outcome, PausePool, RetryJob
from .errors import ConcurrentModification, InvalidTransition, JobNotFound, ScriptCode, raise_for
from .store import Changed, JobRecord, Store, _s, idempotency_key


@dataclass(frozen=True, slots=True)
class Pause:
    """A pool's dispatch state: paused (with its reason and when, ms) or not."""

    pool: str
    paused: bool
    reason: str = ""
    at_ms: int = 0


@dataclass(frozen=True, slots=True)
class SessionCancelled:
    cancelled: list[str]
    already_finished: int


def pause_of(pool: str, partitions: list[list[bytes | None]]) -> Pause:
    """A pool's pause state from its partitions' paused hashes ([reason, at] each): paused when any is
    (pause and resume write them one by one: a pause cut short leaves some paused, and those claim
    nothing), with the earliest pause's reason and time."""
    found = sorted((int(at), _s(reason)) for reason, at in partitions if at is not None)
    if not found:
        return Pause(pool, False)
    at, reason = found[0]
    return Pause(pool, True, reason, at)


class Operations:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis
        self.settings = store.settings

    # -- RetryJob ---------------------------------------------------------------------------------

    async def retry(self, job_id: str, *, deadline_ms: int, max_attempts: int, reason: str) -> Changed:
        """A failed or expired job back to queued (InvalidTransition naming its state otherwise)."""
        s = self.settings
        for _ in range(8):
            view = await self.store.get(job_id, lambda _tenant: True)
            rec, spec = view.record, view.spec
            if rec.state not in sources_of(Event.RETRY):
                raise InvalidTransition(f"job {job_id} is {rec.state}: only a failed or expired job can be retried")
            tag = keys.tag_of(job_id)
            shard = keys.shard_of_tag(tag)
            done = rec.done_bucket or buckets.done(shard, rec.updated, s.retention_ms)[0]  # (ended before `done`)
            call = RetryJob(
                job_id, rec.version, rec.state, done, idempotency_key(tag, spec),
                keys.session_jobs(shard, spec.tenant_id, spec.session_id), spec.tenant_id,
                deadline_ms, s.max_job_ttl_ms, max_attempts, reason or "retried by an operator", s.retention_ms,
            ).call()
            reply = await self.store.scripts.call(self.redis, call)
            code = int(reply[0])
            if code == ScriptCode.VERSION_MISMATCH:
                continue
            if code < 0:
                raise_for(code, job=job_id, event=Event.RETRY, state=_s(reply[1]) if len(reply) > 1 else "")
            if self.store.tenants.of(spec.tenant_id).max_queued:
                # Unfinished again: it counts against its tenant's max_queued (an operator's retry is not
                # refused by it), until it finishes (quotas.finished) or its deadline passes.
                await self.redis.zadd(keys.TenantKeys.of(spec.tenant_id).jobs, {job_id: int(reply[3])})
            return Changed(job_id, ScriptCode(code), _s(reply[1]), int(reply[2]))
        raise ConcurrentModification(f"job {job_id} keeps changing; retry")

    # -- CancelSession ----------------------------------------------------------------------------

    async def cancel_session(self, tenant_id: str, session_id: str, reason: str) -> SessionCancelled:
        """Cancel every unfinished job of the session: its index, then every record (one pipelined
        round trip), then every cancel with the version read (one more); a job that changed in between
        goes through the one-job path (store.cancel). Nodes holding a cancelled job are told."""
        shard = keys.shard_tag(self.store.shard_of(tenant_id, session_id))
        job_ids = [_s(j) for j in await self.redis.zrange(keys.session_jobs(shard, tenant_id, session_id), 0, -1)]
        if not job_ids:
            return SessionCancelled([], 0)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.JobKeys.of(job_id).fsm)
            found = await pipe.execute()
        error = pb.JobError(code="LINGUA_CANCELLED", message=reason or "session cancelled by an operator")
        outcome = Outcome(error.code, error.message, False)
        records: list[JobRecord] = []
        finished = 0
        for job_id, h in zip(job_ids, found, strict=True):
            if not h:
                continue  # past its retention
            rec = JobRecord.parse(job_id, h)
            try:
                decide(rec.state, Event.CANCEL)
            except TransitionRefused:
                finished += 1
                continue
            records.append(rec)
        dest = fixed_dest(Event.CANCEL)
        replies = await self.store.finish_many([FinishJob(rec.job_id, Event.CANCEL, dest, Fence(version=rec.version),
                                                          outcome, self.settings.retention_ms) for rec in records])
        cancelled: list[str] = []
        tell: list[JobRecord] = []
        for rec, reply in zip(records, replies, strict=True):
            code = int(reply[0]) if not isinstance(reply, Exception) else ScriptCode.VERSION_MISMATCH
            if code == ScriptCode.APPLIED:
                self.store._changed(rec.job_id, reply, Event.CANCEL)  # counted in the metrics, as every change
                if self.store.tracing is not None:  # its finish span, as every finish's
                    self.store.tracing.finished(rec.job_id, Event.CANCEL, dest, node_id=rec.node, tenant_id=rec.tenant,
                                                attempt=rec.attempt, terminal=True)
                cancelled.append(rec.job_id)
                self.store.quotas.finished(rec.tenant, rec.job_id)
                if rec.state in HELD:
                    tell.append(rec)
                continue
            try:  # it moved since it was read: decide again on a fresh read
                changed = await self.store.cancel(rec.job_id, error.message)
                if changed.code == ScriptCode.APPLIED:
                    cancelled.append(rec.job_id)
            except (InvalidTransition, JobNotFound):
                finished += 1
        if tell:  # (a cluster client sends no PUBLISH in a pipeline: concurrently instead)
            await asyncio.gather(*(self.redis.publish(keys.node_channel(rec.node), wire.cancel(rec.job_id, rec.token))
                                   for rec in tell))
        return SessionCancelled(cancelled, finished)

    # -- PausePool / ResumePool -------------------------------------------------------------------

    async def set_paused(self, pool: str, pause: bool, reason: str = "") -> Pause:
        """Pause or resume every partition of the pool (one pipelined round trip), then tell every
        instance's dispatcher (keys.pool_channel): a resume is dispatched at once."""
        calls = [PausePool(tag, pause, reason).call() for tag in self.store.tags_of_pool(pool)]
        replies = self.store._raise_errors(await self.store.scripts.call_many(self.redis, calls))
        await self.redis.publish(keys.pool_channel(pool), wire.PAUSE if pause else wire.RESUME)
        if not pause:
            return Pause(pool, False)
        return pause_of(pool, [[r[1], r[2]] for r in replies])

    async def paused(self, pools: list[str]) -> dict[str, Pause]:
        """The pause state of each pool (pause_of its partitions'), one round trip."""
        n = self.settings.partitions
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in pools:
                for tag in self.store.tags_of_pool(pool):
                    pipe.hmget(keys.PartitionKeys.of(tag).paused, "reason", "at")
            found = await pipe.execute()
        return {pool: pause_of(pool, found[i * n: (i + 1) * n]) for i, pool in enumerate(pools)}

    # -- DrainNode --------------------------------------------------------------------------------

    async def drain(self, node_id: str) -> bool:
        """Record the drain in the node's registry entry (its registrations and renewals honour it), then
        tell the instance holding its stream; False when no such node is registered."""
        request = DrainNode(node_id, self.store.settings.node_ttl_ms)
        if not int((await self.store.scripts.call(self.redis, request.call()))[0]):
            return False
        await self.redis.publish(keys.node_channel(node_id), wire.DRAIN)
        return True

