"""Typed errors: one class per gRPC status code, carrying the status and its rich details.

Branch on the class, `reason` (google.rpc.ErrorInfo) or `field_violations` (google.rpc.BadRequest),
never on message text. The handler of a `Node` raises `RetryableError` or `FatalError` to report a
failed attempt; those two are not gRPC errors.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure, error_details_pb2.QuotaFailure, error_details_pb2.ResourceInfo,
    error_details_pb2.DebugInfo, error_details_pb2.Help, error_details_pb2.LocalizedMessage,
)


class LinguaError(Exception):
    """A call to the scheduler failed. `code` is its gRPC status; `details` the unpacked google.rpc
    detail messages (ErrorInfo, BadRequest, RetryInfo, ...) the server attached, if any."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 details: list[Message] | None = None, status: status_pb2.Status | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: list[Message] = details or []
        self.status = status  # the google.rpc.Status as sent, when the server sent one

    def _detail(self, kind: type[Any]) -> Any:
        return next((d for d in self.details if isinstance(d, kind)), None)

    @property
    def reason(self) -> str | None:
        """The stable machine-readable reason (google.rpc.ErrorInfo.reason), when given."""
        info = self._detail(error_details_pb2.ErrorInfo)
        return info.reason if info is not None else None

    @property
    def metadata(self) -> dict[str, str]:
        """google.rpc.ErrorInfo.metadata, when given (ALREADY_EXISTS: `job_id` of the identity's job and
        `index` of the batch entry)."""
        info = self._detail(error_details_pb2.ErrorInfo)
        return dict(info.metadata) if info is not None else {}

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) pairs of a google.rpc.BadRequest, when given."""
        bad = self._detail(error_details_pb2.BadRequest)
        return [(v.field, v.description) for v in bad.field_violations] if bad is not None else []

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asks to wait before retrying (google.rpc.RetryInfo), when given."""
        info = self._detail(error_details_pb2.RetryInfo)
        return info.retry_delay.ToTimedelta().total_seconds() if info is not None else None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(LinguaError):
    code = grpc.StatusCode.CANCELLED


class Unknown(LinguaError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LinguaError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LinguaError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LinguaError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LinguaError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LinguaError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LinguaError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LinguaError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LinguaError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(LinguaError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LinguaError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LinguaError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(LinguaError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(LinguaError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LinguaError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[LinguaError]] = {
    cls.code: cls for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
        ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
        DataLoss, Unauthenticated,
    )
}

# Worth another try on a fresh stream or call; any other code is the caller's (or the setup's) fault.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


# A cancel this client asked for is not an error here (asyncio.CancelledError, or the sync stubs' "Locally
# cancelled"), and the scheduler's handlers never end a call CANCELLED: a bare CANCELLED comes from the
# server's gRPC, which refuses calls so when too many wait to be started (server/settings.py).
_UNEXPLAINED_CANCEL = ("cancelled by the server's gRPC, with no reason given: it refuses calls so when more than "
                       "--grpc-max-pending-calls wait to be started (streams opened in a burst); docs/operations.md")


def from_rpc_error(err: grpc.RpcError) -> LinguaError:
    """The typed error of a failed call (sync or grpc.aio), with its google.rpc details unpacked."""
    code: grpc.StatusCode = err.code()
    message: str = err.details() or ""
    if code == grpc.StatusCode.CANCELLED and message in ("", "CANCELLED"):
        message = _UNEXPLAINED_CANCEL  # gRPC's bare wording: say where such a cancel comes from
    status: status_pb2.Status | None = None
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:  # a details trailer that disagrees with the status: ignore the trailer
        status = None
    details: list[Message] = []
    for any_detail in status.details if status is not None else []:
        for kind in _DETAIL_TYPES:
            if any_detail.TypeName() == kind.DESCRIPTOR.full_name:
                detail = kind()
                any_detail.Unpack(detail)
                details.append(detail)
                break
        else:
            details.append(any_detail)
    return _BY_CODE.get(code, LinguaError)(message, code=code, details=details, status=status)


class HandlerError(Exception):
    """Raised by a node's handler: the attempt failed. `code` is the JobError code reported (printable
    ASCII without spaces, at most 128 characters, not starting with LINGUA_)."""

    retryable: bool = True
    default_code = "HANDLER_ERROR"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code


class RetryableError(HandlerError):
    """Another attempt may succeed: the job is requeued while it has attempts left."""

    retryable = True
    default_code = "RETRYABLE_ERROR"


class FatalError(HandlerError):
    """No attempt will succeed: the job fails now."""

    retryable = False
    default_code = "FATAL_ERROR"


class ModelUnavailable(HandlerError):
    """This node cannot serve the job now (its model is not loaded, say): the job goes back to the
    queue for another node (NodeMessage.unavailable; the scheduler records LINGUA_MODEL_UNAVAILABLE and
    fails the job once its attempts are used up)."""

    retryable = True
    default_code = "LINGUA_MODEL_UNAVAILABLE"
