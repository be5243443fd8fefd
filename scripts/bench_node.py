#!/usr/bin/env python3
"""The SDK's Node beside the simulated node (scripts/simnode.py) in the same lifecycle benchmark
(scripts/bench.py: one scheduler process, clients submit and watch, nodes complete at once), runs
interleaved so both see the same machine. Prints lifecycles/s of each and their ratio.

Usage: .venv/bin/python scripts/bench_node.py [--jobs 3000] [--combos 1x1b1,8x2b10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from lingua_scheduler.server.embedded import EmbeddedRedis  # noqa: E402
from lingua_sdk import Assignment, JobResult, Node  # noqa: E402
from redis_cluster import free_ports  # noqa: E402
from simnode import Received, SimNode  # noqa: E402


class SdkNode:
    """SimNode's interface (as bench.Lifecycle uses it) over lingua_sdk.Node with a no-work handler."""

    address = ""

    def __init__(self, channel: Any, node_id: str, pairs: list[tuple[str, str]], max_concurrency: int,
                 on_receive: Any = None) -> None:
        async def handle(a: Assignment) -> JobResult:
            if on_receive is not None:
                on_receive(Received(a.job_id, a.attempt, time.perf_counter(), a.proto.spec))
            return JobResult(text_asr=f"asr {a.proto.spec.utterance_index}", text_translated=f"en:{a.job_id}",
                             extra={"node": node_id})

        self.node = Node(self.address, node_id=node_id, pairs=pairs, concurrency=max_concurrency, handler=handle,
                         handle_signals=False)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> SdkNode:
        self.task = asyncio.create_task(self.node.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lingua-bench-node-"))
    redis = EmbeddedRedis(tmp / "redis", port=free_ports(1)[0], persistent=False).start()
    original_start = bench.start_scheduler

    def start_scheduler(*a: Any, **kw: Any) -> Any:
        proc, address = original_start(*a, **kw)
        SdkNode.address = address
        return proc, address

    bench.start_scheduler = start_scheduler
    try:
        for combo in args.combos.split(","):
            c, rest = combo.split("x")
            n, b = rest.split("b") if "b" in rest else (rest, "1")
            rates: dict[str, list[float]] = {"simnode": [], "sdk Node": []}
            for _ in range(args.rounds):
                for label, cls in (("simnode", SimNode), ("sdk Node", SdkNode)):
                    bench.SimNode = cls  # type: ignore[misc]
                    run = await bench.lifecycle(redis.url, bench.Run(label, int(c), int(n), int(b)), args.jobs)
                    rates[label].append(run.rate)
            sim, sdk = (max(rates[k]) for k in ("simnode", "sdk Node"))
            print(f"{c} clients x {n} nodes, batch {b}: simnode {sim:.0f}/s, sdk Node {sdk:.0f}/s, "
                  f"ratio {sdk / sim:.2f}  (best of {args.rounds}: {rates})", flush=True)
    finally:
        redis.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--combos", default="1x1b1,8x2b10")
    p.add_argument("--rounds", type=int, default=2)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
