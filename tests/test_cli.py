"""The `lingua` command line against a real scheduler: main(argv) in a thread (the scheduler under
test shares this event loop), output read back as a user would."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from lingua_sdk import AsyncClient, Client, DeadlineExceeded
from lingua_sdk.cli import main
from test_sdk_python import SPEC, make_node, running, target, translate

pytestmark = pytest.mark.single_redis

SUBMIT = ["submit", "--tenant", "acme", "--session", "cli", "--from", "zh", "--to", "en", "--payload-ref", "s3://a/0.opus"]


async def lingua(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = await asyncio.to_thread(main, list(argv), out)
    return rc, out.getvalue()


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """main(argv) must stop with exit status 2 and no traceback; its stderr."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    return err


def assert_aligned(lines: list[str]) -> None:
    """Every row's cells start where the header's columns do (columns are 2+ spaces apart; only the
    last column's cells may hold spaces)."""
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    for line in lines[1:]:
        assert len(line[:starts[-1]].split()) == len(starts) - 1, (lines[0], line)
        assert all(line[s - 1] == " " and line[s] != " " for s in starts[1:] if s < len(line)), (lines[0], line)


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
        rc, out = await lingua("--target", t, "watch", job_id)
        lines = out.splitlines()
        assert rc == 0 and [line.split()[1] for line in lines[1:]] == states
        assert_aligned(lines)  # rows of differing widths ("-" and "gpu-1" nodes, states, events)
        rc, out = await lingua("--target", t, "nodes")
        header, row = out.splitlines()
        assert header.split()[:3] == ["NODE", "POOLS", "LOAD"]
        assert row.split()[:3] == ["gpu-1", "zh:en", "0/4"] and "serving" in row.split()


async def test_quiet_submit_cancel_and_target_from_environment(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINGUA_TARGET", target(app))
    rc, out = await lingua(*SUBMIT, "-q")
    job_id = out.strip()
    assert rc == 0 and job_id.startswith("zh:en:{")
    rc, out = await lingua("cancel", job_id, "--reason", "user hung up")
    assert rc == 0 and re.search(r"^state\s+cancelled$", out, re.M) and "user hung up" in out
    rc, out = await lingua("watch", job_id)
    lines = out.splitlines()
    assert lines[0].split() == ["AT", "STATE", "EVENT", "ATTEMPT", "NODE", "ERROR"]
    assert [line.split()[1] for line in lines[1:]] == ["queued", "cancelled"]
    assert_aligned(lines)
    rc, out = await lingua("--json", "nodes")
    assert (rc, json.loads(out)) == (0, [])


async def test_errors_print_the_status_and_exit_1(app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = target(app)
    missing = "zh:en:{0}01JE0000000000000000000000"
    for command in (["get", missing], ["watch", missing], ["session", "acme", "cli", "--from-index", "-1"]):
        rc, out = await lingua("--target", t, *command)
        assert (rc, out) == (1, "")  # no table header before the error
        assert re.search(r"^lingua: (NOT_FOUND|INVALID_ARGUMENT): ", capsys.readouterr().err)
    bad = [a if a != "zh" else "ZH" for a in SUBMIT]
    rc, _ = await lingua("--target", t, *bad)
    err = capsys.readouterr().err
    assert rc == 1 and re.search(r"INVALID_ARGUMENT: .*src_lang", err)
    assert err.count("src_lang") == 1, err  # the field violation once, not again below the status
    rc, _ = await lingua("--target", t, "--json", *bad)
    error = json.loads(capsys.readouterr().err)["error"]
    assert rc == 1 and (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert [v["field"] for v in error["field_violations"]] == ["jobs[0].src_lang"]


async def test_wait_timeout_names_the_job_and_its_state(app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = target(app)
    rc, out = await lingua("--target", t, *SUBMIT, "--index", "9")
    header, row = out.splitlines()
    assert header.split() == ["JOB", "CREATED", "STATE"] and row.split()[1:] == ["yes", "queued"]
    job_id = row.split()[0]
    rc, out = await lingua("--target", t, *SUBMIT, "--index", "9", "--wait", "0.3")  # no node: it never finishes
    err = capsys.readouterr().err
    assert rc == 4 and f"job {job_id} did not finish within 0.3 s; it is queued" in err
    assert "Deadline Exceeded" not in err and "DEADLINE_EXCEEDED" not in err
    assert re.search(rf"^job\s+{re.escape(job_id)}$", out, re.M) and re.search(r"^state\s+queued$", out, re.M)
    rc, out = await lingua("--target", t, "--json", *SUBMIT, "--index", "9", "--wait", "0.3")
    assert (rc, json.loads(out)["job_id"], json.loads(out)["state"]) == (4, job_id, "queued")
    rc, out = await lingua("--target", t, *SUBMIT, "--index", "9", "--wait", "0.3", "-q")
    assert (rc, out) == (4, job_id + "\n")


async def test_client_wait_timeout_names_the_job_and_its_last_state(app: Any) -> None:
    """The SDK's own wait (the CLI's rests on it): DeadlineExceeded in the caller's terms."""
    async with AsyncClient(target(app)) as client:
        job_id = (await client.submit(**SPEC)).job_id
        with pytest.raises(DeadlineExceeded) as late:
            await client.wait(job_id, timeout=0.3)
    assert str(late.value) == (f"DEADLINE_EXCEEDED: job {job_id} did not finish within 0.3 s; its last known state "
                               "is queued (the job stays: wait again, or cancel it)")
    with Client(target(app)) as sync_client:
        with pytest.raises(DeadlineExceeded) as late:
            await asyncio.to_thread(sync_client.wait, job_id, timeout=0.3)
    assert late.value.message == str(late.value).removeprefix("DEADLINE_EXCEEDED: ")
    assert late.value.message.startswith(f"job {job_id} did not finish within 0.3 s; its last known state is queued")


async def test_wait_exit_status_3_when_the_job_did_not_succeed(app: Any) -> None:
    async def refuse(a: Any) -> None:
        from lingua_sdk import FatalError
        raise FatalError("no", code="NOPE")

    async with running(make_node(target(app), refuse)):
        rc, out = await lingua("--target", target(app), *SUBMIT, "--wait")
    assert rc == 3 and re.search(r"^state\s+failed$", out, re.M) and "NOPE" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "required" in usage_error(capsys, "submit", "--tenant", "acme")
    missing = tmp_path / "nonexistent.opus"
    err = usage_error(capsys, *SUBMIT[:-2], "--payload-file", str(missing))
    assert f"cannot read '{missing}': No such file or directory" in err
    assert "must be 0 or more seconds" in usage_error(capsys, *SUBMIT, "--wait", "-1")
    assert "not a number of seconds" in usage_error(capsys, *SUBMIT, "--wait", "soon")


def test_help_explains_every_submit_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["submit", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert exited.value.code == 0 and "0: no limit" in text and "0 (lowest, default) to 9 (highest)" in text
    for option in ("--tenant", "--session", "--from", "--to", "--index", "--payload-ref", "--payload-file", "--priority",
                   "--max-attempts", "--idempotency-key", "--trace-id", "--wait"):
        described = re.search(rf" {option}(?: \S+)? (\S+ \S+)", text.split("options:")[1])
        assert described and not described.group(1).startswith("--"), option


async def test_submit_a_payload_file(app: Any, tmp_path: Path) -> None:
    audio = tmp_path / "0.opus"
    audio.write_bytes(b"OggS\x00audio")
    rc, out = await lingua("--target", target(app), *SUBMIT[:-2], "--payload-file", str(audio), "-q")
    async with AsyncClient(target(app)) as client:
        job = await client.get(out.strip(), include_payload=True)
    assert rc == 0 and job.spec.payload == b"OggS\x00audio"


async def test_session_prints_a_sessions_jobs_in_utterance_order(app: Any) -> None:
    t = target(app)
    async with running(make_node(t, translate)):
        for index in (0, 1, 2):
            rc, _ = await lingua("--target", t, *SUBMIT, "--index", str(index), "--wait", "20")
            assert rc == 0
        rc, out = await lingua("--target", t, *SUBMIT, "--to", "pt-br", "--index", "1", "-q")  # no node serves it
        rc, _ = await lingua("--target", t, "cancel", out.strip())
        assert rc == 0  # a wider language, a longer job id and another state than the others
        rc, out = await lingua("--target", t, "session", "acme", "cli", "--count", "4")
        lines = out.splitlines()
        assert rc == 0 and lines[0].split()[:4] == ["INDEX", "LANG", "STATE", "JOB"]
        assert [line.split()[:3] for line in lines[1:]] == [
            ["0", "en", "succeeded"], ["1", "en", "succeeded"], ["1", "pt-br", "cancelled"], ["2", "en", "succeeded"]]
        assert lines[2].endswith("hello 1")
        assert_aligned(lines)
        rc, out = await lingua("--target", t, "--json", "session", "acme", "cli", "--from-index", "2", "--count", "1")
        job = json.loads(out)
        assert (rc, job["spec"]["utterance_index"], job["resume_index"]) == (0, 2, 3)
        rc, out = await lingua("--target", t, "--json", "session", "acme", "cli", "--from", "2", "--count", "1")
        assert (rc, json.loads(out)["job_id"]) == (0, job["job_id"])  # the old spelling still works
        rc, out = await lingua("--target", t, "session", "acme", "cli", "--from-index", "3", "--timeout", "0.3")
        assert (rc, out.splitlines()[1:]) == (0, [])  # nothing finished from 3 on: ends at the timeout


def test_tls_files_that_cannot_serve_are_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    """An unreadable --ca, or a client certificate without its key (gRPC's C core would abort the
    process), stop with exit status 2 and a message, before any connection."""
    assert "cannot read '/nonexistent.crt'" in usage_error(capsys, "--ca", "/nonexistent.crt", "get", "x")
    cert = tmp_path / "client.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    assert "together" in usage_error(capsys, "--cert", str(cert), "get", "x")
    assert "together" in usage_error(capsys, "--key", str(cert), "get", "x")


async def test_clients_and_nodes_read_lingua_token_when_given_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from lingua_sdk._channel import Connection

    monkeypatch.setenv("LINGUA_TOKEN", "from-env")
    assert Connection.of("127.0.0.1:1", None, False).metadata == (("authorization", "Bearer from-env"),)
    assert Connection.of("127.0.0.1:1", "given", False).metadata == (("authorization", "Bearer given"),)
    monkeypatch.setenv("LINGUA_TOKEN", "")
    assert Connection.of("127.0.0.1:1", None, False).metadata == ()
