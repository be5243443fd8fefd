"""The job store: the only module that talks to Redis about jobs.

Every state change goes through a compare-and-set Lua script (server/lua). The FSM (fsm/) decides:
hot paths (submit, claim, ack, complete) hand the scripts allow-lists derived from the machine and
cost one round trip; conditional events (fail, lease expiry, cancel, ...) read the record, let the
machine decide, and commit with the version they read, re-reading when they lose the race.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ulid import ULID

from ..fsm import HELD, TERMINAL, Event, JobState, TransitionRefused, decide, sources_of
from . import keys
from .errors import (
    ConcurrentModification,
    InvalidTransition,
    JobNotFound,
    NotDue,
    NotLeaseHolder,
    ScriptCode,
    StaleAttempt,
    raise_for,
)
from .proto import scheduler_pb2 as pb
from .scripts import Scripts
from .settings import Settings

log = logging.getLogger(__name__)


def _allow(event: Event) -> str:
    """The states `event` may fire from, as the ",a,b," list the scripts take."""
    return "," + ",".join(sources_of(event)) + ","


def _s(value: bytes | None) -> str:
    return value.decode() if value else ""


def _i(value: bytes | None) -> int:
    return int(value) if value else 0


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The FSM record of a job, as read from `lingua:v1:job:<id>:fsm`."""

    job_id: str
    state: str
    version: int
    attempt: int
    max_attempts: int
    node: str
    lease: int
    deadline: int
    created: int
    updated: int
    event: str
    error_code: str
    error_message: str
    error_retryable: bool

    @classmethod
    def parse(cls, job_id: str, h: dict[bytes, bytes]) -> JobRecord:
        return cls(
            job_id=job_id,
            state=_s(h.get(b"state")),
            version=_i(h.get(b"ver")),
            attempt=_i(h.get(b"att")),
            max_attempts=_i(h.get(b"maxatt")),
            node=_s(h.get(b"node")),
            lease=_i(h.get(b"lease")),
            deadline=_i(h.get(b"dl")),
            created=_i(h.get(b"created")),
            updated=_i(h.get(b"updated")),
            event=_s(h.get(b"ev")),
            error_code=_s(h.get(b"ecode")),
            error_message=_s(h.get(b"emsg")),
            error_retryable=h.get(b"eretry") == b"1",
        )


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as GetJob shows it."""

    record: JobRecord
    spec: pb.JobSpec
    result: pb.JobResult | None
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class Submitted:
    job_id: str
    created: bool
    state: str


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of one claim call: a job for the node, or why not, plus the next candidates."""

    job_id: str
    code: ScriptCode
    candidates: list[str]
    attempt: int = 0
    lease: int = 0
    meta: bytes = b""
    payload: bytes = b""
    reserved_until: int = 0


@dataclass(frozen=True, slots=True)
class Touched:
    """The outcome of an ack, heartbeat or lease shortening of one job."""

    job_id: str
    code: ScriptCode
    lease: int = 0
    state: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Changed:
    """A committed (or already committed) state change."""

    job_id: str
    code: ScriptCode
    state: str
    version: int


class Store:
    """Jobs in Redis. `redis` is a redis.asyncio client (Redis or RedisCluster) with bytes replies."""

    def __init__(self, redis: Any, settings: Settings, scripts: Scripts | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.scripts = scripts or Scripts()
        self._known_pools: set[str] = set()
        # Allow-lists and destinations, derived from the machine once.
        self._submit_dest = decide(JobState.NEW, Event.SUBMIT)
        self._assign_from = JobState.QUEUED
        self._assign_dest = decide(self._assign_from, Event.ASSIGN)
        self._start_from = JobState.ASSIGNED
        self._start_dest = decide(self._start_from, Event.START)
        self._complete_from = _allow(Event.COMPLETE)
        self._complete_dest = decide(sources_of(Event.COMPLETE)[0], Event.COMPLETE)

    # -- submit ---------------------------------------------------------------------------------

    def partition_tag(self, spec: pb.JobSpec) -> str:
        pool = keys.pool_of(spec.src_lang, spec.tgt_lang)
        return keys.partition_tag(
            pool, keys.partition_for(spec.tenant_id, spec.session_id, self.settings.partitions)
        )

    def tags_of_pool(self, pool: str) -> list[str]:
        return keys.partition_tags(pool, self.settings.partitions)

    async def submit(self, specs: list[pb.JobSpec]) -> list[Submitted]:
        """Create the jobs (or find the ones an identical submit made): one pipelined round trip."""
        s = self.settings
        calls = []
        for spec in specs:
            tag = self.partition_tag(spec)
            job_id = tag + str(ULID())
            identity = f"k:{spec.idempotency_key}" if spec.idempotency_key else (
                f"u:{spec.utterance_index}:{spec.tgt_lang}"
            )
            meta = pb.JobSpec()
            meta.CopyFrom(spec)
            meta.ClearField("payload")
            jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(tag)
            deadline = spec.deadline.ToMilliseconds() if spec.HasField("deadline") else 0
            xto = (
                spec.execution_timeout.ToMilliseconds()
                if spec.HasField("execution_timeout")
                else s.default_execution_timeout_ms
            )
            calls.append((
                "submit_job",
                [
                    keys.idempotency(tag, spec.tenant_id, spec.session_id, identity),
                    jk.fsm, jk.meta, jk.payload, jk.events, pk.queue, pk.timers, pk.affinity,
                ],
                [
                    job_id, meta.SerializeToString(), spec.payload, spec.priority,
                    spec.max_attempts or s.default_max_attempts, deadline, s.default_job_ttl_ms, xto,
                    s.retention_ms, keys.session_field(spec.tenant_id, spec.session_id),
                    s.affinity_ttl_ms, keys.wake_channel(keys.pool_of_tag(tag)), self._submit_dest,
                ],
            ))
        await self._remember_pools({keys.pool_of(sp.src_lang, sp.tgt_lang) for sp in specs})
        replies = self._raise_errors(await self.scripts.call_many(self.redis, calls))
        out = [
            Submitted(_s(r[1]), r[0] == ScriptCode.APPLIED, _s(r[2]) if r[0] == ScriptCode.APPLIED else "")
            for r in replies
        ]
        repeats = [i for i, o in enumerate(out) if not o.created]
        if repeats:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in repeats:
                    pipe.hget(keys.JobKeys.of(out[i].job_id).fsm, "state")
                states = await pipe.execute()
            for i, state in zip(repeats, states, strict=True):
                out[i] = Submitted(out[i].job_id, False, _s(state))
        return out

    async def _remember_pools(self, pools: set[str]) -> None:
        new = pools - self._known_pools
        if new:
            await self.redis.sadd(keys.POOLS, *new)
            self._known_pools |= new

    async def pools(self) -> set[str]:
        found = {_s(p) for p in await self.redis.smembers(keys.POOLS)}
        self._known_pools |= found
        return found

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, job_id: str, *, include_payload: bool = False) -> JobView:
        """The job's record, spec, result (and payload): one pipelined round trip."""
        jk = keys.JobKeys.of(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(jk.fsm)
            pipe.get(jk.meta)
            pipe.get(jk.result)
            if include_payload:
                pipe.get(jk.payload)
            replies = await pipe.execute()
        if not replies[0]:
            raise JobNotFound(f"job {job_id} not found")
        spec = pb.JobSpec.FromString(replies[1] or b"")
        result = pb.JobResult.FromString(replies[2]) if replies[2] is not None else None
        payload = replies[3] if include_payload else None
        return JobView(JobRecord.parse(job_id, replies[0]), spec, result, payload)

    async def record(self, job_id: str) -> JobRecord:
        h = await self.redis.hgetall(keys.JobKeys.of(job_id).fsm)
        if not h:
            raise JobNotFound(f"job {job_id} not found")
        return JobRecord.parse(job_id, h)

    async def events(self, job_id: str, start: int = 0) -> list[dict[str, Any]]:
        """The job's state changes from index `start` on, oldest first."""
        return [json.loads(e) for e in await self.redis.lrange(keys.JobKeys.of(job_id).events, start, -1)]

    # -- claims (queued -> assigned) ------------------------------------------------------------

    async def peek(self, tags: list[str], count: int) -> dict[str, list[tuple[str, float]]]:
        """The first `count` (job id, queue score) of each partition: candidates for claim()."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.zrange(keys.PartitionKeys.of(tag).queue, 0, count - 1, withscores=True)
            replies = await pipe.execute()
        return {tag: [(_s(j), score) for j, score in found] for tag, found in zip(tags, replies, strict=True)}

    async def claim(self, node_id: str, candidates: list[str], hint_count: int = 8) -> list[Claim]:
        """Try to claim each candidate for `node_id`, pipelined in one round trip."""
        s = self.settings
        calls = []
        for job_id in candidates:
            tag = keys.tag_of(job_id)
            jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(tag)
            calls.append((
                "claim_job",
                [pk.queue, pk.timers, pk.affinity, jk.fsm, jk.meta, jk.payload, jk.events],
                [job_id, node_id, s.ack_timeout_ms, s.affinity_wait_ms, self._assign_from,
                 self._assign_dest, hint_count, s.avoid_ms],
            ))
        out = []
        for job_id, r in zip(candidates, self._raise_errors(await self.scripts.call_many(self.redis, calls)),
                             strict=True):
            code = ScriptCode(r[0])
            hints = [_s(j) for j in r[1]]
            if code == ScriptCode.APPLIED:
                out.append(Claim(job_id, code, hints, int(r[2]), int(r[3]), r[4] or b"", r[5] or b""))
            else:
                held = code in (ScriptCode.RESERVED, ScriptCode.AVOIDED)
                out.append(Claim(job_id, code, hints, reserved_until=int(r[2]) if held else 0))
        return out

    # -- node reports ---------------------------------------------------------------------------

    async def touch(self, node_id: str, leases: list[tuple[str, int]], *, mode: str = "ack",
                    lease_ms: int | None = None) -> list[Touched]:
        """Ack/heartbeat (mode "ack") or shorten (mode "shorten") leases, pipelined in one round trip."""
        lease_ms = self.settings.lease_ms if lease_ms is None else lease_ms
        calls = []
        for job_id, attempt in leases:
            jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(keys.tag_of(job_id))
            calls.append((
                "touch_job",
                [jk.fsm, jk.events, pk.timers],
                [job_id, node_id, attempt, lease_ms, mode, self._start_from, self._start_dest],
            ))
        out = []
        for (job_id, _), r in zip(leases, await self.scripts.call_many(self.redis, calls), strict=True):
            if isinstance(r, Exception):
                raise r
            code = ScriptCode(r[0])
            if code >= 0:
                out.append(Touched(job_id, code, int(r[1]), _s(r[2])))
            else:
                detail = r[1] if len(r) > 1 else b""  # the state, attempt or node that refused it
                out.append(Touched(job_id, code, detail=detail.decode() if isinstance(detail, bytes) else str(detail)))
        return out

    async def complete(self, job_id: str, node_id: str, attempt: int, result: pb.JobResult) -> Changed:
        """Success, fenced by node + attempt: one round trip (allow-list from the FSM)."""
        (outcome,) = await self.complete_many(node_id, [(job_id, attempt, result)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def complete_many(self, node_id: str, items: list[tuple[str, int, pb.JobResult]]) -> list[Changed | Exception]:
        """complete() for several jobs in one round trip; per-job errors are returned, not raised."""
        calls = [
            ("finish_job", self._finish_keys(job_id), [
                job_id, Event.COMPLETE, self._complete_from, self._complete_dest, "", node_id, attempt,
                1, result.SerializeToString(), "", "", 0, self.settings.retention_ms, "",
            ])
            for job_id, attempt, result in items
        ]
        out: list[Changed | Exception] = []
        for (job_id, attempt, _), r in zip(items, await self.scripts.call_many(self.redis, calls), strict=True):
            try:
                out.append(self._changed(job_id, r, Event.COMPLETE, attempt))
            except Exception as err:
                out.append(err)
        return out

    async def fail(self, job_id: str, node_id: str, attempt: int, error: pb.JobError) -> Changed:
        """A failed attempt, fenced: requeued with backoff while retryable with attempts left, else failed."""
        return await self.transition(job_id, Event.FAIL, node=node_id, attempt=attempt, error=error)

    async def cancel(self, job_id: str, reason: str) -> Changed:
        """Cancel; a node holding the job is told (see transition())."""
        error = pb.JobError(code="LINGUA_CANCELLED", message=reason or "cancelled by client")
        return await self.transition(job_id, Event.CANCEL, error=error)

    # -- the generic read / decide / compare-and-set path ---------------------------------------

    async def transition(
        self,
        job_id: str,
        event: Event,
        *,
        node: str | None = None,
        attempt: int | None = None,
        error: pb.JobError | None = None,
        guard: str = "",
        avoid: bool = False,
        record: JobRecord | None = None,
    ) -> Changed:
        """Read the record, let the FSM decide, commit with the version read; re-read on a lost race."""
        for _ in range(8):
            rec = record or await self.record(job_id)
            record = None
            if attempt is not None and rec.attempt != attempt:
                raise StaleAttempt(f"job {job_id}: attempt {attempt} is stale (current attempt {rec.attempt})")
            if node is not None and rec.node != node:
                raise NotLeaseHolder(f"job {job_id}: held by another node")
            if rec.event == event and (rec.state in TERMINAL or rec.state == JobState.QUEUED):
                return Changed(job_id, ScriptCode.ALREADY, rec.state, rec.version)  # a repeat
            try:
                dest = decide(rec.state, event, attempt=rec.attempt, max_attempts=rec.max_attempts,
                              retryable=bool(error and error.retryable))
            except TransitionRefused as err:
                raise InvalidTransition(f"job {job_id} is {rec.state}: event {event} not allowed") from err
            reply = await self.scripts.call(self.redis, *self._transition_call(
                rec, event, dest, node, attempt, error, guard, avoid))
            if reply[0] == ScriptCode.VERSION_MISMATCH:
                continue
            changed = self._changed(job_id, reply, event, attempt or 0)
            if changed.code == ScriptCode.APPLIED and node is None and rec.state in HELD:
                # Taken away from its node by someone else (cancel, expiry, lease): tell the node.
                await self.redis.publish(keys.node_channel(rec.node), f"cancel {job_id} {rec.attempt}")
            return changed
        raise ConcurrentModification(f"job {job_id} keeps changing; retry")

    def _transition_call(self, rec: JobRecord, event: Event, dest: JobState, node: str | None,
                         attempt: int | None, error: pb.JobError | None, guard: str,
                         avoid: bool) -> tuple[str, list[str], list[Any]]:
        job_id = rec.job_id
        fence = [node or "", "" if attempt is None else attempt]
        err = [error.code, error.message, int(error.retryable)] if error else ["", "", 0]
        if dest == JobState.QUEUED:
            jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(keys.tag_of(job_id))
            backoff = min(self.settings.backoff_max_ms, self.settings.backoff_base_ms * 2 ** max(rec.attempt - 1, 0))
            return ("requeue_job", [jk.fsm, jk.events, pk.queue, pk.timers], [
                job_id, event, _allow(event), dest, rec.version, *fence, backoff, *err, int(avoid), guard,
                keys.wake_channel(keys.pool_of_tag(keys.tag_of(job_id))),
            ])
        return ("finish_job", self._finish_keys(job_id), [
            job_id, event, _allow(event), dest, rec.version, *fence, 0, "", *err, self.settings.retention_ms,
            guard,
        ])

    # -- timers ---------------------------------------------------------------------------------

    async def due_timers(self, tags: list[str], now_ms: int, limit: int = 200) -> list[tuple[str, str]]:
        """(tag, member) of timers due by now_ms in the given partitions, one pipelined round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.zrangebyscore(keys.PartitionKeys.of(tag).timers, "-inf", now_ms, start=0, num=limit)
            replies = await pipe.execute()
        return [(tag, _s(m)) for tag, members in zip(tags, replies, strict=True) for m in members]

    async def fire_timer(self, member: str) -> Changed | None:
        """Act on one due timer: promote a retry, take back an expired lease, expire a job."""
        kind, job_id = member[:1], member[2:]
        try:
            if kind == "r":
                tag = keys.tag_of(job_id)
                jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(tag)
                r = await self.scripts.call(self.redis, "promote_job", [jk.fsm, pk.queue, pk.timers], [
                    job_id, keys.wake_channel(keys.pool_of_tag(tag)), JobState.QUEUED])
                return Changed(job_id, ScriptCode(r[0]), JobState.QUEUED, 0)
            if kind == "l":
                rec = await self.record(job_id)
                error = pb.JobError(
                    code="LINGUA_LEASE_EXPIRED", retryable=True,
                    message=f"node {rec.node} did not ack or heartbeat attempt {rec.attempt} in time, "
                    "or the attempt ran past its execution timeout",
                )
                return await self.transition(job_id, Event.LEASE_EXPIRED, error=error, guard="lease", record=rec,
                                             avoid=True)
            if kind == "d":
                error = pb.JobError(code="LINGUA_DEADLINE_EXCEEDED", message="the job's deadline passed")
                return await self.transition(job_id, Event.EXPIRE, error=error, guard="deadline")
        except (JobNotFound, InvalidTransition):
            await self._drop_timer(job_id, member)  # the job is gone or already moved on
        except (NotDue, ConcurrentModification):
            pass  # another instance or a heartbeat got there first
        return None

    async def _drop_timer(self, job_id: str, member: str) -> None:
        """A timer whose job is gone or already moved on: remove it (ZREM only; no state involved)."""
        await self.redis.zrem(keys.PartitionKeys.of(keys.tag_of(job_id)).timers, member)

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _finish_keys(job_id: str) -> list[str]:
        jk, pk = keys.JobKeys.of(job_id), keys.PartitionKeys.of(keys.tag_of(job_id))
        return [jk.fsm, jk.meta, jk.payload, jk.result, jk.events, pk.queue, pk.timers]

    @staticmethod
    def _raise_errors(replies: list[Any]) -> list[Any]:
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    @staticmethod
    def _changed(job_id: str, reply: Any, event: str, attempt: int) -> Changed:
        if isinstance(reply, Exception):
            raise reply
        code = int(reply[0])
        if code < 0:
            detail = reply[1] if len(reply) > 1 else b""
            raise_for(code, job=job_id, event=event,
                      state=detail.decode() if isinstance(detail, bytes) else "",
                      attempt=detail if isinstance(detail, int) else attempt)
        return Changed(job_id, ScriptCode(code), _s(reply[1]), int(reply[2]))
