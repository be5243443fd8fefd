#!/usr/bin/env python3
"""The same trivial job through RQ, arq or Celery on a given Redis: enqueue N, drain with two workers.

  python scripts/bench_others.py rq|celery|arq --redis-url redis://127.0.0.1:PORT/0 --jobs 2000

Prints one JSON line: jobs/s (first enqueue to last result) and enqueue -> finished latency p50/p99.
Run by scripts/bench.py (arq from its own virtualenv: it needs redis-py < 6, the scheduler >= 8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def summary(jobs: int, started: float, ends: list[float], lat_ms: list[float]) -> dict[str, float]:
    """jobs/s from the first enqueue to the last result; drain jobs/s between the first and last
    finish (the workers' own pace); enqueue -> finished latency."""
    return {"jobs_per_s": jobs / (max(ends) - started), "drain_per_s": (jobs - 1) / max(1e-9, max(ends) - min(ends)),
            "p50_ms": percentile(lat_ms, 50), "p99_ms": percentile(lat_ms, 99)}


def workers(argv: list[str], count: int = 2) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return [subprocess.Popen(argv, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(count)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def bench_rq(url: str, jobs: int) -> dict[str, float]:
    import bench_tasks
    from redis import Redis
    from rq import Queue

    conn = Redis.from_url(url)
    queue = Queue("bench", connection=conn)
    procs = workers([sys.executable, "-m", "rq.cli", "worker", "--url", url, "bench"])
    try:
        time.sleep(2)  # let both workers register (RQ has no readiness signal to wait on)
        started = time.time()
        enqueued = queue.enqueue_many([Queue.prepare_data(bench_tasks.noop, args=(i,), result_ttl=600)
                                       for i in range(jobs)])
        ids = [j.id for j in enqueued]
        from rq.job import Job

        while True:
            fetched = Job.fetch_many(ids, connection=conn)
            if all(j is not None and j.get_status() == "finished" for j in fetched):
                break
            time.sleep(0.05)
        # RQ 2+ keeps the end time on the job's Result (ended_at may stay empty).
        finished = [j.ended_at or j.latest_result().created_at for j in fetched]
        ends = [f.timestamp() for f in finished]
        lat = [(f - j.enqueued_at).total_seconds() * 1000 for f, j in zip(finished, fetched, strict=True)]
        return summary(jobs, started, ends, lat)
    finally:
        stop(procs)


def bench_celery(url: str, jobs: int) -> dict[str, float]:
    os.environ["LINGUA_BENCH_REDIS"] = url
    import bench_tasks

    procs = workers([sys.executable, "-m", "celery", "-A", "bench_tasks", "worker", "--concurrency", "1",
                     "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", "bench"])
    try:
        app = bench_tasks.celery_app()
        while len(app.control.ping(timeout=0.5) or []) < 2:
            pass  # ping waits up to 0.5 s for the workers' replies
        started = time.time()
        results = [bench_tasks.celery_noop.apply_async((time.time(),), queue="bench") for _ in range(jobs)]
        done = [r.get(timeout=300) for r in results]
        lat = [(end - t0) * 1000 for t0, end in done]
        return summary(jobs, started, [end for _, end in done], lat)
    finally:
        stop(procs)


def bench_arq(url: str, jobs: int) -> dict[str, float]:
    os.environ["LINGUA_BENCH_REDIS"] = url
    from arq import create_pool
    from arq.connections import RedisSettings

    procs = workers([sys.executable, "-m", "arq", "bench_tasks.ArqSettings"])

    async def run() -> dict[str, float]:
        pool = await create_pool(RedisSettings.from_dsn(url))
        try:
            await asyncio.sleep(2)  # let both workers start (arq has no readiness signal to wait on)
            started = time.time()
            queued = [await pool.enqueue_job("noop", i) for i in range(jobs)]
            infos = [await j.result_info() for j in queued]
            while any(i is None for i in infos):
                await asyncio.sleep(0.05)
                infos = [i or await j.result_info() for i, j in zip(infos, queued, strict=True)]
            lat = [(i.finish_time - i.enqueue_time).total_seconds() * 1000 for i in infos]  # type: ignore[union-attr]
            return summary(jobs, started, [i.finish_time.timestamp() for i in infos], lat)  # type: ignore[union-attr]
        finally:
            await pool.aclose()

    try:
        return asyncio.run(run())
    finally:
        stop(procs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=["rq", "celery", "arq"])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--jobs", type=int, default=2000)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    result = {"rq": bench_rq, "celery": bench_celery, "arq": bench_arq}[args.system](args.redis_url, args.jobs)
    import importlib.metadata as md

    result["version"] = md.version(args.system)  # type: ignore[assignment]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
