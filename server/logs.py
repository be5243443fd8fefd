"""Log lines as text or JSON (--log-format), each carrying the job, node, tenant and trace it is about.

The four ids live in context variables, set where the server handles an RPC (server/service.py), a
node stream (server/node.py) or a job (`extra=fields(...)` on a line about one job, which wins over
the context). grpc.aio runs each call in its own task, which copies the context: a value set in a
handler stays with that call and the tasks it starts. The dispatcher and the sweeper run their own
tasks, so their lines name the job with `extra`. A filter on the handler copies the set ones onto
every record; the JSON formatter writes them as keys, the text formatter as `key=value` at the end.
A worker of `--workers N` names its instance on every line too (`instance_id`).

Never log a payload, a result, a bearer token or a Redis password: a line names jobs by id.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

JOB_ID: ContextVar[str] = ContextVar("job_id", default="")
NODE_ID: ContextVar[str] = ContextVar("node_id", default="")
TENANT_ID: ContextVar[str] = ContextVar("tenant_id", default="")
TRACE_ID: ContextVar[str] = ContextVar("trace_id", default="")
FIELDS = (("job_id", JOB_ID), ("node_id", NODE_ID), ("tenant_id", TENANT_ID), ("trace_id", TRACE_ID))
NAMES = ("instance_id", *(name for name, _ in FIELDS))  # as the text line shows them

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def trace_id_of(trace_context: Any) -> str:
    """The trace id of a W3C `traceparent` (version-traceid-spanid-flags) in a JobSpec.trace_context
    map, or "" when it has none."""
    parts: list[str] = trace_context.get("traceparent", "").split("-") if trace_context else []
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def fields(job_id: str = "", node_id: str = "", tenant_id: str = "", trace_context: Any = None,
           trace_id: str = "") -> dict[str, str]:
    """`extra=` for a line about one job, from a task whose context is not that job's. Its trace id:
    the traceparent's in `trace_context`, else the client's own `trace_id` (JobSpec.trace_id)."""
    given = {"job_id": job_id, "node_id": node_id, "tenant_id": tenant_id,
             "trace_id": trace_id_of(trace_context) or trace_id}
    return {k: v for k, v in given.items() if v}


_ID_FIELDS: dict[Any, tuple[tuple[str, ContextVar[str]], ...]] = {}  # message descriptor -> its id fields


def from_request(request: Any) -> None:
    """Set the ids an RPC's request names (its `job_id`, `node_id`, `tenant_id` fields) for the call."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    found = _ID_FIELDS.get(descriptor)
    if found is None:  # once per message type (a stream's iterator has none)
        names = descriptor.fields_by_name if descriptor is not None else {}
        found = _ID_FIELDS[descriptor] = tuple((name, var) for name, var in FIELDS[:3] if name in names)
    for name, var in found:
        value = getattr(request, name)
        if value:
            var.set(value)


class ContextFilter(logging.Filter):
    """Copies the set context ids onto each record (an `extra=` id of the same name wins), and the
    process's instance id when it is one of several workers (`instance`, set by setup())."""

    instance = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if self.instance:
            record.instance_id = self.instance
        for name, var in FIELDS:
            value = var.get()
            if value and not getattr(record, name, ""):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The classic line, then the ids that apply: `... message [job_id=zh:en:{1}01J... node_id=gpu-3]`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{name}={value}" for name in NAMES if (value := getattr(record, name, "")))
        if not ids:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the line
        return f"{head} [{ids}]{sep}{tail}"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the ids that apply,
    and exc_info (the traceback) when there is one."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         timestamp="time")


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is written (as logging's last resort does), so a
    process that swaps it (a test runner capturing output) never leaves it writing to a closed file."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def handler(log_format: str, stream: Any = None, instance: str = "") -> logging.Handler:
    """A stream handler (stderr by default) with the context filter and the chosen formatter; with an
    `instance` id, every line names it (a worker of `--workers N`: server/workers.py)."""
    out = logging.StreamHandler(stream) if stream is not None else _Stderr()
    context = ContextFilter()
    context.instance = instance
    out.addFilter(context)
    out.setFormatter(json_formatter() if log_format == "json" else TextFormatter())
    return out


def setup(log_format: str, level: str = "info", instance: str = "") -> None:
    """The process's logging: the root logger writes to stderr through handler(log_format, instance=)
    at `level` (in place of the handler an earlier setup() added; other handlers, a test runner's, stay)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler(log_format, instance=instance))
    root.setLevel(level.upper())
    logging.getLogger("transitions").setLevel(logging.WARNING)  # it logs every transition at INFO
