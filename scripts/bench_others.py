#!/usr/bin/env python3
"""The same trivial job through RQ, arq, Celery or BullMQ on a given Redis: enqueue N, drain, read results.

  python scripts/bench_others.py rq|arq|celery|bullmq [--tuned] --redis-url redis://127.0.0.1:PORT/0 --jobs 2000

Each system runs at its defaults or, with --tuned, at its best documented settings for speed (SETTINGS
names them). Prints one JSON line: jobs/s (first enqueue to last result read back), drain jobs/s, the
enqueue -> result latency p50/p99, and per job: Redis CPU (INFO cpu), Redis commands (INFO
commandstats; the bench's own INFO calls left out), and the system's own CPU, its worker processes' and
its client's (the enqueueing and result-reading process), all counted from the first enqueue to the
last result. Run by scripts/bench.py (arq from its own virtualenv, .venv-arq, made by ensure_arq: it needs
redis-py < 6, the scheduler >= 8; BullMQ with Node.js from scripts/bench_bullmq, `npm ci` there on
first use by ensure_bullmq). Flushes that Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BULLMQ = HERE / "bench_bullmq"
TICK = os.sysconf("SC_CLK_TCK")
WORKERS = 2  # worker processes for the Python systems; BullMQ runs one Node.js process

# (system, tuned) -> the settings, as the reports name them.
SETTINGS = {
    ("rq", False): "2 workers, `rq worker` (forks a work horse per job)",
    ("rq", True): "2 workers, `rq worker --worker-class rq.SimpleWorker` (no fork)",
    ("arq", False): "2 workers, poll_delay 0.5 s, max_jobs 10",
    ("arq", True): "2 workers, poll_delay 0.01 s, max_jobs 100",
    ("celery", True): "2 workers `--pool solo`, prefetch multiplier 16, acks early, without gossip/mingle/heartbeat",
    ("bullmq", False): "1 Node.js worker, concurrency 1",
    ("bullmq", True): "1 Node.js worker, concurrency 50",
}
BULLMQ_CONCURRENCY = {False: 1, True: 50}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def summary(jobs: int, started: float, ends: list[float], lat_ms: list[float]) -> dict[str, float]:
    """jobs/s from the first enqueue to the last result; drain jobs/s between the first and last
    finish (the workers' own pace); enqueue -> finished latency."""
    return {"jobs": len(ends), "jobs_per_s": jobs / (max(ends) - started),
            "drain_per_s": (jobs - 1) / max(1e-9, max(ends) - min(ends)),
            "p50_ms": percentile(lat_ms, 50), "p99_ms": percentile(lat_ms, 99)}


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (RQ's work horses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICK


class Meter:
    """Counters read before and after a run: Redis CPU and commands, the workers' CPU and, unless the
    client is another process that reports its own, this process's CPU."""

    def __init__(self, url: str, pids: list[int]) -> None:
        from redis import Redis

        self.redis, self.pids = Redis.from_url(url), pids

    def read(self) -> dict[str, float]:
        stats, cpu = self.redis.info("commandstats"), self.redis.info("cpu")
        out = {"commands": sum(float(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"),
               "redis_cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
               "worker_cpu": sum(process_cpu(p) for p in self.pids), "client_cpu": time.process_time()}
        return out

    @contextmanager
    def measure(self, result: dict[str, float]) -> Iterator[None]:
        """Fills result (which the block gives "jobs", and "client_cpu_s" when its client is another
        process) with the per-job figures in microseconds."""
        before = self.read()
        yield
        after = self.read()
        jobs = result["jobs"]
        delta = {k: after[k] - before[k] for k in after}
        client = result.pop("client_cpu_s", delta["client_cpu"])
        result.update({
            "redis_cpu_us": delta["redis_cpu"] / jobs * 1e6, "commands": delta["commands"] / jobs,
            "worker_cpu_us": delta["worker_cpu"] / jobs * 1e6, "client_cpu_us": client / jobs * 1e6,
            "system_cpu_us": (delta["worker_cpu"] + client) / jobs * 1e6})
        self.redis.close()


def workers(argv: list[str], ready: str | None = None, count: int = WORKERS) -> list[subprocess.Popen[bytes]]:
    """Starts the worker processes; with `ready`, waits until each has printed a line containing it."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    procs = [subprocess.Popen(argv, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(count)]
    for p in procs:
        wait_line(p, ready) if ready else drain(p)
    return procs


def drain(proc: subprocess.Popen[bytes]) -> None:
    """Reads and drops the process's output in a thread, so it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()


def wait_line(proc: subprocess.Popen[bytes], text: str, timeout: float = 60) -> None:
    """Reads the process's output until a line contains text (its readiness signal), then drains the rest."""
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            raise RuntimeError(f"{proc.args} exited before {text!r}: {''.join(seen[-20:])}")
        seen.append(line)
        if text in line:
            drain(proc)
            return
    raise RuntimeError(f"{proc.args} not ready within {timeout} s: {''.join(seen[-20:])}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def bench_rq(url: str, jobs: int, tuned: bool) -> dict[str, float]:
    import bench_tasks
    from redis import Redis
    from rq import Queue, Worker

    conn = Redis.from_url(url)
    queue = Queue("bench", connection=conn)
    argv = [sys.executable, "-m", "rq.cli", "worker", "--url", url, "bench"]
    procs = workers(argv + ["--worker-class", "rq.SimpleWorker"] * tuned)
    try:
        # Worker.count builds Worker objects, which set a socket timeout on the connection they are given:
        # a connection of its own, so the blocking result reads below keep none.
        count = Redis.from_url(url)
        until(lambda: Worker.count(connection=count, queue=queue) == WORKERS, 60, "the RQ workers to register")
        result: dict[str, float] = {"jobs": jobs}
        with Meter(url, [p.pid for p in procs]).measure(result):
            started = time.time()
            enqueued = queue.enqueue_many([Queue.prepare_data(bench_tasks.noop, args=(i,), result_ttl=600)
                                           for i in range(jobs)])
            # latest_result(timeout) blocks on the job's result stream until the result is there (2 s at
            # a time: redis-py's socket timeout is longer).
            results = []
            for j in enqueued:
                while (r := j.latest_result(timeout=2)) is None:
                    pass
                results.append(r)
            assert all(r is not None and r.return_value == i for i, r in enumerate(results)), "wrong RQ results"
            finished = [r.created_at for r in results]  # type: ignore[union-attr]
            lat = [(f - j.enqueued_at).total_seconds() * 1000 for f, j in zip(finished, enqueued, strict=True)]
            result.update(summary(jobs, started, [f.timestamp() for f in finished], lat))
        return result
    finally:
        stop(procs)


def bench_celery(url: str, jobs: int, tuned: bool) -> dict[str, float]:
    assert tuned, "Celery runs only with the settings it always ran with (SETTINGS)"
    os.environ["LINGUA_BENCH_REDIS"] = url
    import bench_tasks

    procs = workers([sys.executable, "-m", "celery", "-A", "bench_tasks", "worker", "--concurrency", "1",
                     "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", "bench"])
    try:
        app = bench_tasks.celery_app()
        while len(app.control.ping(timeout=0.5) or []) < WORKERS:
            pass  # ping waits up to 0.5 s for the workers' replies
        result: dict[str, float] = {"jobs": jobs}
        with Meter(url, [p.pid for p in procs]).measure(result):
            started = time.time()
            results = [bench_tasks.celery_noop.apply_async((time.time(),), queue="bench") for _ in range(jobs)]
            done = [r.get(timeout=300) for r in results]
            lat = [(end - t0) * 1000 for t0, end in done]
            result.update(summary(jobs, started, [end for _, end in done], lat))
        return result
    finally:
        stop(procs)


def bench_arq(url: str, jobs: int, tuned: bool) -> dict[str, float]:
    os.environ["LINGUA_BENCH_REDIS"] = url
    from arq import create_pool
    from arq.connections import RedisSettings

    settings = "bench_tasks.ArqTuned" if tuned else "bench_tasks.ArqSettings"
    procs = workers([sys.executable, "-m", "arq", settings], ready="redis_version=")  # logged once connected

    async def run() -> dict[str, float]:
        pool = await create_pool(RedisSettings.from_dsn(url))
        try:
            started = time.time()
            queued = [await pool.enqueue_job("arq_noop", i) for i in range(jobs)]
            infos = []
            for job in queued:  # each result in turn (Job.result polls; 0.02 s apart, not its 0.5 s)
                await job.result(timeout=300, poll_delay=0.02)
                infos.append(await job.result_info())
            assert all(i.result == n for n, i in enumerate(infos)), f"wrong arq results: {infos[:3]}"
            lat = [(i.finish_time - i.enqueue_time).total_seconds() * 1000 for i in infos]
            return summary(jobs, started, [i.finish_time.timestamp() for i in infos], lat)
        finally:
            await pool.aclose()

    try:
        result: dict[str, float] = {"jobs": jobs}
        with Meter(url, [p.pid for p in procs]).measure(result):
            result.update(asyncio.run(run()))
        return result
    finally:
        stop(procs)


def ensure_arq(venv: Path = HERE.parent / ".venv-arq") -> str:
    """The python of arq's own virtualenv (arq pins redis-py < 6, the scheduler >= 8), made on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([os.environ.get("PYTHON", "python3"), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "arq>=0.26"], check=True)
    return str(python)


def ensure_bullmq() -> None:
    """npm ci in scripts/bench_bullmq when node_modules is missing or came from another package-lock.json."""
    if not shutil.which("node") or not shutil.which("npm"):
        raise RuntimeError("BullMQ needs Node.js 20+ (node and npm on PATH)")
    stamp = BULLMQ / "node_modules" / ".lingua-lock"
    want = hashlib.sha256((BULLMQ / "package-lock.json").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BULLMQ, check=True,
                       stdout=subprocess.DEVNULL)
        stamp.write_text(want)


def bench_bullmq(url: str, jobs: int, tuned: bool) -> dict[str, float]:
    ensure_bullmq()
    procs = [subprocess.Popen(["node", "worker.js", url, str(BULLMQ_CONCURRENCY[tuned])], cwd=BULLMQ,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    producer = subprocess.Popen(["node", "producer.js", url, str(jobs)], cwd=BULLMQ, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
    procs.append(producer)
    try:
        wait_line(procs[0], "ready")
        assert producer.stdout is not None and producer.stdin is not None
        if producer.stdout.readline().strip() != b"ready":
            raise RuntimeError("the BullMQ producer did not start")
        result: dict[str, Any] = {"jobs": jobs}
        with Meter(url, [procs[0].pid]).measure(result):
            producer.stdin.write(b"go\n")
            producer.stdin.flush()
            out = json.loads(producer.stdout.readline())
            if out["wrong"] or len(out["ends"]) != jobs:
                raise RuntimeError(f"BullMQ: {out['wrong']} wrong results, {len(out['ends'])} of {jobs}")
            result.update(summary(jobs, out["started"], out["ends"], out["lat_ms"]))
            result["client_cpu_s"] = out["cpu_s"]
        result["version"] = out["version"]
        return result
    finally:
        stop(procs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=["rq", "celery", "arq", "bullmq"])
    p.add_argument("--tuned", action="store_true", help="the system's best documented settings (SETTINGS)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--jobs", type=int, default=2000)
    args = p.parse_args()
    tuned = args.tuned or args.system == "celery"
    sys.path.insert(0, str(HERE))
    from redis import Redis

    Redis.from_url(args.redis_url).flushall()  # the bench's own Redis: each system starts on an empty one
    run = {"rq": bench_rq, "celery": bench_celery, "arq": bench_arq, "bullmq": bench_bullmq}[args.system]
    result: dict[str, Any] = run(args.redis_url, args.jobs, tuned)
    if "version" not in result:
        import importlib.metadata as md

        result["version"] = md.version(args.system)
    result.update(system=args.system, mode="tuned" if tuned else "default", settings=SETTINGS[(args.system, tuned)])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
