"""Request validation: every check raises InvalidArgument (or TooLarge) naming the field.

Nothing here touches Redis, so a bad request is refused before anything changes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from lingua_sdk import pb

from . import keys
from .errors import InvalidArgument, TooLarge
from .settings import Settings

LANG = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})?")
TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: ids, keys
URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:\S+")
# What the scheduler issues after the partition tag: a ULID in python-ulid's canonical spelling,
# 26 upper-case Crockford base32 characters, the first at most 7 (48-bit time). Checked exactly, so
# no other text (spaces, newlines, lower case, non-ASCII) reaches a Redis key or channel name.
JOB_ID = re.compile(r"(?P<src>[a-z0-9-]+):(?P<tgt>[a-z0-9-]+):\{(?P<part>0|[1-9][0-9]{0,5})\}"
                    r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
MAX_ATTEMPT_WINDOW_S = 60
# The ranges of google/protobuf/timestamp.proto and duration.proto: 0001-01-01 to 9999-12-31, and
# about +-10,000 years.
TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
DURATION_SECONDS = 315_576_000_000
NANOS = 999_999_999


def timestamp_ms(ts: Timestamp, field: str) -> int:
    """The milliseconds of a well-formed Timestamp (nanos 0 to 999999999, seconds in year 1 to 9999)."""
    if not 0 <= ts.nanos <= NANOS:
        raise InvalidArgument(field, f"nanos must be 0 to {NANOS}, not {ts.nanos}")
    if not TIMESTAMP_SECONDS[0] <= ts.seconds <= TIMESTAMP_SECONDS[1]:
        raise InvalidArgument(field, f"seconds must lie in the years 0001 to 9999, not {ts.seconds}")
    return ts.ToMilliseconds()


def duration_ms(d: Duration, field: str) -> int:
    """The milliseconds of a well-formed Duration (nanos within +-999999999, same sign as seconds)."""
    if not -NANOS <= d.nanos <= NANOS:
        raise InvalidArgument(field, f"nanos must be -{NANOS} to {NANOS}, not {d.nanos}")
    if not -DURATION_SECONDS <= d.seconds <= DURATION_SECONDS:
        raise InvalidArgument(field, f"seconds must be -{DURATION_SECONDS} to {DURATION_SECONDS}")
    if (d.seconds < 0 < d.nanos) or (d.nanos < 0 < d.seconds):
        raise InvalidArgument(field, "seconds and nanos must have the same sign")
    return d.ToMilliseconds()


def _token(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(field, "required")
    if not TOKEN.fullmatch(value):
        raise InvalidArgument(field, "1 to 128 printable ASCII characters without spaces")


def lang(value: str, field: str) -> None:
    if not LANG.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} is not a language tag such as 'zh', 'en' or 'pt-br'")


def node_id(value: str, field: str = "node_id") -> None:
    _token(value, field)


def job_id(value: str, settings: Settings, field: str = "job_id") -> None:
    if not value:
        raise InvalidArgument(field, "required")
    if len(value) > 200:
        raise InvalidArgument(field, "too long to be a job id")
    m = JOB_ID.fullmatch(value)
    if not (m and LANG.fullmatch(m["src"]) and LANG.fullmatch(m["tgt"]) and m["src"] != m["tgt"]
            and int(m["part"]) < settings.partitions):
        raise InvalidArgument(field, f"{value!r} is not a job id of this scheduler "
                              "(src:tgt:{partition} followed by a 26-character ULID)")


def attempt(value: int, field: str = "attempt") -> None:
    if value < 1:
        raise InvalidArgument(field, "must be 1 or more (the attempt the job was assigned with)")


def trace_context(value: Mapping[str, str], field: str) -> None:
    """W3C trace context entries ("traceparent", "tracestate", ...): at most 8, names 1 to 512 and values
    up to 512 characters."""
    if len(value) > 8:
        raise InvalidArgument(field, f"at most 8 entries, not {len(value)}")
    for name, text in value.items():
        if not 0 < len(name) <= 512 or len(text) > 512:
            raise InvalidArgument(field, f"entry {name[:64]!r}: names must be 1 to 512 and values at most 512 characters")


def spec(s: pb.JobSpec, settings: Settings, field: str) -> None:
    tenant_id(s.tenant_id, f"{field}.tenant_id")
    _token(s.session_id, f"{field}.session_id")
    if s.utterance_index < 0:
        raise InvalidArgument(f"{field}.utterance_index", "must not be negative")
    lang(s.src_lang, f"{field}.src_lang")
    lang(s.tgt_lang, f"{field}.tgt_lang")
    if s.tgt_lang == s.src_lang:
        raise InvalidArgument(f"{field}.tgt_lang", f"must differ from src_lang ({s.src_lang!r})")
    served(keys.pool_of(s.src_lang, s.tgt_lang), settings, f"{field}.tgt_lang")
    if len(s.trace_id) > 128:
        raise InvalidArgument(f"{field}.trace_id", "at most 128 characters")
    if s.trace_context:
        trace_context(s.trace_context, f"{field}.trace_context")
    if not 0 <= s.priority <= 9:
        raise InvalidArgument(f"{field}.priority", "must be 0 to 9")
    if not 0 <= s.max_attempts <= settings.max_attempts_cap:
        raise InvalidArgument(f"{field}.max_attempts", f"must be 0 (default) to {settings.max_attempts_cap}")
    if s.idempotency_key:
        _token(s.idempotency_key, f"{field}.idempotency_key")
    if s.HasField("deadline"):
        deadline(s.deadline, settings, f"{field}.deadline")
    if s.HasField("execution_timeout"):
        ms = duration_ms(s.execution_timeout, f"{field}.execution_timeout")
        if ms <= 0 or ms > settings.max_job_ttl_ms:
            raise InvalidArgument(f"{field}.execution_timeout", "must be positive and at most max job TTL")
    if s.payload and s.payload_ref:
        raise InvalidArgument(field, "set payload or payload_ref, not both")
    if not s.payload and not s.payload_ref:
        raise InvalidArgument(field, "payload or payload_ref is required")
    if len(s.payload) > settings.max_payload_bytes:
        raise TooLarge(f"{field}.payload", f"{len(s.payload)} bytes is over the cap of {settings.max_payload_bytes}")
    if s.payload_ref and (len(s.payload_ref) > 2048 or not URI.fullmatch(s.payload_ref)):
        raise InvalidArgument(f"{field}.payload_ref", "must be a URI (scheme:...) of at most 2048 characters")


def deadline(ts: Timestamp, settings: Settings, field: str) -> int:
    """A job's deadline (Submit, RetryJob): in the future, at most the max job TTL ahead; its ms."""
    now_ms = int(time.time() * 1000)
    at = timestamp_ms(ts, field)
    if at <= now_ms:
        raise InvalidArgument(field, "must be in the future")
    if at > now_ms + settings.max_job_ttl_ms:
        raise InvalidArgument(field, f"at most {settings.max_job_ttl_ms // 1000} s ahead")
    return at


def submit(req: pb.SubmitRequest, settings: Settings) -> None:
    if not req.jobs:
        raise InvalidArgument("jobs", "at least one job is required")
    if len(req.jobs) > settings.max_batch:
        raise TooLarge("jobs", f"{len(req.jobs)} jobs is over the batch cap of {settings.max_batch}")
    for i, s in enumerate(req.jobs):
        spec(s, settings, f"jobs[{i}]")


def served(pool: str, settings: Settings, field: str) -> None:
    """Refuse a pool outside the --pools allow-list (when there is one)."""
    allowed = settings.allowed_pools()
    if allowed is not None and pool not in allowed:
        raise InvalidArgument(field, f"{pool} is not served here (served: {', '.join(sorted(allowed))})")


def pairs(items: Iterable[pb.LanguagePair], settings: Settings, field: str = "pairs") -> list[str]:
    found: list[str] = []
    for i, p in enumerate(items):
        lang(p.src_lang, f"{field}[{i}].src_lang")
        lang(p.tgt_lang, f"{field}[{i}].tgt_lang")
        if p.tgt_lang == p.src_lang:
            raise InvalidArgument(f"{field}[{i}].tgt_lang", f"must differ from src_lang ({p.src_lang!r})")
        pool = keys.pool_of(p.src_lang, p.tgt_lang)
        served(pool, settings, f"{field}[{i}]")
        if pool not in found:
            found.append(pool)
    return found


def assign(req: pb.AssignRequest, settings: Settings) -> list[str]:
    node_id(req.node_id)
    if not req.pairs:
        raise InvalidArgument("pairs", "at least one language pair is required")
    if len(req.pairs) > 256:
        raise InvalidArgument("pairs", "at most 256")
    if not 0 <= req.max_jobs <= 100:
        raise InvalidArgument("max_jobs", "must be 1 to 100 (0 means 1)")
    if req.HasField("wait") and not 0 <= duration_ms(req.wait, "wait") <= 60_000:
        raise InvalidArgument("wait", "must be 0 to 60 s")
    return pairs(req.pairs, settings)


def result(r: pb.JobResult, settings: Settings, field: str) -> None:
    if len(r.tts_audio) > settings.max_payload_bytes:
        raise TooLarge(f"{field}.tts_audio", f"{len(r.tts_audio)} bytes is over the cap of {settings.max_payload_bytes}")
    if r.tts_audio and r.tts_audio_ref:
        raise InvalidArgument(field, "set tts_audio or tts_audio_ref, not both")
    if r.tts_audio_ref and not URI.fullmatch(r.tts_audio_ref):
        raise InvalidArgument(f"{field}.tts_audio_ref", "must be a URI")
    if r.ByteSize() > settings.max_payload_bytes + 65_536:
        raise TooLarge(field, "result is over the cap")


def error(e: pb.JobError, field: str) -> None:
    _token(e.code, f"{field}.code")
    if e.code.startswith("LINGUA_"):
        raise InvalidArgument(f"{field}.code", "codes starting with LINGUA_ are the scheduler's own")
    if len(e.message) > 4096:
        raise InvalidArgument(f"{field}.message", "at most 4096 characters")


def lease_token(value: str, field: str = "lease_token") -> None:
    if not value:
        raise InvalidArgument(field, "required (the lease_token the assignment carried)")
    if len(value) > 64 or not TOKEN.fullmatch(value):
        raise InvalidArgument(field, "not a lease token of this scheduler")


def lease(item: pb.JobLease, settings: Settings, field: str) -> None:
    job_id(item.job_id, settings, f"{field}.job_id")
    attempt(item.attempt, f"{field}.attempt")
    lease_token(item.lease_token, f"{field}.lease_token")


def outcome(msg: pb.CompleteRequest | pb.Completion, settings: Settings, prefix: str = "") -> None:
    """The result-or-error oneof of a Complete call or a stream Completion."""
    which = msg.WhichOneof("outcome")
    if which is None:
        raise InvalidArgument(f"{prefix}outcome", "set result or error")
    if which == "result":
        result(msg.result, settings, f"{prefix}result")
    else:
        error(msg.error, f"{prefix}error")


def completion(c: pb.Completion, settings: Settings, field: str) -> None:
    lease(c.lease, settings, f"{field}.lease")
    outcome(c, settings, f"{field}.")


def complete(req: pb.CompleteRequest, settings: Settings) -> None:
    job_id(req.job_id, settings)
    attempt(req.attempt)
    lease_token(req.lease_token)
    node_id(req.node_id)
    outcome(req, settings)


def tenant_id(value: str, field: str = "tenant_id") -> None:
    if not TENANT.fullmatch(value):
        raise InvalidArgument(field, "required, 1 to 64 of A-Z a-z 0-9 . _ -")


def session(tenant: str, session_id: str) -> None:
    """A session named by tenant_id and session_id (WatchSession, CancelSession, ListJobs)."""
    tenant_id(tenant)
    _token(session_id, "session_id")


def watch_session(req: pb.WatchSessionRequest) -> None:
    session(req.tenant_id, req.session_id)
    if req.from_index < 0:
        raise InvalidArgument("from_index", "must not be negative")
    if req.tgt_lang:
        lang(req.tgt_lang, "tgt_lang")
