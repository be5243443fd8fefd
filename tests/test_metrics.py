"""Prometheus metrics (server/metrics.py, server/grpc_metrics.py) scraped from a live server's /metrics:
real gRPC, a real node (the SDK's Node), real Redis (one server and a cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from conftest import AppFactory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import set_maxmemory, spec, until
from lingua_scheduler.fsm import MACHINE, Event
from lingua_scheduler.server.app import App
from lingua_scheduler.server.metrics import ATTEMPT_OUTCOMES, attempt_ending_events
from lingua_scheduler.server.tokens import mint
from lingua_sdk import AsyncClient, FatalError, JobResult, JobState, Node, RetryableError, pb, pb_grpc
from lingua_sdk.models import Assignment
from prometheus_client.parser import text_string_to_metric_families

HTTP = "127.0.0.1:0"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_text(app: App) -> str:
    assert app.http is not None
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{app.http.port}/metrics") as reply:
        assert reply.status == 200
        return await reply.text()


async def scrape(app: App) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(await scrape_text(app)) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent: a child never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def make_node(app: App, handler: Any) -> Node:
    return Node(f"127.0.0.1:{app.port}", node_id="gpu-1", pairs=["zh:en"], concurrency=4, handler=handler,
                handle_signals=False, backoff=(0.05, 0.5))


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[None]:
    task = asyncio.create_task(node.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_tally_families_render_as_prometheus_clients_own() -> None:
    """server/tally.py's lock-free counters and histograms give the samples prometheus_client's give."""
    import prometheus_client
    from lingua_scheduler.server import tally

    ours, theirs = prometheus_client.CollectorRegistry(), prometheus_client.CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    for module, registry in ((tally, ours), (prometheus_client, theirs)):
        counter = module.Counter("t_things_total", "things", ["pool"], registry=registry)
        histogram = module.Histogram("t_wait_seconds", "wait", ["pool"], buckets=buckets, registry=registry)
        counter.labels("a").inc()
        counter.labels("a").inc(2)
        counter.labels("b").inc()
        for v in (0.0005, 0.001, 0.002, 0.5, 1.0, 7.0):
            histogram.labels("a").observe(v)

    def samples(registry: Any) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        text = prometheus_client.generate_latest(registry).decode()
        return {(s.name, tuple(sorted(s.labels.items())), s.value) for f in text_string_to_metric_families(text)
                for s in f.samples if not s.name.endswith("_created")}

    assert samples(ours) == samples(theirs)
    assert ("t_wait_seconds_bucket", (("le", "0.001"), ("pool", "a")), 2.0) in samples(ours)


def test_every_event_that_ends_an_attempt_has_its_outcome() -> None:
    ending = attempt_ending_events()
    assert ending, "the machine has events that end an attempt"
    assert ending <= set(ATTEMPT_OUTCOMES), f"events without an outcome: {ending - set(ATTEMPT_OUTCOMES)}"
    assert Event.START not in ending and Event.SUBMIT not in ending
    assert set(ATTEMPT_OUTCOMES) <= set(MACHINE.events)


async def test_counters_and_histograms_say_what_happened(make_app: AppFactory) -> None:
    """5 jobs submitted (and 2 repeats), one cancelled while queued; a node finishes the others: two
    succeed, one fails, one fails once (retried) then succeeds. Plus a refused Submit."""
    app = await make_app(http_listen=HTTP)
    target = f"127.0.0.1:{app.port}"
    specs = [dict(tenant_id="acme", session_id=f"s{i}", utterance_index=0, src_lang="zh", tgt_lang="en",
                  payload_ref=f"s3://a/{i}", idempotency_key=f"k{i}") for i in range(5)]

    async def work(a: Assignment) -> JobResult:
        if a.spec.session_id == "s2":
            raise FatalError("not speech", code="NOT_SPEECH")
        if a.spec.session_id == "s3" and a.attempt == 1:
            raise RetryableError("GPU hiccup", code="GPU_HICCUP")
        return JobResult(text_translated="hello")

    async with AsyncClient(target) as client:
        ids = [(await client.submit(**s)).job_id for s in specs]
        for s in specs[:2]:  # repeats: the same jobs, nothing created
            assert (await client.submit(**s)).job_id in ids
        await client.cancel(ids[4])
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.SchedulerStub(channel).Submit(pb.SubmitRequest(jobs=[spec(tenant_id="")]))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        async with running(make_node(app, work)):
            await until(lambda: scrape_has(app, "lingua_node_streams", 1), 20, "one node stream")
            states = [(await client.wait(job_id, timeout=20)).state for job_id in ids[:4]]
    assert states == [JobState.SUCCEEDED, JobState.SUCCEEDED, JobState.FAILED, JobState.SUCCEEDED]

    m = await scrape(app)
    pool = {"pool": "zh:en"}
    assert value(m, "lingua_jobs_submitted_total", **pool) == 5
    assert {s: value(m, "lingua_jobs_finished_total", **pool, state=s)
            for s in ("succeeded", "failed", "cancelled", "expired")} == \
        {"succeeded": 3, "failed": 1, "cancelled": 1, "expired": 0}
    attempts = {o: value(m, "lingua_job_attempts_total", **pool, outcome=o)
                for o in ("succeeded", "failed", "retried", "cancelled", "lease_expired", "ack_timeout")}
    assert attempts == {"succeeded": 3, "failed": 1, "retried": 1, "cancelled": 0, "lease_expired": 0,
                        "ack_timeout": 0}
    # Every claim ended in one attempt outcome; four jobs were claimed for the first time; four ended held.
    assert value(m, "lingua_queue_wait_seconds_count", **pool) == total(m, "lingua_job_attempts_total", **pool) == 5
    assert value(m, "lingua_dispatch_latency_seconds_count", **pool) == 4
    assert value(m, "lingua_run_seconds_count", **pool) == 4
    assert 0 < value(m, "lingua_dispatch_latency_seconds_sum", **pool) < 20
    assert value(m, "lingua_redis_call_seconds_count", op="submit_job") >= 3  # a round trip per Submit
    assert value(m, "lingua_redis_call_seconds_count", op="claim_job") >= 1
    await until(lambda: scrape_has(app, "lingua_event_loop_lag_seconds_count", 1, at_least=True), 20, "a lag sample")

    scheduler = {"grpc_service": "lingua.scheduler.v1.Scheduler", "grpc_type": "unary"}
    assert value(m, "grpc_server_handled_total", **scheduler, grpc_method="Submit", grpc_code="OK") == 7
    assert value(m, "grpc_server_handled_total", **scheduler, grpc_method="Submit", grpc_code="INVALID_ARGUMENT") == 1
    assert value(m, "grpc_server_started_total", **scheduler, grpc_method="Submit") == 8
    assert value(m, "grpc_server_handling_seconds_count", **scheduler, grpc_method="Submit") == 8
    assert value(m, "grpc_server_handled_total", **scheduler, grpc_method="CancelJob", grpc_code="OK") == 1
    session = {"grpc_service": "lingua.scheduler.v1.Scheduler", "grpc_type": "bidi_stream",
               "grpc_method": "NodeSession"}
    assert value(m, "grpc_server_started_total", **session) == 1
    # Register, then acks and results; registered, then assignments (several to a message at times).
    assert value(m, "grpc_server_msg_received_total", **session) >= 2
    assert value(m, "grpc_server_msg_sent_total", **session) >= 2
    await until(lambda: scrape_has(app, "lingua_node_streams", 0), 20, "the node stream closed")
    m = await scrape(app)
    assert total(m, "grpc_server_handled_total", **session) == 1  # the stream ended, with whatever code


async def scrape_has(app: App, name: str, want: float, *, at_least: bool = False,
                     labels: dict[str, str] | None = None) -> bool:
    got = value(await scrape(app), name, **(labels or {}))
    return got >= want if at_least else got == want


async def test_refused_calls_are_counted_with_their_code_when_auth_is_on(make_app: AppFactory, tmp_path: Path) -> None:
    secret = tmp_path / "hs.secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef-metrics\n")
    app = await make_app(http_listen=HTTP, auth_jwt_key=(str(secret),))
    node = mint(str(secret), "node", node_ids=["gpu-*"], ttl_s=60)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        request = pb.SubmitRequest(jobs=[spec()])
        with pytest.raises(grpc.aio.AioRpcError) as no_token:
            await stub.Submit(request)
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong_role:
            await stub.Submit(request, metadata=[("authorization", f"Bearer {node}")])
        assert wrong_role.value.code() == grpc.StatusCode.PERMISSION_DENIED
    m = await scrape(app)
    labels = {"grpc_service": "lingua.scheduler.v1.Scheduler", "grpc_type": "unary", "grpc_method": "Submit"}
    assert value(m, "grpc_server_handled_total", **labels, grpc_code="UNAUTHENTICATED") == 1
    assert value(m, "grpc_server_handled_total", **labels, grpc_code="PERMISSION_DENIED") == 1
    assert value(m, "grpc_server_started_total", **labels) == 2
    assert value(m, "lingua_jobs_submitted_total", pool="zh:en") == 0


async def test_streams_not_counted_by_their_handler_are_counted_message_by_message(make_app: AppFactory) -> None:
    """NodeSession counts its own messages (above); the other streams go through the interceptor's
    layers: reflection's request stream (an async generator over it) and health's Watch, answered
    with context.write() (a wrapper of the context)."""
    app = await make_app(http_listen=HTTP)
    labels = {"grpc_service": "grpc.reflection.v1alpha.ServerReflection", "grpc_type": "bidi_stream",
              "grpc_method": "ServerReflectionInfo"}
    watch = {"grpc_service": "grpc.health.v1.Health", "grpc_type": "server_stream", "grpc_method": "Watch"}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        for _ in range(3):
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            assert (await call.read()).HasField("list_services_response")
        watching = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watching.read()).status == health_pb2.HealthCheckResponse.SERVING
        m = await scrape(app)
        assert value(m, "grpc_server_msg_received_total", **labels) == 3
        assert value(m, "grpc_server_msg_sent_total", **labels) == 3
        assert total(m, "grpc_server_handled_total", **labels) == 0  # still open
        assert value(m, "grpc_server_msg_received_total", **watch) == 1
        assert value(m, "grpc_server_msg_sent_total", **watch) == 1
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        watching.cancel()
    await until(lambda: scrape_has(app, "grpc_server_handled_total", 1, labels={**labels, "grpc_code": "OK"}),
                20, "the reflection stream counted as handled")
    m = await scrape(app)
    assert value(m, "grpc_server_started_total", **labels) == 1
    assert value(m, "grpc_server_msg_received_total", **labels) == 3


async def test_redis_errors_are_counted_by_script_and_class(make_app: AppFactory, redis: Any) -> None:
    """A Redis that refuses writes (out of memory, noeviction): Submit answers UNAVAILABLE, and the
    failed script call is counted with its error class."""
    app = await make_app(http_listen=HTTP)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="ok")]))
        await set_maxmemory(redis, "1")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="oom")]))
        finally:
            await set_maxmemory(redis, "0")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    m = await scrape(app)
    assert value(m, "lingua_redis_errors_total", op="submit_job", error="OutOfMemoryError") == 1
    assert value(m, "lingua_redis_call_seconds_count", op="submit_job") == 2
    assert value(m, "lingua_jobs_submitted_total", pool="zh:en") == 1
    assert value(m, "grpc_server_handled_total", grpc_service="lingua.scheduler.v1.Scheduler", grpc_type="unary",
                 grpc_method="Submit", grpc_code="UNAVAILABLE") == 1


@pytest.mark.single_redis
async def test_a_stopped_redis_is_counted_as_connection_errors(make_app: AppFactory, tmp_path: Path) -> None:
    from lingua_scheduler.server.embedded import EmbeddedRedis

    private = EmbeddedRedis(tmp_path, persistent=False).start()
    try:
        app = await make_app(http_listen=HTTP, redis_url=private.url, redis_pool_timeout_ms=500)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            await stub.Submit(pb.SubmitRequest(jobs=[spec()]))
            private.stop()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="after")]))
    finally:
        private.stop()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    m = await scrape(app)
    assert total(m, "lingua_redis_errors_total", op="submit_job") >= 1
    assert value(m, "lingua_redis_errors_total", op="submit_job", error="ConnectionError") >= 1


async def test_no_http_port_no_metrics(app: App) -> None:
    assert app.http is None and app.store.metrics is None and app.store.scripts.metrics is None


# -- the dashboard and the alert rules ----------------------------------------------------------------

METRIC = re.compile(r"\b((?:lingua|grpc_server)_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_count", "_sum")


def referenced(repo_root: Path, tmp_path: Path) -> set[str]:
    """The metric names the dashboard's queries and the alert rules use (parsed; with promtool on the
    machine, the rules and every dashboard query are checked by it too)."""
    dashboard = json.loads((repo_root / "docs/grafana/lingua-scheduler.json").read_text())
    rules_file = repo_root / "docs/prometheus/alerts.yml"
    rules = yaml.safe_load(rules_file.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rule_list = [r for group in rules["groups"] for r in group["rules"]]
    for rule in rule_list:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
    assert queries and rule_list
    if shutil.which("promtool"):  # Debian's prometheus package: PromQL syntax checked as well
        as_rules = tmp_path / "dashboard-queries.yml"
        as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query_{i}", "expr": q.replace("$__rate_interval", "5m").replace("$pool", ".*")}
            for i, q in enumerate(queries)]}]}))
        for path in (rules_file, as_rules):
            checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stdout + checked.stderr
    variables = [t["query"] for t in dashboard.get("templating", {}).get("list", []) if t.get("type") == "query"]
    return {name for expr in [*queries, *variables, *(r["expr"] for r in rule_list)] for name in METRIC.findall(expr)}


def exported(text: str) -> set[str]:
    """Every sample name the scrape can carry: from its TYPE lines (families with no sample yet too)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        if kind == "histogram":
            names.update(name + s for s in SUFFIXES)
    return names


async def test_dashboard_and_alerts_use_only_exported_metrics(make_app: AppFactory, repo_root: Path,
                                                             tmp_path: Path) -> None:
    app = await make_app(http_listen=HTTP)
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:

        async def work(a: Assignment) -> JobResult:
            return JobResult(text_translated="hi")

        async with running(make_node(app, work)):
            job = await client.wait((await client.submit(tenant_id="acme", session_id="s", src_lang="zh",
                                                         tgt_lang="en", payload_ref="s3://a")).job_id, timeout=20)
    assert job.state == JobState.SUCCEEDED
    names = referenced(repo_root, tmp_path)
    missing = names - exported(await scrape_text(app))
    assert not missing, f"referenced in docs/ but not exported: {sorted(missing)}"
    assert {"lingua_jobs_submitted_total", "grpc_server_handled_total", "lingua_queue_depth"} <= names


async def test_cancel_session_counts_every_job_it_cancels(make_app: AppFactory) -> None:
    """CancelSession cancels in one pipelined round trip of its own: those changes are counted too."""
    app = await make_app(http_listen=HTTP)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="call", utterance_index=i) for i in range(3)]))
        reply = await stub.CancelSession(pb.CancelSessionRequest(tenant_id="acme", session_id="call"))
    assert len(reply.cancelled_job_ids) == 3
    m = await scrape(app)
    assert value(m, "lingua_jobs_finished_total", pool="zh:en", state="cancelled") == 3
    assert total(m, "lingua_job_attempts_total") == 0  # queued jobs: no attempt ended
    assert value(m, "lingua_run_seconds_count", pool="zh:en") == 0


async def test_ack_timeout_and_lease_expiry_are_attempt_outcomes(make_app: AppFactory) -> None:
    """Taken back by the sweeper: an assignment never acknowledged (ack_timeout), then one acknowledged
    and never heard of again (lease_expired), then a completion. Dispatch latency is observed at the
    first claim only; queue wait at every claim; run time once, at the end."""
    from google.protobuf.duration_pb2 import Duration

    app = await make_app(http_listen=HTTP)
    pool = {"pool": "zh:en"}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id

        async def assign(node: str) -> pb.Assignment:
            reply = await stub.Assign(pb.AssignRequest(node_id=node, pairs=[pb.LanguagePair(src_lang="zh", tgt_lang="en")],
                                                       max_jobs=1, wait=Duration(seconds=10)))
            assert [a.job_id for a in reply.assignments] == [job_id]
            return reply.assignments[0]

        async def outcome_is(outcome: str) -> bool:
            return value(await scrape(app), "lingua_job_attempts_total", **pool, outcome=outcome) == 1

        await assign("n1")  # never acknowledged
        await until(lambda: outcome_is("ack_timeout"), 20, "the ack timeout")
        second = await assign("n2")
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n2", leases=[
            pb.JobLease(job_id=job_id, attempt=second.attempt, lease_token=second.lease_token)]))
        await until(lambda: outcome_is("lease_expired"), 20, "the lease expiry")
        third = await assign("n3")
        await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=third.attempt, lease_token=third.lease_token,
                                               node_id="n3", result=pb.JobResult(text_translated="hi")))
    m = await scrape(app)
    assert {o: value(m, "lingua_job_attempts_total", **pool, outcome=o)
            for o in ("ack_timeout", "lease_expired", "succeeded")} == {"ack_timeout": 1, "lease_expired": 1, "succeeded": 1}
    assert total(m, "lingua_job_attempts_total", **pool) == 3
    assert value(m, "lingua_dispatch_latency_seconds_count", **pool) == 1
    assert value(m, "lingua_queue_wait_seconds_count", **pool) == 3
    assert value(m, "lingua_run_seconds_count", **pool) == 1
    assert value(m, "lingua_jobs_finished_total", **pool, state="succeeded") == 1



async def test_a_stream_its_client_closes_while_a_response_is_being_written_is_counted_cancelled(
        make_app: AppFactory) -> None:
    """grpc.aio leaves the response generator where it yielded when the client goes away during the
    write, and closes it later (GeneratorExit) with context.cancelled() still False: CANCELLED, not
    UNKNOWN (WatchJobs closed by their clients right after the terminal event were counted UNKNOWN)."""
    app = await make_app(http_listen=HTTP)
    labels = {"grpc_service": "grpc.reflection.v1alpha.ServerReflection", "grpc_type": "bidi_stream",
              "grpc_method": "ServerReflectionInfo"}
    # A small window and no BDP probing: a ~60 KB response the client does not read cannot be written.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="lingua.scheduler.v1.Scheduler")
        await call.write(request)
        assert (await call.read()).ByteSize() > 10 * 1024
        await call.write(request)  # its answer is handed to grpc (counted sent), and stays in the write
        await until(lambda: scrape_has(app, "grpc_server_msg_sent_total", 2, labels=labels), 20, "the second answer")
        call.cancel()

    async def ended() -> bool:
        return total(await scrape(app), "grpc_server_handled_total", **labels) == 1

    await until(ended, 20, "the stream counted as handled")
    assert value(await scrape(app), "grpc_server_handled_total", **labels, grpc_code="CANCELLED") == 1
