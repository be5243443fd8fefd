"""The job store: the only module that talks to Redis about jobs.

Every state change goes through a compare-and-set Lua script (server/lua). The FSM (fsm/) decides:
hot paths (submit, claim, ack, complete) hand the scripts allow-lists derived from the machine and
cost one round trip; conditional events (fail, lease expiry, cancel, ...) read the record, let the
machine decide, and commit with the version they read, re-reading when they lose the race.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lingua_sdk import pb
from ulid import ULID

from ..fsm import (
    GIVES_BACK_ATTEMPT,
    HELD,
    TERMINAL,
    Event,
    JobState,
    TransitionRefused,
    decide,
    fixed_dest,
    is_repeat,
    unacknowledged,
)
from . import keys, wire
from .calls import (
    CALL_JOBS,
    ClaimJob,
    DropTimer,
    Fence,
    FinishJob,
    FinishJobs,
    ForgetJob,
    Outcome,
    PromoteJob,
    RequeueJob,
    ShareSweep,
    SubmitJob,
    TouchJob,
    WatchJob,
    claim_call,
    forget_call,
    submit_call,
)
from .errors import (
    AlreadyExists,
    ConcurrentModification,
    InvalidTransition,
    JobNotFound,
    NotDue,
    NotLeaseHolder,
    ScriptCode,
    StaleLease,
    raise_for,
)
from .metrics import Metrics
from .quotas import Quotas
from .rates import Rates
from .scripts import Call, Scripts
from .settings import Settings
from .tenants import Tenants
from .throttle import ThrottledWarning
from .tracing import Tracing

log = logging.getLogger(__name__)
_junk_timers = ThrottledWarning(log, interval_s=10)  # a bad writer's members would come every sweep
SET_ASIDE_MS = 60_000  # a due timer that cannot be acted on is due again this much later (Store.set_aside)


def _s(value: bytes | None) -> str:
    return value.decode() if value else ""


def read_views(pipe: Any, job_ids: list[str]) -> None:
    """Queue on `pipe` the reads of the jobs' views (the record, with its spec and a short result; no
    payload): parse_views, then with_results."""
    for job_id in job_ids:
        pipe.hgetall(keys.JobKeys.of(job_id).fsm)


def parse_views(job_ids: list[str], replies: list[Any]) -> list[JobView | None]:
    """The views read_views' replies give, None for a job whose record is gone. A succeeded job's result
    that is not in its record (result_elsewhere) is None here: with_results reads it."""
    views: list[JobView | None] = []
    for job_id, h in zip(job_ids, replies, strict=True):
        result = wire.joined(h, b"r") if h else None
        views.append(JobView(JobRecord.parse(job_id, h), pb.JobSpec.FromString(wire.joined(h, b"spec") or b""),
                             pb.JobResult.FromString(result) if result is not None else None, None) if h else None)
    return views


def result_elsewhere(view: JobView) -> bool:
    """Whether the view's result is in the job's result key: a succeeded job's whose record has none (a result
    longer than the record keeps, wire.RESULT_PIECES, or a record an earlier version wrote)."""
    return view.result is None and view.record.state == _SUCCEEDED


async def with_results(redis: Any, views: list[JobView | None]) -> list[JobView | None]:
    """`views` with the results kept in result keys read (one round trip, only when some are)."""
    away = [(i, v) for i, v in enumerate(views) if v is not None and result_elsewhere(v)]
    if not away:
        return views
    async with redis.pipeline(transaction=False) as pipe:
        for _, view in away:
            pipe.get(keys.JobKeys.of(view.record.job_id).result)
        found = await pipe.execute()
    out = list(views)
    for (i, view), raw in zip(away, found, strict=True):
        if raw is not None:
            out[i] = dataclasses.replace(view, result=pb.JobResult.FromString(raw))
    return out


_SUBMITTED, _SUBMIT, _SUCCEEDED = str(fixed_dest(Event.SUBMIT)), str(Event.SUBMIT), str(JobState.SUCCEEDED)


def history(h: dict[bytes, bytes], after: int = 0) -> list[dict[str, Any]]:
    """The state changes of a record read whole, oldest first, from version `after` + 1 on: what the
    scripts published as they happened ({s, v, a, n, e, t}, and ec, em, er with an error). The submit
    (version 1) is not stored: it is the record's creation. Version v (2 and on) is field `h<v>` (in pieces
    when long), holding [s, e, a, n, t - created] or [s, e, a, n, t - created, ec, em, er] (JSON; the Lua
    prelude's record_event)."""
    created, version = created_of(h), _i(h.get(b"ver"))
    out: list[dict[str, Any]] = []
    if after < 1 <= version:
        out.append({"s": _SUBMITTED, "v": 1, "a": 0, "n": "", "e": str(Event.SUBMIT), "t": created})
    for v in range(max(after + 1, 2), version + 1):
        raw = wire.joined(h, b"h%d" % v)
        if raw is not None:
            s, e, a, n, t, *error = json.loads(raw)
            entry = {"s": s, "v": v, "a": a, "n": n, "e": e, "t": created + t}
            if error:
                entry["ec"], entry["em"], entry["er"] = error
            out.append(entry)
        elif v == version:  # a record an earlier version wrote (its events list is not read): its current state
            out.append({"s": _s(h.get(b"state")), "v": v, "a": _i(h.get(b"att")), "n": _s(h.get(b"node")),
                        "e": _s(h.get(b"ev")), "t": _i(h.get(b"updated"))})
    return out


def last_error(h: dict[bytes, bytes]) -> tuple[str, str, bool]:
    """The record's last error (code, message, retryable): that of the change whose version `err` names
    (its `h<v>`, in pieces when long: a message of any length keeps the record a listpack). A record an
    earlier version wrote holds it in `ecode`, `emsg`, `eretry`."""
    version = h.get(b"err")
    raw = wire.joined(h, b"h" + version) if version else None
    if raw is not None:
        code, message, retryable = json.loads(raw)[5:8]
        return str(code), str(message), str(retryable) == "1"
    return _s(h.get(b"ecode")), _s(h.get(b"emsg")), h.get(b"eretry") == b"1"


def _timer(member: str) -> wire.Timer | None:
    """A due timer's member read, or None (logged) for one no scheduler wrote: its kind or its job id (which
    carries its partition's tag) is not one. Such a member is never acted on: the sweep sets it aside
    (Store.set_aside), where it no longer holds back the timers due after it."""
    try:
        timer = wire.parse_timer(member)
        keys.tag_of(timer.job_id)
    except ValueError:
        _junk_timers("ignoring a timer member no scheduler wrote (set aside for %d s): %r", SET_ASIDE_MS // 1000,
                     member)
        return None
    return timer


def is_timer(member: str) -> bool:
    """Whether a due timer's member is one a scheduler wrote (logged when not: see _timer)."""
    return _timer(member) is not None


def _shard_of_job(job_id: str) -> str:
    """The group of a call for one shard's jobs (finish_job, forget_job): the shard's hash tag."""
    return keys.shard_of_tag(keys.tag_of(job_id))


def _i(value: bytes | None) -> int:
    return int(value) if value else 0


def created_of(h: dict[bytes, bytes]) -> int:
    """When the record's job was created: `c` (`created` in a record an earlier version wrote)."""
    return _i(h.get(b"c") or h.get(b"created"))


def spec_digest(meta: pb.JobSpec, payload: bytes) -> str:
    """What a repeat submit must match: the spec without payload (`meta`) and the payload, less the
    fields a client's retry may change (trace_id, trace_context, deadline)."""
    core = meta
    if meta.trace_id or meta.trace_context or meta.HasField("deadline"):  # (a copy only when one is set)
        core = pb.JobSpec()
        core.CopyFrom(meta)
        core.ClearField("trace_id")
        core.ClearField("trace_context")
        core.ClearField("deadline")
    h = hashlib.blake2b(core.SerializeToString(deterministic=True), digest_size=16)
    h.update(payload)
    return h.hexdigest()[:16]  # 64 bits tell a repeat from other work; an earlier version stored all 32 digits


@dataclass(frozen=True, slots=True)
class Lease:
    """One claim of a job by a node: job id + lease token is the fencing token."""

    job_id: str
    token: str
    attempt: int = 0  # for messages; the token is what is checked


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The FSM record of a job, as read from `lingua:v1:job:<id>:fsm`."""

    job_id: str
    state: str
    version: int
    attempt: int
    max_attempts: int
    node: str
    token: str
    lease: int
    deadline: int
    created: int
    updated: int
    event: str
    error_code: str
    error_message: str
    error_retryable: bool
    tenant: str  # the job's tenant (from `sess`, "<tenant>\0<session>"): what authorization checks
    done_bucket: str = ""  # the done bucket its finish counted it in ("" before it ended, or written before)

    @classmethod
    def parse(cls, job_id: str, h: dict[bytes, bytes]) -> JobRecord:
        """A record read whole. Fields a record holds only once they say something are read as what their
        absence means: no `ev` (never changed) the submit, no `updated` its creation, no `att`, `node`, `tok`,
        `lease` (never claimed) 0 and empty; a lease only while the job is held. `c` and `m` are `created` and
        `maxatt` in a record an earlier version wrote."""
        code, message, retryable = last_error(h)
        created, state = created_of(h), _s(h.get(b"state"))
        return cls(
            job_id=job_id,
            state=state,
            version=_i(h.get(b"ver")),
            attempt=_i(h.get(b"att")),
            max_attempts=_i(h.get(b"m") or h.get(b"maxatt")),
            node=_s(h.get(b"node")),
            token=_s(h.get(b"tok")),
            lease=_i(h.get(b"lease")) if state in HELD else 0,
            deadline=_i(h.get(b"dl")),
            created=created,
            updated=_i(h.get(b"updated")) or created,
            event=_s(h.get(b"ev")) or _SUBMIT,
            error_code=code,
            error_message=message,
            error_retryable=retryable,
            tenant=_s(h.get(b"sess")).partition("\x00")[0],
            done_bucket=_s(h.get(b"done")),
        )


def idempotency_key(tag: str, spec: pb.JobSpec) -> str:
    """The key naming a submit's identity: its idempotency_key, else its utterance and target language.
    Only an explicit idempotency_key's key is written: the default identity is found in the session's
    index (lua/submit_job-n.lua), and its key is only read for records written before that."""
    identity = f"k:{spec.idempotency_key}" if spec.idempotency_key else f"u:{spec.utterance_index}:{spec.tgt_lang}"
    return keys.idempotency(tag, spec.tenant_id, spec.session_id, identity)


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
    token: str = ""
    attempt: int = 0
    lease: int = 0
    meta: bytes = b""
    payload: bytes = b""
    reserved_until: int = 0
    scores: tuple[float, ...] = ()  # the candidates' queue scores, in the same order


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
    tenant: str = ""  # of a job that reached a terminal state now (finish_job tells it)



class Store:
    """Jobs in Redis. `redis` is a redis.asyncio client (Redis or RedisCluster) with bytes replies."""

    def __init__(self, redis: Any, settings: Settings, scripts: Scripts | None = None,
                 tenants: Tenants | None = None) -> None:
        if not settings.partitions:
            raise ValueError("settings.partitions is 0 (auto): resolve it first (server.app.resolve_partitions)")
        self.redis = redis
        self.settings = settings
        self.scripts = scripts or Scripts()
        self.tenants = tenants if tenants is not None else Tenants(settings.tenants)
        self.quotas = Quotas(redis, self.scripts, self.tenants, settings)
        self.rates = Rates(redis, self.scripts)  # submits and finishes per second, the pools zset (server/rates.py)
        # Completions and releases commit without reading the record first (one round trip), so
        # the machine must give these events one destination (fixed_dest raises otherwise).
        self._release_dest = fixed_dest(Event.RELEASE)
        self._complete_dest = fixed_dest(Event.COMPLETE)
        self.tracing: Tracing | None = None  # set by the app when tracing is on: finish spans (server/tracing.py)
        # This instance's counters and histograms (server/metrics.py); None when the HTTP port is off.
        self.metrics: Metrics | None = None

    # -- submit ---------------------------------------------------------------------------------

    def partition_tag(self, spec: pb.JobSpec) -> str:
        pool = keys.pool_of(spec.src_lang, spec.tgt_lang)
        return keys.partition_tag(pool, self.shard_of(spec.tenant_id, spec.session_id))

    def shard_of(self, tenant_id: str, session_id: str) -> int:
        """The shard of a session: every job of it, whatever its pair."""
        return keys.partition_for(tenant_id, session_id, self.settings.partitions)

    def tags_of_pool(self, pool: str) -> list[str]:
        return keys.partition_tags(pool, self.settings.partitions)

    def shard_timers(self, shards: list[int]) -> list[str]:
        return [keys.shard_timers(keys.shard_tag(s)) for s in shards]

    def _submit_job(self, spec: pb.JobSpec) -> SubmitJob:
        s = self.settings
        tag = self.partition_tag(spec)
        job_id = tag + str(ULID())
        meta = spec
        if spec.payload:  # the spec stored is without it (a copy only then)
            meta = pb.JobSpec()
            meta.CopyFrom(spec)
            meta.ClearField("payload")
        session_jobs = keys.session_jobs(keys.shard_of_tag(tag), spec.tenant_id, spec.session_id)
        return SubmitJob(
            job_id=job_id,
            identity=idempotency_key(tag, spec),
            meta=meta.SerializeToString(),
            payload=spec.payload,
            priority=spec.priority,
            max_attempts=spec.max_attempts or s.default_max_attempts,
            deadline_ms=spec.deadline.ToMilliseconds() if spec.HasField("deadline") else 0,
            default_ttl_ms=s.default_job_ttl_ms,
            execution_timeout_ms=(spec.execution_timeout.ToMilliseconds() if spec.HasField("execution_timeout")
                                  else s.default_execution_timeout_ms),
            retention_ms=s.retention_ms,
            session=keys.session_field(spec.tenant_id, spec.session_id),
            affinity_ttl_ms=s.affinity_ttl_ms,
            digest=spec_digest(meta, spec.payload),
            session_jobs=session_jobs,
            utterance_index=spec.utterance_index,
            tenant_id=spec.tenant_id,
            fair_step=self.tenants.of(spec.tenant_id).step,
            keyed=bool(spec.idempotency_key),
            pools_known=self.rates.pools_known(tag),
            session_known=self.rates.session_known(session_jobs),
        )

    async def submit(self, specs: list[pb.JobSpec]) -> list[Submitted]:
        """Create the jobs (or find the ones an identical submit made): one pipelined round trip.

        A repeat whose content differs from the job its identity has raises AlreadyExists naming it;
        the other jobs of the batch (before and after it) are stored (a retry of the batch finds them).
        An identity is per target language: with another src_lang it is the other pair's job, a conflict.

        Tenants with limits (--tenants) are admitted first (server/quotas.py: one more round trip,
        for them only); a refusal raises TenantLimit (or TooLarge) and stores nothing."""
        jobs = [self._submit_job(spec) for spec in specs]
        admitted = await self.quotas.admit(jobs)
        replies = await self._submit_calls(jobs)
        if admitted:
            await self.quotas.settle(admitted, {job.job_id for job, r in zip(jobs, replies, strict=True)
                                                if r[0] == ScriptCode.APPLIED})
        for job, r in zip(jobs, replies, strict=True):
            if r[0] == ScriptCode.APPLIED:
                self.rates.submitted(job.job_id)
                self.rates.pooled(keys.tag_of(job.job_id), int(r[3]))
                self.rates.session_kept(job.session_jobs, int(r[4]))
                if self.metrics is not None:
                    self.metrics.of_job(job.job_id).submitted.inc()
        for i, (job, r) in enumerate(zip(jobs, replies, strict=True)):
            if r[0] == ScriptCode.IDENTITY_CONFLICT:
                other = keys.pool_of_tag(keys.tag_of(_s(r[1])))
                if other != keys.pool_of_tag(keys.tag_of(job.job_id)):
                    raise AlreadyExists(f"jobs[{i}]: job {_s(r[1])} already exists for this identity in pair "
                                        f"{other} (src_lang differs: an identity is per tgt_lang)", _s(r[1]), i)
                raise AlreadyExists(
                    f"jobs[{i}]: job {_s(r[1])} already exists for this identity with different content "
                    "(payload, payload_ref, priority, max_attempts, execution_timeout or utterance_index differ)",
                    _s(r[1]), i)
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

    async def _submit_calls(self, jobs: list[SubmitJob]) -> list[Any]:
        """The replies of submit_job for `jobs`, in order (the first error raised)."""
        replies = await self._batched([job.job_id for job in jobs], lambda at: submit_call([jobs[i] for i in at]))
        return self._raise_errors(replies)

    async def _batched(self, job_ids: list[str], build: Callable[[list[int]], Call],
                       group: Callable[[str], str] = keys.tag_of) -> list[Any]:
        """Replies of a script that takes several jobs per call (`build`: the call for the items at those
        positions), jobs of one `group` each (a partition, or a shard): one call per group and CALL_JOBS of
        its items, all pipelined in one round trip; each item's reply in its place (a failed call's error in
        place of each of its items)."""
        groups: dict[str, list[int]] = {}
        for i, job_id in enumerate(job_ids):
            groups.setdefault(group(job_id), []).append(i)
        chunks = [at[c:c + CALL_JOBS] for at in groups.values() for c in range(0, len(at), CALL_JOBS)]
        replies: list[Any] = [None] * len(job_ids)
        for at, reply in zip(chunks, await self.scripts.call_many(self.redis, [build(at) for at in chunks]),
                             strict=True):
            for n, i in enumerate(at):
                replies[i] = reply if isinstance(reply, Exception) else reply[n]
        return replies

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, job_id: str, visible: Callable[[str], bool], *, include_payload: bool = False) -> JobView:
        """The job's record, spec and result in one pipelined round trip; a job whose tenant fails
        `visible` (the caller's tenant check) is JobNotFound. The payload, when asked for, is read only
        after that check (a second round trip), so no other tenant's payload is ever fetched for a caller."""
        jk = keys.JobKeys.of(job_id)
        h = await self.redis.hgetall(jk.fsm)
        (view,) = parse_views([job_id], [h])
        if view is None or not visible(view.record.tenant):
            raise JobNotFound(f"job {job_id} not found")
        if not (include_payload or result_elsewhere(view)):
            return view
        async with self.redis.pipeline(transaction=False) as pipe:  # after the tenant check, in one round trip
            if include_payload:
                pipe.get(jk.payload)
            if result_elsewhere(view):
                pipe.get(jk.result)
            found = await pipe.execute()
        payload = found.pop(0) if include_payload else None
        result = pb.JobResult.FromString(found[0]) if found and found[0] is not None else None
        return dataclasses.replace(view, payload=payload, result=result if result is not None else view.result)

    async def session_read(self, tenant_id: str, session_id: str, span: tuple[int, int | None] | None,
                           job_ids: list[str]) -> tuple[list[tuple[str, int]], list[JobView | None]]:
        """WatchSession's one round trip: the session's (job id, utterance index) with low <= index <=
        high (`span`; high None: no upper bound; span None: the index is not read), and the views of
        `job_ids` (None for a job whose record is gone)."""
        index = keys.session_jobs(keys.shard_tag(self.shard_of(tenant_id, session_id)), tenant_id, session_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            if span is not None:
                low, high = span
                pipe.zrangebyscore(index, low, "+inf" if high is None else high, withscores=True)
            read_views(pipe, job_ids)
            replies = await pipe.execute()
        read = 0 if span is None else 1
        members = [(_s(j), int(score)) for found in replies[:read] for j, score in found]
        return members, await with_results(self.redis, parse_views(job_ids, replies[read:]))

    async def record(self, job_id: str) -> JobRecord:
        h = await self.redis.hgetall(keys.JobKeys.of(job_id).fsm)
        if not h:
            raise JobNotFound(f"job {job_id} not found")
        return JobRecord.parse(job_id, h)

    async def watch(self, job_id: str) -> tuple[list[dict[str, Any]], str]:
        """WatchJob's first read, one round trip: marks the job watched (its later state changes are
        published on its channel: subscribe first), and returns every state change so far and its tenant.
        JobNotFound when its record is gone."""
        fsm = keys.JobKeys.of(job_id).fsm
        marked, h = await self.scripts.call_then_read(self.redis, WatchJob(job_id).call(),
                                                      lambda pipe: pipe.hgetall(fsm))  # marked first, then read
        for reply in (marked, h):
            if isinstance(reply, Exception):
                raise reply
        if not h:
            raise JobNotFound(f"job {job_id} not found")
        return history(h), JobRecord.parse(job_id, h).tenant

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's state changes after version `after`, oldest first; JobNotFound when its record is gone."""
        h = await self.redis.hgetall(keys.JobKeys.of(job_id).fsm)
        if not h:
            raise JobNotFound(f"job {job_id} not found")
        return history(h, after)

    async def timelines(self, job_ids: list[str]) -> list[list[dict[str, Any]]]:
        """Every state change of each job, oldest first, in one pipelined round trip (the dashboard)."""
        if not job_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.JobKeys.of(job_id).fsm)
            found = await pipe.execute()
        return [history(h) for h in found]

    # -- claims (queued -> assigned) ------------------------------------------------------------

    async def peek(self, tags: list[str], count: int) -> dict[str, list[tuple[str, float]]]:
        """The first `count` (job id, queue score) of each partition: candidates for claim()."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tag in tags:
                pipe.zrange(keys.PartitionKeys.of(tag).queue, 0, count - 1, withscores=True)
            replies = await pipe.execute()
        return {tag: [(_s(j), score) for j, score in found] for tag, found in zip(tags, replies, strict=True)}

    async def claim(self, node_id: str, candidates: list[tuple[str, str]], hint_count: int = 8) -> list[Claim]:
        """Try to claim each (job id, lease token) for `node_id`: claim_many() for one node, raising the
        first per-claim error."""
        out = []
        for claim in await self.claim_many([(job_id, node_id, token) for job_id, token in candidates], hint_count):
            if isinstance(claim, Exception):
                raise claim
            out.append(claim)
        return out

    async def claim_many(self, items: list[tuple[str, str, str]], hint_count: int = 8) -> list[Claim | Exception]:
        """Try to claim each (job id, node id, lease token), pipelined in one round trip: the claims
        the dispatcher pairs for all its nodes in one pass go together. A claim that fails on its own
        (a script error on a damaged record) is returned in its place, so it cannot fail the others.

        Idempotent per token: claiming again with the same token answers the same assignment, which
        is how a caller whose reply was lost learns what it holds."""
        s = self.settings
        claims = [ClaimJob(job_id, node_id, token, s.ack_timeout_ms, s.affinity_wait_ms, hint_count, s.avoid_ms,
                           s.affinity_ttl_ms) for job_id, node_id, token in items]
        replies = await self._batched([c.job_id for c in claims], lambda at: claim_call([claims[i] for i in at]))
        out: list[Claim | Exception] = []
        metrics = self.metrics
        for (job_id, _node_id, token), r in zip(items, replies, strict=True):
            if isinstance(r, Exception):
                out.append(r)
                continue
            code = ScriptCode(r[0])
            hints, scores = [_s(j) for j in r[1][::2]], tuple(float(s) for s in r[1][1::2])
            if code == ScriptCode.APPLIED:
                if metrics is not None and len(r) > 7:  # claimed now, not a repeat of this token's claim
                    metrics.claimed(job_id, int(r[6]), int(r[7]))
                out.append(Claim(job_id, code, hints, token, int(r[2]), int(r[3]), r[4] or b"", r[5] or b"",
                                 scores=scores))
            else:
                held = code in (ScriptCode.RESERVED, ScriptCode.AVOIDED)
                out.append(Claim(job_id, code, hints, reserved_until=int(r[2]) if held else 0, scores=scores))
        return out

    async def release(self, node_id: str, leases: list[Lease]) -> list[Changed | Exception]:
        """Claims that never reached their node go back to the queue with their attempt given back
        (fenced by node + token: a claim someone else holds now is left alone). One round trip."""
        calls = [
            RequeueJob(lease.job_id, Event.RELEASE, self._release_dest, Fence(node_id, lease.token), Outcome(),
                       give_back_attempt=True).call()
            for lease in leases
        ]
        return self._outcomes([lease.job_id for lease in leases], await self.scripts.call_many(self.redis, calls),
                              Event.RELEASE)

    # -- node reports ---------------------------------------------------------------------------

    async def touch(self, node_id: str, leases: list[Lease], *, mode: str = "ack",
                    lease_ms: int | None = None) -> list[Touched]:
        """Ack/heartbeat (mode "ack") or shorten (mode "shorten") leases, pipelined in one round trip."""
        lease_ms = self.settings.lease_ms if lease_ms is None else lease_ms
        calls = [TouchJob(lease.job_id, node_id, lease.token, lease_ms, mode).call() for lease in leases]
        out = []
        for lease, r in zip(leases, self._raise_errors(await self.scripts.call_many(self.redis, calls)),
                            strict=True):
            code = ScriptCode(r[0])
            if code >= 0:
                out.append(Touched(lease.job_id, code, int(r[1]), _s(r[2])))
            else:
                detail = r[1] if len(r) > 1 else b""  # the state, attempt or node that refused it
                out.append(Touched(lease.job_id, code,
                                   detail=detail.decode() if isinstance(detail, bytes) else str(detail)))
        return out

    async def complete(self, job_id: str, node_id: str, token: str, result: pb.JobResult) -> Changed:
        """Success, fenced by node + lease token: one round trip."""
        (outcome,) = await self.complete_many(node_id, [(Lease(job_id, token), result)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def complete_many(self, node_id: str, items: list[tuple[Lease, pb.JobResult]]) -> list[Changed | Exception]:
        """complete() for several jobs in one round trip; per-job errors are returned, not raised."""
        finishes = [
            FinishJob(lease.job_id, Event.COMPLETE, self._complete_dest, Fence(node_id, lease.token),
                      Outcome(result=result.SerializeToString()), self.settings.retention_ms)
            for lease, result in items
        ]
        outcomes = self._outcomes([lease.job_id for lease, _ in items], await self.finish_many(finishes),
                                  Event.COMPLETE)
        for outcome, (lease, _) in zip(outcomes, items, strict=True):
            if isinstance(outcome, Changed) and outcome.tenant:
                self.quotas.finished(outcome.tenant, outcome.job_id)
            if self.tracing is not None and isinstance(outcome, Changed) and outcome.code == ScriptCode.APPLIED:
                self.tracing.finished(outcome.job_id, Event.COMPLETE, outcome.state, node_id=node_id,
                                      tenant_id=outcome.tenant, attempt=lease.attempt, terminal=True)
        return outcomes

    async def finish_many(self, finishes: list[FinishJob]) -> list[Any]:
        """finish_job for each job, one call per shard (up to CALL_JOBS jobs), all in one round trip: the
        jobs' replies (or the exception of their call) in the order given. A job's commands that touch keys
        of the shard every job of it touches (the timers, the done bucket, its session's channel...) are sent
        once per call, not once per job (lua/finish_job-n.lua)."""
        return await self._batched([f.job_id for f in finishes],
                                   lambda at: FinishJobs(tuple(finishes[i] for i in at)).call(), group=_shard_of_job)

    async def fail(self, job_id: str, node_id: str, token: str, error: pb.JobError) -> Changed:
        """A failed attempt, fenced: requeued with backoff while retryable with attempts left, else failed."""
        return await self.transition(job_id, Event.FAIL, node=node_id, token=token, error=error)

    async def cancel(self, job_id: str, reason: str, visible: Callable[[str], bool] | None = None) -> Changed:
        """Cancel; a node holding the job is told (see transition()). A job whose tenant fails
        `visible` is JobNotFound, as if it did not exist."""
        error = pb.JobError(code="LINGUA_CANCELLED", message=reason or "cancelled by client")
        return await self.transition(job_id, Event.CANCEL, error=error, visible=visible)

    # -- the generic read / decide / compare-and-set path ---------------------------------------

    async def transition(
        self,
        job_id: str,
        event: Event,
        *,
        node: str | None = None,
        token: str | None = None,
        error: pb.JobError | None = None,
        guard: str = "",
        avoid: bool = False,
        record: JobRecord | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> Changed:
        """Read the record, let the FSM decide, commit with the version read; re-read on a lost race.
        `visible`: the caller's tenant check (a job of a tenant it fails is JobNotFound).
        `lease_expired` and `node_lost` of a job its node never acknowledged are `ack_timeout`
        (decided on each record read: an ack may land in between)."""
        requested = event
        for _ in range(8):
            rec = record or await self.record(job_id)
            record = None
            event = unacknowledged(rec.state, requested)
            if visible is not None and not visible(rec.tenant):
                raise JobNotFound(f"job {job_id} not found")
            if token is not None and rec.token != token:
                raise StaleLease(f"job {job_id}: the lease token is not the job's current claim (stale lease; "
                                 f"the job's current attempt is {rec.attempt})")
            if node is not None and rec.node != node:
                raise NotLeaseHolder(f"job {job_id}: held by another node")
            if is_repeat(rec.state, rec.event, event):
                return Changed(job_id, ScriptCode.ALREADY, rec.state, rec.version)
            try:
                dest = decide(rec.state, event, attempt=rec.attempt, max_attempts=rec.max_attempts,
                              retryable=bool(error and error.retryable))
            except TransitionRefused as err:
                raise InvalidTransition(f"job {job_id} is {rec.state}: event {event} not allowed") from err
            fence = Fence(node or "", token or "", rec.version)
            outcome = Outcome(error.code, error.message, error.retryable) if error else Outcome()
            if dest == JobState.QUEUED:
                given_back = event in GIVES_BACK_ATTEMPT  # no execution started: no backoff either
                backoff = 0 if given_back else min(self.settings.backoff_max_ms,
                                                   self.settings.backoff_base_ms * 2 ** max(rec.attempt - 1, 0))
                reply = await self.scripts.call(self.redis, RequeueJob(
                    job_id, event, dest, fence, outcome, backoff_ms=backoff, avoid=avoid, guard=guard,
                    give_back_attempt=given_back).call())
            else:  # finish_job answers a list, one reply per job: this job's
                (reply,) = await self.scripts.call(self.redis, FinishJob(
                    job_id, event, dest, fence, outcome, self.settings.retention_ms, guard=guard).call())
            if isinstance(reply, Exception):
                raise reply
            if reply[0] == ScriptCode.VERSION_MISMATCH:
                continue
            changed = self._changed(job_id, reply, event)
            if changed.tenant:
                self.quotas.finished(changed.tenant, job_id)
            if self.tracing is not None and changed.code == ScriptCode.APPLIED:
                self.tracing.finished(job_id, event, changed.state, node_id=rec.node, tenant_id=rec.tenant,
                                      attempt=rec.attempt, terminal=bool(changed.tenant))
            if changed.code == ScriptCode.APPLIED and node is None and rec.state in HELD:
                # Taken away from its node by someone else (cancel, expiry, lease): tell the node.
                await self.redis.publish(keys.node_channel(rec.node), wire.cancel(job_id, rec.token))
            return changed
        raise ConcurrentModification(f"job {job_id} keeps changing; retry")

    # -- timers ---------------------------------------------------------------------------------

    async def due_timers(self, shards: list[int], now_ms: int, limit: int = 200) -> list[tuple[str, str]]:
        """(key, member) of timers due by now_ms in the given shards (all their pools), one pipelined round
        trip: at most `limit` per shard, so the cost is what is due, not how many keys exist."""
        timers = self.shard_timers(shards)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in timers:
                pipe.zrangebyscore(key, "-inf", now_ms, start=0, num=limit)
            replies = await pipe.execute()
        return [(key, _s(m)) for key, members in zip(timers, replies, strict=True) for m in members]

    async def set_aside(self, timers: list[tuple[str, str]], until_ms: int) -> None:
        """Make these due timers (key, member) due again at until_ms, where they no longer stand before the
        timers due after them: members no scheduler wrote, timers whose record fails (one round trip).
        Only members still there, and only later (ZADD XX GT): one moved on meanwhile keeps its time."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, member in timers:
                pipe.zadd(key, {member: until_ms}, xx=True, gt=True)
            await pipe.execute()

    async def keep_partitions(self) -> bytes | None:
        """Store the key layout and this instance's partition count again where Redis lost them (a restart
        without persistence, a flush) while instances ran, so that an instance starting then adopts this
        count (server/app.py resolve_partitions) instead of picking its own. Never overwrites (SET NX);
        the layout first, as at the start. Two GETs when both are there. Returns the count Redis holds when
        it is not this instance's (an instance started while Redis had lost it stored its own), else None."""
        if await self.redis.get(keys.LAYOUT) is None:
            await self.redis.set(keys.LAYOUT, keys.LAYOUT_VERSION, nx=True)
        mine = str(self.settings.partitions).encode()
        stored = await self.redis.get(keys.PARTITIONS)
        if stored is None:
            if await self.redis.set(keys.PARTITIONS, mine, nx=True):
                return None
            stored = await self.redis.get(keys.PARTITIONS)
        return None if stored in (mine, None) else stored

    async def share_sweep(self, instance_id: str, live_ms: int, *, alive: bool = True) -> list[str]:
        """Record this instance's sign of life (or its leaving); the live instances, sorted."""
        reply = await self.scripts.call(self.redis, ShareSweep(instance_id, live_ms, alive).call())
        return [_s(i) for i in reply]

    async def forget(self, members: list[str]) -> list[str]:
        """Fire due forget timers (wire.forget_timer): each finished job leaves ListJobs' indexes as its
        record expires, one forget_job call per shard (up to CALL_JOBS timers), all in one round trip. The
        jobs this call took out (a timer another instance or a RetryJob removed first is left alone)."""
        forgets = [ForgetJob(member, t.job_id, t.tenant, t.ended) for member in members
                   if (t := _timer(member)) is not None]
        if not forgets:
            return []
        replies = self._raise_errors(await self._batched(
            [f.job_id for f in forgets], lambda at: forget_call([forgets[i] for i in at]), group=_shard_of_job))
        return [f.job_id for f, r in zip(forgets, replies, strict=True) if r == 1]

    async def fire_timer(self, member: str) -> Changed | None:
        """Act on one due timer: promote a retry, take back an expired lease (an assignment never
        acknowledged: ack_timeout, attempt given back), expire a job, forget a finished one (its
        Changed has state "": the job is gone)."""
        timer = _timer(member)
        if timer is None:
            return None
        job_id = timer.job_id
        if timer.kind == wire.FORGET:
            return Changed(job_id, ScriptCode.APPLIED, "", 0) if await self.forget([member]) else None
        try:
            if timer.kind == wire.RETRY:
                r = await self.scripts.call(self.redis, PromoteJob(job_id).call())
                return Changed(job_id, ScriptCode(r[0]), JobState.QUEUED, 0)
            if timer.kind == wire.LEASE:
                rec = await self.record(job_id)
                if rec.state == JobState.ASSIGNED:
                    error = pb.JobError(
                        code="LINGUA_ACK_TIMEOUT", retryable=True,
                        message=f"node {rec.node} did not acknowledge attempt {rec.attempt} within the ack "
                        "timeout; the attempt was given back",
                    )
                else:
                    error = pb.JobError(
                        code="LINGUA_LEASE_EXPIRED", retryable=True,
                        message=f"node {rec.node} did not ack or heartbeat attempt {rec.attempt} in time, "
                        "or the attempt ran past its execution timeout",
                    )
                return await self.transition(job_id, Event.LEASE_EXPIRED, token=timer.token or None, error=error,
                                             guard="lease", record=rec, avoid=True)
            error = pb.JobError(code="LINGUA_DEADLINE_EXCEEDED", message="the job's deadline passed")
            return await self.transition(job_id, Event.EXPIRE, error=error, guard="deadline")
        except (JobNotFound, InvalidTransition, StaleLease):
            # The job is gone or moved on. A lease member names this claim, so removing it can never remove a
            # newer claim's lease timer; a deadline member is the job's one, which a RetryJob may have put back
            # with a new deadline since: removed unless the job lives again (drop_timer).
            timers = keys.PartitionKeys.of(keys.tag_of(job_id)).timers
            if timer.kind == wire.LEASE:
                await self.redis.zrem(timers, member)
            else:
                await self.scripts.call(self.redis, DropTimer(timers, member, job_id).call())
        except (NotDue, ConcurrentModification):
            pass  # another instance or a heartbeat got there first
        return None

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _raise_errors(replies: list[Any]) -> list[Any]:
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def _outcomes(self, job_ids: list[str], replies: list[Any], event: str) -> list[Changed | Exception]:
        out: list[Changed | Exception] = []
        for job_id, r in zip(job_ids, replies, strict=True):
            try:
                out.append(self._changed(job_id, r, event))
            except Exception as err:
                out.append(err)
        return out

    def _changed(self, job_id: str, reply: Any, event: str) -> Changed:
        """A finish_job or requeue_job reply as Changed (counted in the metrics when applied now)."""
        if isinstance(reply, Exception):
            raise reply
        code = int(reply[0])
        if code < 0:
            detail = reply[1] if len(reply) > 1 else b""
            raise_for(code, job=job_id, event=event,
                      state=detail.decode() if isinstance(detail, bytes) else "",
                      attempt=detail if isinstance(detail, int) else 0)
        dest, tenant = _s(reply[1]), ""
        if code == ScriptCode.APPLIED:
            if dest in TERMINAL:  # finish_job: {1, state, version, session, from, run ms}
                tenant = _s(reply[3]).partition("\x00")[0]
                self.rates.finished(job_id)
                if self.metrics is not None:
                    self.metrics.changed(job_id, event, _s(reply[4]), dest, int(reply[5]))
            elif self.metrics is not None:  # requeue_job: {1, state, version, from}
                self.metrics.changed(job_id, event, _s(reply[3]), dest, -1)
        return Changed(job_id, ScriptCode(code), dest, int(reply[2]), tenant)
