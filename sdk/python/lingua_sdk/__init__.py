"""Lingua Scheduler SDK: `Client` / `AsyncClient` for applications, `Node` for worker nodes, and the
`lingua` command line. The generated messages and stub are in `lingua_sdk.pb` and `lingua_sdk.pb_grpc`."""

__version__ = "0.1.0"

from ._channel import TLS
from ._proto import scheduler_pb2 as pb
from ._proto import scheduler_pb2_grpc as pb_grpc
from .client import AsyncClient, Client
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FatalError,
    HandlerError,
    Internal,
    InvalidArgument,
    LinguaError,
    ModelUnavailable,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryableError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .models import (
    Assignment,
    Job,
    JobError,
    JobEvent,
    JobFields,
    JobPage,
    JobResult,
    JobSpec,
    JobState,
    NodeInfo,
    PoolState,
    PoolStats,
    SessionCancelled,
    SessionEvent,
    Stats,
    SubmitResult,
)
from .node import Node

__all__ = [
    "TLS", "Aborted", "AlreadyExists", "Assignment", "AsyncClient", "Cancelled", "Client", "DeadlineExceeded",
    "FailedPrecondition", "FatalError", "HandlerError", "Internal", "InvalidArgument", "Job", "JobError", "JobEvent",
    "JobFields", "JobPage", "JobResult", "JobSpec", "JobState", "LinguaError", "ModelUnavailable", "Node", "NodeInfo", "NotFound",
    "PermissionDenied", "PoolState", "PoolStats", "ResourceExhausted", "RetryableError", "SessionCancelled",
    "SessionEvent", "Stats", "SubmitResult", "Unauthenticated",
    "Unavailable", "Unimplemented",
    "pb", "pb_grpc",
]
