"""The `lingua` command line against a real scheduler: main(argv) in a thread (the scheduler under
test shares this event loop), output read back as a user would."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import pytest
from lingua_sdk.cli import main
from test_sdk_python import make_node, running, target, translate

pytestmark = pytest.mark.single_redis

SUBMIT = ["submit", "--tenant", "acme", "--session", "cli", "--from", "zh", "--to", "en", "--payload-ref", "s3://a/0.opus"]


async def lingua(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = await asyncio.to_thread(main, list(argv), out)
    return rc, out.getvalue()


async def test_submit_get_watch_nodes_with_a_node(app: Any) -> None:
    t = target(app)
    async with running(make_node(t, translate)):
        rc, out = await lingua("--target", t, *SUBMIT, "--index", "3", "--wait", "20")
        assert rc == 0
        assert re.search(r"^state\s+succeeded$", out, re.M) and re.search(r"^translated\s+hello 3$", out, re.M)
        job_id = out.splitlines()[0].split()[1]
        rc, out = await lingua("get", job_id, "--target", t, "--json")  # flags after the command too
        job = json.loads(out)
        assert (rc, job["state"], job["result"]["text_translated"], job["attempt"]) == (0, "succeeded", "hello 3", 1)
        rc, out = await lingua("--target", t, "--json", "watch", job_id)
        states = [json.loads(line)["state"] for line in out.splitlines()]
        assert rc == 0 and states[0] == "queued" and states[-1] == "succeeded"
        rc, out = await lingua("--target", t, "nodes")
        header, row = out.splitlines()
        assert header.split()[:3] == ["NODE", "POOLS", "LOAD"]
        assert row.split()[:3] == ["gpu-1", "zh:en", "0/4"] and "serving" in row.split()


async def test_quiet_submit_cancel_and_target_from_environment(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINGUA_TARGET", target(app))
    rc, out = await lingua(*SUBMIT, "-q")
    job_id = out.strip()
    assert rc == 0 and job_id.startswith("{zh:en:")
    rc, out = await lingua("cancel", job_id, "--reason", "user hung up")
    assert rc == 0 and re.search(r"^state\s+cancelled$", out, re.M) and "user hung up" in out
    rc, out = await lingua("watch", job_id)
    lines = out.splitlines()
    assert lines[0].split() == ["AT", "STATE", "EVENT", "ATTEMPT", "NODE", "ERROR"]
    assert [line.split()[1] for line in lines[1:]] == ["queued", "cancelled"]
    rc, out = await lingua("--json", "nodes")
    assert (rc, json.loads(out)) == (0, [])


async def test_errors_print_the_status_and_exit_1(app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = target(app)
    rc, _ = await lingua("--target", t, "get", "{zh:en:0}01JE0000000000000000000000")
    assert rc == 1 and "NOT_FOUND" in capsys.readouterr().err
    bad = [a if a != "zh" else "ZH" for a in SUBMIT]
    rc, _ = await lingua("--target", t, *bad)
    assert rc == 1 and re.search(r"INVALID_ARGUMENT: .*src_lang", capsys.readouterr().err)
    rc, out = await lingua("--target", t, *SUBMIT, "--index", "9")
    header, row = out.splitlines()
    assert header.split() == ["JOB", "CREATED", "STATE"] and row.split()[1:] == ["yes", "queued"]
    rc, _ = await lingua("--target", t, *SUBMIT, "--index", "9", "--wait", "0.3")
    assert rc == 1 and "DEADLINE_EXCEEDED" in capsys.readouterr().err  # no node: it never finished


async def test_wait_exit_status_3_when_the_job_did_not_succeed(app: Any) -> None:
    async def refuse(a: Any) -> None:
        from lingua_sdk import FatalError
        raise FatalError("no", code="NOPE")

    async with running(make_node(target(app), refuse)):
        rc, out = await lingua("--target", target(app), *SUBMIT, "--wait")
    assert rc == 3 and re.search(r"^state\s+failed$", out, re.M) and "NOPE" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["submit", "--tenant", "acme"])
    assert exited.value.code == 2 and "required" in capsys.readouterr().err


async def test_session_prints_a_sessions_jobs_in_utterance_order(app: Any) -> None:
    t = target(app)
    async with running(make_node(t, translate)):
        for index in (0, 1, 2):
            rc, _ = await lingua("--target", t, *SUBMIT, "--index", str(index), "--wait", "20")
            assert rc == 0
        rc, out = await lingua("--target", t, "session", "acme", "cli", "--count", "3")
        lines = out.splitlines()
        assert rc == 0 and lines[0].split()[:4] == ["INDEX", "LANG", "STATE", "JOB"]
        assert [line.split()[:3] for line in lines[1:]] == [[str(i), "en", "succeeded"] for i in range(3)]
        assert lines[2].endswith("hello 1")
        rc, out = await lingua("--target", t, "--json", "session", "acme", "cli", "--from", "2", "--count", "1")
        job = json.loads(out)
        assert (rc, job["spec"]["utterance_index"], job["resume_index"]) == (0, 2, 3)
        rc, out = await lingua("--target", t, "session", "acme", "cli", "--from", "3", "--timeout", "0.3")
        assert (rc, out.splitlines()[1:]) == (0, [])  # nothing finished from 3 on: ends at the timeout
    rc, _ = await lingua("--target", t, "session", "acme", "cli", "--from", "-1")
    assert rc == 1
