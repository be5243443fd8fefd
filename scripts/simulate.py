#!/usr/bin/env python3
"""Node simulator: N simulated nodes (the Python SDK's Node with a simulated handler), and optionally
a client (the SDK's AsyncClient) submitting jobs.

Examples (see README):
  # three nodes against a running scheduler, until Ctrl-C
  python scripts/simulate.py --target 127.0.0.1:50051 --nodes 3 --pairs zh:en,en:zh
  # the same, and submit 500 jobs at 20/s, then print dispatch latency and outcomes
  python scripts/simulate.py --target 127.0.0.1:50051 --nodes 3 --jobs 500 --rate 20
  # start its own Redis and 2 scheduler processes first
  python scripts/simulate.py --spawn 2 --nodes 4 --jobs 2000 --rate 200 --fail-rate 0.05 --crash-rate 0.01

Dispatch latency is submit (just before the Submit call) to the node's handler receiving the
assignment, both clocks in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_sdk import Assignment, AsyncClient, JobSpec, JobState
from simulated import Behaviour, SimulatedNode


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Stats:
    submitted_at: dict[tuple[str, int], float] = field(default_factory=dict)
    dispatch_ms: list[float] = field(default_factory=list)
    first_seen: set[tuple[str, int]] = field(default_factory=set)

    def on_receive(self, a: Assignment, at: float) -> None:
        key = (a.proto.spec.session_id, a.proto.spec.utterance_index)
        t0 = self.submitted_at.get(key)
        if t0 is not None and key not in self.first_seen:
            self.first_seen.add(key)
            self.dispatch_ms.append((at - t0) * 1000)


def spawn_schedulers(count: int, redis_url: str, extra: list[str]) -> list[tuple[subprocess.Popen[bytes], str]]:
    procs = []
    for _ in range(count):
        proc = subprocess.Popen(
            [sys.executable, "-m", "lingua_scheduler.server",
            "--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--redis-url", redis_url,
             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"scheduler did not start: {line!r}")
        procs.append((proc, line.rsplit(" ", 1)[-1].strip()))
    return procs


class Fleet:
    """Simulated nodes that crash at random (Node.abort()) and come back after a pause, as a new
    process would; the first --silent-nodes never heartbeat (Node.silent)."""

    def __init__(self, targets: list[str], args: argparse.Namespace, stats: Stats) -> None:
        self.targets = targets
        self.args = args
        self.stats = stats
        self.rng = random.Random(args.seed)
        self.nodes: list[SimulatedNode] = []
        self.crashes = 0

    def behaviour(self) -> Behaviour:
        a, rng = self.args, self.rng
        mean, sd = a.proc_ms
        return Behaviour(processing_s=lambda: max(0.0, rng.gauss(mean, sd)) / 1000, fail_rate=a.fail_rate,
                         fatal_rate=a.fatal_rate, unavailable_rate=a.unavailable_rate, rng=random.Random(rng.random()))

    def make(self, i: int, target: str, pairs: list[tuple[str, str]], behaviour: Behaviour) -> SimulatedNode:
        node_id = f"sim-{i}"
        node = SimulatedNode(target, node_id, pairs, self.args.concurrency, behaviour, token=self.args.token,
                             on_receive=lambda a, at: self._on_receive(i, a, at))
        node.node.silent = i < self.args.silent_nodes
        return node

    async def start(self) -> None:
        pairs = [(s, t) for s, t in (p.split(":") for p in self.args.pairs.split(","))]
        for i in range(self.args.nodes):
            served = [pairs[(i + k) % len(pairs)] for k in range(min(len(pairs), 2))] or pairs
            node = self.make(i, self.targets[i % len(self.targets)], served, self.behaviour())
            self.nodes.append(await node.start())

    def _on_receive(self, i: int, a: Assignment, at: float) -> None:
        self.stats.on_receive(a, at)
        if self.rng.random() < self.args.crash_rate:
            asyncio.get_running_loop().create_task(self._crash_and_return(i))

    async def _crash_and_return(self, i: int) -> None:
        node = self.nodes[i]
        if node.task is None or node.task.done():
            return  # crashed already
        self.crashes += 1
        await node.crash()
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        fresh = self.make(i, self.rng.choice(self.targets), node.pairs, node.behaviour)
        self.nodes[i] = fresh
        with contextlib.suppress(Exception):
            await fresh.start()

    async def stop(self) -> None:
        """Drain every node (Node.stop())."""
        await asyncio.gather(*(node.stop() for node in self.nodes))


async def submit_and_wait(targets: list[str], args: argparse.Namespace, stats: Stats) -> dict[str, Any]:
    clients = [AsyncClient(t, token=args.token) for t in targets]
    pairs = [p.split(":") for p in args.pairs.split(",")]
    ids: list[str] = []
    started = time.perf_counter()
    interval = 1 / args.rate if args.rate else 0
    for i in range(args.jobs):
        session, utt = f"sess-{i % max(1, args.sessions)}", i
        src, tgt = pairs[i % len(pairs)]
        spec = JobSpec(tenant_id="sim", session_id=session, utterance_index=utt, src_lang=src, tgt_lang=tgt,
                       payload_ref=f"session://{session}/{utt}", max_attempts=args.max_attempts)
        stats.submitted_at[(session, utt)] = time.perf_counter()
        ids += [r.job_id for r in await clients[i % len(clients)].submit_many([spec])]
        if interval:
            await asyncio.sleep(max(0.0, started + (i + 1) * interval - time.perf_counter()))
    outcome: dict[JobState, int] = {}
    deadline = time.monotonic() + args.timeout
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        still = []
        for job_id in pending:
            job = await clients[0].get(job_id)
            if job.state.terminal:
                outcome[job.state] = outcome.get(job.state, 0) + 1
            else:
                still.append(job_id)
        pending = still
        if pending:
            await asyncio.sleep(0.2)
    for client in clients:
        await client.close()
    return {"outcome": outcome, "unfinished": len(pending), "seconds": time.perf_counter() - started}


async def run(args: argparse.Namespace) -> int:
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    redis: EmbeddedRedis | None = None
    targets = args.target.split(",") if args.target else []
    if args.spawn:
        redis = EmbeddedRedis(tempfile.mkdtemp(prefix="lingua-sim-"), persistent=False).start()
        procs = spawn_schedulers(args.spawn, redis.url, args.scheduler_arg)
        targets = [addr for _, addr in procs]
    if not targets:
        print("give --target HOST:PORT[,HOST:PORT] or --spawn N", file=sys.stderr)
        return 2
    stats = Stats()
    fleet = Fleet(targets, args, stats)
    try:
        await fleet.start()
        print(f"{len(fleet.nodes)} simulated nodes on {', '.join(targets)}", flush=True)
        if not args.jobs:
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            return 0
        result = await submit_and_wait(targets, args, stats)
        d = stats.dispatch_ms
        order = list(JobState)
        print(f"jobs: {args.jobs} in {result['seconds']:.1f} s; outcome: "
              + ", ".join(f"{s} {n}" for s, n in sorted(result["outcome"].items(), key=lambda kv: order.index(kv[0])))
              + (f"; unfinished {result['unfinished']}" if result["unfinished"] else ""))
        print(f"dispatch latency (submit -> handler receives), ms: p50 {percentile(d, 50):.2f}  "
              f"p99 {percentile(d, 99):.2f}  max {max(d, default=float('nan')):.2f}  (n={len(d)})")
        print(f"node crashes simulated: {fleet.crashes}")
        return 0 if not result["unfinished"] else 1
    finally:
        await fleet.stop()
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            proc.wait(30)
            if proc.stdout:
                proc.stdout.close()
        if redis is not None:
            redis.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=os.environ.get("LINGUA_TARGET", ""), help="scheduler address(es), comma-separated")
    p.add_argument("--token", default=os.environ.get("LINGUA_TOKEN"),
                   help="bearer token (env LINGUA_TOKEN): an admin token, or one with the node and client rights needed")
    p.add_argument("--spawn", type=int, default=0, help="start an embedded Redis and this many scheduler processes")
    p.add_argument("--scheduler-arg", action="append", default=[], help="extra flag for spawned schedulers")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--pairs", default="zh:en,en:zh,ja:en", help="pools, comma-separated src:tgt")
    p.add_argument("--concurrency", type=int, default=4, help="max_concurrency of each node")
    p.add_argument("--proc-ms", type=lambda s: tuple(float(x) for x in s.split(",")), default=(20.0, 5.0),
                   help="processing time: mean,stddev in ms (normal, clipped at 0)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of attempts failing (retryable)")
    p.add_argument("--fatal-rate", type=float, default=0.0, help="share of attempts failing for good")
    p.add_argument("--unavailable-rate", type=float, default=0.0, help="share answered 'model not available'")
    p.add_argument("--crash-rate", type=float, default=0.0,
                   help="chance per assignment that its node crashes (and comes back as a new process)")
    p.add_argument("--silent-nodes", type=int, default=0,
                   help="this many nodes never heartbeat (stream open): their long jobs lose the lease")
    p.add_argument("--jobs", type=int, default=0, help="submit this many jobs (0: nodes only, until Ctrl-C)")
    p.add_argument("--rate", type=float, default=20.0, help="submits per second (0: as fast as possible)")
    p.add_argument("--sessions", type=int, default=50, help="distinct sessions the jobs are spread over")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every job to finish")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
