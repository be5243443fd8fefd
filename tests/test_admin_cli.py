"""The admin calls from the SDK and the `lingua` command line, against a real scheduler and a real
node: what an on-call engineer types, read back as they would read it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest
from helpers import until
from lingua_sdk import Assignment, AsyncClient, FailedPrecondition, FatalError, InvalidArgument, JobState, Node
from lingua_sdk.models import Job
from test_cli import SUBMIT, assert_aligned, lingua
from test_sdk_python import make_node, running, target, translate

pytestmark = pytest.mark.single_redis  # the SDK sees only gRPC; the server side is tested on both backends


async def submitted(t: str, *argv: str) -> str:
    rc, out = await lingua("--target", t, *SUBMIT, *argv, "-q")
    assert rc == 0, out
    return out.strip()


async def test_stats_jobs_pause_resume_from_the_command_line(app: Any) -> None:
    t = target(app)
    first = [await submitted(t, "--index", str(i)) for i in range(3)]  # zh:en, no node yet
    rc, out = await lingua("--target", t, "stats")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:4] == ["POOL", "QUEUED", "ASSIGNED", "RUNNING"]
    assert_aligned(lines)
    row = next(line.split() for line in lines[1:] if line.startswith("zh:en "))
    assert row[1:4] == ["3", "0", "0"] and row[-1] == "on"

    rc, out = await lingua("--target", t, "jobs", "--pool", "zh:en", "--limit", "2")
    lines = out.splitlines()
    assert rc == 0 and [line.split()[0] for line in lines[1:]] == first[:0:-1]  # newest first
    rc, out = await lingua("--target", t, "--json", "jobs", "--pool", "zh:en", "--limit", "2")
    page = json.loads(out)
    assert [j["job_id"] for j in page["jobs"]] == first[:0:-1] and page["next_page_token"]
    rc, out = await lingua("--target", t, "--json", "jobs", "--limit", "5", "--page-token", page["next_page_token"])
    assert rc == 0 and [j["job_id"] for j in json.loads(out)["jobs"]] == first[:1]

    rc, out = await lingua("--target", t, "pause", "zh:en", "--reason", "model upgrade")
    assert rc == 0 and re.fullmatch(r"pool zh:en paused since \S+Z: model upgrade\n", out)
    rc, out = await lingua("--target", t, "stats", "--pool", "zh:en")
    table, why = out.splitlines()[:-1], out.splitlines()[-1]
    assert rc == 0 and table[1].split()[-1] == "paused" and re.fullmatch(r"pool zh:en paused since \S+Z: model upgrade", why)
    async with AsyncClient(t) as client, running(_both_pools(t)):
        # The node serves both pools: a job of the other pool runs to the end while zh:en holds.
        other = await client.submit(tenant_id="acme", session_id="cli", src_lang="en", tgt_lang="zh",
                                    payload_ref="s3://a/1.opus")
        assert (await client.wait(other.job_id, timeout=20)).state is JobState.SUCCEEDED
        assert [(await client.get(j)).state for j in first] == [JobState.QUEUED] * 3
        stats = {p.pool: p for p in (await client.get_stats()).pools}
        assert stats["zh:en"].paused and stats["zh:en"].jobs["queued"] == 3

        async def node_counted() -> bool:  # figures are a snapshot up to a second old
            return (await client.get_stats("zh:en")).pools[0].nodes == 1

        await until(node_counted, what="the node in the pool's figures")
        rc, out = await lingua("--target", t, "resume", "zh:en")
        assert (rc, out) == (0, "pool zh:en dispatching\n")
        for job_id in first:
            assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED


def _both_pools(t: str) -> Node:
    return Node(t, node_id="gpu-1", pairs=["zh:en", "en:zh"], concurrency=4, handler=translate,
                handle_signals=False, backoff=(0.05, 0.5))


async def test_retry_a_failed_job_then_it_succeeds(app: Any) -> None:
    t = target(app)
    tries: list[int] = []

    async def fails_once(a: Assignment) -> dict[str, Any]:
        tries.append(a.attempt)
        if len(tries) == 1:
            raise FatalError("model crashed", code="MODEL_CRASH")
        return await translate(a)

    async with AsyncClient(t) as client, running(make_node(t, fails_once)):
        job_id = await submitted(t)
        failed: Job = await client.wait(job_id, timeout=20)
        assert failed.state is JobState.FAILED and failed.last_error and failed.last_error.code == "MODEL_CRASH"
        rc, out = await lingua("--target", t, "jobs", "--state", "failed")
        assert rc == 0 and job_id in out and "MODEL_CRASH" in out
        rc, out = await lingua("--target", t, "retry", job_id, "--reason", "model fixed")
        assert rc == 0 and re.search(r"^state\s+queued$", out, re.M)
        done = await client.wait(job_id, timeout=20)
        assert done.state is JobState.SUCCEEDED and done.attempt == 1  # a fresh attempt budget
        with pytest.raises(FailedPrecondition):
            await client.retry(job_id)  # succeeded: nothing to retry
    rc, _ = await lingua("--target", t, "retry", job_id)
    assert rc == 1


async def test_cancel_session_and_drain_node(app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = target(app)
    queued = [await submitted(t, "--session", "hung-up", "--to", "ja", "--index", str(i)) for i in range(2)]
    rc, out = await lingua("--target", t, "cancel-session", "acme", "hung-up", "--reason", "caller left")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "cancelled 2 job(s); 0 already finished"
    assert sorted(line.strip() for line in lines[1:]) == sorted(queued)
    rc, out = await lingua("--target", t, "--json", "cancel-session", "acme", "hung-up")
    assert (rc, json.loads(out)["cancelled_job_ids"], json.loads(out)["already_finished"]) == (0, [], 2)

    async with AsyncClient(t) as client, running(make_node(t, translate)) as node_run:
        async def registered() -> bool:
            return bool(await client.list_nodes())

        await until(registered, what="the node registered")
        rc, out = await lingua("--target", t, "drain", "gpu-1")
        header, row = out.splitlines()
        assert rc == 0 and header.split()[:3] == ["NODE", "POOLS", "LOAD"]
        assert row.split()[0] == "gpu-1" and "draining" in row.split()
        await asyncio.wait_for(node_run, 10)  # the drained node's run() returns: it does not reconnect
    rc, _ = await lingua("--target", t, "drain", "nobody")
    assert rc == 1 and "NOT_FOUND" in capsys.readouterr().err


async def test_admin_refusals_are_typed(app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = target(app)
    async with AsyncClient(t) as client:
        with pytest.raises(InvalidArgument):
            await client.pause_pool("not-a-pool")
        with pytest.raises(InvalidArgument):
            await client.list_jobs(page_size=501)
        queued = await submitted(t)
        with pytest.raises(FailedPrecondition):
            await client.retry(queued)
    rc, _ = await lingua("--target", t, "pause", "zh")
    assert rc == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err


async def test_every_admin_change_is_audited(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """One INFO line per change an operator made, with its arguments and who made it; reads are not
    audited."""
    caplog.set_level(logging.INFO, logger="lingua_scheduler.audit")
    async with AsyncClient(target(app)) as client:
        await client.pause_pool("zh:en", reason="model upgrade")
        await client.resume_pool("zh:en")
        await client.get_stats()
        await client.list_jobs()
        with pytest.raises(InvalidArgument):
            await client.pause_pool("zh")  # refused: nothing changed, nothing audited
    lines = [r.getMessage() for r in caplog.records if r.name == "lingua_scheduler.audit"]
    assert lines == [
        'admin PausePool(pool: "zh:en" reason: "model upgrade") by a caller of a server without authentication',
        'admin ResumePool(pool: "zh:en") by a caller of a server without authentication',
    ]
