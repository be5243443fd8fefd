"""The README's quick starts, run as written (only the address is the test scheduler's)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lingua_sdk import AsyncClient, JobState
from test_sdk_python import SPEC, make_node, running, target, translate

pytestmark = pytest.mark.single_redis
README_TARGET = "127.0.0.1:50051"


def snippet(repo_root: Path, name: str) -> str:
    text = (repo_root / "README.md").read_text()
    found = re.search(rf"<!-- quickstart: {name} -->\n```\w+\n(.*?)\n```", text, re.S)
    assert found, f"README has no quick start {name!r}"
    assert README_TARGET in found.group(1)
    return found.group(1)


async def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_cli(code: str, address: str) -> str:
    """The CLI quick start in bash -euo pipefail, with this venv's `lingua` on PATH; its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rc, out, err = await run("bash", "-euo", "pipefail", "-c", code.replace(README_TARGET, address), env=env)
    assert rc == 0, err
    job_id = re.search(r"^job\s+(\S+)$", out, re.M)
    assert job_id, out
    assert re.search(r"^state\s+cancelled$", out, re.M)
    assert re.search(r"\scancelled\s+cancel\s", out), out  # the watch line of the cancel
    assert f'"job_id": "{job_id.group(1)}"' in out.splitlines()[-1] and '"state": "cancelled"' in out.splitlines()[-1]
    return out


@contextlib.asynccontextmanager
async def node_quickstart(repo_root: Path, address: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The node quick start as a process; stopped with SIGTERM at the end (it must drain and exit 0)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c",
                                                snippet(repo_root, "python-node").replace(README_TARGET, address),
                                                stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_python_client_quickstart(app: Any, repo_root: Path) -> None:
    code = snippet(repo_root, "python-client")
    assert len(code.splitlines()) <= 5
    async with running(make_node(target(app), translate)):
        rc, out, err = await run(sys.executable, "-c", code.replace(README_TARGET, target(app)))
    assert rc == 0, err
    assert out == "succeeded hello 0\n"


async def test_python_node_quickstart_serves_and_drains_on_sigterm(app: Any, repo_root: Path) -> None:
    """Needs the scheduler to confirm stored results (SchedulerMessage.confirmed) to drain promptly."""
    assert len(snippet(repo_root, "python-node").splitlines()) <= 15
    async with node_quickstart(repo_root, target(app)), AsyncClient(target(app)) as client:
        job = await client.wait((await client.submit(**SPEC)).job_id, timeout=20)
        assert (job.state, job.node_id) == (JobState.SUCCEEDED, "gpu-1")
        assert job.result is not None and job.result.text_translated == "[en] utterance 0"
        bad = await client.wait((await client.submit(**{**SPEC, "payload_ref": "https://x/1.opus",
                                                        "utterance_index": 1})).job_id, timeout=20)
        assert bad.last_error is not None and (bad.state, bad.last_error.code) == (JobState.FAILED, "BAD_INPUT")


async def test_cli_quickstart(app: Any, repo_root: Path) -> None:
    out = await run_cli(snippet(repo_root, "cli"), target(app))
    assert "no nodes registered" in out


async def test_quickstarts_one_after_another_on_one_scheduler(app: Any, repo_root: Path) -> None:
    """A reader runs the node quick start, leaves it running, then the client and the CLI ones: each
    still works (the CLI's job is a pair the node does not serve, so it can still be cancelled)."""
    async with node_quickstart(repo_root, target(app)):
        rc, out, err = await run(sys.executable, "-c", snippet(repo_root, "python-client").replace(README_TARGET,
                                                                                                   target(app)))
        assert (rc, out) == (0, "succeeded [en] utterance 0\n"), err
        out = await run_cli(snippet(repo_root, "cli"), target(app))
        assert re.search(r"^gpu-1\s+zh:en\s", out, re.M), out  # `lingua nodes` lists the running node
