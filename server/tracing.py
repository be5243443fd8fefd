"""OpenTelemetry tracing: off unless the standard OTEL_* variables turn it on (docs/operations.md, "Tracing").

On when OTEL_TRACES_EXPORTER names an exporter other than `none` (`otlp`, `console`, any installed
`opentelemetry_traces_exporter` entry point, comma-separated), or when it is unset and
OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (then `otlp`).
OTEL_SDK_DISABLED=true turns it off whatever else is set. Everything else (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_EXPORTER_OTLP_*, OTEL_PROPAGATORS) is
read by the OpenTelemetry SDK itself.

Off, nothing here is built: App.tracing, Store.tracing and Dispatcher.tracing are None, the hot paths
test that once, and this module does not even import the SDK.

On, the scheduler makes:
- a server span per RPC (opentelemetry-instrumentation-grpc; its parent is the caller's `traceparent`
  metadata), except the long-lived NodeSession streams and health checks;
- `lingua.submit` per submitted job, the child of the job's `trace_context` when the client set one
  (the SDK does), else of the RPC's span. Its context replaces the job's traceparent, so the job
  carries it to its node: the node's work is a child of the submit;
- `lingua.claim` per job the dispatcher claims (the claim round trip), a child of the submit;
- `lingua.finish` per complete, fail, cancel, expiry, lease expiry or lost node, a child of the submit
  when this instance submitted or claimed the job (it keeps the last MAX_REMEMBERED such contexts),
  else a span of its own trace that names the job.
Attributes: lingua.job_id, lingua.pool, lingua.tenant_id, lingua.node_id, lingua.attempt,
lingua.outcome (the event), lingua.state (the state it led to).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from lingua_sdk import pb

from . import keys, logs
from .errors import ScriptCode

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider

    from .store import Claim, Submitted

MAX_REMEMBERED = 65_536  # job id -> trace context kept for finish spans (about 200 bytes each)
TRACER_NAME = "lingua_scheduler"


def exporters_wanted(env: Mapping[str, str]) -> list[str]:
    """The trace exporters the environment asks for; [] when tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [name for name in (n.strip() for n in named.split(",")) if name and name != "none"]


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A TracerProvider exporting (batched) to what the environment names, or None when tracing is off.
    ValueError for an exporter name that no installed package provides."""
    names = exporters_wanted(os.environ if env is None else env)
    if not names:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    installed = {ep.name: ep for ep in entry_points(group="opentelemetry_traces_exporter")}
    missing = [name for name in names if name not in installed]
    if missing:
        raise ValueError(f"OTEL_TRACES_EXPORTER: no exporter named {', '.join(missing)} is installed "
                         f"(installed: {', '.join(sorted(installed))})")
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over this default name.
    provider = TracerProvider(resource=Resource({SERVICE_NAME: "lingua-scheduler"}).merge(Resource.create()))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(installed[name].load()()))
    return provider


def _pool(job_id: str) -> str:
    try:
        return keys.pool_of_tag(keys.tag_of(job_id))
    except ValueError:
        return ""


class Tracing:
    """The scheduler's spans, from one TracerProvider (see the module's docstring)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, propagate, trace

        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)
        self._propagate = propagate
        self._context = context
        self._trace = trace
        self._jobs: OrderedDict[str, Context] = OrderedDict()  # job id -> its submit's context, newest last

    def interceptor(self) -> Any:
        """The grpc.aio server interceptor of opentelemetry-instrumentation-grpc: a span per RPC."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        return aio_server_interceptor(self.provider, filters.negate(filters.any_of(  # type: ignore[no-untyped-call]
            filters.method_name("NodeSession"), filters.health_check())))

    def _remember(self, job_id: str, ctx: Context) -> None:
        self._jobs[job_id] = ctx
        self._jobs.move_to_end(job_id)
        while len(self._jobs) > MAX_REMEMBERED:
            self._jobs.popitem(last=False)

    def _parent(self, trace_context: Mapping[str, str]) -> Context | None:
        return self._propagate.extract(trace_context) if trace_context else None

    def _submit_parent(self, trace_context: Mapping[str, str]) -> Context | None:
        """The job's trace_context; the current span (the RPC's) instead when it is of the same trace
        (the client sent traceparent metadata too), so the submit nests under the call."""
        parent = self._parent(trace_context)
        if parent is None:
            return None
        current = self._trace.get_current_span().get_span_context()
        given = self._trace.get_current_span(parent).get_span_context()
        return None if current.is_valid and current.trace_id == given.trace_id else parent

    async def submit(self, store: Any, specs: Sequence[pb.JobSpec]) -> list[Submitted]:
        """store.submit(specs) inside one `lingua.submit` span per job, each spec's trace_context set to it."""
        spans = []
        for spec in specs:
            span = self.tracer.start_span("lingua.submit", context=self._submit_parent(spec.trace_context), attributes={
                "lingua.pool": keys.pool_of(spec.src_lang, spec.tgt_lang), "lingua.tenant_id": spec.tenant_id})
            ctx = self._trace.set_span_in_context(span)
            spec.trace_context.pop("traceparent", None)
            spec.trace_context.pop("tracestate", None)
            self._propagate.inject(spec.trace_context, context=ctx)
            spans.append((span, ctx))
        if spans:
            logs.TRACE_ID.set(logs.trace_id_of(specs[0].trace_context))
        try:
            done: list[Submitted] = await store.submit(list(specs))
        except BaseException as err:
            for span, _ in spans:
                span.record_exception(err)
                span.set_status(self._trace.StatusCode.ERROR, type(err).__name__)
                span.end()
            raise
        for (span, ctx), d in zip(spans, done, strict=True):
            span.set_attributes({"lingua.job_id": d.job_id, "lingua.outcome": "created" if d.created else "repeat",
                                 "lingua.state": d.state})
            span.end()
            if d.created:
                self._remember(d.job_id, ctx)
        return done

    def claimed(self, claims: Sequence[tuple[str, Claim | Exception]], start_ns: int) -> None:
        """A `lingua.claim` span per claim that applied ((node id, claim) pairs of one round trip)."""
        for node_id, claim in claims:
            if isinstance(claim, Exception) or claim.code != ScriptCode.APPLIED:
                continue
            spec = pb.JobSpec.FromString(claim.meta)
            parent = self._parent(spec.trace_context)
            if parent is not None:
                self._remember(claim.job_id, parent)
            span = self.tracer.start_span("lingua.claim", context=parent, start_time=start_ns, attributes={
                "lingua.job_id": claim.job_id, "lingua.pool": keys.pool_of(spec.src_lang, spec.tgt_lang),
                "lingua.tenant_id": spec.tenant_id, "lingua.node_id": node_id, "lingua.attempt": claim.attempt,
                "lingua.outcome": "assigned"})
            span.end()

    def finished(self, job_id: str, event: str, state: str, *, node_id: str = "", tenant_id: str = "",
                 attempt: int = 0, terminal: bool = False) -> None:
        """A `lingua.finish` span for a committed complete / fail / cancel / expiry of a job."""
        parent = self._jobs.pop(job_id, None) if terminal else self._jobs.get(job_id)
        attributes: dict[str, str | int] = {"lingua.job_id": job_id, "lingua.pool": _pool(job_id),
                                            "lingua.outcome": event, "lingua.state": state}
        for name, value in (("lingua.node_id", node_id), ("lingua.tenant_id", tenant_id), ("lingua.attempt", attempt)):
            if value:
                attributes[name] = value
        self.tracer.start_span("lingua.finish", context=parent, attributes=attributes).end()
