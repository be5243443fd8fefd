"""Auth end to end: tokens minted by `lingua-scheduler token`, used by the Python SDK (Client, Node),
the `lingua` command line (LINGUA_TOKEN), and key rotation by SIGHUP on a scheduler process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AppFactory
from lingua_scheduler.server.settings import Settings
from lingua_sdk import AsyncClient, errors
from test_cli import SUBMIT, lingua
from test_sdk_python import make_node, running, target, translate

pytestmark = pytest.mark.single_redis


def mint(*args: str) -> str:
    """`lingua-scheduler token ARGS` (the console script's code, as a process)."""
    done = subprocess.run([sys.executable, "-m", "lingua_scheduler.server", "token", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "k1.secret").write_text(os.urandom(32).hex() + "\n")
    return folder


async def test_token_command_sdk_and_cli_with_auth_on(make_app: AppFactory, keys: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    app = await make_app(auth_jwt_key=(str(keys),))
    key = str(keys / "k1.secret")
    client_tok = mint("--role", "client", "--tenant", "acme", "--key", key, "--ttl", "15m")
    node_tok = mint("--role", "node", "--node-id", "gpu-*", "--key", key)
    t = target(app)
    async with AsyncClient(t, token=client_tok) as client, running(make_node(t, translate, token=node_tok)):
        job = await client.submit(tenant_id="acme", session_id="s", utterance_index=1, src_lang="zh", tgt_lang="en",
                                  payload=b"audio")
        done = await client.wait(job.job_id, timeout=20)
        assert done.result is not None and done.result.text_translated == "hello 1"
        async with AsyncClient(t) as anonymous, AsyncClient(t, token=mint(
                "--role", "client", "--tenant", "other", "--key", key)) as other:
            with pytest.raises(errors.Unauthenticated):
                await anonymous.get(job.job_id)
            with pytest.raises(errors.NotFound):
                await other.get(job.job_id)
            with pytest.raises(errors.PermissionDenied):
                await client.list_nodes()
        monkeypatch.setenv("LINGUA_TOKEN", client_tok)
        rc, out = await lingua("--target", t, "get", job.job_id)
        assert rc == 0 and "succeeded" in out
        monkeypatch.delenv("LINGUA_TOKEN")
        rc, _ = await lingua("--target", t, *SUBMIT)
        assert rc != 0


def test_token_command_refuses_what_it_cannot_sign(keys: Path, tmp_path: Path) -> None:
    (tmp_path / "short").write_text("short")
    for args in (["--role", "client", "--key", str(keys / "k1.secret")],  # no tenant
                 ["--role", "admin", "--key", str(tmp_path / "short")],
                 ["--role", "admin", "--key", str(keys / "k1.secret"), "--ttl", "soon"]):
        done = subprocess.run([sys.executable, "-m", "lingua_scheduler.server", "token", *args],
                              capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("lingua-scheduler token: ") and not done.stdout


@contextlib.asynccontextmanager
async def scheduler(redis_url: str, *flags: str) -> AsyncIterator[tuple[Any, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--redis-url", redis_url,
        "--uvloop", "0", *flags, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert "listening on" in line, line
        yield proc, line.split()[-1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def log_line(proc: Any, text: str) -> str:
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert line, f"the scheduler's log ended before {text!r}"
        if text in line:
            return line


async def test_sighup_rotates_keys_on_a_running_scheduler(redis: Any, settings: Settings, keys: Path) -> None:
    old = mint("--role", "admin", "--key", str(keys / "k1.secret"))  # `redis`: flushed, so any partition count
    async with scheduler(settings.redis_url, "--auth-jwt-key", str(keys)) as (proc, address):
        assert "k1 (HS256)" in await log_line(proc, "authentication on")
        async with AsyncClient(address, token=old) as c_old:
            await c_old.list_nodes()
            (keys / "k2.secret").write_text(os.urandom(32).hex())
            new = mint("--role", "admin", "--key", str(keys / "k2.secret"))
            async with AsyncClient(address, token=new) as c_new:
                proc.send_signal(signal.SIGHUP)
                await log_line(proc, "auth keys reloaded")
                await c_old.list_nodes()  # both keys accepted
                await c_new.list_nodes()
                (keys / "k1.secret").unlink()
                proc.send_signal(signal.SIGHUP)
                await log_line(proc, "auth keys reloaded")
                with pytest.raises(errors.Unauthenticated):
                    await c_old.list_nodes()
                await c_new.list_nodes()


async def test_an_unusable_key_file_stops_the_start_with_its_name(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "weak.secret").write_text("password")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--redis-url",
                         settings.redis_url, "--auth-jwt-key", str(tmp_path / "weak.secret")],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "weak.secret" in done.stderr and "32 bytes" in done.stderr
