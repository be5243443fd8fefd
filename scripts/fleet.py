#!/usr/bin/env python3
"""Fleet generator (issue 11): N node streams from one process against one scheduler, and the figures
a fleet operator cares about.

Examples (see docs/benchmarks.md, "Fleet"):
  # its own Redis and one scheduler; 1000 streams, then 300 jobs at 20/s while they stay connected
  python scripts/fleet.py --spawn --streams 1000 --jobs 300 --rate 20
  # against a running scheduler (RSS and Redis figures need --spawn, or --redis-url for the latter)
  python scripts/fleet.py --target 127.0.0.1:50051 --redis-url redis://127.0.0.1:6380/0 --streams 500

The streams are raw NodeSession streams (scripts/simnode.py's SimNode: ack at once, result at once)
spread over a few shared channels (--channels): an SDK Node opens its own channel, a TCP connection
and a heartbeat/flush machinery per node, which makes this process, not the scheduler, the bottleneck
at thousands of nodes on 2 cores (`--sdk` runs SDK Nodes instead, for comparison).

Reported, as `key: value` lines: streams held (registered, and listed by ListNodes), time to register
them, the spawned scheduler's RSS before and after (and per stream), Redis commands per second with
the fleet idle (INFO commandstats delta over --idle-window seconds), and dispatch latency (submit ->
the node receives the assignment, one clock) of --jobs jobs at --rate while the fleet is connected.
Everything is bounded (--register-timeout, --timeout), loopback only, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import redis.asyncio as aioredis
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_sdk import AsyncClient, JobSpec, LinguaError
from simnode import Received, SimNode, bearer
from simulate import percentile
from simulated import SimulatedNode


def spawn_scheduler(redis_url: str, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One scheduler process on a loopback port; its log goes to `log` (warnings are counted)."""
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lingua_scheduler.server",
            "--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
                                 "--redis-url", redis_url, *extra], stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        raise RuntimeError(f"scheduler did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def rss_kib(pid: int, children: bool = False) -> int:
    """Resident memory of the process (and, with `children`, of its live children: the scheduler's
    workers under --workers N)."""
    kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir()
            for k in (task / "children").read_text().split()] if children else []
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) + sum(rss_kib(k, children) for k in kids)
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def redis_calls(url: str) -> int:
    """Commands Redis has run so far (sum of INFO commandstats calls, the INFO itself included)."""
    r = aioredis.from_url(url)
    try:
        stats = await r.info("commandstats")
        return sum(int(v["calls"]) for v in stats.values())
    finally:
        await r.aclose()


class Fleet:
    """N node streams; `dispatched` records the first arrival of each job (job id -> perf_counter)."""

    def __init__(self, target: str, args: argparse.Namespace) -> None:
        self.target, self.args = target, args
        self.pairs = [(s, t) for s, t in (p.split(":") for p in args.pairs.split(","))]
        self.channels: list[Any] = []
        self.raw: list[SimNode] = []
        self.sdk: list[SimulatedNode] = []
        self.failures: list[str] = []
        self.arrived: dict[tuple[str, int], float] = {}

    def _seen(self, session: str, utterance: int, at: float) -> None:
        self.arrived.setdefault((session, utterance), at)

    async def _open_one(self, i: int, gate: asyncio.Semaphore, deadline: float) -> None:
        pair = self.pairs[i % len(self.pairs)]
        async with gate:
            left = deadline - time.monotonic()
            if left <= 0:
                self.failures.append(f"fleet-{i}: not tried: --register-timeout passed")
                return
            try:
                if self.args.sdk:
                    node = SimulatedNode(self.target, f"fleet-{i}", [pair], self.args.concurrency, token=self.args.token,
                                         on_receive=lambda a, at: self._seen(a.proto.spec.session_id,
                                                                             a.proto.spec.utterance_index, at))
                    self.sdk.append(await node.start(timeout=left))
                else:
                    def on_receive(r: Received) -> None:
                        self._seen(r.spec.session_id, r.spec.utterance_index, r.at)
                    # SimNode's own default behaviour: ack and answer at once, heartbeat, answer pings
                    raw = SimNode(self.channels[i % len(self.channels)], f"fleet-{i}", [pair], self.args.concurrency,
                                  on_receive=on_receive)
                    try:
                        await asyncio.wait_for(raw.start(), left)
                    except BaseException:
                        await raw.crash()
                        raise
                    self.raw.append(raw)
            except Exception as err:  # counted and reported: registration failures are a figure
                why = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else repr(err)
                self.failures.append(f"fleet-{i}: {why}"[:200])

    async def start(self) -> None:
        if not self.args.sdk:
            # A local subchannel pool each: otherwise gRPC shares one connection among equal channels.
            self.channels = [grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)],
                                                       interceptors=bearer(self.args.token) if self.args.token else None)
                             for _ in range(self.args.channels)]
        gate = asyncio.Semaphore(self.args.open_parallel)  # bounds the register burst
        deadline = time.monotonic() + self.args.register_timeout
        await asyncio.gather(*(self._open_one(i, gate, deadline) for i in range(self.args.streams)))

    @property
    def held(self) -> int:
        return len(self.raw) + sum(1 for n in self.sdk if n.node.instance_id is not None)

    @property
    def open(self) -> int:
        """Streams registered and still open (the scheduler ends one that stops answering its pings)."""
        return sum(1 for n in self.raw if not n.closed.is_set()) + sum(1 for n in self.sdk if n.node.instance_id)

    async def stop(self) -> None:
        async def one(coro: Any) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(coro, 10)
        await asyncio.gather(*(one(n.crash()) for n in self.raw), *(one(n.crash()) for n in self.sdk))
        for channel in self.channels:
            await channel.close(None)


async def listed(client: AsyncClient, want: int, deadline: float, errors: list[str]) -> int:
    """Nodes of this fleet ListNodes shows, polled until all are or the deadline passes (-1: ListNodes
    never answered). A failed ListNodes is recorded in `errors` and tried again."""
    count = -1
    while True:
        try:
            count = sum(1 for n in await client.list_nodes() if n.node_id.startswith("fleet-"))
        except LinguaError as err:
            errors.append(f"ListNodes: {err}")
        if count >= want or time.monotonic() >= deadline:
            return count
        await asyncio.sleep(0.5)


async def jobs(client: AsyncClient, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    submitted: dict[tuple[str, int], float] = {}
    errors: list[str] = []
    ids: list[str] = []
    started = time.perf_counter()
    deadline = time.monotonic() + (args.jobs / args.rate if args.rate else 0) + args.timeout
    for i in range(args.jobs):
        if time.monotonic() >= deadline:
            errors.append(f"Submit: {args.jobs - i} jobs not submitted: --timeout passed")
            break
        src, tgt = fleet.pairs[i % len(fleet.pairs)]
        session = f"fleet-sess-{i % 50}"
        spec = JobSpec(tenant_id="fleet", session_id=session, utterance_index=i, src_lang=src, tgt_lang=tgt,
                       payload_ref=f"session://{session}/{i}")
        submitted[(session, i)] = time.perf_counter()
        try:
            ids += [r.job_id for r in await asyncio.wait_for(client.submit_many([spec]), deadline - time.monotonic())]
        except (LinguaError, TimeoutError) as err:
            submitted.pop((session, i))
            errors.append(f"Submit: {type(err).__name__}: {err}")
        if args.rate:
            await asyncio.sleep(max(0.0, started + (i + 1) / args.rate - time.perf_counter()))
    outcome: dict[str, int] = {}
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            try:
                state = (await asyncio.wait_for(client.get(job_id), max(0.1, deadline - time.monotonic()))).state
            except (LinguaError, TimeoutError):
                still.append(job_id)  # asked again next round
                continue
            if state.terminal:
                outcome[state.name.lower()] = outcome.get(state.name.lower(), 0) + 1
            else:
                still.append(job_id)
        pending = still
        if pending:
            await asyncio.sleep(0.2)
    latency = [(fleet.arrived[k] - t0) * 1000 for k, t0 in submitted.items() if k in fleet.arrived]
    return {"outcome": outcome, "unfinished": len(pending), "seconds": time.perf_counter() - started,
            "latency": latency, "errors": errors}


async def run(args: argparse.Namespace) -> int:
    redis: EmbeddedRedis | None = None
    procs: list[Any] = []
    target, redis_url = args.target, args.redis_url
    log: Path | None = None
    workdir: Path | None = None
    if args.spawn:
        workdir = Path(tempfile.mkdtemp(prefix="lingua-fleet-"))
        redis = EmbeddedRedis(str(workdir), persistent=False).start()
        redis_url, log = redis.url, workdir / "scheduler.log"
        procs = [spawn_scheduler(redis.url, args.scheduler_arg, log)]
        target = procs[0][1]
    if not target:
        print("give --target HOST:PORT or --spawn", file=sys.stderr)
        return 2
    pid = procs[0][0].pid if procs else None
    report: dict[str, str] = {}

    def say(key: str, value: object) -> None:
        report[key] = str(value)
        print(f"{key}: {value}", flush=True)

    client = AsyncClient(target, token=args.token)
    fleet = Fleet(target, args)
    try:
        await client.list_nodes()  # the scheduler answers (and the token is good) before any stream opens
        say("streams wanted", args.streams)
        say("stream kind", "sdk Node (own channel each)" if args.sdk else f"raw NodeSession on {args.channels} channels")
        rss_before = rss_kib(pid, children=True) if pid else None
        if rss_before is not None:
            say("scheduler rss before (KiB)", rss_before)
        t0 = time.monotonic()
        await fleet.start()
        say("register seconds", f"{time.monotonic() - t0:.2f}")
        say("streams registered", fleet.held)
        say("registration failures", len(fleet.failures))
        say("fleet process rss (KiB)", rss_kib(os.getpid()))
        for failure in fleet.failures[:5]:
            print(f"  {failure}", file=sys.stderr)
        list_errors: list[str] = []
        say("streams listed", await listed(client, fleet.held, time.monotonic() + args.list_timeout, list_errors))
        say("listed seconds", f"{time.monotonic() - t0:.2f}")
        with contextlib.suppress(LinguaError):  # how the streams spread over instances (--workers N)
            spread = Counter(n.instance_id for n in await client.list_nodes() if n.node_id.startswith("fleet-"))
            say("streams per instance", ", ".join(f"{i} {c}" for i, c in sorted(spread.items())))
        if redis_url:
            before = await redis_calls(redis_url)
            await asyncio.sleep(args.idle_window)
            say("redis commands/s idle", f"{(await redis_calls(redis_url) - before - 1) / args.idle_window:.0f}")
        if rss_before is not None and pid is not None:
            rss_after = rss_kib(pid, children=True)
            say("scheduler rss after (KiB)", rss_after)
            say("rss per idle stream (KiB)", f"{(rss_after - rss_before) / max(1, fleet.held):.1f}")
        if args.jobs:
            result = await jobs(client, fleet, args)
            d = result["latency"]
            say("jobs", f"{args.jobs} in {result['seconds']:.1f} s")
            say("outcome", ", ".join(f"{k} {v}" for k, v in sorted(result["outcome"].items())) or "none")
            say("unfinished", result["unfinished"])
            say("submit failures", len(result["errors"]))
            for error in result["errors"][:3]:
                print(f"  {error}", file=sys.stderr)
            say("dispatch ms", f"p50 {percentile(d, 50):.2f} p99 {percentile(d, 99):.2f} "
                               f"max {max(d, default=float('nan')):.2f} (n={len(d)})")
            say("streams listed after jobs", await listed(client, fleet.held, time.monotonic(), list_errors))
        say("streams open at end", fleet.open)
        say("ListNodes failures", len(list_errors))
        for error in list_errors[:3]:
            print(f"  {error}", file=sys.stderr)
        if log is not None:
            text = log.read_text(errors="replace")
            if args.keep_log:
                say("scheduler log", log)
            warnings = [line for line in text.splitlines() if " WARNING " in line]
            say("scheduler log warnings", len(warnings))
            # the Redis pool running dry: redis-py says MaxConnectionsError or "Too many connections"
            say("pool exhausted warnings",
                sum(1 for w in warnings if "MaxConnectionsError" in w or "Too many connections" in w))
            # one line per failed renewal before issue 11, one per failed batch (at most one a tick) since
            say("registry renewal failures", sum(1 for w in warnings if "renewing node" in w or "registry entries failed" in w))
        jobs_ok = report.get("unfinished") == "0" and report.get("submit failures") == "0"
        ok = not fleet.failures and (not args.jobs or jobs_ok)
        return 0 if ok else 1
    finally:
        await fleet.stop()
        await client.close()
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if redis is not None:
            redis.stop()
        if workdir is not None and not args.keep_log:
            shutil.rmtree(workdir, ignore_errors=True)  # a 2,000-stream run logs 100+ MB of warnings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=os.environ.get("LINGUA_TARGET", ""), help="scheduler address (loopback)")
    p.add_argument("--token", default=os.environ.get("LINGUA_TOKEN"),
                   help="bearer token (env LINGUA_TOKEN): an admin token, or one with the node and client rights needed")
    p.add_argument("--spawn", action="store_true", help="start a private Redis and one scheduler process")
    p.add_argument("--scheduler-arg", action="append", default=[], help="extra flag for the spawned scheduler")
    p.add_argument("--keep-log", action="store_true", help="keep the spawned scheduler's log (path in the report)")
    p.add_argument("--redis-url", default="", help="with --target: the scheduler's Redis, for the commands/s figure")
    p.add_argument("--streams", type=int, default=500, help="node streams to open")
    p.add_argument("--channels", type=int, default=8, help="shared channels the raw streams are spread over")
    p.add_argument("--sdk", action="store_true", help="one SDK Node (own channel) per stream instead")
    p.add_argument("--open-parallel", type=int, default=200, help="streams registering at once, at most")
    p.add_argument("--pairs", default="zh:en,en:zh,ja:en", help="pools, comma-separated src:tgt (round-robin)")
    p.add_argument("--concurrency", type=int, default=4, help="max_concurrency of each node")
    p.add_argument("--register-timeout", type=float, default=60.0, help="seconds all the streams may take to register")
    p.add_argument("--list-timeout", type=float, default=30.0, help="seconds to wait for ListNodes to show them all")
    p.add_argument("--idle-window", type=float, default=10.0,
                   help="seconds the idle Redis rate is measured over (default: a registry renewal period with the "
                        "default --node-ttl-ms, so the figure averages a renewal of every node in)")
    p.add_argument("--jobs", type=int, default=0, help="jobs to submit while the fleet is connected")
    p.add_argument("--rate", type=float, default=20.0, help="submits per second (0: as fast as possible)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds past the last planned submit (jobs/rate) the job phase may take")
    # This process holds as many streams as the scheduler: its own full garbage collections would show
    # up as dispatch latency (it timestamps the assignments), so it collects as the scheduler does.
    from lingua_scheduler.server.main import GC_THRESHOLDS

    gc.set_threshold(*GC_THRESHOLDS)
    return asyncio.run(main_task(p.parse_args()))


async def main_task(args: argparse.Namespace) -> int:
    """run(), cancelled by SIGTERM/SIGINT so that its cleanup stops the spawned scheduler and Redis."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run(args)
    except asyncio.CancelledError:
        print("stopped by a signal", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
