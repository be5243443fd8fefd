#!/usr/bin/env python3
"""Chaos run: many jobs through 3 scheduler processes and simulated nodes while things get killed.

The nodes are the Python SDK's Node (scripts/simulated.py), each given the three instances as one
target (it moves to the next when its instance dies, resuming its leases); submissions go through the
SDK's AsyncClient. Killed instances come back on the same port.

  python scripts/chaos.py --mode single  --jobs 5000 --nodes 8     # one Redis (AOF everysec)
  python scripts/chaos.py --mode cluster --jobs 5000 --nodes 8     # a 3-master Redis Cluster

During the run, over and over: SIGKILL a random scheduler instance and start it again, crash and
restart a random node (Node.abort(): its work is lost), cut a random node's stream (Node.disconnect():
it reconnects and resumes its leases); in single mode also restart Redis once
(a clean restart: Redis fsyncs its AOF on SHUTDOWN; see docs/deployment.md for what a crash can lose).
Clients retry a Submit that failed on another instance with the same idempotency key. After a cut,
the jobs the node was working on are also completed out of band, by a unary Complete with their lease
through the SDK's generated stub (lingua_sdk.pb_grpc): accepted while the lease holds, refused after.

At the end it checks, from Redis: every job is terminal; none is missing (each idempotency key has
exactly one job, and every id a client was given exists); every succeeded job has exactly one accepted
completion, from its last attempt and the node that held it; no queued count or held entry is left
(GetStats' figures: each job counted out exactly once); and it prints the table.
tests/test_chaos.py runs a shorter version on both Redis modes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import redis.asyncio as aioredis
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.app import connect_redis
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import history, last_error
from lingua_sdk import Assignment, AsyncClient, LinguaError, PermissionDenied, Unauthenticated, pb, pb_grpc
from lingua_sdk.node import Handler, Outcome
from redis_cluster import LocalCluster, free_ports
from simnode import open_channel
from simulated import Behaviour, SimulatedNode

PAIRS = [("zh", "en"), ("en", "zh"), ("ja", "en")]
TERMINAL = {b"succeeded", b"failed", b"cancelled", b"expired"}
FAST_FLAGS = ["--ack-timeout-ms", "2000", "--lease-ms", "2000", "--heartbeat-interval-ms", "500",
              "--stream-grace-ms", "1000", "--backoff-base-ms", "50", "--backoff-max-ms", "500",
              "--avoid-ms", "500", "--sweep-interval-ms", "100", "--poll-interval-ms", "200",
              "--shutdown-grace-s", "0.5", "--partitions", "4"]


@dataclass
class Instance:
    proc: asyncio.subprocess.Process
    address: str


def tracking(inner: Handler, working: dict[str, pb.JobLease]) -> Handler:
    """The handler, noting the lease of each job while it runs (for the out-of-band late Complete)."""

    async def handle(a: Assignment) -> Outcome:
        working[a.job_id] = pb.JobLease(job_id=a.job_id, attempt=a.attempt, lease_token=a.proto.lease_token)
        try:
            return await inner(a)
        finally:
            working.pop(a.job_id, None)

    return handle


@dataclass
class Report:
    submitted: int = 0
    given_ids: int = 0
    succeeded: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    other_terminal: dict[str, int] = field(default_factory=dict)
    not_terminal: int = 0
    missing: int = 0
    duplicates: int = 0
    retried_jobs: int = 0
    requeues: int = 0
    refused_completions: int = 0
    late_accepted: int = 0
    auth_refused: int = 0  # out-of-band calls refused UNAUTHENTICATED / PERMISSION_DENIED: a bad --token
    bad_completions: int = 0
    counts_left: int = 0  # queued counts and held entries left once every job ended (GetStats' figures)
    longest_to_terminal_s: float = 0.0
    instance_kills: int = 0
    node_crashes: int = 0
    stream_closes: int = 0
    redis_restarts: int = 0
    submit_retries: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.not_terminal == 0 and self.missing == 0 and self.duplicates == 0 and self.bad_completions == 0
                and self.auth_refused == 0 and self.given_ids == self.submitted
                and (self.counts_left == 0 or self.not_terminal > 0))

    def table(self, mode: str) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed_by_reason.items())) or "0"
        rows = [
            ("Redis mode", mode),
            ("jobs submitted (distinct idempotency keys)", self.submitted),
            ("job ids the clients were given", self.given_ids),
            ("succeeded", self.succeeded),
            ("failed, by reason", failed),
            ("other terminal", ", ".join(f"{k} {v}" for k, v in self.other_terminal.items()) or "0"),
            ("not terminal at the end", self.not_terminal),
            ("missing", self.missing),
            ("duplicate jobs for one key", self.duplicates),
            ("jobs retried (attempt > 1)", self.retried_jobs),
            ("requeues (fail / lease_expired / node_lost / unavailable)", self.requeues),
            ("late completions accepted (lease still held)", self.late_accepted),
            ("late or duplicate completions refused", self.refused_completions),
            ("late completions refused by auth (must be 0)", self.auth_refused),
            ("succeeded jobs without exactly one accepted completion from the last attempt", self.bad_completions),
            ("queued counts and held entries left, every job ended (must be 0)", self.counts_left),
            ("longest submit -> terminal", f"{self.longest_to_terminal_s:.2f} s"),
            ("scheduler SIGKILLs / node crashes / streams cut / Redis restarts",
             f"{self.instance_kills} / {self.node_crashes} / {self.stream_closes} / {self.redis_restarts}"),
            ("Submit calls retried on another instance", self.submit_retries),
            ("wall time", f"{self.seconds:.1f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join([f"| {'':{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
                         + [f"| {k:{width}} | {v} |" for k, v in rows])


class Chaos:
    def __init__(self, mode: str, jobs: int, nodes: int, seed: int, workdir: Path, quiet: bool = False,
                 rate: float = 250.0, token: str | None = None) -> None:
        self.mode, self.jobs, self.node_count, self.rate = mode, jobs, nodes, rate
        self.token = token  # sent by every client and node (instances read LINGUA_AUTH_JWT_KEY from the environment)
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.quiet = quiet
        self.redis: EmbeddedRedis | None = None
        self.cluster: LocalCluster | None = None
        self.instances: list[Instance] = []
        self.report = Report()
        self.ids: dict[int, str] = {}
        self.ports: list[int] = []
        self.nodes: dict[str, SimulatedNode] = {}
        self.working: dict[str, dict[str, pb.JobLease]] = {}  # node id -> job id -> lease, while handled
        self.refused_completions = 0
        self.auth_refused = 0
        self.refused: LinguaError | None = None  # a node's token was refused: the run cannot finish
        self.done = asyncio.Event()
        self.late: set[asyncio.Task[None]] = set()

    def log(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- the pieces -----------------------------------------------------------------------------

    def redis_flags(self) -> list[str]:
        if self.cluster is not None:
            return ["--redis-cluster", self.cluster.seeds]
        assert self.redis is not None
        return ["--redis-url", self.redis.url]

    async def start_instance(self, port: int) -> Instance:
        log = self.workdir / f"instance-{port}.log"  # appended to by each start on this port
        with log.open("ab") as err:
            offset = err.tell()  # this start's lines begin here
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lingua_scheduler.server",
                "--http-listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}", *self.redis_flags(),
                *FAST_FLAGS, stdout=asyncio.subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        except TimeoutError:
            line = "(nothing within 30 s)"
        if "listening on" not in line:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already
                proc.kill()
            await proc.wait()
            with log.open("rb") as f:
                f.seek(offset)
                tail = f.read().decode(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"scheduler did not start: {line!r}; its log ends: {tail}")
        return Instance(proc, line.rsplit(" ", 1)[-1].strip())

    def live(self) -> list[Instance]:
        return [i for i in self.instances if i.proc.returncode is None]

    async def run_node(self, n: int, pairs: list[tuple[str, str]]) -> None:
        """Keep one node process running; after a crash, a new one starts (same node id). Its target
        lists the three instances, starting at a different one per node to spread the streams."""
        node_id = f"node-{n}"
        behaviour = Behaviour(processing_s=lambda: self.rng.uniform(0, 0.05), fail_rate=0.03,
                              rng=random.Random(self.rng.random()))
        ring = self.ports[n % 3:] + self.ports[:n % 3]
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ring)
        working = self.working.setdefault(node_id, {})
        while not self.done.is_set():
            node = SimulatedNode(target, node_id, pairs, 4, behaviour, token=self.token)
            node.node.handler = tracking(node.node.handler, working)
            try:
                await node.start(timeout=30)
                self.nodes[node_id] = node
                done = asyncio.create_task(self.done.wait())
                assert node.task is not None
                await asyncio.wait({done, node.task}, return_when=asyncio.FIRST_COMPLETED)  # done, or crashed
                done.cancel()
            except (Unauthenticated, PermissionDenied) as err:  # a bad --token: retrying cannot help
                self.refused = err
                return
            except Exception as err:
                self.log(f"{node_id}: {err!r}")
            finally:
                self.nodes.pop(node_id, None)
                with contextlib.suppress(Exception):
                    await node.crash()
                working.clear()
                self.refused_completions += node.node.refused_results
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))

    async def submit_all(self) -> None:
        """Batches of 25 at `rate` jobs/s, each batch retried on another instance until it is accepted."""
        batch = 25
        began = time.monotonic()
        for start in range(0, self.jobs, batch):
            await asyncio.sleep(max(0.0, began + start / self.rate - time.monotonic()))
            specs = []
            for i in range(start, min(self.jobs, start + batch)):
                src, tgt = PAIRS[i % len(PAIRS)]
                specs.append(pb.JobSpec(tenant_id="chaos", session_id=f"s{i % 97}", utterance_index=i,
                                        src_lang=src, tgt_lang=tgt, idempotency_key=f"chaos-{i}",
                                        payload_ref=f"session://s{i % 97}/{i}", max_attempts=5))
            while True:
                live = self.live()
                if not live:
                    await asyncio.sleep(0.1)
                    continue
                try:
                    async with AsyncClient(self.rng.choice(live).address, timeout=5, token=self.token) as client:
                        results = await client.submit_many(specs)
                    break
                except (Unauthenticated, PermissionDenied):
                    raise  # a bad --token: retrying on another instance cannot help
                except LinguaError:
                    self.report.submit_retries += 1
                    await asyncio.sleep(0.1)
            for i, result in zip(range(start, start + len(specs)), results, strict=True):
                self.ids[i] = result.job_id
            self.report.submitted = len(self.ids)

    async def chaos_loop(self, stop: asyncio.Event) -> None:
        restarted_redis = self.mode == "cluster"
        # Each kind of chaos once first (0.1: an instance killed, 0.5: a node crashed, 0.9: a stream cut),
        # so a short run sees every kind however fast its jobs finish; then at random.
        first = [0.1, 0.5, 0.9]
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.3, 0.9))
            if not restarted_redis and self.report.submitted > self.jobs // 2:
                restarted_redis = True
                await self.restart_redis()
                continue
            roll = first.pop(0) if first else self.rng.random()
            if roll < 0.35:
                victim = self.rng.choice(self.instances)
                if victim.proc.returncode is None:
                    victim.proc.kill()
                    await victim.proc.wait()
                    self.report.instance_kills += 1
                    self.log(f"SIGKILL scheduler {victim.address}")
                    port = int(victim.address.rsplit(":", 1)[1])
                    self.instances[self.instances.index(victim)] = await self.start_instance(port)
            elif roll < 0.7 and self.nodes:
                node = self.nodes.get(self.rng.choice(list(self.nodes)))
                if node is not None:
                    self.report.node_crashes += 1
                    await node.crash()  # run_node starts a new process
            elif self.nodes:
                node = self.nodes.get(self.rng.choice(list(self.nodes)))
                if node is not None and node.node.instance_id is not None:
                    self.report.stream_closes += 1
                    unfinished = list(self.working.get(node.node_id, {}).values())
                    node.node.disconnect()  # the stream is cut; the node reconnects and resumes its leases
                    # ...and what it was working on is also completed out of band, by unary Complete on
                    # any instance: accepted while the lease holds, refused once the job moved on.
                    for lease in unfinished:
                        task = asyncio.create_task(self.late_complete(node.node_id, lease))
                        self.late.add(task)
                        task.add_done_callback(self.late.discard)

    async def late_complete(self, node_id: str, lease: pb.JobLease) -> None:
        await asyncio.sleep(self.rng.uniform(0.0, 1.5))
        live = self.live()
        if not live:
            return
        try:
            async with open_channel(self.rng.choice(live).address, self.token) as ch:
                await pb_grpc.SchedulerStub(ch).Complete(pb.CompleteRequest(
                    job_id=lease.job_id, attempt=lease.attempt, lease_token=lease.lease_token, node_id=node_id,
                    result=pb.JobResult(text_asr="late", extra={"node": node_id})), timeout=5)
            self.report.late_accepted += 1
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self.refused_completions += 1
            elif err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self.auth_refused += 1  # counted, not swallowed: the run would check nothing out of band

    async def restart_redis(self) -> None:
        assert self.redis is not None
        self.log("restarting Redis (SHUTDOWN: AOF fsynced)")
        self.redis.stop()
        self.redis.start()
        self.report.redis_restarts += 1

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> Report:
        started = time.monotonic()
        if self.mode == "cluster":
            self.cluster = LocalCluster(self.workdir / "cluster", masters=3, persistent=True).start()
        else:
            self.redis = EmbeddedRedis(self.workdir / "redis", persistent=True).start()
        tasks: list[asyncio.Task[None]] = []
        try:
            self.ports = free_ports(3)
            self.instances = [await self.start_instance(port) for port in self.ports]
            runners = [asyncio.create_task(self.run_node(n, [PAIRS[n % 3], PAIRS[(n + 1) % 3]]))
                       for n in range(self.node_count)]
            stop_chaos = asyncio.Event()
            chaos = asyncio.create_task(self.chaos_loop(stop_chaos))
            tasks = [*runners, chaos]
            await self.submit_all()
            self.log(f"all {self.jobs} submitted")
            await self.wait_terminal(stop_chaos, timeout=120 + self.jobs / 50)
            stop_chaos.set()
            await chaos
            self.done.set()
            await asyncio.gather(*runners, return_exceptions=True)
            await self.verify()
        finally:
            # A run cut short (an exception) stops its chaos first: a Redis restart it made after the
            # Redis below was stopped would outlive the run.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for instance in self.instances:
                if instance.proc.returncode is None:
                    instance.proc.terminate()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(instance.proc.wait(), 10)
            if self.cluster is not None:
                self.cluster.stop()
            if self.redis is not None:
                self.redis.stop()
        self.report.seconds = time.monotonic() - started
        return self.report

    def store_settings(self) -> Settings:
        if self.cluster is not None:
            return Settings(redis_cluster=self.cluster.seeds)
        assert self.redis is not None
        return Settings(redis_url=self.redis.url)

    async def wait_terminal(self, stop_chaos: asyncio.Event, timeout: float) -> None:
        """Poll the job records until every job is terminal; chaos stops at 80% so the tail can drain."""
        client = connect_redis(self.store_settings())
        deadline = time.monotonic() + timeout
        pending = list(self.ids.values())
        try:
            while pending and time.monotonic() < deadline:
                if self.refused is not None:
                    raise self.refused
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for job_id in pending:
                            pipe.hget(keys.JobKeys.of(job_id).fsm, "state")
                        states = await pipe.execute()
                except Exception:
                    await asyncio.sleep(0.2)
                    continue
                pending = [j for j, s in zip(pending, states, strict=True) if s not in TERMINAL]
                if len(pending) < 0.2 * len(self.ids):
                    stop_chaos.set()
                await asyncio.sleep(0.25)
        finally:
            await client.aclose()

    async def scan(self, pattern: str) -> list[bytes]:
        """Every key matching `pattern` on every Redis server (each cluster primary scanned directly)."""
        urls = ([f"redis://127.0.0.1:{p}" for p in self.cluster.ports] if self.cluster is not None
                else [self.redis.url] if self.redis is not None else [])
        found: list[bytes] = []
        for url in urls:
            client = aioredis.from_url(url)
            found += [k async for k in client.scan_iter(match=pattern, count=1000)]
            await client.aclose()
        return found

    async def verify(self) -> None:
        r, rep = self.report, self.report
        client = connect_redis(self.store_settings())
        try:
            rep.given_ids = len(set(self.ids.values()))
            fsm_keys = await self.scan("lingua:v1:job:*:fsm")
            rep.duplicates = len(fsm_keys) - len(set(self.ids.values()))
            for job_id in self.ids.values():
                jk = keys.JobKeys.of(job_id)
                h = await client.hgetall(jk.fsm)
                if not h:
                    rep.missing += 1
                    continue
                state = h[b"state"]
                events = history(h)
                if state not in TERMINAL:
                    rep.not_terminal += 1
                    continue
                first, last = events[0]["t"], events[-1]["t"]
                rep.longest_to_terminal_s = max(rep.longest_to_terminal_s, (last - first) / 1000)
                if int(h[b"att"]) > 1:
                    rep.retried_jobs += 1
                rep.requeues += sum(1 for e in events if e["s"] == "queued" and e["e"] != "submit")
                if state == b"succeeded":
                    r.succeeded += 1
                    completes = [e for e in events if e["e"] == "complete"]
                    assigns = [e for e in events if e["e"] == "assign"]
                    stored = wire.joined(h, b"r")  # a short result is in the record, a long one in its key
                    result = pb.JobResult.FromString(stored if stored is not None else await client.get(jk.result) or b"")
                    if (len(completes) != 1 or completes[0]["a"] != int(h[b"att"]) or assigns[-1]["n"] != completes[0]["n"]
                            or result.extra.get("node") != completes[0]["n"]):
                        rep.bad_completions += 1
                elif state == b"failed":
                    code = last_error(h)[0] or "?"
                    rep.failed_by_reason[code] = rep.failed_by_reason.get(code, 0) + 1
                else:
                    rep.other_terminal[state.decode()] = rep.other_terminal.get(state.decode(), 0) + 1
            # Every job ended: GetStats' queued counts (keys.PartitionKeys.queued) and held zsets must be empty
            # (each job counted out of QUEUED, and out of ASSIGNED/RUNNING, exactly once, whatever was killed).
            for key in await self.scan("lingua:v1:queued:*"):
                rep.counts_left += sum(int(v) for v in await client.hvals(key))
            for key in await self.scan("lingua:v1:held:*"):
                rep.counts_left += await client.zcard(key)
            rep.refused_completions += self.refused_completions
            rep.auth_refused = self.auth_refused
        finally:
            await client.aclose()




async def chaos_run(mode: str, jobs: int, nodes: int, seed: int = 1, quiet: bool = False,
                    rate: float = 250.0, token: str | None = None) -> Report:
    with tempfile.TemporaryDirectory(prefix="lingua-chaos-") as tmp:
        return await Chaos(mode, jobs, nodes, seed, Path(tmp), quiet, rate, token).run()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["single", "cluster"], default="single")
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=250.0, help="jobs submitted per second")
    p.add_argument("--token", default=os.environ.get("LINGUA_TOKEN"),
                   help="bearer token (env LINGUA_TOKEN), an admin one; the instances started here read "
                        "LINGUA_AUTH_JWT_KEY from the environment")
    args = p.parse_args()
    report = asyncio.run(chaos_run(args.mode, args.jobs, args.nodes, args.seed, rate=args.rate, token=args.token))
    print(report.table(args.mode))
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
