"""Tracing (server/tracing.py, lingua_sdk/_otel.py) and structured logs (server/logs.py), end to end:
a real App and a lingua_sdk Node in this process, spans caught by the OpenTelemetry SDK's
InMemorySpanExporter, log lines by a handler of server/logs.py on a StringIO."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import all_keys, spec, until
from lingua_scheduler.server import logs, tracing
from lingua_scheduler.server.app import App, create_server
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.tokens import mint
from lingua_sdk import AsyncClient, JobState, Node, Unauthenticated, pb, pb_grpc
from lingua_sdk.models import Assignment
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SPEC = dict(tenant_id="acme", session_id="s1", src_lang="zh", tgt_lang="en", payload_ref="s3://audio/s1/0.opus")


@pytest.fixture(scope="session")
def spans() -> Iterator[InMemorySpanExporter]:
    """One provider for the process (the global one, which the SDK's node uses) and the apps here."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


@pytest.fixture
def exporter(spans: InMemorySpanExporter) -> InMemorySpanExporter:
    spans.clear()
    return spans


@pytest.fixture
async def traced_app(redis: Any, settings: Settings, spans: InMemorySpanExporter) -> AsyncIterator[App]:
    app = create_server(settings, tracer_provider=trace.get_tracer_provider())
    await app.start()
    yield app
    await app.stop(grace=0)


def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@contextlib.asynccontextmanager
async def node_running(app: App, handler: Any) -> AsyncIterator[Node]:
    node = Node(target(app), node_id="gpu-1", pairs=["zh:en"], handler=handler, handle_signals=False, concurrency=4,
                backoff=(0.05, 0.5))
    task = asyncio.create_task(node.run())
    try:
        yield node
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def ancestors(span: ReadableSpan, exporter: InMemorySpanExporter) -> list[int]:
    """Span ids from the span's parent up to the root, as far as the recorded spans go."""
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    out, parent = [], span.parent
    while parent is not None:
        out.append(parent.span_id)
        up = by_id.get(parent.span_id)
        parent = up.parent if up is not None else None
    return out


async def seen(exporter: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    deadline = time.monotonic() + 10
    while len(named(exporter, name)) < count:
        assert time.monotonic() < deadline, f"{count} {name} span(s) not recorded within 10 s"
        await asyncio.sleep(0.01)
    return named(exporter, name)


async def test_the_node_span_is_a_child_of_the_submit_in_the_clients_trace(
        traced_app: App, exporter: InMemorySpanExporter) -> None:
    contexts: list[dict[str, str]] = []

    async def handler(a: Assignment) -> dict[str, str]:
        contexts.append(dict(a.spec.trace_context))
        with trace.get_tracer("handler").start_as_current_span("translate"):
            return {"text_translated": "hello"}

    async with AsyncClient(target(traced_app)) as client, node_running(traced_app, handler):
        with trace.get_tracer("client").start_as_current_span("speech-turn") as turn:
            job_id = (await client.submit(**SPEC)).job_id
        assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED
    (submit,) = named(exporter, "lingua.submit")
    (job,) = await seen(exporter, "lingua.job")
    (claim,) = named(exporter, "lingua.claim")
    (finish,) = await seen(exporter, "lingua.finish")
    (work,) = named(exporter, "translate")
    trace_id = turn.get_span_context().trace_id
    assert {s.context.trace_id for s in (submit, job, claim, finish, work)} == {trace_id}
    assert submit.parent is not None and submit.parent.span_id == turn.get_span_context().span_id
    assert job.parent is not None and job.parent.span_id == submit.context.span_id  # the node's work: the submit's child
    assert submit.context.span_id in ancestors(work, exporter)  # and what the handler does below it
    assert claim.parent is not None and claim.parent.span_id == submit.context.span_id
    assert finish.parent is not None and finish.parent.span_id == submit.context.span_id
    assert contexts[0]["traceparent"].split("-")[1:3] == [f"{trace_id:032x}", f"{submit.context.span_id:016x}"]
    assert dict(submit.attributes or {}) == {"lingua.pool": "zh:en", "lingua.tenant_id": "acme", "lingua.job_id": job_id,
                                             "lingua.outcome": "created", "lingua.state": "queued"}
    assert dict(claim.attributes or {}) == {"lingua.job_id": job_id, "lingua.pool": "zh:en", "lingua.tenant_id": "acme",
                                            "lingua.node_id": "gpu-1", "lingua.attempt": 1, "lingua.outcome": "assigned"}
    assert dict(finish.attributes or {}) == {"lingua.job_id": job_id, "lingua.pool": "zh:en", "lingua.tenant_id": "acme",
                                             "lingua.node_id": "gpu-1", "lingua.attempt": 1, "lingua.outcome": "complete",
                                             "lingua.state": "succeeded"}
    assert (job.attributes or {})["lingua.job_id"] == job_id
    rpc = [s for s in exporter.get_finished_spans() if s.name.endswith("/Submit")]
    assert rpc and rpc[0].kind is trace.SpanKind.SERVER  # opentelemetry-instrumentation-grpc's span per call


async def test_without_client_context_the_submit_starts_the_trace_and_metadata_parents_it(
        traced_app: App, exporter: InMemorySpanExporter) -> None:
    """A caller without the SDK: W3C traceparent in gRPC metadata parents the call's span (the
    instrumentation extracts it), under which the submit span is; the job carries the submit's context."""
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with grpc.aio.insecure_channel(target(traced_app)) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        reply = await stub.Submit(pb.SubmitRequest(jobs=[spec()]),
                                  metadata=(("traceparent", f"00-{parent_trace}-{parent_span}-01"),))
        job = await stub.GetJob(pb.GetJobRequest(job_id=reply.results[0].job_id))
        bare = await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="s2")]))  # no context at all
        bare_job = await stub.GetJob(pb.GetJobRequest(job_id=bare.results[0].job_id))
    submit, bare_submit = named(exporter, "lingua.submit")
    assert f"{submit.context.trace_id:032x}" == parent_trace
    assert job.spec.trace_context["traceparent"] == f"00-{parent_trace}-{submit.context.span_id:016x}-01"
    assert int(parent_span, 16) in ancestors(submit, exporter)
    assert bare_job.spec.trace_context["traceparent"].split("-")[2] == f"{bare_submit.context.span_id:016x}"


async def test_cancel_session_makes_a_finish_span_per_job_in_its_trace(
        traced_app: App, exporter: InMemorySpanExporter) -> None:
    async with grpc.aio.insecure_channel(target(traced_app)) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        made = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=i) for i in range(2)]))).results
        done = await stub.CancelSession(pb.CancelSessionRequest(tenant_id="acme", session_id="s1"))
    assert sorted(done.cancelled_job_ids) == sorted(r.job_id for r in made)
    finishes = await seen(exporter, "lingua.finish", 2)
    submits = {s.attributes["lingua.job_id"]: s for s in named(exporter, "lingua.submit")}  # type: ignore[index]
    for finish in finishes:
        attrs = finish.attributes or {}
        assert (attrs["lingua.outcome"], attrs["lingua.state"]) == ("cancel", "cancelled")
        assert finish.context.trace_id == submits[attrs["lingua.job_id"]].context.trace_id


async def test_tracing_off_makes_no_spans_and_leaves_trace_context_alone(
        app: App, exporter: InMemorySpanExporter) -> None:
    """`app` is built without a tracer provider (as main does when no OTEL_* variable turns tracing on)."""
    assert app.tracing is None and app.store.tracing is None and app.dispatcher.tracing is None
    contexts: list[dict[str, str]] = []

    async def handler(a: Assignment) -> dict[str, str]:
        contexts.append(dict(a.spec.trace_context))
        return {"text_translated": "hello"}

    given = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "vendor": "kept"}
    async with AsyncClient(target(app)) as client, node_running(app, handler):
        first = (await client.submit(**SPEC)).job_id  # no current span: nothing injected
        second = (await client.submit(**SPEC, utterance_index=1, trace_context=given)).job_id
        for job_id in (first, second):
            assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED
    assert contexts == [{}, given]
    assert not [s for s in exporter.get_finished_spans() if s.name.startswith("lingua.") and s.name != "lingua.job"]
    assert not [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]


@pytest.mark.parametrize(("context", "what"), [
    ({f"k{i}": "v" for i in range(9)}, "at most 8 entries"),
    ({"traceparent": "x" * 513}, "at most 512"),
    ({"": "v"}, "names must be 1 to 512"),
])
async def test_bad_trace_context_is_refused_naming_the_field(
        stub: pb_grpc.SchedulerStub, redis: Any, context: dict[str, str], what: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Submit(pb.SubmitRequest(jobs=[spec(), spec(session_id="s2", trace_context=context)]))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[1].trace_context" in (raised.value.details() or "") and what in (raised.value.details() or "")
    assert await all_keys(redis, "lingua:v1:job:*") == []  # the whole batch refused: nothing stored


async def test_with_tracing_on_a_refusal_keeps_its_rich_status(traced_app: App, exporter: InMemorySpanExporter) -> None:
    """The instrumentation wraps each call's context: abort_with_status still carries the details."""
    async with grpc.aio.insecure_channel(target(traced_app)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await pb_grpc.SchedulerStub(channel).Submit(pb.SubmitRequest(jobs=[spec(
                trace_context={f"k{i}": "v" for i in range(9)})]))
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    violation = error_details_pb2.BadRequest()
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.details[1].Unpack(violation) and violation.field_violations[0].field == "jobs[0].trace_context"
    # The server ends the call's span after the status went out: the client may hear it first.
    await until(lambda: any(s.name.endswith("/Submit") for s in exporter.get_finished_spans()), what="the call's span")
    (rpc,) = [s for s in exporter.get_finished_spans() if s.name.endswith("/Submit")]
    assert not named(exporter, "lingua.submit")  # refused before anything was submitted
    # The call's span records the code (a caller's mistake is not a server error: its status stays unset).
    assert (rpc.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_a_repeat_submit_with_another_trace_context_finds_its_job(stub: pb_grpc.SchedulerStub) -> None:
    """trace_context is not part of a job's identity: a retry under another span is the same job."""
    one, other = "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "00-" + "3" * 32 + "-" + "4" * 16 + "-01"
    first = await stub.Submit(pb.SubmitRequest(jobs=[spec(trace_context={"traceparent": one})]))
    again = await stub.Submit(pb.SubmitRequest(jobs=[spec(trace_context={"traceparent": other})]))
    assert again.results[0].job_id == first.results[0].job_id and not again.results[0].created


def test_what_turns_tracing_on() -> None:
    assert tracing.exporters_wanted({}) == []
    assert tracing.exporters_wanted({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_wanted({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.exporters_wanted({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    assert tracing.exporters_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ["otlp"]
    assert tracing.exporters_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}) == ["otlp"]
    assert tracing.exporters_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_wanted({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert tracing.provider_from_env({}) is None
    provider = tracing.provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(provider, TracerProvider)
    provider.shutdown()
    with pytest.raises(ValueError, match="no exporter named zipkin-nope"):
        tracing.provider_from_env({"OTEL_TRACES_EXPORTER": "zipkin-nope"})


# -- logs -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured(log_format: str) -> Iterator[io.StringIO]:
    """Every log line of the process, at DEBUG, through server/logs.py's handler, into a StringIO."""
    out = io.StringIO()
    handler = logs.handler(log_format, out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_json_lines_carry_the_job_node_tenant_and_trace(traced_app: App, exporter: InMemorySpanExporter) -> None:
    async def handler(a: Assignment) -> dict[str, str]:
        return {"text_translated": "hello"}

    with captured("json") as out:
        async with AsyncClient(target(traced_app)) as client, node_running(traced_app, handler):
            job_id = (await client.submit(**SPEC)).job_id
            assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    about = [line for line in lines if line.get("job_id") == job_id]
    (submit,) = named(exporter, "lingua.submit")
    trace_id = f"{submit.context.trace_id:032x}"
    submitted = next(line for line in about if line["message"].startswith("submitted job"))
    assert (submitted["tenant_id"], submitted["trace_id"], submitted["level"]) == ("acme", trace_id, "DEBUG")
    assigned = next(line for line in about if line["message"].startswith("assigned job"))
    assert (assigned["node_id"], assigned["tenant_id"], assigned["trace_id"]) == ("gpu-1", "acme", trace_id)
    finished = next(line for line in about if line["message"].endswith(": succeeded"))
    assert (finished["node_id"], finished["tenant_id"]) == ("gpu-1", "acme")


async def test_text_lines_show_the_ids_compactly(app: App) -> None:
    async def handler(a: Assignment) -> dict[str, str]:
        return {"text_translated": "hello"}

    with captured("text") as out:
        async with AsyncClient(target(app)) as client, node_running(app, handler):
            job_id = (await client.submit(**SPEC, trace_id="caller-trace-7")).job_id
            assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED
    line = next(line for line in out.getvalue().splitlines() if "assigned job" in line)
    assert line.endswith(f"[job_id={job_id} node_id=gpu-1 tenant_id=acme trace_id=caller-trace-7]")


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_no_payload_or_token_reaches_the_log(make_app: AppFactory, settings: Settings, tmp_path: Path,
                                                   spans: InMemorySpanExporter, log_format: str) -> None:
    """A lifecycle with an inline payload, a result and bearer tokens (and a refused junk token), logged at
    DEBUG with tracing on: none of their bytes appear in any line."""
    secret = tmp_path / "hs.secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef-log-test\n")
    payload, result = b"PAYLOAD-3f9c-audio-bytes", "RESULT-77ab-text"
    client_token = mint(str(secret), "client", tenants=["acme"], ttl_s=60)
    node_token = mint(str(secret), "node", node_ids=["gpu-*"], ttl_s=60)
    junk = "JUNK-TOKEN-5d1e"
    with captured(log_format) as out:
        app = create_server(dataclasses.replace(settings, auth_jwt_key=(str(secret),)),
                            tracer_provider=trace.get_tracer_provider())
        await app.start()
        try:
            async def handler(a: Assignment) -> dict[str, str]:
                assert a.spec.payload == payload
                return {"text_translated": result}

            node = Node(target(app), node_id="gpu-1", pairs=["zh:en"], handler=handler, handle_signals=False, concurrency=4,
                        backoff=(0.05, 0.5), token=node_token)
            task = asyncio.create_task(node.run())
            try:
                async with AsyncClient(target(app), token=client_token) as client:
                    fields = {**SPEC, "payload_ref": "", "payload": payload}
                    job_id = (await client.submit(**fields)).job_id
                    assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED
                async with AsyncClient(target(app), token=junk) as refused:
                    with pytest.raises(Unauthenticated):
                        await refused.get(job_id)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await app.stop(grace=0)
    text = out.getvalue()
    assert job_id in text and "refused" in text  # the log did record this lifecycle and the refusal
    for secret_text in (payload.decode(), result, client_token, node_token, junk, client_token.split(".")[2]):
        assert secret_text not in text


def test_a_throttled_line_keeps_its_level_and_ids() -> None:
    """ThrottledWarning passes `extra` (the ids) and `exc_info` through, at its level, and counts what it held back."""
    from lingua_scheduler.server.throttle import ThrottledWarning

    now = [0.0]
    out = io.StringIO()
    logger = logging.getLogger("test.tracing.throttle")
    logger.addHandler(logs.handler("json", out))
    logger.propagate = False
    try:
        warn = ThrottledWarning(logger, interval_s=10, clock=lambda: now[0], level=logging.ERROR)
        for i in range(4):
            now[0] = i * 4.0  # 0 logged, 4 and 8 held back, 12 logged again
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                warn("node %s failed", "gpu-1", extra=logs.fields(node_id="gpu-1"), exc_info=True)
    finally:
        logger.propagate = True
        logger.handlers.clear()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["level"], x["message"], x["node_id"]) for x in lines] == [
        ("ERROR", "node gpu-1 failed", "gpu-1"),
        ("ERROR", "node gpu-1 failed (2 more like it suppressed in the last 12 s)", "gpu-1")]
    assert all("RuntimeError: boom" in x["exc_info"] for x in lines)


def test_the_sdk_works_without_opentelemetry() -> None:
    """lingua-scheduler-sdk without its [otel] extra: submits carry no context, handlers run without a span."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed: importing it fails
from lingua_sdk import _otel, pb
from lingua_sdk.client import _Core
request = _Core.submit_request([dict(tenant_id="acme", session_id="s", src_lang="zh", tgt_lang="en", payload_ref="x:y")])
assert _otel.trace is None and dict(request.jobs[0].trace_context) == {}
with _otel.job_span(pb.Assignment(job_id="j"), "gpu-1") as span:
    assert span is None
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
