"""Typed errors, each with its gRPC status; the return codes of the Lua scripts, mirrored."""

from __future__ import annotations

from enum import IntEnum
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


class SchedulerError(Exception):
    """Base of every error a client may see; `status` is what the RPC answers."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SchedulerError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class TooLarge(SchedulerError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SchedulerError):
    status = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(SchedulerError):
    """No bearer token, or one that is malformed, expired or not signed by a configured key."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SchedulerError):
    """A valid token whose role, tenants or node ids do not allow the call."""

    status = grpc.StatusCode.PERMISSION_DENIED


class JobNotFound(SchedulerError):
    status = grpc.StatusCode.NOT_FOUND


class InvalidTransition(SchedulerError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class ConcurrentModification(SchedulerError):
    status = grpc.StatusCode.ABORTED


class StaleLease(SchedulerError):
    """The lease token is not the job's current one: another claim holds (or held) the job."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class NotLeaseHolder(SchedulerError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(SchedulerError):
    """A repeat submit (same identity) asked for different work than the job that identity has."""

    status = grpc.StatusCode.ALREADY_EXISTS


class ResultConflict(SchedulerError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class NotInQueue(SchedulerError):
    """A claim lost its candidate: another node got it first."""

    status = grpc.StatusCode.ABORTED


class Avoided(SchedulerError):
    """A claim skipped a job this node said it cannot serve."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Reserved(SchedulerError):
    """A claim skipped a job held back for its session's node for a short while."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class NotDue(SchedulerError):
    """A timer (lease, deadline, retry) was moved by someone else before it fired."""

    status = grpc.StatusCode.ABORTED


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


def raise_for(code: int, *, job: str, state: str = "", event: str = "", attempt: int = 0) -> NoReturn:
    """Raise the typed exception of a negative script return code."""
    cls, text = _BY_CODE[ScriptCode(code)]
    raise cls(text.format(job=job, state=state, event=event, attempt=attempt))
