"""Plain data at the SDK's surface: small dataclasses, each with `to_proto`/`from_proto` and, for
what the scheduler returns, the generated message itself in `.proto`."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Required, TypedDict

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ._proto import scheduler_pb2 as pb


def _time(ts: Timestamp) -> datetime | None:
    """A set Timestamp as an aware UTC datetime; None when unset."""
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


class JobState(enum.Enum):
    """A job's state (docs/fsm.md). Terminal: succeeded, failed, cancelled, expired."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        return _STATES.get(value, cls.UNSPECIFIED)

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
_STATES = {getattr(pb, f"JOB_STATE_{s.name}"): s for s in JobState}


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a client asks for: one utterance of one session, src_lang -> tgt_lang (see JobSpec in the
    proto for every field's rules). `deadline` is an aware datetime; `execution_timeout` a timedelta or
    seconds."""

    tenant_id: str
    session_id: str
    src_lang: str
    tgt_lang: str
    utterance_index: int = 0
    payload: bytes = b""
    payload_ref: str = ""
    trace_id: str = ""
    priority: int = 0
    deadline: datetime | None = None
    max_attempts: int = 0
    idempotency_key: str = ""
    execution_timeout: timedelta | float | None = None
    # W3C trace context ("traceparent", ...): with opentelemetry-api installed, a submit fills it from
    # the current span when left empty.
    trace_context: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> pb.JobSpec:
        m = pb.JobSpec(tenant_id=self.tenant_id, session_id=self.session_id, utterance_index=self.utterance_index,
                       src_lang=self.src_lang, tgt_lang=self.tgt_lang, trace_id=self.trace_id, priority=self.priority,
                       max_attempts=self.max_attempts, idempotency_key=self.idempotency_key, payload=self.payload,
                       payload_ref=self.payload_ref, trace_context=dict(self.trace_context))
        if self.deadline is not None:
            m.deadline.FromDatetime(self.deadline)
        if self.execution_timeout is not None:
            timeout = self.execution_timeout
            m.execution_timeout.FromTimedelta(timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout))
        return m

    @classmethod
    def from_proto(cls, m: pb.JobSpec) -> JobSpec:
        return cls(tenant_id=m.tenant_id, session_id=m.session_id, src_lang=m.src_lang, tgt_lang=m.tgt_lang,
                   utterance_index=m.utterance_index, payload=m.payload, payload_ref=m.payload_ref,
                   trace_id=m.trace_id, priority=m.priority,
                   deadline=_time(m.deadline) if m.HasField("deadline") else None,
                   max_attempts=m.max_attempts, idempotency_key=m.idempotency_key,
                   execution_timeout=m.execution_timeout.ToTimedelta() if m.HasField("execution_timeout") else None,
                   trace_context=dict(m.trace_context))

    @classmethod
    def of(cls, spec: JobSpec | Mapping[str, Any] | pb.JobSpec) -> pb.JobSpec:
        """Any accepted spec form as the message: a JobSpec, a dict of its fields, or a pb.JobSpec."""
        if isinstance(spec, pb.JobSpec):
            return spec
        if isinstance(spec, JobSpec):
            return spec.to_proto()
        return cls(**spec).to_proto()


class JobFields(TypedDict, total=False):
    """JobSpec's fields as keywords (`client.submit(tenant_id=..., ...)`), so a type checker sees a
    misspelt or mistyped field."""

    tenant_id: Required[str]
    session_id: Required[str]
    src_lang: Required[str]
    tgt_lang: Required[str]
    utterance_index: int
    payload: bytes
    payload_ref: str
    trace_id: str
    priority: int
    deadline: datetime | None
    max_attempts: int
    idempotency_key: str
    execution_timeout: timedelta | float | None
    trace_context: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """The outcome of a successful job; what a node's handler returns (or a dict of these fields)."""

    text_asr: str = ""
    text_translated: str = ""
    tts_audio: bytes = b""
    tts_audio_ref: str = ""
    tts_format: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> pb.JobResult:
        return pb.JobResult(text_asr=self.text_asr, text_translated=self.text_translated, tts_audio=self.tts_audio,
                            tts_audio_ref=self.tts_audio_ref, tts_format=self.tts_format, extra=dict(self.extra))

    @classmethod
    def from_proto(cls, m: pb.JobResult) -> JobResult:
        return cls(text_asr=m.text_asr, text_translated=m.text_translated, tts_audio=m.tts_audio,
                   tts_audio_ref=m.tts_audio_ref, tts_format=m.tts_format, extra=dict(m.extra))

    @classmethod
    def of(cls, value: JobResult | Mapping[str, Any] | pb.JobResult | None) -> pb.JobResult:
        if isinstance(value, pb.JobResult):
            return value
        if isinstance(value, JobResult):
            return value.to_proto()
        if value is None:
            return pb.JobResult()
        return cls(**value).to_proto()


@dataclass(frozen=True)
class JobError:
    """Why an attempt failed."""

    code: str
    message: str = ""
    retryable: bool = False

    @classmethod
    def from_proto(cls, m: pb.JobError) -> JobError:
        return cls(m.code, m.message, m.retryable)


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job as stored. `result` once succeeded, `last_error` after any failed attempt."""

    job_id: str
    state: JobState
    spec: JobSpec
    version: int
    attempt: int
    max_attempts: int
    node_id: str
    created_at: datetime | None
    updated_at: datetime | None
    lease_deadline: datetime | None
    last_error: JobError | None
    result: JobResult | None
    proto: pb.Job = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.Job) -> Job:
        return cls(job_id=m.job_id, state=JobState.from_proto(m.state), spec=JobSpec.from_proto(m.spec),
                   version=m.version, attempt=m.attempt, max_attempts=m.max_attempts, node_id=m.node_id,
                   created_at=_time(m.created_at), updated_at=_time(m.updated_at),
                   lease_deadline=_time(m.lease_deadline),
                   last_error=JobError.from_proto(m.last_error) if m.HasField("last_error") else None,
                   result=JobResult.from_proto(m.result) if m.HasField("result") else None, proto=m)


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One state change of a job."""

    job_id: str
    state: JobState
    version: int
    attempt: int
    node_id: str
    at: datetime | None
    event: str
    error: JobError | None
    proto: pb.JobEvent = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.JobEvent) -> JobEvent:
        return cls(job_id=m.job_id, state=JobState.from_proto(m.state), version=m.version, attempt=m.attempt,
                   node_id=m.node_id, at=_time(m.at), event=m.event,
                   error=JobError.from_proto(m.error) if m.HasField("error") else None, proto=m)


@dataclass(frozen=True, kw_only=True)
class SessionEvent:
    """Finished jobs of a session, in utterance order (WatchSession). To resume after a reconnect,
    watch again from `resume_index`: every job below it has been delivered."""

    jobs: list[Job]
    resume_index: int
    proto: pb.SessionEvent = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.SessionEvent) -> SessionEvent:
        return cls(jobs=[Job.from_proto(j) for j in m.jobs], resume_index=m.resume_index, proto=m)


@dataclass(frozen=True)
class SubmitResult:
    """The outcome of submitting one job: its id, whether this call created it, its state."""

    job_id: str
    created: bool
    state: JobState

    @classmethod
    def from_proto(cls, m: pb.SubmitResult) -> SubmitResult:
        return cls(m.job_id, m.created, JobState.from_proto(m.state))


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """A registered node, as ListNodes reports it."""

    node_id: str
    pools: list[str]
    max_concurrency: int
    in_flight: int
    instance_id: str
    labels: dict[str, str]
    version: str
    connected_at: datetime | None
    draining: bool
    proto: pb.NodeInfo = field(repr=False, compare=False)
    quarantined: bool = False  # no new work: it let an assignment pass its ack timeout unacknowledged

    @classmethod
    def from_proto(cls, m: pb.NodeInfo) -> NodeInfo:
        return cls(node_id=m.node_id, pools=list(m.pools), max_concurrency=m.max_concurrency, in_flight=m.in_flight,
                   instance_id=m.instance_id, labels=dict(m.labels), version=m.version,
                   connected_at=_time(m.connected_at), draining=m.draining, proto=m, quarantined=m.quarantined)


@dataclass(frozen=True, kw_only=True)
class JobPage:
    """One page of ListJobs, newest first; pass `next_page_token` for the next ("" when none)."""

    jobs: list[Job]
    next_page_token: str
    proto: pb.ListJobsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.ListJobsResponse) -> JobPage:
        return cls(jobs=[Job.from_proto(j) for j in m.jobs], next_page_token=m.next_page_token, proto=m)


@dataclass(frozen=True, kw_only=True)
class PoolStats:
    """One pool's figures (GetStats). `jobs` maps every state's name ("queued", ...) to a count: now
    for queued/assigned/running, finished within the server's retention for the terminal states."""

    pool: str
    jobs: dict[str, int]
    nodes: int
    capacity: int
    in_flight: int
    submitted_per_second: float
    finished_per_second: float
    paused: bool
    oldest_queued_age: timedelta
    proto: pb.PoolStats = field(repr=False, compare=False)
    paused_reason: str = ""  # while paused: the reason given to PausePool
    paused_at: datetime | None = None

    @classmethod
    def from_proto(cls, m: pb.PoolStats) -> PoolStats:
        jobs = {str(s): 0 for s in JobState if s is not JobState.UNSPECIFIED}
        jobs.update({str(JobState.from_proto(c.state)): c.count for c in m.jobs})
        return cls(pool=m.pool, jobs=jobs, nodes=m.nodes, capacity=m.capacity, in_flight=m.in_flight,
                   submitted_per_second=m.submitted_per_second, finished_per_second=m.finished_per_second,
                   paused=m.paused, oldest_queued_age=m.oldest_queued_age.ToTimedelta(), proto=m,
                   paused_reason=m.paused_reason, paused_at=_time(m.paused_at))


@dataclass(frozen=True, kw_only=True)
class Stats:
    """GetStats: every pool's figures (by pool name), read at `as_of` (Redis time)."""

    pools: list[PoolStats]
    as_of: datetime | None
    proto: pb.GetStatsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.GetStatsResponse) -> Stats:
        return cls(pools=[PoolStats.from_proto(p) for p in m.pools], as_of=_time(m.as_of), proto=m)


@dataclass(frozen=True, kw_only=True)
class PoolState:
    """A pool's dispatch state after PausePool or ResumePool."""

    pool: str
    paused: bool
    reason: str
    paused_at: datetime | None
    proto: pb.PoolState = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.PoolState) -> PoolState:
        return cls(pool=m.pool, paused=m.paused, reason=m.reason, paused_at=_time(m.paused_at), proto=m)


@dataclass(frozen=True, kw_only=True)
class SessionCancelled:
    """What CancelSession did: the jobs it cancelled, and how many were already finished."""

    cancelled_job_ids: list[str]
    already_finished: int
    proto: pb.CancelSessionResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, m: pb.CancelSessionResponse) -> SessionCancelled:
        return cls(cancelled_job_ids=list(m.cancelled_job_ids), already_finished=m.already_finished, proto=m)


class Assignment:
    """One job given to a node's handler: `job_id`, `attempt`, `spec` (a JobSpec, payload included),
    `lease_deadline`. The lease itself is the runtime's business; `proto` is the message as received."""

    __slots__ = ("__dict__", "proto")  # __dict__ for the cached spec

    def __init__(self, proto: pb.Assignment) -> None:
        self.proto = proto

    @property
    def job_id(self) -> str:
        return self.proto.job_id

    @property
    def attempt(self) -> int:
        return self.proto.attempt

    @cached_property
    def spec(self) -> JobSpec:
        return JobSpec.from_proto(self.proto.spec)

    @property
    def lease_deadline(self) -> datetime | None:
        return _time(self.proto.lease_deadline)

    def __repr__(self) -> str:
        return f"Assignment(job_id={self.job_id!r}, attempt={self.attempt})"


def duration_seconds(d: Duration) -> float:
    return d.ToMilliseconds() / 1000


def as_dict(value: Any) -> dict[str, Any]:
    """A model dataclass as a JSON-friendly dict (datetimes as ISO 8601, bytes as their length)."""
    out: dict[str, Any] = {}
    for f in fields(value):
        if f.name == "proto":
            continue
        out[f.name] = _plain(getattr(value, f.name))
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, timedelta):
        return v.total_seconds()
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, bytes):
        return {"bytes": len(v)}
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "__dataclass_fields__"):
        return as_dict(v)
    return v
