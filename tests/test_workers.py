"""`lingua-scheduler --workers N` as an operator runs it: real processes on one port, a real Redis (and
Redis Cluster), real gRPC connections; the workers found as the supervisor's child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from helpers import spec, until, watch_until
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc
from simnode import SimNode

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ (\S+): ")
# Enough connections that both workers get some: the kernel spreads them by a hash of their addresses,
# so all of them land on one of two workers with a chance of 2 / 2^24.
CONNECTIONS = 24


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    port: int = 0
    stdout: list[str] = field(default_factory=list)  # the lines before serving, then none read
    stderr: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> dict[str, int]:
        """Live worker processes: instance id -> pid (from the supervisor's children's command lines)."""
        out = {}
        for pid in children(self.proc.pid):
            argv = cmdline(pid)
            if "--instance-id" in argv and not zombie(pid):
                out[argv[-argv[::-1].index("--instance-id")]] = pid  # the value of the last --instance-id
        return out

    async def logged(self, pattern: str, timeout: float = 30.0) -> str:
        """The first stderr line matching `pattern` (waits for it)."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.stderr if re.search(pattern, line)]
            return bool(found)

        await until(seen, timeout, f"a log line matching {pattern!r}")
        return found[0]


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except FileNotFoundError:
        return []


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def gone(pid: int) -> bool:
    """Exited (a zombie left to a parent that does not reap counts as exited)."""
    return not Path(f"/proc/{pid}").exists() or zombie(pid)


def redis_flags(settings: Settings) -> list[str]:
    return ["--redis-cluster", settings.redis_cluster] if settings.redis_cluster else ["--redis-url", settings.redis_url]


@contextlib.asynccontextmanager
async def scheduler(*flags: str, http_lines: int = 0, stop: bool = True) -> AsyncIterator[Running]:
    """The server process with `flags`, once it prints its listening line (and `http_lines` more); on
    exit SIGTERM (when `stop`), then it must exit 0 leaving no process of its own behind."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--shutdown-grace-s", "0.5",
        *flags, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    run = Running(proc)

    async def drain(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            run.stderr.append(line.decode(errors="replace").rstrip("\n"))

    run._drain = asyncio.create_task(drain(proc.stderr))
    descendants: set[int] = set()
    try:
        for _ in range(1 + http_lines):
            run.stdout.append((await asyncio.wait_for(proc.stdout.readline(), 60)).decode().rstrip("\n"))
        first = re.fullmatch(r"lingua-scheduler listening on 127\.0\.0\.1:(\d+)", run.stdout[0])
        assert first, (run.stdout, run.stderr[-20:])
        run.port = int(first[1])
        descendants = {p for w in children(proc.pid) for p in [w, *children(w)]}
        yield run
        if stop:
            descendants |= {p for w in children(proc.pid) for p in [w, *children(w)]}  # restarted ones too
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 60) == 0, run.stderr[-20:]
            await until(lambda: all(gone(p) for p in descendants), 10, "every child process gone")
    finally:
        if proc.returncode is None:  # a failed test: stop it all the same (SIGKILL would leave the embedded Redis)
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await run._drain


def channels(target: str, count: int) -> list[grpc.aio.Channel]:
    """Channels with a connection each (by default gRPC shares one among equal channels)."""
    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


async def nodes_on(chans: list[grpc.aio.Channel], prefix: str) -> list[SimNode]:
    return [await SimNode(ch, f"{prefix}-{i}", [("zh", "en")]).start() for i, ch in enumerate(chans)]


def instance_of(node: SimNode) -> str:
    assert node.registered is not None
    return node.registered.instance_id


async def test_two_workers_on_one_port_both_serve(settings: Settings, redis: Any) -> None:
    flags = ["--workers", "2", "--instance-id", "wk", "--partitions", str(settings.partitions), *redis_flags(settings)]
    async with scheduler(*flags, "--http-listen", "127.0.0.1:0", http_lines=2) as s:
        assert set(s.workers()) == {"wk-1", "wk-2"}
        # Each worker's operations port on a line of its own, and its own /metrics.
        lines = [re.fullmatch(r"lingua-scheduler http on 127\.0\.0\.1:(\d+) \(worker (\d), instance (\S+)\)", line)
                 for line in s.stdout[1:]]
        assert all(lines), s.stdout
        assert [(m[2], m[3]) for m in lines if m] == [("1", "wk-1"), ("2", "wk-2")]
        async with aiohttp.ClientSession() as http:
            for m in lines:
                assert m is not None
                async with http.get(f"http://127.0.0.1:{m[1]}/metrics") as reply:
                    assert reply.status == 200 and "lingua_" in await reply.text()
        # Node streams over many connections land on both workers, and ListNodes (through either) shows them.
        chans = channels(s.target, CONNECTIONS)
        try:
            nodes = await nodes_on(chans, "n")
            on = {instance_of(n): ch for n, ch in zip(nodes, chans, strict=True)}
            assert set(on) == {"wk-1", "wk-2"}
            for ch in on.values():
                listed = (await pb_grpc.SchedulerStub(ch).ListNodes(pb.ListNodesRequest())).nodes
                assert {n.node_id: n.instance_id for n in listed} == {n.node_id: instance_of(n) for n in nodes}
            # Submit through either worker: the job runs on a node (of either) and its result is read back.
            for i, (instance, ch) in enumerate(sorted(on.items())):
                stub = pb_grpc.SchedulerStub(ch)
                job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=i)]))).results[0].job_id
                done = (await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED))[-1]
                assert done.node_id.startswith("n-"), (instance, done)
            for n in nodes:
                await n.stop()
        finally:
            for ch in chans:
                await ch.close()


async def test_signals_reach_every_worker_and_sigterm_drains_them(settings: Settings, redis: Any) -> None:
    """SIGHUP is passed on; SIGTERM drains every worker (their node streams are ended by the drain, not
    cut), the supervisor exits 0 once all have, leaving no process (the scheduler() helper checks)."""
    flags = ["--workers", "2", "--instance-id", "wk", "--partitions", str(settings.partitions), *redis_flags(settings)]
    async with scheduler(*flags, stop=False) as s:
        chans = channels(s.target, CONNECTIONS)
        try:
            nodes = await nodes_on(chans, "d")
            assert {instance_of(n) for n in nodes} == {"wk-1", "wk-2"}
            s.proc.send_signal(signal.SIGHUP)
            for instance in ("wk-1", "wk-2"):
                await s.logged(rf"SIGHUP: no TLS certificates.*\[instance_id={instance}\]")
            pids = list(s.workers().values())
            s.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(s.proc.wait(), 60) == 0, s.stderr[-20:]
            assert all(gone(p) for p in pids)
            for n in nodes:  # every stream was closed by its worker (the drain), none is left open
                await asyncio.wait_for(n.closed.wait(), 10)
        finally:
            for ch in chans:
                await ch.close()
    for instance in ("wk-1", "wk-2"):
        assert any(re.search(rf"shutting down: draining.*\[instance_id={instance}\]", line) for line in s.stderr)
        assert any(re.search(rf"worker \d \(pid \d+, instance {instance}\) stopped", line) for line in s.stderr)
    # Every log line names its worker, except the supervisor's own.
    for line in s.stderr:
        m = LOG_LINE.match(line)
        if m and m[1] != "lingua_scheduler.workers":
            assert re.search(r"\[instance_id=wk-[12]( |\])", line), line


async def test_a_killed_worker_is_restarted_and_serves_again(settings: Settings, redis: Any) -> None:
    flags = ["--workers", "2", "--instance-id", "wk", "--partitions", str(settings.partitions), *redis_flags(settings)]
    async with scheduler(*flags) as s:
        first = s.workers()
        os.kill(first["wk-2"], signal.SIGKILL)
        await s.logged(rf"worker 2 \(pid {first['wk-2']}, instance wk-2\) was killed by SIGKILL; restarting it in 1 s")
        await s.logged(rf"worker 2 \(pid (?!{first['wk-2']}\b)\d+, instance wk-2\) listening on")
        await until(lambda: s.workers().get("wk-2", first["wk-2"]) != first["wk-2"], 10, "the new worker 2 seen")
        assert s.workers()["wk-1"] == first["wk-1"], "the other worker was left alone"
        # A node stream on the new worker 2 gets a job submitted through it.
        found: SimNode | None = None
        opened: list[grpc.aio.Channel] = []
        try:
            for i in range(CONNECTIONS * 2):
                ch = channels(s.target, 1)[0]
                opened.append(ch)
                node = await SimNode(ch, f"r-{i}", [("zh", "en")]).start()
                if instance_of(node) == "wk-2":
                    found = node
                    break
                await node.stop()
            assert found is not None, "no connection reached the restarted worker"
            stub = pb_grpc.SchedulerStub(opened[-1])
            job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
            done = (await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED))[-1]
            assert done.node_id == found.node_id
            await found.stop()
        finally:
            for ch in opened:
                await ch.close()


async def test_a_worker_that_cannot_start_stops_the_others(settings: Settings, redis: Any) -> None:
    """A worker refused at start (here: another --partitions than Redis holds) is not retried: the
    supervisor stops the other worker and exits with that worker's status, having printed nothing."""
    flags = ["--workers", "2", "--partitions", str(settings.partitions), *redis_flags(settings)]
    async with scheduler(*flags):  # stores the partition count
        pass
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", *flags,
        "--partitions", str(settings.partitions + 1), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1 and b"listening on" not in out, (out, err[-2000:])
    assert f"start every instance with --partitions {settings.partitions}".encode() in err
    assert re.search(rb"worker \d \(pid \d+, instance \S+\) exited with status 1 before it listened", err), err[-2000:]
    assert b"Traceback" not in err


@pytest.mark.single_redis
async def test_one_worker_is_the_single_process_of_before(settings: Settings, redis: Any) -> None:
    flags = ["--workers", "1", "--instance-id", "solo", *redis_flags(settings)]
    async with scheduler(*flags, http_lines=1) as s:
        assert s.workers() == {} and children(s.proc.pid) == [], "no supervisor, no worker processes"
        assert re.fullmatch(r"lingua-scheduler http on 127\.0\.0\.1:\d+", s.stdout[1]), s.stdout
        async with grpc.aio.insecure_channel(s.target) as ch:
            node = await SimNode(ch, "solo-node", [("zh", "en")]).start()
            assert instance_of(node) == "solo"
            await node.stop()
    assert not any("instance_id=" in line for line in s.stderr)


@pytest.mark.single_redis
async def test_the_embedded_redis_is_started_once_for_every_worker(tmp_path: Path) -> None:
    async with scheduler("--workers", "2", "--data-dir", str(tmp_path / "data")) as s:
        kids = {pid: cmdline(pid) for pid in children(s.proc.pid)}
        servers = [pid for pid, argv in kids.items() if "redis-server" in argv[0]]  # (it retitles itself)
        assert len(servers) == 1 and len(s.workers()) == 2, kids
        socket_url = f"unix://{tmp_path / 'data' / 'redis.sock'}"
        for pid in s.workers().values():
            assert kids[pid][kids[pid].index("--redis-url") + 1] == socket_url
        async with grpc.aio.insecure_channel(s.target) as ch:
            stub = pb_grpc.SchedulerStub(ch)
            job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
            assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_QUEUED
    assert gone(servers[0])


@pytest.mark.single_redis
async def test_workers_stop_when_the_supervisor_is_killed(settings: Settings, redis: Any) -> None:
    """SIGKILL leaves the supervisor no time to stop anyone: each worker sees its stdin pipe close and
    drains by itself, so none keeps serving unsupervised."""
    async with scheduler("--workers", "2", "--instance-id", "wk", *redis_flags(settings), stop=False) as s:
        pids = list(s.workers().values())
        s.proc.kill()
        await s.proc.wait()
        await until(lambda: all(gone(p) for p in pids), 30, "every worker gone")
        for instance in ("wk-1", "wk-2"):
            await s.logged(rf"the supervisor \(--workers\) is gone: stopping \[instance_id={instance}\]")


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "0"], "workers must be at least 1"),
    (["--workers", "2", "--listen", "unix:/tmp/lingua.sock"], "needs a TCP --listen address"),
    (["--workers", "3", "--http-listen", "127.0.0.1:65534"], "past 65535"),
])
def test_worker_counts_that_cannot_work_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(flags, env={})
