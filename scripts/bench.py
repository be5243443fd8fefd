#!/usr/bin/env python3
"""Benchmark: the full job lifecycle through one scheduler instance, beside BullMQ, Celery, arq and RQ.

Run it as `scripts/bench` (it makes the virtualenvs). It starts its own Redis (one server for every
system, appendonly off, noeviction) and scheduler process, then for several client x node
concurrencies: clients Submit (batches), simulated nodes (zero processing time) receive over
NodeSession, ack and complete (the ack rides with the result), clients learn the result (WatchJob per
job, or with --session-reader also WatchSession: one stream per session).
Clients are the SDK's AsyncClient, nodes the SDK's Node (scripts/simulated.py). Each combination runs
again, in the same run, with the raw-stub node of scripts/simnode.py as the baseline: the ratio SDK
Node / simnode of lifecycles/s and of scheduler CPU per lifecycle is printed and written (--rounds N
repeats each pair; the ranges are reported). With --auth each combination also runs, in the same
rounds, with bearer-token authentication on and with authentication and TLS on (an HS256 key and a
server certificate made for the run); the ratios to the row without are printed and written. With
--metrics each combination also runs, in the same rounds, with the operations HTTP port off
(`--http-listen ''`: no metrics counted) beside the usual rows (port on: every counter, histogram and
gRPC metric counted); the ratio on / off is printed and written. Then the
same at half the best throughput, for dispatch latency (--half-rate-batch N: N jobs per Submit there;
--load-fraction F with --half-rate-only: at F of the best rate instead; --nodes-apart: every row's nodes
in a process of their own, scripts/bench_nodes.py). Then Redis memory per queued and per
finished job. Then BullMQ, Celery, arq and RQ on the same Redis, each at its defaults and tuned
(scripts/bench_others.py; --compare-rounds N repeats them), with jobs/s and per job Redis CPU, the
system's own CPU and Redis commands, beside ours and as ratios us / peer. Writes
docs/benchmarks.md and docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# gRPC core logs every GOAWAY of a TLS channel when its scheduler stops; keep the rows readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from bench_others import ensure_arq  # noqa: E402
from certs import CA  # noqa: E402
from lingua_scheduler.server.dispatch import new_lease_token  # noqa: E402
from lingua_scheduler.server.embedded import EmbeddedRedis  # noqa: E402
from lingua_scheduler.server.settings import Settings  # noqa: E402
from lingua_scheduler.server.store import Lease, Store  # noqa: E402
from lingua_scheduler.server.tokens import mint  # noqa: E402
from lingua_sdk import TLS, Assignment, AsyncClient, pb  # noqa: E402
from redis_cluster import free_ports  # noqa: E402
from simnode import Received, SimNode, open_channel  # noqa: E402
from simulated import SimulatedNode  # noqa: E402

NODES = ("sdk", "simnode")  # the SDK's Node; the raw-stub baseline
SECURITY = ("none", "auth", "auth+TLS")  # --auth: each combination in these three modes
METRICS_OFF = "metrics off"  # --metrics: each combination also with the HTTP port (and so metrics) off

TICK = os.sysconf("SC_CLK_TCK")
SESSIONS_PER_CLIENT = 8  # --session-reader: live sessions per client, one WatchSession stream each
# --workers N: the scheduler runs N worker processes on its port (server/workers.py), and every client
# and node gets a connection of its own, as separate processes would (by default gRPC gives equal
# channels of one process one connection, which the kernel hands to one worker).
WORKERS: list[str] = []
OWN_CONNECTION: list[tuple[str, Any]] = []
# --nodes-apart: the nodes run in a process of their own (scripts/bench_nodes.py), not in this one beside
# the clients, so neither side's event loop delays the other's (a fleet's nodes are machines of their own).
NODES_APART: list[bool] = [False]
GENERATOR = {False: "the Submit call, its event loop shared by every client and node",
             True: "the Submit call, the clients' event loop; the nodes' event loop, in a process of their own"}


def commands_line(run: Run) -> str:
    """Redis commands per lifecycle, most frequent first, and the reads Redis made from its clients'
    sockets (INFO stats total_reads_processed: about one per round trip of a client) (--commands)."""
    top = sorted(run.by_command.items(), key=lambda kv: -kv[1])
    return (f"  socket reads per lifecycle {run.redis_reads:.2f}; commands per lifecycle (and their time, us): "
            + ", ".join(f"{k} {v:.2f} ({run.command_us.get(k, 0):.1f})" for k, v in top))


def scrape_dispatch(http: str) -> dict[float, float]:
    """lingua_dispatch_latency_seconds_bucket of the scheduler at `http`, summed over pools: le -> count."""
    if not http:
        return {}
    import urllib.request
    out: dict[float, float] = {}
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("lingua_dispatch_latency_seconds_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def histogram_pct(buckets: dict[float, float], p: float) -> float:
    """The p-th percentile (ms) of a cumulative histogram, linear within a bucket (as Prometheus'
    histogram_quantile does)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return float("nan")
    rank, low, below = total * p / 100, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return low * 1000
            return (low + (bound - low) * (rank - below) / max(buckets[bound] - below, 1e-9)) * 1000
        low, below = bound, buckets[bound]
    return low * 1000


def within(buckets: dict[float, float], bound: float) -> float:
    """Share of a cumulative histogram's observations at most `bound` (a bucket bound, s)."""
    total = buckets.get(float("inf"), 0.0)
    return buckets.get(bound, 0.0) / total if total else float("nan")


def server_dispatch(run: Run) -> str:
    """The scheduler's own dispatch latency over a row (its histogram), in words."""
    h = run.server_dispatch
    if not h:
        return "the scheduler's histogram: not read (operations port off)"
    return (f"the scheduler's histogram (Submit's commit -> claim, Redis clock): p50 {histogram_pct(h, 50):.2f} "
            f"p99 {histogram_pct(h, 99):.2f} ms, {within(h, 0.005):.1%} within 5 ms")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its live children (the workers of --workers N)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]
    return (int(fields[11]) + int(fields[12])) / TICK + sum(cpu_seconds(k) for k in kids)


async def redis_counters(client: Any) -> dict[str, float]:
    stats = await client.info("commandstats")
    cpu = await client.info("cpu")
    out = {k.removeprefix("cmdstat_"): float(v["calls"]) for k, v in stats.items()}
    out.update({"_us_" + k.removeprefix("cmdstat_"): float(v["usec"]) for k, v in stats.items()})
    out["_cpu"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    out["_reads"] = float((await client.info("stats"))["total_reads_processed"])
    return out


def session_specs(sessions: list[str], first: int, size: int) -> list[pb.JobSpec]:
    """A batch of `size` utterances from `first` on, spread over `sessions` in turn."""
    specs = []
    for i in range(size):
        session = sessions[(first + i) % len(sessions)]
        specs.append(pb.JobSpec(tenant_id="bench", session_id=session, utterance_index=first + i, src_lang="zh",
                                tgt_lang="en", payload_ref=f"session://{session}/{i}"))
    return specs


async def open_loop(batches: int, every_s: float, batch: Callable[[int], Awaitable[None]]) -> None:
    """batch(0), batch(1), ... started every `every_s` seconds whatever the earlier ones' progress; returns
    once all are done."""
    t0 = time.perf_counter()
    tasks = []
    for i in range(batches):
        await asyncio.sleep(max(0.0, t0 + i * every_s - time.perf_counter()))
        tasks.append(asyncio.create_task(batch(i)))
    await asyncio.gather(*tasks)


@dataclass
class Run:
    label: str
    clients: int
    nodes: int
    batch: int
    reader: str = "job"  # how clients learn results: "job" (WatchJob per job) or "session" (WatchSession)
    node: str = "sdk"  # one of NODES
    jobs: int = 0
    seconds: float = 0.0
    submit_ms: list[float] = field(default_factory=list)
    dispatch_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    commands: float = 0.0
    by_command: dict[str, float] = field(default_factory=dict)  # Redis command -> calls per lifecycle
    command_us: dict[str, float] = field(default_factory=dict)  # Redis command -> its time, us per lifecycle
    lua: float = 0.0
    redis_cpu_us: float = 0.0
    redis_reads: float = 0.0  # reads Redis made from its clients' sockets, per lifecycle (--commands)
    sched_cpu_per_1000: float = 0.0
    bench_cpu_per_1000: float = 0.0  # this process: the clients and nodes (their side of TLS, say)
    # The scheduler's own lingua_dispatch_latency_seconds over the row (Submit's commit -> the claim, by
    # Redis' clock): bucket bound (s) -> count, cumulative. The load generator's delays are not in it.
    server_dispatch: dict[float, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


class Lifecycle:
    """Clients and simulated nodes against one scheduler process."""

    def __init__(self, address: str, pid: int, redis_url: str, token: str | None = None, tls: TLS | None = None,
                 http: str = "") -> None:
        self.address, self.pid, self.redis_url, self.token, self.tls = address, pid, redis_url, token, tls
        self.http = http
        self.sent: dict[tuple[str, int], float] = {}
        self.seq = 0

    def on_receive(self, run: Run, spec: pb.JobSpec, at: float) -> None:
        t0 = self.sent.pop((spec.session_id, spec.utterance_index), None)
        if t0 is not None:
            run.dispatch_ms.append((at - t0) * 1000)

    async def start_node(self, run: Run, i: int) -> SimulatedNode | SimNode:
        if run.node == "sdk":
            def sdk_receive(a: Assignment, at: float) -> None:
                self.on_receive(run, a.proto.spec, at)
            return await SimulatedNode(self.address, f"bench-{i}", [("zh", "en")], 64, on_receive=sdk_receive,
                                       token=self.token, tls=self.tls, options=OWN_CONNECTION).start()
        assert self.tls is None, "the raw-stub node speaks plaintext only"
        channel = open_channel(self.address, self.token)
        self.raw_channels.append(channel)

        def raw_receive(got: Received) -> None:
            self.on_receive(run, got.spec, got.at)
        return await SimNode(channel, f"bench-{i}", [("zh", "en")], 64, on_receive=raw_receive).start()

    async def one_batch(self, client: AsyncClient, run: Run, size: int) -> None:
        specs = []
        for _ in range(size):
            self.seq += 1
            specs.append(pb.JobSpec(tenant_id="bench", session_id=f"s{self.seq % 500}", utterance_index=self.seq,
                                    src_lang="zh", tgt_lang="en", payload_ref=f"session://s/{self.seq}"))
        t0 = time.perf_counter()
        for s in specs:
            self.sent[(s.session_id, s.utterance_index)] = t0
        results = await client.submit_many(specs)
        run.submit_ms.append((time.perf_counter() - t0) * 1000)

        async def watch(job_id: str) -> None:
            async for event in client.watch(job_id):
                if event.state.terminal:
                    run.e2e_ms.append((time.perf_counter() - t0) * 1000)
                    return

        await asyncio.gather(*[watch(r.job_id) for r in results])

    def submitted_at(self, specs: list[pb.JobSpec]) -> float:
        """Now, noted as the submit time of each of `specs` (the dispatch column: on_receive)."""
        now = time.perf_counter()
        for sp in specs:
            self.sent[(sp.session_id, sp.utterance_index)] = now
        return now

    async def session_client(self, client: AsyncClient, run: Run, index: int, batches: int) -> None:
        """A client that keeps SESSIONS_PER_CLIENT sessions and one WatchSession stream each; each batch
        is spread over its sessions (utterances in order), and it waits for every result of the batch."""
        delivered: asyncio.Queue[float] = asyncio.Queue()
        sessions = [f"c{index}s{k}" for k in range(SESSIONS_PER_CLIENT)]

        async def read(session: str) -> None:
            async for event in client.watch_session("bench", session):
                at = time.perf_counter()
                for _ in event.jobs:
                    delivered.put_nowait(at)

        readers = [asyncio.create_task(read(s)) for s in sessions]
        utterance = 0
        try:
            for _ in range(batches):
                specs = session_specs(sessions, utterance, run.batch)
                utterance += run.batch
                t0 = self.submitted_at(specs)
                await client.submit_many(specs)
                run.submit_ms.append((time.perf_counter() - t0) * 1000)
                for _ in specs:
                    run.e2e_ms.append((await delivered.get() - t0) * 1000)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def session_open_loop(self, stubs: list[AsyncClient], run: Run, jobs: int, rate: float) -> None:
        """Open loop over WatchSession: the batches of open_loop(), the clients in turn, each batch spread
        over its client's SESSIONS_PER_CLIENT sessions (one WatchSession stream each, open first)."""
        submitted: dict[tuple[str, int], float] = {}
        left = asyncio.Event()
        expected = jobs // run.batch * run.batch

        async def read(client: AsyncClient, session: str) -> None:
            async for event in client.watch_session("bench", session):
                at = time.perf_counter()
                for job in event.jobs:
                    sent = submitted.pop((job.spec.session_id, job.spec.utterance_index), None)
                    if sent is not None:
                        run.e2e_ms.append((at - sent) * 1000)
                if len(run.e2e_ms) >= expected:
                    left.set()

        sessions = [[f"o{c}s{k}" for k in range(SESSIONS_PER_CLIENT)] for c in range(len(stubs))]
        readers = [asyncio.create_task(read(stub, s)) for stub, names in zip(stubs, sessions, strict=True)
                   for s in names]
        utterance = [0] * len(stubs)

        async def batch(i: int) -> None:
            c = i % len(stubs)
            specs = session_specs(sessions[c], utterance[c], run.batch)
            utterance[c] += run.batch
            start = self.submitted_at(specs)
            submitted.update(((sp.session_id, sp.utterance_index), start) for sp in specs)
            await stubs[c].submit_many(specs)
            run.submit_ms.append((time.perf_counter() - start) * 1000)

        try:
            await asyncio.sleep(0.5)  # the streams open (nothing announces it: a stream yields results only)
            await open_loop(jobs // run.batch, run.batch / rate, batch)
            await asyncio.wait_for(left.wait(), 60)
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def start_apart(self, run: Run) -> asyncio.subprocess.Process:
        """run.nodes SDK Nodes in a process of their own (scripts/bench_nodes.py), once they registered."""
        assert run.node == "sdk" and self.tls is None, "--nodes-apart runs plaintext SDK Nodes"
        env = {**os.environ, "LINGUA_TOKEN": self.token or ""}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "bench_nodes.py"), "--target", self.address, "--nodes", str(run.nodes),
            *(["--own-connection"] if OWN_CONNECTION else []), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"bench_nodes.py did not start (its output: {line!r}; its error above)")
        except BaseException:
            await end_process(proc)
            raise
        return proc

    async def stop_apart(self, run: Run, proc: asyncio.subprocess.Process) -> None:
        """Stop the nodes' process; each job's dispatch time from when it reached its node's handler there."""
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        out = await asyncio.wait_for(proc.stdout.read(), 60)  # (one line, over 64 KiB: to EOF)
        if await asyncio.wait_for(proc.wait(), 60) != 0 or not out.strip():
            raise RuntimeError(f"bench_nodes.py failed as it stopped (exit status {proc.returncode}; its error above)")
        arrived = json.loads(out)
        for (session, utterance), t0 in self.sent.items():
            at = arrived.get(f"{session}/{utterance}")
            if at is not None:
                run.dispatch_ms.append((at - t0) * 1000)
        self.sent.clear()

    async def load(self, stubs: list[AsyncClient], run: Run, jobs: int, rate: float) -> None:
        """The row's jobs, as `run` says: open loop at `rate` (or closed loop), results over WatchJob or WatchSession."""
        if rate and run.reader == "session":  # open loop, results over WatchSession
            await self.session_open_loop(stubs, run, jobs, rate)
        elif rate:  # open loop: a new lifecycle every 1/rate s
            await open_loop(jobs // run.batch, run.batch / rate,
                            lambda i: self.one_batch(stubs[i % len(stubs)], run, run.batch))
        elif run.reader == "session":  # closed loop, results over WatchSession
            per_client = jobs // run.clients // run.batch
            await asyncio.gather(*[self.session_client(s, run, i, per_client) for i, s in enumerate(stubs)])
        else:  # closed loop: each client submits its next batch once the last one's results are in
            per_client = jobs // run.clients // run.batch

            async def client(stub: AsyncClient) -> None:
                for _ in range(per_client):
                    await self.one_batch(stub, run, run.batch)

            await asyncio.gather(*[client(s) for s in stubs])

    async def run(self, run: Run, jobs: int, rate: float = 0.0) -> Run:
        self.raw_channels: list[grpc.aio.Channel] = []
        apart = await self.start_apart(run) if NODES_APART[0] else None
        try:
            return await self._run(run, jobs, rate, apart)
        finally:
            if apart is not None:
                await end_process(apart)

    async def _run(self, run: Run, jobs: int, rate: float, apart: asyncio.subprocess.Process | None) -> Run:
        redis = aioredis.from_url(self.redis_url)
        nodes: list[SimulatedNode | SimNode] = []
        stubs = [AsyncClient(self.address, token=self.token, tls=self.tls or False, options=OWN_CONNECTION)
                 for _ in range(run.clients)]
        try:
            nodes += [] if apart else [await self.start_node(run, i) for i in range(run.nodes)]
            await self.measure(redis, stubs, run, jobs, rate, apart)
            for node in nodes:
                await node.stop()
            nodes.clear()
            if apart:
                await self.stop_apart(run, apart)
            return run
        finally:  # (a row that failed too: nothing left open behind it)
            for node in nodes:
                await node.crash()
            for channel in self.raw_channels:
                await channel.close(None)
            for stub in stubs:
                await stub.close()
            await redis.aclose()

    async def measure(self, redis: Any, stubs: list[AsyncClient], run: Run, jobs: int, rate: float,
                      apart: asyncio.subprocess.Process | None) -> None:
        """The row's load, and what it cost: Redis' commands and CPU, the scheduler's CPU and histogram, ours."""
        hist0 = scrape_dispatch(self.http)
        before, cpu0, t0 = await redis_counters(redis), cpu_seconds(self.pid), time.perf_counter()
        own0 = time.process_time() + (cpu_seconds(apart.pid) if apart else 0.0)
        loading = asyncio.ensure_future(self.load(stubs, run, jobs, rate))
        if apart is not None:  # the nodes' process ending mid-row would leave the load waiting for ever
            died = asyncio.ensure_future(apart.wait())
            await asyncio.wait([loading, died], return_when=asyncio.FIRST_COMPLETED)
            if not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
                raise RuntimeError(f"bench_nodes.py exited (status {apart.returncode}) in the middle of the row")
            died.cancel()
        await loading
        if not run.e2e_ms:
            raise RuntimeError(f"{run.label}: no job ran (--jobs is less than a batch of {run.batch} per client)")
        run.seconds = time.perf_counter() - t0
        own1 = time.process_time() + (cpu_seconds(apart.pid) if apart else 0.0)
        after, cpu1 = await redis_counters(redis), cpu_seconds(self.pid)
        run.server_dispatch = {le: n - hist0.get(le, 0.0) for le, n in scrape_dispatch(self.http).items()}
        run.jobs = len(run.e2e_ms)
        run.lua = (after.get("evalsha", 0) - before.get("evalsha", 0)) / run.jobs
        run.by_command = {k: (after[k] - before.get(k, 0)) / run.jobs for k in after
                          if not k.startswith("_") and k != "info" and after[k] > before.get(k, 0)}
        run.commands = sum(run.by_command.values())
        run.command_us = {k: (after["_us_" + k] - before.get("_us_" + k, 0)) / run.jobs for k in run.by_command}
        run.redis_cpu_us = (after["_cpu"] - before["_cpu"]) / run.jobs * 1e6
        run.redis_reads = (after["_reads"] - before["_reads"]) / run.jobs
        run.sched_cpu_per_1000 = (cpu1 - cpu0) / run.jobs * 1000
        run.bench_cpu_per_1000 = (own1 - own0) / run.jobs * 1000


async def end_process(proc: asyncio.subprocess.Process) -> None:
    """Kill `proc` unless it ended, and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def start_scheduler(redis_url: str, profile: Path | None, *flags: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """The scheduler's process, its gRPC address and its operations HTTP address ("" when off)."""
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    proc = subprocess.Popen([*prefix, "-m", "lingua_scheduler.server",
            "--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
                             "--redis-url", redis_url, *WORKERS, *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        raise RuntimeError(f"scheduler did not start: {line!r}")
    http = ""
    if "--http-listen" not in flags and not WORKERS:  # the port is on: its line follows
        http_line = proc.stdout.readline().decode()
        if "http on" not in http_line:
            raise RuntimeError(f"scheduler did not print its http port: {http_line!r}")
        http = http_line.rsplit(" ", 1)[-1].strip()
    return proc, line.rsplit(" ", 1)[-1].strip(), http


def stop_scheduler(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)
    if proc.stdout:
        proc.stdout.close()


@dataclass(frozen=True)
class Security:
    """How one row's scheduler is secured: its extra flags, the token every client and node sends, and
    the clients' TLS settings."""

    flags: tuple[str, ...] = ()
    token: str | None = None
    tls: TLS | None = None


def security_modes(folder: Path, token: str | None = None) -> dict[str, Security]:
    """SECURITY's modes, with an HS256 key and a CA + server certificate (for 127.0.0.1) made in `folder`.
    `token` (--token): what the rows not secured by that key send, to schedulers that read
    LINGUA_AUTH_JWT_KEY from the environment."""
    key = folder / "bench.secret"
    key.write_text(secrets.token_hex(32))
    ca = CA("Lingua Bench CA")
    cert, cert_key = ca.issue("scheduler", server=True).write(folder, "server")
    auth = ("--auth-jwt-key", str(key))
    given, token = token, mint(str(key), "admin")
    return {"none": Security((), given), "auth": Security(auth, token),
            "auth+TLS": Security((*auth, "--tls-cert", str(cert), "--tls-key", str(cert_key)), token,
                                 TLS(root_certificates=ca.pem)),
            METRICS_OFF: Security(("--http-listen", ""), given)}


async def lifecycle(redis_url: str, run: Run, jobs: int, rate: float = 0.0, profile: Path | None = None,
                    security: Security = Security()) -> Run:
    """One row, against a scheduler started for it (secured as `security` says)."""
    client = aioredis.from_url(redis_url)
    await client.flushall()  # the bench's own Redis
    await client.aclose()
    proc, address, http = start_scheduler(redis_url, profile, *security.flags)
    try:
        return await Lifecycle(address, proc.pid, redis_url, security.token, security.tls, http).run(run, jobs, rate)
    finally:
        stop_scheduler(proc)


async def memory(redis_url: str, count: int) -> dict[str, float]:
    """Redis bytes per queued job and per retained finished job (no payload: payload_ref)."""
    client = aioredis.from_url(redis_url)
    await client.flushall()
    store = Store(client, Settings(redis_url=redis_url, partitions=1))  # what one Redis gets by default
    specs = [pb.JobSpec(tenant_id="bench", session_id=f"s{i % 500}", utterance_index=i, src_lang="zh", tgt_lang="en",
                        payload_ref=f"session://s{i % 500}/{i}") for i in range(count)]
    await store.submit(specs[:1])  # queue, timers and affinity keys exist before the baseline
    base = (await client.info("memory"))["used_memory"]
    ids = []
    for i in range(1, count, 500):
        ids += [s.job_id for s in await store.submit(specs[i:i + 500])]
    queued = (await client.info("memory"))["used_memory"]
    for i in range(0, len(ids), 500):
        claims = await store.claim("mem-node", [(job_id, new_lease_token()) for job_id in ids[i:i + 500]])
        await store.complete_many("mem-node", [(Lease(c.job_id, c.token), pb.JobResult(
            text_asr="ni hao shi jie", text_translated="hello world", tts_audio_ref="s3://tts/x.opus",
            tts_format="opus")) for c in claims])
    finished = (await client.info("memory"))["used_memory"]
    await client.aclose()
    return {"per_queued": (queued - base) / len(ids), "per_finished": (finished - base) / len(ids)}


# The peers, each at its defaults and tuned (scripts/bench_others.py SETTINGS names the settings).
PEERS = (("bullmq", False), ("bullmq", True), ("celery", True), ("arq", False), ("arq", True), ("rq", False), ("rq", True))


def peer_label(system: str, tuned: bool) -> str:
    return f"{'BullMQ' if system == 'bullmq' else system}, {'tuned' if tuned else 'default'}"


def others(redis_url: str, jobs: int, arq_python: str, rounds: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Every peer in PEERS `rounds` times on the bench's Redis (the order rotating each round): label ->
    the JSON line of each round (or {"error": ...})."""
    out: dict[str, list[dict[str, Any]]] = {peer_label(*p): [] for p in PEERS}
    for r in range(rounds):
        shift = r * 3 % len(PEERS)
        for system, tuned in PEERS[shift:] + PEERS[:shift]:
            python = arq_python if system == "arq" else sys.executable
            argv = [python, str(HERE / "bench_others.py"), system, "--redis-url", redis_url, "--jobs", str(jobs)]
            try:
                done = subprocess.run(argv + ["--tuned"] * tuned, capture_output=True, text=True, timeout=900, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.CalledProcessError as err:
                result = {"error": (err.stderr or "").strip()[-300:]}
            except (subprocess.SubprocessError, ValueError, IndexError) as err:
                result = {"error": str(err)[-300:]}
            out[peer_label(system, tuned)].append(result)
            print(f"{peer_label(system, tuned)}: {json.dumps(result)}", flush=True)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str) -> str:
    """The median and, with several rounds, the range: "1234 (1100-1300)"."""
    mid = f"{median(values):{fmt}}"
    return mid if len(values) < 2 else f"{mid} ({min(values):{fmt}}-{max(values):{fmt}})"


def _ours(runs: list[Run]) -> dict[str, list[float]]:
    return {"jobs_per_s": [r.rate for r in runs], "redis_cpu_us": [r.redis_cpu_us for r in runs],
            "system_cpu_us": [(r.sched_cpu_per_1000 + r.bench_cpu_per_1000) * 1000 for r in runs],
            "own_cpu_us": [r.sched_cpu_per_1000 * 1000 for r in runs], "commands": [r.commands for r in runs]}


def peers_table(ours: list[Run], comp: dict[str, list[dict[str, Any]]], session: list[Run] | None = None) -> str:
    """Us (every round of our best combination, results over WatchJob; and over WatchSession when run)
    beside each peer: jobs/s, per job Redis CPU, the system's own CPU and Redis commands, medians (ranges
    over the rounds), and the ratios us / peer of the medians (of the WatchSession row when there is one:
    a peer's client reads one result per job, as a session reader does)."""
    head = ("| system | jobs/s | Redis CPU us/job | system CPU us/job (of which server / workers) | Redis cmds/job "
            "| us / peer: jobs/s | Redis CPU | system CPU |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for runs in [ours] + ([session] if session else []):
        u = _ours(runs)
        rows.append(f"| **Lingua Scheduler** ({runs[0].label}) | {spread(u['jobs_per_s'], '.0f')} | "
                    f"{spread(u['redis_cpu_us'], '.0f')} | {spread(u['system_cpu_us'], '.0f')} "
                    f"({median(u['own_cpu_us']):.0f} scheduler) | {spread(u['commands'], '.1f')} | 1 | 1 | 1 |")
    us = _ours(session or ours)
    for label, results in comp.items():
        good = [r for r in results if "jobs_per_s" in r]
        if not good:
            error = str(results[-1].get("error", "")).strip().splitlines()[-1:] if results else []
            rows.append(f"| {label} | failed: {' '.join(error).replace('|', '/')} | | | | | | |")  # one line: a cell
            continue
        col = {k: [r[k] for r in good] for k in ("jobs_per_s", "redis_cpu_us", "system_cpu_us", "worker_cpu_us", "commands")}
        ratio = [median(us[k]) / median(col[k]) for k in ("jobs_per_s", "redis_cpu_us", "system_cpu_us")]
        failed = f" ({len(results) - len(good)} of {len(results)} rounds failed)" if len(good) < len(results) else ""
        rows.append(f"| {label} {good[0]['version']}{failed} | {spread(col['jobs_per_s'], '.0f')} | "
                    f"{spread(col['redis_cpu_us'], '.0f')} | {spread(col['system_cpu_us'], '.0f')} "
                    f"({median(col['worker_cpu_us']):.0f} workers) | {spread(col['commands'], '.1f')} | "
                    + " | ".join(f"{x:.2f}" for x in ratio) + " |")
    return head + "\n" + "\n".join(rows)


def peers_section(args: argparse.Namespace, ours: list[Run], comp: dict[str, list[dict[str, Any]]],
                  session: list[Run] | None = None) -> str:
    return f"""## Beside BullMQ, Celery, arq and RQ (same Redis, same run)

The same trivial job (return its argument) through each peer on the bench's private Redis (flushed
before each), {args.compare_jobs} jobs enqueued in bulk where the system has it (BullMQ addBulk, RQ
enqueue_many; arq and Celery one call per job), drained, and every result read back and checked
(BullMQ from QueueEvents' `completed` events, RQ from each job's result stream, arq polling each job's
result in turn, Celery's AsyncResult.get). Each peer at its defaults and at its best documented
settings for speed ("tuned"):

{peers_settings(comp)}

{args.compare_rounds} round(s) of each, the order rotating; medians (ranges over the rounds). Per
job, counted from the first enqueue to the last result: Redis CPU (INFO cpu, user + sys), the
system's own CPU (Lingua: the scheduler process, and the bench process where the SDK clients and
nodes run; peers: their worker processes, with RQ's forked work horses, and the enqueueing and
result-reading client process), Redis commands (INFO commandstats, the bench's INFO calls left out,
commands inside Lua counted). Lingua Scheduler's row is every round of its best combination above (a
full lifecycle: Submit, dispatch over NodeSession, ack + result, WatchJob; with --session-reader also
the same combination with results read over WatchSession, the stream a real-time client uses). The
ratios are us / peer of the medians (of the WatchSession row when there is one: a peer's client reads
one result per job, as a session reader does): jobs/s above 1 and CPU below 1 favour us.

{peers_table(ours, comp, session)}
"""


def peers_settings(comp: dict[str, list[dict[str, Any]]]) -> str:
    return "\n".join(f"- {label}: {next((r['settings'] for r in results if 'settings' in r), '(failed)')}"
                     for label, results in comp.items())


def profile_summary(path: Path, jobs: int, top: int = 25) -> str:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    lines = [f"cProfile of the scheduler process, {jobs} lifecycles: {total:.2f} s of own time in Python functions "
             f"= {total / jobs * 1e6:.0f} us per lifecycle (cProfile roughly doubles it). Top {top} by own time:", ""]
    body = buf.getvalue()
    start = body.find("   ncalls")
    return "\n".join(lines) + "\n```\n" + body[start:].rstrip() + "\n```\n"


def plot(runs: list[Run], comp: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {k: [r["jobs_per_s"] for r in v if "jobs_per_s" in r] for k, v in comp.items()}
    labels = [r.label for r in runs] + [k for k, v in done.items() if v]
    rates = [r.rate for r in runs] + [median(v) for v in done.values() if v]
    colors = ["tab:blue"] * len(runs) + ["tab:gray"] * (len(labels) - len(runs))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(labels, rates, color=colors)
    ax.set_ylabel("lifecycles (jobs) per second")
    ax.set_title("Full job lifecycle, one Redis, 2-core machine (blue: Lingua Scheduler, 1 instance)")
    for i, v in enumerate(rates):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def span(values: list[float], fmt: str = ".2f") -> str:
    low, high = min(values), max(values)
    return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}} to {high:{fmt}}"


def ratios(values: list[float]) -> str:
    """A range of ratios, with its median when there are several (the figure a verdict reads)."""
    return span(values) if len(values) < 2 else f"{span(values)} (median {statistics.median(values):.2f})"


def node_ratio_row(label: str, sdk: list[Run], sim: list[Run]) -> str:
    """One markdown row: SDK Node and simnode lifecycles/s and scheduler CPU, and their ratios (ranges
    over the rounds; round i of one beside round i of the other, which ran next to it)."""
    rate = [a.rate / b.rate for a, b in zip(sdk, sim, strict=True)]
    cpu = [a.sched_cpu_per_1000 / b.sched_cpu_per_1000 for a, b in zip(sdk, sim, strict=True)]
    return (f"| {label} | {span([r.rate for r in sdk], '.0f')} | {span([r.rate for r in sim], '.0f')} | {ratios(rate)} | "
            f"{span([r.sched_cpu_per_1000 for r in sdk])} | {span([r.sched_cpu_per_1000 for r in sim])} | {ratios(cpu)} |")


def security_row(label: str, modes: dict[str, list[Run]]) -> str:
    """One markdown row: lifecycles/s without security, with auth, with auth+TLS, the ratios to the row
    without (round i beside round i), and scheduler and client/node CPU per 1000 lifecycles."""
    none = modes["none"]

    def ratio(runs: list[Run], attr: str) -> str:
        return ratios([getattr(a, attr) / getattr(b, attr) for a, b in zip(runs, none, strict=True)])

    cells = [span([r.rate for r in modes[m]], ".0f") for m in SECURITY]
    cells += [ratio(modes[m], "rate") for m in SECURITY[1:]]
    cells += [span([r.sched_cpu_per_1000 for r in modes[m]]) for m in SECURITY]
    cells += [span([r.bench_cpu_per_1000 for r in modes[m]]) for m in SECURITY]
    return f"| {label} | {' | '.join(cells)} |"


def metrics_row(label: str, on: list[Run], off: list[Run]) -> str:
    """One markdown row: lifecycles/s with metrics on and off, the ratio on / off (round i beside round
    i), and scheduler CPU per 1000 lifecycles."""
    rate = [a.rate / b.rate for a, b in zip(on, off, strict=True)]
    cpu = [a.sched_cpu_per_1000 / b.sched_cpu_per_1000 for a, b in zip(on, off, strict=True)]
    return (f"| {label} | {span([r.rate for r in on], '.0f')} | {span([r.rate for r in off], '.0f')} | {span(rate)} | "
            f"{pct(rate, 50):.3f} | {span([r.sched_cpu_per_1000 for r in on])} | "
            f"{span([r.sched_cpu_per_1000 for r in off])} | {span(cpu)} | {pct(cpu, 50):.3f} |")


def metrics_section(args: argparse.Namespace, rows: list[tuple[str, list[Run], list[Run]]]) -> str:
    return f"""## Metrics on and off (same run)

With --metrics each combination also ran with the operations HTTP port off (`--http-listen ''`: no
metrics are made or counted) beside the usual rows (port on, 127.0.0.1:0: every job counter and
histogram, the Redis script timings and the gRPC server metrics counted; not scraped during the run).
The two alternate, {args.rounds} round(s) each, the order rotating each round; ranges over the rounds,
ratios of round i beside round i, and their median. The goal: metrics cost less than 3% of
lifecycles/s (ratio on / off >= 0.97).

| clients x nodes, batch | lifecycles/s, metrics on | metrics off | ratio on / off | median | scheduler CPU \
s/1000, on | off | ratio on / off | median |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(metrics_row(*r) for r in rows)}
"""


SECURITY_TABLE_HEAD = """| clients x nodes, batch | lifecycles/s, no auth | auth | auth+TLS | ratio auth / none \
| ratio auth+TLS / none | scheduler CPU s/1000, no auth | auth | auth+TLS | clients+nodes CPU s/1000, no auth \
| auth | auth+TLS |
|---|---|---|---|---|---|---|---|---|---|---|---|"""


def security_section(args: argparse.Namespace, rows: list[tuple[str, dict[str, list[Run]]]]) -> str:
    return f"""## With authentication and TLS (same run)

With --auth each combination also ran with bearer-token authentication on (an HS256 key made for the
run, an admin token on every client and node: every call is verified, a cache hit after the first) and
with authentication and TLS on (a server certificate for 127.0.0.1 from a CA made for the run; the
clients and nodes trust that CA). The three alternate, {args.rounds} round(s) each, the order rotating
each round; ranges over the rounds, ratios of round i beside round i. The goal: auth and TLS together
cost at most 10% of lifecycles/s (ratio auth+TLS / none >= 0.90). "clients+nodes CPU" is the bench
process, where the clients and simulated nodes run: their side of TLS.

{SECURITY_TABLE_HEAD}
{chr(10).join(security_row(*r) for r in rows)}
"""


NODE_TABLE_HEAD = """| clients x nodes, batch | SDK Node lifecycles/s | simnode lifecycles/s | ratio SDK / simnode \
| scheduler CPU s/1000, SDK Node | ..., simnode | ratio SDK / simnode |
|---|---|---|---|---|---|---|"""


def write_report(args: argparse.Namespace, runs: list[Run], half: Run, mem: dict[str, float],
                 comp: dict[str, list[dict[str, Any]]], ours: list[Run], profile: str,
                 pairs: list[tuple[str, list[Run], list[Run]]],
                 secured: list[tuple[str, dict[str, list[Run]]]], metered: list[tuple[str, list[Run], list[Run]]],
                 out: Path, session: list[Run] | None = None) -> None:
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("grpcio", "protobuf", "redis", "hiredis", "transitions"))
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    rows = [
        f"| {r.label} | {r.rate:.0f} | {pct(r.submit_ms, 50):.2f} / {pct(r.submit_ms, 99):.2f} | "
        f"{pct(r.dispatch_ms, 50):.2f} / {pct(r.dispatch_ms, 99):.2f} / {max(r.dispatch_ms):.1f} | "
        f"{pct(r.e2e_ms, 50):.2f} / {pct(r.e2e_ms, 99):.2f} | {r.commands:.1f} | {r.lua:.2f} | {r.redis_cpu_us:.0f} | "
        f"{r.sched_cpu_per_1000:.2f} |"
        for r in [*runs, half]
    ]
    node_section = f"""## The SDK's Node beside a raw-stub node (same run)

The rows above run on the SDK (AsyncClient, Node with a simulated handler: scripts/simulated.py). Here
each combination also ran with scripts/simnode.py, a node written on the generated stubs alone, the
two alternating, {args.rounds} round(s) each; ranges over the rounds. A ratio of lifecycles/s >= 1 and
of scheduler CPU <= 1 means the SDK's Node costs the fleet nothing.

{NODE_TABLE_HEAD}
{chr(10).join(node_ratio_row(*p) for p in pairs)}
""" if pairs else ""
    text = f"""# Benchmarks

Generated by `scripts/bench` ({command_line() or 'defaults'}); do not edit by hand: rerun it.
Analysis and what was changed because of it: [performance.md](performance.md).

Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, Redis {redis_v}
(one private server for everything, appendonly off, noeviction), {versions}.

![throughput](benchmarks.png)

## Lingua Scheduler, one instance

Each lifecycle: a client (the SDK's AsyncClient) Submits (in batches of the size shown), a simulated
node (the SDK's Node, zero processing time) receives it over NodeSession and acks + completes it in one
message, the client learns the result over WatchJob (rows marked WatchSession: over one WatchSession
stream per session, {SESSIONS_PER_CLIENT} live sessions per client, each batch spread over them).
{args.jobs} jobs per row (the best of the rounds); the half-load row submits open-loop at half the best rate.
At half rate, {server_dispatch(half)}: the dispatch column above also holds the load generator's own
delays ({GENERATOR[NODES_APART[0]]}, on the same {os.cpu_count()} cores).
Latencies in ms (p50 / p99 [/ max]); "cmds" counts every Redis command including those run inside Lua.

| clients x nodes, batch | lifecycles/s | Submit | dispatch (submit -> node) | end to end | cmds/job | Lua calls/job \
| Redis CPU us/job | scheduler CPU s / 1000 jobs |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Redis memory, no payload (payload_ref), {args.memory_jobs} jobs: **{mem['per_queued']:.0f} bytes per queued
job**, **{mem['per_finished']:.0f} bytes per retained finished job** (with a short text result).

{node_section}
{security_section(args, secured) if secured else ""}
{metrics_section(args, metered) if metered else ""}
{peers_section(args, ours, comp, session) if comp else ""}
## Where the time goes

{profile}
"""
    out.write_text(text + kept_sections(out, text))


def kept_sections(out: Path, text: str) -> str:
    """The sections of the existing report that this run does not write (hand-written ones: fleet,
    WatchSession, auth... measured by other commands), carried over so a full run does not drop them.
    Sections are matched by their `## ` title, less any parenthesised remark."""
    if not out.exists():
        return ""

    def title(line: str) -> str:
        return line[3:].split(" (", 1)[0].strip()

    written = {title(line) for line in text.splitlines() if line.startswith("## ")}
    kept, current = [], None
    for line in out.read_text().splitlines():
        if line.startswith("## "):
            current = [line] if title(line) not in written else None
            if current is not None:
                kept.append(current)
        elif current is not None:
            current.append(line)
    return "".join("\n" + "\n".join(section).rstrip() + "\n" for section in kept)


def half_run(best: Run, batch: int, reader: str = "job", fraction: float = 0.5) -> Run:
    """The half-rate row of the best row `best` (or the row at `fraction` of its rate): its clients and
    nodes, in batches of `batch` (0: its own)."""
    batch = batch or best.batch
    session = ", WatchSession" if reader == "session" else ""
    at = "half rate" if fraction == 0.5 else f"{fraction:g} of the best rate"
    return Run(f"{best.clients} x {best.nodes}, batch {batch}{session}, at {at}", best.clients, best.nodes, batch,
               reader=reader)


async def main_async(args: argparse.Namespace) -> int:
    docs = HERE.parent / "docs"
    tmp = Path(tempfile.mkdtemp(prefix="lingua-bench-"))
    if NODES_APART[0]:
        print("--nodes-apart: every row's nodes run in a process of their own (scripts/bench_nodes.py)", flush=True)
    redis = EmbeddedRedis(tmp / "redis", port=free_ports(1)[0], persistent=False).start()
    try:
        runs = []
        session_runs: list[Run] = []
        all_session: dict[str, list[Run]] = {}  # combo label -> its WatchSession rows of every round
        auth_runs: list[Run] = []
        modes = security_modes(tmp, args.token)
        pairs: list[tuple[str, list[Run], list[Run]]] = []  # combo label, SDK Node runs, simnode runs
        secured: list[tuple[str, dict[str, list[Run]]]] = []  # combo label, runs per SECURITY mode
        metered: list[tuple[str, list[Run], list[Run]]] = []  # combo label, metrics on runs, metrics off runs
        all_sdk: dict[str, list[Run]] = {}  # combo label -> its SDK Node rows of every round
        for combo in args.combos.split(","):
            c, rest = combo.split("x")
            n, b = rest.split("b") if "b" in rest else (rest, "1")
            label = f"{c} x {n}, batch {b}"
            # (node kind, security mode): the SDK Node plain first, the simnode baseline, the secured rows
            variants = [("sdk", "none")] + [("simnode", "none")] * args.baseline
            variants += [("sdk", m) for m in SECURITY[1:]] * args.auth
            variants += [("sdk", METRICS_OFF)] * args.metrics
            done: dict[tuple[str, str], list[Run]] = {v: [] for v in variants}
            for r in range(args.rounds):
                shift = r % len(variants)  # rotate which goes first
                for kind, mode in variants[shift:] + variants[:shift]:
                    suffix = "" if mode == "none" else f", {mode}"
                    run = await lifecycle(redis.url, Run(label + suffix, int(c), int(n), int(b), node=kind), args.jobs,
                                          security=modes[mode])
                    print(f"{run.label} [{kind}]: {run.rate:.0f}/s, dispatch p50 {pct(run.dispatch_ms, 50):.2f} ms, "
                          f"e2e p50 {pct(run.e2e_ms, 50):.2f} ms, {run.lua:.2f} Lua/job, {run.commands:.1f} commands/job, "
                          f"{run.redis_cpu_us:.0f} us Redis CPU/job, {run.sched_cpu_per_1000:.2f} sched CPU s/1000, "
                          f"{run.bench_cpu_per_1000:.2f} clients+nodes CPU s/1000", flush=True)
                    done[(kind, mode)].append(run)
                    if args.commands:
                        print(commands_line(run), flush=True)
            runs.append(max(done[("sdk", "none")], key=lambda r: r.rate))
            all_sdk[runs[-1].label] = done[("sdk", "none")]
            if args.baseline:
                pairs.append((label, done[("sdk", "none")], done[("simnode", "none")]))
                print(node_ratio_row(label, done[("sdk", "none")], done[("simnode", "none")]), flush=True)
            if args.auth:
                by_mode = {m: done[("sdk", m)] for m in SECURITY}
                secured.append((label, by_mode))
                auth_runs += [max(by_mode[m], key=lambda r: r.rate) for m in SECURITY[1:]]
                print(security_row(label, by_mode), flush=True)
            if args.metrics:
                metered.append((label, done[("sdk", "none")], done[("sdk", METRICS_OFF)]))
                print(metrics_row(*metered[-1]), flush=True)
            for _ in range(args.rounds if args.session_reader else 0):
                srun = Run(f"{label}, WatchSession", int(c), int(n), int(b), reader="session")
                await lifecycle(redis.url, srun, args.jobs)
                print(f"{srun.label}: {srun.rate:.0f}/s, e2e p50 {pct(srun.e2e_ms, 50):.2f} ms, "
                      f"{srun.lua:.2f} Lua/job, {srun.commands:.1f} commands/job, {srun.redis_cpu_us:.0f} us Redis "
                      f"CPU/job, {srun.sched_cpu_per_1000:.2f} sched CPU s/1000", flush=True)
                if args.commands:
                    print(commands_line(srun), flush=True)
                all_session.setdefault(label, []).append(srun)
            if label in all_session:
                session_runs.append(max(all_session[label], key=lambda r: r.rate))
        if args.half_rate_only:  # the half-rate row alone, `--rounds` times, at half the best rate above
            rows = [(max(runs, key=lambda r: r.rate), "job")]  # (and with --session-reader, over WatchSession)
            rows += [(max(all_session[label], key=lambda r: r.rate), "session") for label in all_session]
            for best, reader in rows:
                for _ in range(args.rounds):
                    half = half_run(best, args.half_rate_batch, reader, args.load_fraction)
                    await lifecycle(redis.url, half, args.jobs, rate=best.rate * args.load_fraction)
                    print(f"{half.label} ({best.rate * args.load_fraction:.0f}/s): dispatch p50 {pct(half.dispatch_ms, 50):.2f} "
                          f"p90 {pct(half.dispatch_ms, 90):.2f} p99 {pct(half.dispatch_ms, 99):.2f} ms; "
                          f"{server_dispatch(half)}; {half.sched_cpu_per_1000:.2f} sched CPU s/1000", flush=True)
            return 0
        if args.lifecycle_only:
            if secured:
                print(security_section(args, secured))
            if metered:
                print(metrics_section(args, metered))
            return 0
        best = max(runs, key=lambda r: r.rate)
        half = half_run(best, args.half_rate_batch)
        await lifecycle(redis.url, half, args.jobs, rate=best.rate / 2)
        print(f"half rate ({best.rate / 2:.0f}/s): dispatch p50 {pct(half.dispatch_ms, 50):.2f} "
              f"p99 {pct(half.dispatch_ms, 99):.2f} ms; {server_dispatch(half)}", flush=True)
        mem = await memory(redis.url, args.memory_jobs)
        print(f"memory: {mem}", flush=True)
        profile = "(run with --profile for a cProfile of the hot paths)"
        if args.profile:
            prof = tmp / "sched.prof"
            await lifecycle(redis.url, Run("profile", best.clients, best.nodes, best.batch), args.jobs, profile=prof)
            profile = profile_summary(prof, args.jobs)
        comp = {}
        if args.compare_jobs:
            comp = others(redis.url, args.compare_jobs, args.arq_python or ensure_arq(), args.compare_rounds)
        ours = all_sdk[best.label]
        session = all_session.get(best.label)
        if comp:
            print(peers_table(ours, comp, session), flush=True)
        write_report(args, runs + auth_runs + session_runs, half, mem, comp, ours, profile, pairs, secured, metered,
                     docs / "benchmarks.md", session)
        plot(runs, comp, docs / "benchmarks.png")
        print("wrote docs/benchmarks.md and docs/benchmarks.png")
        return 0
    finally:
        redis.stop()


def main() -> int:
    # No abbreviations: `--tok SECRET` would pass command_line()'s mask into the report.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--jobs", type=int, default=3000, help="lifecycles per row")
    p.add_argument("--combos", default="1x1b1,8x2b1,8x2b10,16x2b25",
                   help="clients x nodes [b batch], comma-separated")
    p.add_argument("--rounds", type=int, default=1, help="runs of each combination per node kind (ranges reported)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the raw-stub simnode rows (and the SDK/simnode ratio)")
    p.add_argument("--memory-jobs", type=int, default=10_000)
    p.add_argument("--compare-jobs", type=int, default=2000, help="jobs for BullMQ/Celery/arq/RQ (0: skip them)")
    p.add_argument("--compare-rounds", type=int, default=1, help="runs of each peer (medians and ranges reported)")
    p.add_argument("--arq-python", default=None, help="python of a virtualenv with arq (default: .venv-arq, made on first use)")
    p.add_argument("--profile", action="store_true", help="also profile the scheduler (cProfile)")
    p.add_argument("--session-reader", action="store_true",
                   help="also run each row with clients reading results over WatchSession (one stream per "
                        f"session, {SESSIONS_PER_CLIENT} sessions per client) instead of WatchJob per job")
    p.add_argument("--auth", action="store_true",
                   help="also run each row with bearer-token authentication on (an HS256 key made for the run) "
                        "and with authentication and TLS on (a server certificate made for the run)")
    p.add_argument("--metrics", action="store_true",
                   help="also run each row with the operations HTTP port off (--http-listen '': no metrics) "
                        "beside the usual rows (metrics on)")
    p.add_argument("--commands", action="store_true",
                   help="print each row's Redis commands per lifecycle, by command (INFO commandstats)")
    p.add_argument("--lifecycle-only", action="store_true",
                   help="only the lifecycle rows: print them, skip half rate, memory, the others and the report")
    p.add_argument("--half-rate-only", action="store_true",
                   help="the lifecycle rows, then --rounds half-rate rows at half the best rate (dispatch latency, "
                        "the scheduler's histogram; with --session-reader also over WatchSession at half the "
                        "best WatchSession rate); no memory, others or report")
    p.add_argument("--half-rate-batch", type=int, default=0,
                   help="jobs per Submit in the half-rate rows (default 0: the best row's batch); the rate stays "
                        "half the best row's (or --load-fraction of it)")
    p.add_argument("--load-fraction", type=float, default=0.5,
                   help="with --half-rate-only: run those rows at this fraction of the best rate instead of half")
    p.add_argument("--workers", type=int, default=0,
                   help="run the scheduler with --workers N, each client and node on its own connection "
                        "(scripts/bench_workers.py compares worker counts)")
    p.add_argument("--nodes-apart", action="store_true",
                   help="run every row's SDK nodes in a process of their own (scripts/bench_nodes.py), as on machines "
                        "of their own, not in the clients' process (whose event loop then delays what they receive); "
                        "plaintext, SDK Node rows only (with --no-baseline, without --auth)")
    p.add_argument("--token", default=None,
                   help="bearer token (env LINGUA_TOKEN, read when LINGUA_AUTH_JWT_KEY is set), an admin one, sent "
                        "by every client and node; the schedulers started here read LINGUA_AUTH_JWT_KEY from the "
                        "environment (as scripts/chaos.py). Not with --auth, whose rows without auth it would secure")
    args = p.parse_args()
    key = os.environ.get("LINGUA_AUTH_JWT_KEY")
    if args.token is None and key:
        args.token = os.environ.get("LINGUA_TOKEN")
    if bool(args.token) != bool(key):
        p.error("--token (or LINGUA_TOKEN) and LINGUA_AUTH_JWT_KEY go together: the schedulers started here "
                "verify the token with the key")
    if args.token and args.auth:
        p.error("--token with --auth: its rows \"no auth\" would run with auth on (LINGUA_AUTH_JWT_KEY); use one")
    if not 0 < args.load_fraction <= 1:
        p.error(f"--load-fraction {args.load_fraction}: a fraction of the best rate, above 0 and at most 1")
    if args.load_fraction != 0.5 and not args.half_rate_only:
        p.error("--load-fraction goes with --half-rate-only (the full report's row is at half rate)")
    if not 0 <= args.half_rate_batch <= args.jobs:
        p.error(f"--half-rate-batch {args.half_rate_batch}: 0 (the best row's batch) up to --jobs ({args.jobs})")
    if args.nodes_apart and (args.baseline or args.auth):
        p.error("--nodes-apart runs plaintext SDK Nodes only: add --no-baseline, leave out --auth")
    use_workers(args.workers)
    NODES_APART[0] = args.nodes_apart
    return asyncio.run(main_async(args))


def command_line() -> str:
    """This run's arguments, for the report: a token given on the command line is not written down."""
    argv = sys.argv[1:]
    return " ".join("***" if i and argv[i - 1] == "--token" else a.split("=")[0] + "=***" if a.startswith("--token=")
                    else a for i, a in enumerate(argv))


def use_workers(count: int) -> None:
    """Schedulers started from now on run `count` workers (0: the flag left out), and every client and
    node gets its own connection (with a count)."""
    WORKERS[:] = ["--workers", str(count)] if count else []
    OWN_CONNECTION[:] = [("grpc.use_local_subchannel_pool", 1)] if count else []


if __name__ == "__main__":
    sys.exit(main())
