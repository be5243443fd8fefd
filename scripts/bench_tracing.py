#!/usr/bin/env python3
"""Benchmark: lifecycles/s with tracing off and on, in the same run (docs/operations.md, "Tracing").

One process: a private redis-server, a scheduler App, SDK AsyncClients submitting in batches and an
SDK Node (zero processing time) completing. "off" is the App as main builds it without OTEL_*
variables (no tracer anywhere); "on" has a TracerProvider whose spans go, batched, to an
InMemorySpanExporter, every trace sampled; "10%" samples one trace in ten (parentbased_traceidratio).
What an OTLP exporter costs on top runs on the batch processor's thread. Rounds alternate the three
modes; each prints lifecycles/s and the process's CPU time per lifecycle (the steadier figure on a
shared machine). The SDK client and node share the process, so the figures are lower than
scripts/bench's and only their ratios mean something.

Usage: .venv/bin/python scripts/bench_tracing.py [--jobs 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import Any

from lingua_scheduler.server.app import create_server
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.settings import Settings
from lingua_sdk import AsyncClient, JobState, Node
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased


async def one_round(redis_url: str, jobs: int, mode: str) -> tuple[float, float, int]:
    """(lifecycles/s, CPU us per lifecycle of this process, spans recorded) of `jobs` jobs submitted by
    4 clients, done by one node. `mode`: off, on (every trace sampled) or 10% (as
    OTEL_TRACES_SAMPLER=parentbased_traceidratio with arg 0.1)."""
    provider: Any = None
    exporter = InMemorySpanExporter()
    if mode != "off":
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)) if mode == "10%" else None)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_url, http_listen="", uvloop=0, partitions=1)
    app = create_server(settings, tracer_provider=provider)
    await app.redis.flushall()
    await app.start()
    done = asyncio.Event()
    count = [0]

    async def handler(_a: Any) -> dict[str, str]:
        count[0] += 1
        if count[0] == jobs:
            done.set()
        return {"text_translated": "ok"}

    target = f"127.0.0.1:{app.port}"
    node = Node(target, node_id="bench-1", pairs=["zh:en"], handler=handler, concurrency=256, handle_signals=False)
    node_task = asyncio.create_task(node.run())
    clients = [AsyncClient(target) for _ in range(4)]
    try:
        await asyncio.sleep(0.5)  # the node registers
        started, cpu = time.perf_counter(), time.process_time()

        async def submit(c: int) -> list[str]:
            ids = []
            for start in range(c, jobs, 4 * 50):
                batch = [dict(tenant_id="bench", session_id=f"s{i % 64}", utterance_index=i, src_lang="zh",
                              tgt_lang="en", payload_ref=f"session://s/{i}") for i in range(start, min(start + 200, jobs), 4)]
                ids += [r.job_id for r in await clients[c].submit_many(batch)]
            return ids

        ids = [j for part in await asyncio.gather(*(submit(c) for c in range(4))) for j in part]
        await asyncio.wait_for(done.wait(), 120)
        for job_id in ids[-8:]:  # the last results are stored too
            assert (await clients[0].wait(job_id, timeout=30)).state is JobState.SUCCEEDED
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        for client in clients:
            await client.close()
        node_task.cancel()
        await asyncio.gather(node_task, return_exceptions=True)
        await app.stop(grace=0)
    if provider is not None:
        provider.shutdown()
    return len(ids) / elapsed, cpu / len(ids) * 1e6, len(exporter.get_finished_spans())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        redis = EmbeddedRedis(folder, persistent=False).start()
        try:
            rates: dict[str, list[float]] = {"off": [], "10%": [], "on": []}
            cpus: dict[str, list[float]] = {mode: [] for mode in rates}
            await one_round(redis.url, 200, "off")  # warm-up
            for r in range(args.rounds):
                for mode in rates:
                    rate, cpu, spans = await one_round(redis.url, args.jobs, mode)
                    rates[mode].append(rate)
                    cpus[mode].append(cpu)
                    print(f"round {r + 1} tracing {mode:3}: {rate:7.0f} lifecycles/s, {cpu:5.0f} us CPU per lifecycle "
                          f"({spans} spans)", flush=True)
        finally:
            redis.stop()
    off, off_cpu = statistics.median(rates["off"]), statistics.median(cpus["off"])
    for mode in ("10%", "on"):
        rate, cpu = statistics.median(rates[mode]), statistics.median(cpus[mode])
        print(f"median, tracing {mode} vs off: {rate:.0f} vs {off:.0f} lifecycles/s ({100 * (rate / off - 1):+.1f}%), "
              f"{cpu:.0f} vs {off_cpu:.0f} us CPU per lifecycle ({100 * (cpu / off_cpu - 1):+.1f}%)")


if __name__ == "__main__":
    asyncio.run(main())
