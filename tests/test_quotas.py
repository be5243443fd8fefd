"""Per-tenant Submit limits (--tenants file; server/quotas.py, lua/admit_jobs-2.lua): a token bucket and
a cap on unfinished jobs, shared by every instance, refused with RESOURCE_EXHAUSTED and a retry delay;
and the file's errors. Real schedulers, real Redis, the Python SDK and raw stubs."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from lingua_scheduler.server import keys
from lingua_scheduler.server.app import create_server
from lingua_scheduler.server.main import main as server_main
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.tenants import TenantConfigError, TenantLimits, Tenants, parse
from lingua_sdk import AsyncClient, ResourceExhausted, pb, pb_grpc
from lingua_sdk.cli import main as cli_main
from test_lua_scripts import documented_codes
from test_round_trips import Monitor

TENANTS = """
[default]
weight = 1

[tenant."fast"]        # a realistic rate: its retry delay is short enough to wait for
submit_rate = 20
submit_burst = 2

[tenant."frugal"]      # next to no refill while a test runs
submit_rate = 0.001
submit_burst = 4

[tenant."small"]
max_queued = 3
"""


@pytest.fixture
def tenants_file(tmp_path: Path) -> str:
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    return str(path)


def job(tenant: str, i: int, **extra: Any) -> dict[str, Any]:
    return dict(tenant_id=tenant, session_id=f"{tenant}-s", utterance_index=i, src_lang="zh", tgt_lang="en",
                payload_ref=f"s3://audio/{tenant}/{i}.opus", **extra)


def target(app: Any) -> str:
    return f"127.0.0.1:{app.port}"


async def unfinished(redis: Any, tenant: str) -> int:
    return int(await redis.zcard(keys.TenantKeys.of(tenant).jobs))


async def test_over_the_rate_is_resource_exhausted_with_its_retry_delay(make_app: AppFactory, tenants_file: str,
                                                                       redis: Any) -> None:
    app = await make_app(tenants=tenants_file)
    async with AsyncClient(target(app)) as client:
        await client.submit_many([job("fast", 0), job("fast", 1)])  # the burst
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit(**job("fast", 2))
        delay = refused.value.retry_delay
        assert refused.value.reason == "TENANT_RATE_LIMITED"
        assert delay is not None and 0 < delay <= 0.05  # one token at 20 jobs/s
        assert "tenant fast" in refused.value.message and "submit_rate of 20 jobs/s" in refused.value.message
        # The same through the raw stub: a rich status with ErrorInfo and RetryInfo.
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await client.stub.Submit(pb.SubmitRequest(jobs=[pb.JobSpec(**job("fast", 2))]))
        status = rpc_status.from_call(raw.value)  # type: ignore[arg-type]
        assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info) and info.reason == "TENANT_RATE_LIMITED"
        assert status.details[1].Unpack(retry) and 0 < retry.retry_delay.ToMilliseconds() <= 50
        # The refused job was not stored; after the delay it is accepted, as new.
        await asyncio.sleep(delay)  # the delay the server asked for, not a guess: what is tested
        assert (await client.submit(**job("fast", 2))).created
    # Only limited tenants have quota keys.
    assert await redis.exists(keys.TenantKeys.of("fast").bucket)
    assert not await redis.exists(keys.TenantKeys.of("acme").bucket, keys.TenantKeys.of("acme").jobs)


async def test_a_full_queue_is_refused_until_a_job_finishes(make_app: AppFactory, tenants_file: str,
                                                            redis: Any) -> None:
    app = await make_app(tenants=tenants_file)
    async with AsyncClient(target(app)) as client:
        jobs = await client.submit_many([job("small", i) for i in range(3)])
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit(**job("small", 3))
        assert refused.value.reason == "TENANT_QUEUE_FULL" and refused.value.retry_delay == 1.0
        assert "tenant small has 3 jobs queued or running" in refused.value.message
        assert "max_queued of 3" in refused.value.message
        # A job that finishes (here: a node completes it) makes room, counted out by the instance that
        # finished it within its flush interval.
        reply = await client.stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pb.LanguagePair(src_lang="zh",
                                                                                             tgt_lang="en")]))
        (a,) = reply.assignments
        await client.stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, node_id="n1",
                                                      lease_token=a.lease_token, result=pb.JobResult()))
        await until(lambda: unfinished(redis, "small"), 2)
        assert (await client.submit(**job("small", 3))).created
        # A cancel counts out too.
        await client.cancel(jobs[1].job_id if jobs[1].job_id != a.job_id else jobs[2].job_id)
        await until(lambda: unfinished(redis, "small"), 2)
        assert (await client.submit(**job("small", 4))).created


async def until(count: Any, want: int, timeout: float = 5.0) -> None:
    """Poll `count()` until it is `want` (a condition with a deadline: the flush is a background task)."""
    deadline = time.monotonic() + timeout
    while (got := await count()) != want:
        assert time.monotonic() < deadline, f"still {got}, not {want}"
        await asyncio.sleep(0.02)


async def test_repeats_of_stored_jobs_are_not_refused(make_app: AppFactory, tenants_file: str, redis: Any) -> None:
    app = await make_app(tenants=tenants_file)
    async with AsyncClient(target(app)) as client:
        first = await client.submit_many([job("frugal", i) for i in range(2)])
        # A repeat while tokens remain: admitted, found by submit, its tokens and places given back...
        again = await client.submit_many([job("frugal", i) for i in range(2)])
        assert [r.job_id for r in again] == [r.job_id for r in first] and not any(r.created for r in again)
        # ... so the burst's other two still pass, and then the bucket is empty.
        await client.submit_many([job("frugal", i) for i in range(2, 4)])
        with pytest.raises(ResourceExhausted):
            await client.submit(**job("frugal", 4))
        # A repeat with the bucket empty (a client retrying a batch whose reply it lost) is answered.
        again = await client.submit_many([job("frugal", i) for i in range(4)])
        assert not any(r.created for r in again)
        # Same for the queue limit, and the count stays the truth.
        small = await client.submit_many([job("small", i) for i in range(3)])
        again = await client.submit_many([job("small", i) for i in range(3)])
        assert [r.job_id for r in again] == [r.job_id for r in small]
    assert await unfinished(redis, "small") == 3
    assert await unfinished(redis, "frugal") == 0  # no max_queued: not counted


async def test_limits_are_shared_by_every_instance(make_app: AppFactory, tenants_file: str) -> None:
    one, two = await make_app(tenants=tenants_file), await make_app(tenants=tenants_file)
    async with AsyncClient(target(one)) as a, AsyncClient(target(two)) as b:
        await a.submit_many([job("frugal", 0), job("frugal", 1)])
        await b.submit_many([job("frugal", 2), job("frugal", 3)])
        with pytest.raises(ResourceExhausted) as rate:
            await a.submit(**job("frugal", 4))
        await a.submit_many([job("small", 0), job("small", 1)])
        await b.submit(**job("small", 2))
        with pytest.raises(ResourceExhausted) as full:
            await a.submit(**job("small", 3))
    assert (rate.value.reason, full.value.reason) == ("TENANT_RATE_LIMITED", "TENANT_QUEUE_FULL")


async def test_a_refused_batch_changes_nothing(make_app: AppFactory, tenants_file: str, redis: Any) -> None:
    app = await make_app(tenants=tenants_file)
    async with AsyncClient(target(app)) as client:
        await client.submit_many([job("small", i) for i in range(3)])
        # frugal would be admitted, small is full: the batch is refused whole, frugal's tokens given
        # back, the unlimited tenant's job not stored.
        batch = [job("acme", 0), job("frugal", 0), job("frugal", 1), job("small", 3)]
        with pytest.raises(ResourceExhausted) as refused:
            await client.submit_many(batch)
        assert refused.value.reason == "TENANT_QUEUE_FULL"
        assert (await client.submit(**job("acme", 0))).created
        assert all(r.created for r in await client.submit_many([job("frugal", i) for i in range(4)]))
    assert await unfinished(redis, "small") == 3


async def test_a_batch_that_can_never_pass_is_too_large(make_app: AppFactory, tenants_file: str) -> None:
    app = await make_app(tenants=tenants_file)
    async with AsyncClient(target(app)) as client:
        with pytest.raises(ResourceExhausted) as burst:
            await client.submit_many([job("frugal", i) for i in range(5)])
        with pytest.raises(ResourceExhausted) as queue:
            await client.submit_many([job("small", i) for i in range(4)])
    for err in (burst.value, queue.value):
        assert err.reason == "TOO_LARGE" and err.retry_delay is None  # the same batch never fits
        assert [f for f, _ in err.field_violations] == ["jobs"]
    assert "submit_burst of 4" in burst.value.message and "max_queued of 3" in queue.value.message


@pytest.mark.single_redis
async def test_admission_is_one_round_trip_for_limited_tenants_only(make_app: AppFactory, tenants_file: str,
                                                                   redis: Any) -> None:
    app = await make_app(tenants=tenants_file, sweep_interval_ms=600_000, poll_interval_ms=600_000)
    mon = Monitor(redis)
    async with grpc.aio.insecure_channel(target(app)) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        await stub.Submit(pb.SubmitRequest(jobs=[pb.JobSpec(**job("acme", 100))]))  # the pool is now known
        async with mon.watch():
            await stub.Submit(pb.SubmitRequest(jobs=[pb.JobSpec(**job("acme", i)) for i in range(3)]))
        assert mon.client == Counter(EVALSHA=1), mon.client  # one submit_job call: the jobs share a partition
        specs = [pb.JobSpec(**job(t, i)) for t in ("acme", "small", "fast") for i in range(10, 12)]
        async with mon.watch():
            await stub.Submit(pb.SubmitRequest(jobs=specs))
        calls = len({app.store.partition_tag(s) for s in specs})  # a submit_job call per partition
        assert mon.client == Counter(EVALSHA=2 + calls), mon.client  # admit_jobs for small and fast, then those


async def test_lua_codes(redis: Any, settings: Settings) -> None:
    from lingua_scheduler.server.calls import AdmitJobs, RefundJobs
    from lingua_scheduler.server.scripts import Scripts

    scripts, seen = Scripts(), set()
    admit = AdmitJobs("t", 1, 2, 3, 60_000, (("j1", 0), ("j2", 0)))
    seen.add((await scripts.call(redis, admit.call()))[0])
    seen.add((r := await scripts.call(redis, AdmitJobs("t", 1, 2, 0, 60_000, (("j3", 0),)).call()))[0])
    assert r[1] > 0  # a retry delay (ms)
    seen.add((r := await scripts.call(redis, AdmitJobs("t", 0, 0, 3, 60_000, (("j3", 0), ("j4", 0))).call()))[0])
    assert r[1] == 2  # the unfinished jobs counted
    assert set(seen) == documented_codes("admit_jobs") == {1, -12, -13}
    assert (await scripts.call(redis, RefundJobs("t", 1, 2, ("j1", "j2")).call()))[0] == 1
    assert documented_codes("refund_jobs") == {1}
    assert await redis.zcard(keys.TenantKeys.of("t").jobs) == 0
    assert (await scripts.call(redis, AdmitJobs("t", 1, 2, 3, 60_000, (("j1", 0), ("j2", 0))).call()))[0] == 1


# -- the file -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("[default]\nweight = 0\n", "t.toml: [default] weight: must be from 0.01 to 1000, not 0"),
    ("[tenant.\"acme\"]\nmax_queued = -1\n", "t.toml: [tenant.\"acme\"] max_queued: must be at least 0, not -1"),
    ("[tenant.\"acme\"]\nmax_queued = 2.5\n", "t.toml: [tenant.\"acme\"] max_queued: must be an integer, not 2.5"),
    ("[tenant.\"acme\"]\nsubmit_rate = true\n", "t.toml: [tenant.\"acme\"] submit_rate: must be a number, not True"),
    ("[tenant.\"acme\"]\nburst = 3\n", "t.toml: [tenant.\"acme\"]: unknown key 'burst'"),
    ("[tenant.\"a b\"]\nweight = 2\n", "t.toml: [tenant.\"a b\"]: not a tenant id"),
    ("[tenants.\"acme\"]\nweight = 2\n", "t.toml: unknown table [tenants]"),
    ("[default\n", "t.toml: not valid TOML"),
])
def test_file_errors_name_the_file_table_and_key(text: str, message: str) -> None:
    with pytest.raises(TenantConfigError) as bad:
        parse(text, "t.toml")
    assert str(bad.value).startswith(message), str(bad.value)


def test_file_defaults_and_overrides() -> None:
    config = parse("[default]\nsubmit_rate = 10\n[tenant.\"acme\"]\nweight = 2.5\n[tenant.\"free\"]\nsubmit_rate = 0\n")
    tenants = Tenants(config=config)
    assert (tenants.of("acme").weight, tenants.of("acme").submit_rate, tenants.of("acme").burst) == (2.5, 10, 10)
    assert not tenants.of("free").limited and tenants.of("other").limited
    assert (tenants.of("other").step, tenants.of("acme").step) == (65536, round(65536 / 2.5))


def test_a_bad_file_stops_the_server_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tenants.toml"
    bad.write_text("[tenant.\"acme\"]\nweight = -2\n")
    assert server_main(["--tenants", str(bad), "--redis-url", "redis://127.0.0.1:1"]) == 2
    assert f"{bad}: [tenant.\"acme\"] weight: must be from 0.01 to 1000" in capsys.readouterr().err
    assert server_main(["--tenants", str(tmp_path / "missing.toml"), "--redis-url", "redis://127.0.0.1:1"]) == 2
    assert "missing.toml: cannot read the tenants file" in capsys.readouterr().err
    with pytest.raises(TenantConfigError):
        create_server(Settings(listen="127.0.0.1:0", redis_url="redis://127.0.0.1:1", tenants=str(bad)))


async def test_sighup_rereads_the_file_and_keeps_it_when_broken(make_app: AppFactory, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text("[tenant.\"acme\"]\nmax_queued = 1\n")
    app = await make_app(tenants=str(path))
    async with AsyncClient(target(app)) as client:
        await client.submit(**job("acme", 0))
        with pytest.raises(ResourceExhausted):
            await client.submit(**job("acme", 1))
        path.write_text("[tenant.\"acme\"]\nmax_queued = 2\n")
        app.reload()  # what SIGHUP calls
        await client.submit(**job("acme", 1))
        path.write_text("[tenant.\"acme\"]\nmax_queued = many\n")
        with caplog.at_level(logging.ERROR):
            app.reload()
        assert "tenants: keeping the current settings" in caplog.text and "not valid TOML" in caplog.text
        with pytest.raises(ResourceExhausted):  # still 2
            await client.submit(**job("acme", 2))


@pytest.mark.single_redis
async def test_the_cli_prints_the_retry_delay(make_app: AppFactory, tenants_file: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    app = await make_app(tenants=tenants_file)
    argv = ["--target", target(app), "submit", "--tenant", "frugal", "--session", "cli", "--from", "zh", "--to", "en",
            "--payload-ref", "s3://a/0.opus"]
    codes = [await asyncio.to_thread(cli_main, [*argv, "--index", str(i)], io.StringIO()) for i in range(5)]
    assert codes == [0, 0, 0, 0, 1]
    err = capsys.readouterr().err
    assert "RESOURCE_EXHAUSTED: tenant frugal is over its submit_rate" in err
    assert "retry in " in err and "s (TENANT_RATE_LIMITED)" in err


def test_the_documented_example_loads(repo_root: Path) -> None:
    text = (repo_root / "docs" / "deployment.md").read_text()
    block = text.split("<!-- tenants-example -->\n```toml\n", 1)[1].split("```", 1)[0]
    tenants = Tenants(config=parse(block, "deployment.md"))
    assert tenants.of("acme") == TenantLimits(weight=3, max_queued=20000, submit_rate=500, submit_burst=2000)
    assert tenants.of("trial-42") == TenantLimits(max_queued=100, submit_rate=5)
    assert tenants.of("trial-42").burst == 5 and not tenants.of("anyone").limited


async def test_a_retried_job_counts_against_its_tenants_max_queued_again(make_app: AppFactory, tenants_file: str,
                                                                        redis: Any) -> None:
    app = await make_app(tenants=tenants_file)
    async with grpc.aio.insecure_channel(target(app)) as ch:
        stub = pb_grpc.SchedulerStub(ch)
        await stub.Submit(pb.SubmitRequest(jobs=[pb.JobSpec(**job("small", i)) for i in range(3)]))
        claim = await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pb.LanguagePair(src_lang="zh", tgt_lang="en")],
                                                   max_jobs=1))
        (a,) = claim.assignments
        await stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, node_id="n1",
                                               lease_token=a.lease_token, error=pb.JobError(code="FATAL")))
        await until(lambda: unfinished(redis, "small"), 2)  # the failed job counted out (batched)
        await stub.RetryJob(pb.RetryJobRequest(job_id=a.job_id))
        assert await unfinished(redis, "small") == 3
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Submit(pb.SubmitRequest(jobs=[pb.JobSpec(**job("small", 9))]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
