"""One typed builder per Lua script: named fields in, the script's KEYS and ARGV out.

Every caller builds its script calls here, so the positional order of a script's header lives in
one place. Keys come from server/keys.py, timer members from the Lua prelude (server/wire.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from . import buckets, keys
from .scripts import Call

# The most jobs one call of a script for several jobs takes (submit_job, claim_job, finish_job, forget_job): a Submit's
# jobs of a partition go in calls of this many, so no call holds Redis for long (a batch may be --max-batch, 500).
CALL_JOBS = 100


def _bounded(script: str, jobs: Any) -> None:
    """The builders of calls for several jobs take 1 to CALL_JOBS of them (callers chunk)."""
    if not 0 < len(jobs) <= CALL_JOBS:
        raise ValueError(f"{script}: 1 to {CALL_JOBS} jobs per call, not {len(jobs)}")


def _job(job_id: str) -> tuple[keys.JobKeys, keys.PartitionKeys, str]:
    return keys.JobKeys.of(job_id), *_partition(keys.tag_of(job_id))


def _shard(job_id: str) -> tuple[str, keys.ShardKeys]:
    return _shard_of(keys.tag_of(job_id))


# A partition's (and a shard's) key names are the same for each of its jobs, and there are few of them
# (pools x shards): made once, not for every job of every call (a finish call built 9 names per job).
@functools.lru_cache(maxsize=4096)
def _partition(tag: str) -> tuple[keys.PartitionKeys, str]:
    return keys.PartitionKeys.of(tag), keys.wake_channel(keys.pool_of_tag(tag))


@functools.lru_cache(maxsize=4096)
def _shard_of(tag: str) -> tuple[str, keys.ShardKeys]:
    shard = keys.shard_of_tag(tag)
    return shard, keys.ShardKeys.of(shard)


@dataclass(frozen=True, slots=True)
class SubmitJob:
    job_id: str
    identity: str  # the idempotency key's name (keys.idempotency)
    meta: bytes
    payload: bytes
    priority: int
    max_attempts: int
    deadline_ms: int  # 0: now + default_ttl_ms
    default_ttl_ms: int
    execution_timeout_ms: int
    retention_ms: int
    session: str  # keys.session_field
    affinity_ttl_ms: int
    digest: str
    session_jobs: str  # keys.session_jobs of the job's shard
    utterance_index: int
    tenant_id: str
    fair_step: int  # wire.fair_step of the tenant's weight
    keyed: bool  # the identity is the spec's idempotency key (else its utterance and target language: no key of its own)
    pools_known: int | None = None  # the pool's score in its shard's pools zset, as written lately (rates.Pools)
    session_known: int | None = None  # when the session's index expires, as written or read lately (rates.py)

    def find(self) -> Call:
        """The read-only lookup of the job this submit's identity has already (find_identity)."""
        return Call("find_identity", [self.identity, self.session_jobs, _shard(self.job_id)[1].pools],
                    [self.job_id, self.utterance_index, "1" if self.keyed else ""])


def submit_call(jobs: list[SubmitJob]) -> Call:
    """One submit_job call for `jobs` of one partition (same tag; the settings-wide fields of the first
    stand for all): its reply is one reply per job, in order."""
    _bounded("submit_job", jobs)
    first = jobs[0]
    _, pk, wake = _job(first.job_id)
    shard, sk = _shard(first.job_id)
    names = [pk.queue, pk.timers, pk.affinity, pk.fair, pk.queued, pk.jobs, sk.pools]
    argv: list[Any] = [first.default_ttl_ms, first.retention_ms, first.affinity_ttl_ms, wake,
                       "" if first.pools_known is None else first.pools_known]
    for job in jobs:
        jk = keys.JobKeys.of(job.job_id)
        names += [job.identity, jk.fsm, jk.payload, job.session_jobs, keys.tenant_jobs(shard, job.tenant_id)]
        argv += [job.job_id, job.meta, job.payload, job.priority, job.max_attempts, job.deadline_ms,
                 job.execution_timeout_ms, job.session, job.digest, job.utterance_index, job.tenant_id,
                 job.fair_step, "1" if job.keyed else "", "" if job.session_known is None else job.session_known]
    return Call("submit_job", names, argv)


@dataclass(frozen=True, slots=True)
class ClaimJob:
    job_id: str
    node_id: str
    token: str
    ack_timeout_ms: int
    affinity_wait_ms: int
    hint_count: int
    avoid_ms: int
    affinity_ttl_ms: int


def claim_call(claims: list[ClaimJob]) -> Call:
    """One claim_job call for `claims` of one partition (same tag; the settings-wide fields of the first
    stand for all): its reply is one reply per claim, in order (an error reply in place of a claim that failed)."""
    _bounded("claim_job", claims)
    first = claims[0]
    _, pk, _ = _job(first.job_id)
    names = [pk.queue, pk.timers, pk.affinity, pk.affinity_at, pk.fair, pk.queued, pk.held, pk.paused]
    argv: list[Any] = [first.ack_timeout_ms, first.affinity_wait_ms, first.hint_count, first.avoid_ms,
                       first.affinity_ttl_ms]
    for claim in claims:
        jk = keys.JobKeys.of(claim.job_id)
        names += [jk.fsm, jk.payload]
        argv += [claim.job_id, claim.node_id, claim.token]
    return Call("claim_job", names, argv)


@dataclass(frozen=True, slots=True)
class TouchJob:
    job_id: str
    node_id: str
    token: str
    lease_ms: int
    mode: str = "ack"  # or "shorten"

    def call(self) -> Call:
        jk, pk, _ = _job(self.job_id)
        return Call("touch_job", [jk.fsm, pk.timers, pk.held],
                    [self.job_id, self.node_id, self.token, self.lease_ms, self.mode])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a transition records: an error (code "" for none) and, for success, the result."""

    error_code: str = ""
    error_message: str = ""
    error_retryable: bool = False
    result: bytes | None = None


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may make a change: "" for anyone (the field is not checked)."""

    node_id: str = ""
    token: str = ""
    version: int | None = None  # compare-and-set on the version read, None for any


@dataclass(frozen=True, slots=True)
class FinishJob:
    job_id: str
    event: str
    dest: str
    fence: Fence
    outcome: Outcome
    retention_ms: int
    guard: str = ""  # "lease" or "deadline": only once that ran out

    def call(self) -> Call:
        """This job alone: its reply is a list of one job's reply."""
        return FinishJobs((self,)).call()


@dataclass(frozen=True, slots=True)
class FinishJobs:
    """Jobs of one shard finished in one call (finish_job takes a batch), each on its own: one reply per job."""

    jobs: tuple[FinishJob, ...]

    def call(self) -> Call:
        _bounded("finish_job", self.jobs)
        first = self.jobs[0]
        shard, _ = _shard(first.job_id)
        done_key, done_expiry = buckets.done(shard, buckets.now_ms(), first.retention_ms)
        names = [keys.shard_timers(shard), done_key]
        argv: list[Any] = [first.retention_ms, done_expiry, keys.SESSION_CHANNEL]
        ended: dict[str, str] = {}
        for job in self.jobs:
            tag = keys.tag_of(job.job_id)
            if _shard_of(tag)[0] != shard or job.retention_ms != first.retention_ms:
                raise ValueError("finish_job: jobs of one shard and one retention per call")
            jk, pk = keys.JobKeys.of(job.job_id), _partition(tag)[0]
            ended_key = ended.get(job.dest) or ended.setdefault(job.dest, keys.ended_jobs(shard, job.dest))
            o, f = job.outcome, job.fence
            names += [jk.fsm, jk.payload, jk.result, pk.queue, pk.queued, pk.held, ended_key]
            argv += [job.job_id, job.event, job.dest, "" if f.version is None else f.version, f.node_id, f.token,
                     int(o.result is not None), o.result or b"", o.error_code, o.error_message,
                     int(o.error_retryable), job.guard]
        return Call("finish_job", names, argv)


@dataclass(frozen=True, slots=True)
class RequeueJob:
    job_id: str
    event: str
    dest: str
    fence: Fence
    outcome: Outcome
    backoff_ms: int = 0
    avoid: bool = False  # the job keeps away from its current node for a while
    guard: str = ""  # "lease": only once the lease ran out
    give_back_attempt: bool = False  # the claim never reached its node

    def call(self) -> Call:
        jk, pk, wake = _job(self.job_id)
        o, f = self.outcome, self.fence
        return Call("requeue_job", [jk.fsm, pk.queue, pk.timers, pk.queued, pk.held], [
            self.job_id, self.event, self.dest, "" if f.version is None else f.version, f.node_id, f.token,
            self.backoff_ms, o.error_code, o.error_message, int(o.error_retryable), int(self.avoid), self.guard,
            wake, int(self.give_back_attempt),
        ])


@dataclass(frozen=True, slots=True)
class RetryJob:
    """A failed or expired job back to queued (RetryJob): compare-and-set on `version`."""

    job_id: str
    version: int
    state: str  # the state read (failed or expired): its ended index and done bucket count it out
    done_bucket: str  # the done bucket its finish counted it in (JobRecord.done_bucket)
    identity: str  # the job's idempotency key's name (keys.idempotency)
    session_jobs: str  # keys.session_jobs of the job's session
    tenant_id: str
    deadline_ms: int  # 0: as far ahead as its first deadline was from its submit
    max_job_ttl_ms: int
    max_attempts: int  # 0: the job's own
    reason: str
    retention_ms: int

    def call(self) -> Call:
        jk, pk, wake = _job(self.job_id)
        shard, sk = _shard(self.job_id)
        return Call("retry_job", [jk.fsm, jk.payload, pk.queue, pk.timers, pk.queued,
                                  keys.ended_jobs(shard, self.state), self.done_bucket, self.identity,
                                  self.session_jobs, pk.jobs, keys.tenant_jobs(shard, self.tenant_id), sk.pools], [
            self.job_id, self.version, self.deadline_ms, self.max_job_ttl_ms, self.max_attempts, self.reason,
            self.retention_ms, wake,
        ])


@dataclass(frozen=True, slots=True)
class WatchJob:
    """Marks the job watched (WatchJob, before it reads the record in the same round trip)."""

    job_id: str

    def call(self) -> Call:
        return Call("watch_job", [keys.JobKeys.of(self.job_id).fsm], [])


@dataclass(frozen=True, slots=True)
class PausePool:
    """Pause (reason) or resume one partition of a pool."""

    tag: str  # the partition (keys.partition_tag)
    pause: bool
    reason: str = ""

    def call(self) -> Call:
        return Call("pause_pool", [keys.PartitionKeys.of(self.tag).paused],
                    ["pause" if self.pause else "resume", self.reason])


@dataclass(frozen=True, slots=True)
class PromoteJob:
    job_id: str

    def call(self) -> Call:
        jk, pk, wake = _job(self.job_id)
        return Call("promote_job", [jk.fsm, pk.queue, pk.timers], [self.job_id, wake])


@dataclass(frozen=True, slots=True)
class FoldWaiting:
    """Up to `count` entries of an earlier version's waiting zset into the partition's queued counts."""

    tag: str  # the partition (keys.partition_tag)
    count: int

    def call(self) -> Call:
        return Call("fold_waiting", [keys.waiting_before(self.tag), keys.PartitionKeys.of(self.tag).queued],
                    [self.count])


@dataclass(frozen=True, slots=True)
class ForgetJob:
    """A finished job's forget timer fired: its entries leave ListJobs' indexes (once, whoever fires it)."""

    member: str  # the timer member (wire.forget_timer)
    job_id: str
    tenant_id: str
    ended: str  # the state whose ended index holds the job, or wire.NOT_ENDED_INDEXED


def forget_call(forgets: list[ForgetJob]) -> Call:
    """One forget_job call for `forgets` of one shard: its reply is one reply per job, in order."""
    _bounded("forget_job", forgets)
    shard, _ = _shard(forgets[0].job_id)
    names = [keys.shard_timers(shard)]
    argv: list[Any] = []
    for forget in forgets:
        tag = keys.tag_of(forget.job_id)
        if _shard_of(tag)[0] != shard:
            raise ValueError("forget_job: jobs of one shard per call")
        pk = _partition(tag)[0]
        names += [pk.jobs, keys.tenant_jobs(shard, forget.tenant_id), keys.ended_jobs(shard, forget.ended)]
        argv += [forget.member, forget.job_id, forget.ended]
    return Call("forget_job", names, argv)


@dataclass(frozen=True, slots=True)
class AdmitJobs:
    """One tenant's new jobs of a Submit batch, against its limits (0: none)."""

    tenant_id: str
    submit_rate: float
    burst: int
    max_queued: int
    default_ttl_ms: int
    jobs: tuple[tuple[str, int], ...]  # (job id, deadline ms or 0)

    def call(self) -> Call:
        tk = keys.TenantKeys.of(self.tenant_id)
        return Call("admit_jobs", [tk.bucket, tk.jobs], [
            self.submit_rate, self.burst, self.max_queued, self.default_ttl_ms,
            *(v for job in self.jobs for v in job),
        ])


@dataclass(frozen=True, slots=True)
class RefundJobs:
    """Admitted jobs that were not created: their tokens and places back."""

    tenant_id: str
    submit_rate: float
    burst: int
    job_ids: tuple[str, ...]

    def call(self) -> Call:
        tk = keys.TenantKeys.of(self.tenant_id)
        return Call("refund_jobs", [tk.bucket, tk.jobs], [self.submit_rate, self.burst, *self.job_ids])


@dataclass(frozen=True, slots=True)
class RegisterNode:
    node_id: str
    session_token: str
    renew: bool
    ttl_ms: int
    fields: tuple[tuple[str, str | int], ...]

    def call(self) -> Call:
        flat = [v for pair in self.fields for v in pair]
        return Call("register_node", [keys.node(self.node_id)],
                    [self.session_token, "renew" if self.renew else "register", self.ttl_ms, *flat])


@dataclass(frozen=True, slots=True)
class DrainNode:
    node_id: str
    hold_ms: int  # how long the request drains the node's new streams (the node TTL)

    def call(self) -> Call:
        return Call("drain_node", [keys.node(self.node_id)], [self.hold_ms])


@dataclass(frozen=True, slots=True)
class ReleaseNode:
    node_id: str
    session_token: str

    def call(self) -> Call:
        return Call("release_node", [keys.node(self.node_id)], [self.session_token])


@dataclass(frozen=True, slots=True)
class ShareSweep:
    instance_id: str
    live_ms: int
    alive: bool = True  # False: this instance is leaving

    def call(self) -> Call:
        return Call("share_sweep", [keys.INSTANCES], [self.instance_id, self.live_ms, "1" if self.alive else "0"])


@dataclass(frozen=True, slots=True)
class DropTimer:
    key: str  # the timers zset
    member: str
    job_id: str  # whose record decides

    def call(self) -> Call:
        return Call("drop_timer", [self.key, keys.JobKeys.of(self.job_id).fsm], [self.member])


@dataclass(frozen=True, slots=True)
class ReadClock:
    key: str = keys.NODES  # the registry's index: its server judges the entries' ages

    def call(self) -> Call:
        return Call("read_clock", [self.key], [])
