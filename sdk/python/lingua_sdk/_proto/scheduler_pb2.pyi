import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_ASSIGNED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_EXPIRED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_ASSIGNED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_EXPIRED: JobState

class JobSpec(_message.Message):
    __slots__ = ("tenant_id", "session_id", "utterance_index", "src_lang", "tgt_lang", "trace_id", "priority", "deadline", "max_attempts", "idempotency_key", "payload", "payload_ref", "execution_timeout", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SRC_LANG_FIELD_NUMBER: _ClassVar[int]
    TGT_LANG_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_REF_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    utterance_index: int
    src_lang: str
    tgt_lang: str
    trace_id: str
    priority: int
    deadline: _timestamp_pb2.Timestamp
    max_attempts: int
    idempotency_key: str
    payload: bytes
    payload_ref: str
    execution_timeout: _duration_pb2.Duration
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., utterance_index: _Optional[int] = ..., src_lang: _Optional[str] = ..., tgt_lang: _Optional[str] = ..., trace_id: _Optional[str] = ..., priority: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_attempts: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., payload: _Optional[bytes] = ..., payload_ref: _Optional[str] = ..., execution_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("text_asr", "text_translated", "tts_audio", "tts_audio_ref", "tts_format", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEXT_ASR_FIELD_NUMBER: _ClassVar[int]
    TEXT_TRANSLATED_FIELD_NUMBER: _ClassVar[int]
    TTS_AUDIO_FIELD_NUMBER: _ClassVar[int]
    TTS_AUDIO_REF_FIELD_NUMBER: _ClassVar[int]
    TTS_FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    text_asr: str
    text_translated: str
    tts_audio: bytes
    tts_audio_ref: str
    tts_format: str
    extra: _containers.ScalarMap[str, str]
    def __init__(self, text_asr: _Optional[str] = ..., text_translated: _Optional[str] = ..., tts_audio: _Optional[bytes] = ..., tts_audio_ref: _Optional[str] = ..., tts_format: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "retryable")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retryable: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "version", "attempt", "node_id", "created_at", "updated_at", "lease_deadline", "last_error", "result", "max_attempts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    version: int
    attempt: int
    node_id: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    lease_deadline: _timestamp_pb2.Timestamp
    last_error: JobError
    result: JobResult
    max_attempts: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., version: _Optional[int] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[_Union[JobError, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSpec]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSpec, _Mapping]]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("job_id", "created", "state")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    created: bool
    state: JobState
    def __init__(self, job_id: _Optional[str] = ..., created: _Optional[bool] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "include_payload")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_payload: bool
    def __init__(self, job_id: _Optional[str] = ..., include_payload: _Optional[bool] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "state", "version", "attempt", "node_id", "at", "event", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    version: int
    attempt: int
    node_id: str
    at: _timestamp_pb2.Timestamp
    event: str
    error: JobError
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., version: _Optional[int] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event: _Optional[str] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "from_index", "tgt_lang")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    TGT_LANG_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    from_index: int
    tgt_lang: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., from_index: _Optional[int] = ..., tgt_lang: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("jobs", "resume_index")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    RESUME_INDEX_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    resume_index: int
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., resume_index: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LanguagePair(_message.Message):
    __slots__ = ("src_lang", "tgt_lang")
    SRC_LANG_FIELD_NUMBER: _ClassVar[int]
    TGT_LANG_FIELD_NUMBER: _ClassVar[int]
    src_lang: str
    tgt_lang: str
    def __init__(self, src_lang: _Optional[str] = ..., tgt_lang: _Optional[str] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("node_id", "pairs", "max_jobs", "wait")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pairs: _containers.RepeatedCompositeFieldContainer[LanguagePair]
    max_jobs: int
    wait: _duration_pb2.Duration
    def __init__(self, node_id: _Optional[str] = ..., pairs: _Optional[_Iterable[_Union[LanguagePair, _Mapping]]] = ..., max_jobs: _Optional[int] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job_id", "attempt", "spec", "lease_deadline", "lease_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    spec: JobSpec
    lease_deadline: _timestamp_pb2.Timestamp
    lease_token: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., lease_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_token: _Optional[str] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("assignments",)
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class JobLease(_message.Message):
    __slots__ = ("job_id", "attempt", "lease_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    lease_token: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., lease_token: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "leases")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    leases: _containers.RepeatedCompositeFieldContainer[JobLease]
    def __init__(self, node_id: _Optional[str] = ..., leases: _Optional[_Iterable[_Union[JobLease, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    def __init__(self, leases: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ...) -> None: ...

class LeaseStatus(_message.Message):
    __slots__ = ("job_id", "ok", "state", "lease_deadline", "error_code", "error_message", "lease_token", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    ok: bool
    state: JobState
    lease_deadline: _timestamp_pb2.Timestamp
    error_code: str
    error_message: str
    lease_token: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., ok: _Optional[bool] = ..., state: _Optional[_Union[JobState, str]] = ..., lease_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., lease_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "node_id", "result", "error", "lease_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    node_id: str
    result: JobResult
    error: JobError
    lease_token: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., lease_token: _Optional[str] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("state", "version")
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    version: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., version: _Optional[int] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node_id", "pairs", "asr_langs", "tts_langs", "max_concurrency", "labels", "version", "holding")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    ASR_LANGS_FIELD_NUMBER: _ClassVar[int]
    TTS_LANGS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOLDING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pairs: _containers.RepeatedCompositeFieldContainer[LanguagePair]
    asr_langs: _containers.RepeatedScalarFieldContainer[str]
    tts_langs: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency: int
    labels: _containers.ScalarMap[str, str]
    version: str
    holding: _containers.RepeatedCompositeFieldContainer[JobLease]
    def __init__(self, node_id: _Optional[str] = ..., pairs: _Optional[_Iterable[_Union[LanguagePair, _Mapping]]] = ..., asr_langs: _Optional[_Iterable[str]] = ..., tts_langs: _Optional[_Iterable[str]] = ..., max_concurrency: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., version: _Optional[str] = ..., holding: _Optional[_Iterable[_Union[JobLease, _Mapping]]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("lease", "result", "error")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    lease: JobLease
    result: JobResult
    error: JobError
    def __init__(self, lease: _Optional[_Union[JobLease, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("register", "acks", "heartbeats", "completions", "unavailable", "drain", "pong")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    register: Register
    acks: _containers.RepeatedCompositeFieldContainer[JobLease]
    heartbeats: _containers.RepeatedCompositeFieldContainer[JobLease]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    unavailable: _containers.RepeatedCompositeFieldContainer[JobLease]
    drain: bool
    pong: Pong
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., acks: _Optional[_Iterable[_Union[JobLease, _Mapping]]] = ..., heartbeats: _Optional[_Iterable[_Union[JobLease, _Mapping]]] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., unavailable: _Optional[_Iterable[_Union[JobLease, _Mapping]]] = ..., drain: _Optional[bool] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("id", "sent_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    sent_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("registered", "assignments", "cancels", "refused", "error", "confirmed", "ping", "drain")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    CANCELS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    registered: RegisterAck
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    cancels: _containers.RepeatedCompositeFieldContainer[JobLease]
    refused: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    error: str
    confirmed: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    ping: Ping
    drain: bool
    def __init__(self, registered: _Optional[_Union[RegisterAck, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., cancels: _Optional[_Iterable[_Union[JobLease, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ..., error: _Optional[str] = ..., confirmed: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., drain: _Optional[bool] = ...) -> None: ...

class RegisterAck(_message.Message):
    __slots__ = ("instance_id", "heartbeat_interval", "lease_duration", "ack_timeout", "pools", "ping_interval", "ping_timeout")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    ACK_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    PING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PING_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    heartbeat_interval: _duration_pb2.Duration
    lease_duration: _duration_pb2.Duration
    ack_timeout: _duration_pb2.Duration
    pools: _containers.RepeatedScalarFieldContainer[str]
    ping_interval: _duration_pb2.Duration
    ping_timeout: _duration_pb2.Duration
    def __init__(self, instance_id: _Optional[str] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ack_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., pools: _Optional[_Iterable[str]] = ..., ping_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ping_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "pools", "max_concurrency", "in_flight", "instance_id", "labels", "version", "connected_at", "draining", "quarantined")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    pools: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency: int
    in_flight: int
    instance_id: str
    labels: _containers.ScalarMap[str, str]
    version: str
    connected_at: _timestamp_pb2.Timestamp
    draining: bool
    quarantined: bool
    def __init__(self, node_id: _Optional[str] = ..., pools: _Optional[_Iterable[str]] = ..., max_concurrency: _Optional[int] = ..., in_flight: _Optional[int] = ..., instance_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., version: _Optional[str] = ..., connected_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., draining: _Optional[bool] = ..., quarantined: _Optional[bool] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("pool", "state", "tenant_id", "session_id", "page_size", "page_token")
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pool: str
    state: JobState
    tenant_id: str
    session_id: str
    page_size: int
    page_token: str
    def __init__(self, pool: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("pools", "as_of")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStats]
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStats, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StateCount(_message.Message):
    __slots__ = ("state", "count")
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    count: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., count: _Optional[int] = ...) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("pool", "jobs", "nodes", "capacity", "in_flight", "submitted_per_second", "finished_per_second", "paused", "oldest_queued_age", "paused_reason", "paused_at")
    POOL_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_QUEUED_AGE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_AT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    jobs: _containers.RepeatedCompositeFieldContainer[StateCount]
    nodes: int
    capacity: int
    in_flight: int
    submitted_per_second: float
    finished_per_second: float
    paused: bool
    oldest_queued_age: _duration_pb2.Duration
    paused_reason: str
    paused_at: _timestamp_pb2.Timestamp
    def __init__(self, pool: _Optional[str] = ..., jobs: _Optional[_Iterable[_Union[StateCount, _Mapping]]] = ..., nodes: _Optional[int] = ..., capacity: _Optional[int] = ..., in_flight: _Optional[int] = ..., submitted_per_second: _Optional[float] = ..., finished_per_second: _Optional[float] = ..., paused: _Optional[bool] = ..., oldest_queued_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., paused_reason: _Optional[str] = ..., paused_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RetryJobRequest(_message.Message):
    __slots__ = ("job_id", "reason", "deadline", "max_attempts")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    deadline: _timestamp_pb2.Timestamp
    max_attempts: int
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_attempts: _Optional[int] = ...) -> None: ...

class CancelSessionRequest(_message.Message):
    __slots__ = ("tenant_id", "session_id", "reason")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    session_id: str
    reason: str
    def __init__(self, tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelSessionResponse(_message.Message):
    __slots__ = ("cancelled_job_ids", "already_finished")
    CANCELLED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FINISHED_FIELD_NUMBER: _ClassVar[int]
    cancelled_job_ids: _containers.RepeatedScalarFieldContainer[str]
    already_finished: int
    def __init__(self, cancelled_job_ids: _Optional[_Iterable[str]] = ..., already_finished: _Optional[int] = ...) -> None: ...

class PausePoolRequest(_message.Message):
    __slots__ = ("pool", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    reason: str
    def __init__(self, pool: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumePoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class PoolState(_message.Message):
    __slots__ = ("pool", "paused", "reason", "paused_at")
    POOL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_AT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    paused: bool
    reason: str
    paused_at: _timestamp_pb2.Timestamp
    def __init__(self, pool: _Optional[str] = ..., paused: _Optional[bool] = ..., reason: _Optional[str] = ..., paused_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...
