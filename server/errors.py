"""Typed errors, each with its gRPC status; the return codes of the Lua scripts, mirrored."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType
from typing import NoReturn

import grpc


class ScriptCode(IntEnum):
    """Return codes shared by every script in server/lua (see each script's header)."""

    APPLIED = 1
    ALREADY = 0  # a repeat of the same event with the same fencing token: nothing changed
    JOB_NOT_FOUND = -1
    INVALID_TRANSITION = -2
    VERSION_MISMATCH = -3
    STALE_LEASE = -4  # another claim's lease token
    NOT_LEASE_HOLDER = -5
    RESULT_CONFLICT = -6
    NOT_IN_QUEUE = -7
    AVOIDED = -8
    RESERVED = -9
    NOT_DUE = -10
    IDENTITY_CONFLICT = -11  # a repeat submit whose content differs from the first
    TENANT_QUEUE_FULL = -12  # admit_jobs: the tenant's unfinished jobs would pass its max_queued
    TENANT_RATE_LIMITED = -13  # admit_jobs: the tenant's submit-rate token bucket is short
    POOL_PAUSED = -14  # claim_job: the job's pool is paused (PausePool)


# google.rpc.ErrorInfo.domain of every error status; each class's `reason` is its stable ErrorInfo.reason
# (docs/errors.md lists them: a contract, so never rename one).
DOMAIN = "lingua.scheduler.v1"


class SchedulerError(Exception):
    """Base of every error a client may see; `status` is what the RPC answers, `reason` the stable
    machine-readable reason sent as google.rpc.ErrorInfo, `retry_delay` (seconds) a google.rpc.RetryInfo
    sent with it when a retry of the same call may succeed."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
    retry_delay: float | None = None
    metadata: Mapping[str, str] = MappingProxyType({})  # sent as ErrorInfo.metadata; an instance may set its own


class FieldError(SchedulerError):
    """A request field is wrong: `field` is its path (`jobs[0].src_lang`), sent as a google.rpc.BadRequest
    field violation with `description`; the message is "field: description"."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class InvalidArgument(FieldError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class TooLarge(FieldError):
    """Over a fixed cap (payload bytes, batch size): the same request never fits, so no RetryInfo."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "TOO_LARGE"


class StreamOverflow(SchedulerError):
    """A stream's client fell further behind than --stream-outbox-max messages: the stream is ended
    rather than its backlog kept. Open it again (a watch resumes, a node reconnects with its holding)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "STREAM_OVERFLOW"


class TenantLimit(SchedulerError):
    """A tenant's Submit over one of its limits (--tenants file): the whole batch is refused, nothing is
    stored; the same call may pass after `retry_delay` seconds."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_delay: float) -> None:
        super().__init__(message)
        self.retry_delay = retry_delay


class TenantQueueFull(TenantLimit):
    """The tenant has max_queued jobs queued or running already."""

    reason = "TENANT_QUEUE_FULL"


class TenantRateLimited(TenantLimit):
    """The tenant submits faster than its submit_rate (beyond its submit_burst)."""

    reason = "TENANT_RATE_LIMITED"


class NodeUnresponsive(SchedulerError):
    """A node stream left a ping unanswered for --ping-timeout-ms: the connection (or the node) is taken
    for dead and the stream is ended. Its jobs go as those of any lost stream; a live node reconnects."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "NODE_UNRESPONSIVE"


class Unavailable(SchedulerError):
    """The job store (Redis) cannot be reached or failed mid-call."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"
    retry_delay = 1.0


class NotEnabled(SchedulerError):
    status = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_ENABLED"


class Unauthenticated(SchedulerError):
    """No bearer token, or one that is malformed, expired or not signed by a configured key."""

    status = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(SchedulerError):
    """A valid token whose role, tenants or node ids do not allow the call."""

    status = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class JobNotFound(SchedulerError):
    status = grpc.StatusCode.NOT_FOUND
    reason = "JOB_NOT_FOUND"


class NodeNotFound(SchedulerError):
    status = grpc.StatusCode.NOT_FOUND
    reason = "NODE_NOT_FOUND"


class InvalidTransition(SchedulerError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INVALID_TRANSITION"


class ConcurrentModification(SchedulerError):
    status = grpc.StatusCode.ABORTED
    reason = "CONCURRENT_MODIFICATION"
    retry_delay = 0.1


class StaleLease(SchedulerError):
    """The lease token is not the job's current one: another claim holds (or held) the job."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "STALE_LEASE"


class NotLeaseHolder(SchedulerError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NOT_LEASE_HOLDER"


class AlreadyExists(SchedulerError):
    """A repeat submit (same identity) asked for different work than the job that identity has."""

    status = grpc.StatusCode.ALREADY_EXISTS
    reason = "IDENTITY_CONFLICT"

    def __init__(self, message: str, job_id: str = "", index: int = 0) -> None:
        super().__init__(message)
        if job_id:  # the job the identity has, and the batch entry: for a program, not parsed from the text
            self.metadata = {"job_id": job_id, "index": str(index)}


class ResultConflict(SchedulerError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "RESULT_CONFLICT"


class NotInQueue(SchedulerError):
    """A claim lost its candidate: another node got it first."""

    status = grpc.StatusCode.ABORTED
    reason = "NOT_IN_QUEUE"


class Avoided(SchedulerError):
    """A claim skipped a job this node said it cannot serve."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AVOIDED"


class Reserved(SchedulerError):
    """A claim skipped a job held back for its session's node for a short while."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "RESERVED"


class NotDue(SchedulerError):
    """A timer (lease, deadline, retry) was moved by someone else before it fired."""

    status = grpc.StatusCode.ABORTED
    reason = "NOT_DUE"


# Refusals that mean the caller no longer holds the lease (the job moved on, or another claim has it):
# a node's slot for that job is free.
LEASE_GONE = (JobNotFound, InvalidTransition, StaleLease, NotLeaseHolder, ResultConflict)

_BY_CODE: dict[ScriptCode, tuple[type[SchedulerError], str]] = {
    ScriptCode.JOB_NOT_FOUND: (JobNotFound, "job {job} not found"),
    ScriptCode.INVALID_TRANSITION: (InvalidTransition, "job {job} is {state}: event {event} not allowed"),
    ScriptCode.VERSION_MISMATCH: (ConcurrentModification, "job {job} changed concurrently; retry"),
    ScriptCode.STALE_LEASE: (StaleLease, "job {job}: the lease token is not the job's current claim (stale lease; "
                                         "the job's current attempt is {attempt})"),
    ScriptCode.NOT_LEASE_HOLDER: (NotLeaseHolder, "job {job}: held by another node"),
    ScriptCode.RESULT_CONFLICT: (ResultConflict, "job {job} already finished with another outcome"),
    ScriptCode.NOT_IN_QUEUE: (NotInQueue, "job {job} is no longer queued"),
    ScriptCode.AVOIDED: (Avoided, "job {job} avoids this node"),
    ScriptCode.RESERVED: (Reserved, "job {job} is reserved for its session's node"),
    ScriptCode.NOT_DUE: (NotDue, "job {job}: timer not due"),
    ScriptCode.IDENTITY_CONFLICT: (AlreadyExists, "job {job} already exists for this identity with different content"),
}


def error_class(code: int) -> type[SchedulerError]:
    """The typed exception of a negative script return code."""
    return _BY_CODE[ScriptCode(code)][0]


def raise_for(code: int, *, job: str, state: str = "", event: str = "", attempt: int = 0) -> NoReturn:
    """Raise the typed exception of a negative script return code."""
    cls, text = _BY_CODE[ScriptCode(code)]
    raise cls(text.format(job=job, state=state, event=event, attempt=attempt))
