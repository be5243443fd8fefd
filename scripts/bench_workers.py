#!/usr/bin/env python3
"""Worker counts compared (issue 13, parts 3 and 4): scripts/bench.py's lifecycle rows against a
scheduler run with --workers 1 and with --workers 2 (server/workers.py), in alternating rounds on one
private Redis, then each worker count at half of its best rate of the round, for dispatch latency.

Every client and node has a connection of its own (bench.py --workers), as separate processes would:
the kernel hands each connection to one worker. Scheduler CPU is the supervisor's and its workers'.
Prints each row, then a markdown table of ranges and medians over the rounds.

  .venv/bin/python scripts/bench_workers.py --rounds 3 --workers 1,2 --combos 16x2b25,16x8b25 --jobs 3000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import Run, lifecycle, pct, use_workers
from lingua_scheduler.server.embedded import EmbeddedRedis
from redis_cluster import free_ports


def spread(values: list[float], digits: int = 0) -> str:
    """ "median (min-max)" """
    if not values:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(statistics.median(values))} ({f.format(min(values))}-{f.format(max(values))})"


async def main_async(args: argparse.Namespace) -> int:
    counts = [int(w) for w in args.workers.split(",")]
    combos = []
    for combo in args.combos.split(","):
        c, rest = combo.split("x")
        n, b = rest.split("b") if "b" in rest else (rest, "1")
        combos.append((int(c), int(n), int(b)))
    rows: dict[tuple[int, str], list[Run]] = defaultdict(list)  # (workers, row label) -> its runs
    tmp = Path(tempfile.mkdtemp(prefix="lingua-bench-workers-"))
    redis = EmbeddedRedis(tmp / "redis", port=free_ports(1)[0], persistent=False).start()
    try:
        for r in range(args.rounds):
            shift = r % len(counts)
            for workers in counts[shift:] + counts[:shift]:  # rotate which goes first
                use_workers(workers)
                best: Run | None = None
                for c, n, b in combos:
                    run = await lifecycle(redis.url, Run(f"{c} x {n}, batch {b}", c, n, b), args.jobs)
                    rows[(workers, run.label)].append(run)
                    print(f"round {r + 1}, {workers} worker(s), {run.label}: {run.rate:.0f}/s, sched CPU "
                          f"{run.sched_cpu_per_1000 * 1000:.0f} us/lifecycle, Redis CPU {run.redis_cpu_us:.0f} us, "
                          f"dispatch p50 {pct(run.dispatch_ms, 50):.2f} ms", flush=True)
                    best = run if best is None or run.rate > best.rate else best
                assert best is not None
                half = Run(f"half of the best ({best.label})", best.clients, best.nodes, best.batch)
                await lifecycle(redis.url, half, args.jobs, rate=best.rate / 2)
                rows[(workers, "half")].append(half)
                print(f"round {r + 1}, {workers} worker(s), at {best.rate / 2:.0f}/s ({half.label}): dispatch p50 "
                      f"{pct(half.dispatch_ms, 50):.2f} ms, p99 {pct(half.dispatch_ms, 99):.2f} ms", flush=True)
    finally:
        redis.stop()
    print(f"\n{args.rounds} rounds of {args.jobs} lifecycles per row; median (min-max)\n")
    print("| workers | row | lifecycles/s | scheduler CPU us/lifecycle | Redis CPU us/lifecycle | dispatch p50 ms "
          "| dispatch p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for (workers, label), runs in rows.items():
        if label == "half":
            label = f"at half of the best rate ({spread([r.rate for r in runs])}/s)"
        print(f"| {workers} | {label} | {spread([r.rate for r in runs])} "
              f"| {spread([r.sched_cpu_per_1000 * 1000 for r in runs])} | {spread([r.redis_cpu_us for r in runs])} "
              f"| {spread([pct(r.dispatch_ms, 50) for r in runs], 2)} | {spread([pct(r.dispatch_ms, 99) for r in runs], 2)} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    p.add_argument("--combos", default="16x2b25,16x8b25", help="clients x nodes [b batch], comma-separated")
    p.add_argument("--jobs", type=int, default=3000, help="lifecycles per row")
    p.add_argument("--rounds", type=int, default=3)
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
