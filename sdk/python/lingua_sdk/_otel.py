"""OpenTelemetry, when `opentelemetry-api` is installed (`pip install lingua-scheduler-sdk[otel]`); without
it, both helpers do nothing and cost nothing.

- A submit carries the caller's current trace context in each JobSpec.trace_context that has none
  (W3C traceparent/tracestate, by the globally configured propagators), so the scheduler's submit span
  and, through the job's assignment, the node's work join the caller's trace.
- A node runs its handler inside a `lingua.job` span whose parent is the assignment's trace_context:
  spans the handler starts are its children. Spans go wherever the process's TracerProvider sends
  them (none is configured here: the application configures OpenTelemetry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ._proto import scheduler_pb2 as pb

try:
    from opentelemetry import propagate, trace
except ImportError:  # the [otel] extra is not installed
    propagate = trace = None  # type: ignore[assignment]

# A proxy until the application sets its TracerProvider, then that provider's tracer: made once.
_tracer = trace.get_tracer("lingua_sdk") if trace is not None else None


def inject(request: pb.SubmitRequest) -> None:
    """The current trace context into each job's trace_context that the caller left empty."""
    if propagate is None:
        return
    for spec in request.jobs:
        if not spec.trace_context:
            propagate.inject(spec.trace_context)  # writes nothing when no span is current


@contextlib.contextmanager
def job_span(a: pb.Assignment, node_id: str) -> Iterator[Any]:
    """The handler's span (None without opentelemetry): a child of the submit that made the job."""
    if _tracer is None:
        yield None
        return
    parent = propagate.extract(a.spec.trace_context) if a.spec.trace_context else None
    with _tracer.start_as_current_span(
        "lingua.job", context=parent, kind=trace.SpanKind.CONSUMER, attributes={
            "lingua.job_id": a.job_id, "lingua.node_id": node_id, "lingua.attempt": a.attempt,
            "lingua.pool": f"{a.spec.src_lang}:{a.spec.tgt_lang}", "lingua.tenant_id": a.spec.tenant_id}) as span:
        yield span
