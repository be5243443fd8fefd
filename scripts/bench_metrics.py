#!/usr/bin/env python3
"""The metrics' own CPU per job, without the noise of a whole lifecycle on a shared machine.

scripts/bench --metrics compares whole lifecycles with metrics on and off (the figure the 3% goal is
about), but on a busy 2-core machine its rounds vary by +-20%, more than metrics cost. This measures
the metrics' hot-path work alone, in one process, against the same work without it: per job, the
interceptor's lookup for two calls (WatchJob, a tenth of a Submit batch), a WatchJob-like stream of 5
messages through the gRPC wrapper, one NodeSession message in and one out, a tenth of a unary Submit,
the job counters and histograms of a submit, a claim and a completion, and a third of a Redis batch
timing. Prints microseconds per job (process CPU time), bare and metered, alternating.

    .venv/bin/python scripts/bench_metrics.py [--jobs 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from lingua_scheduler.server.grpc_metrics import GrpcMetrics, stream
from lingua_scheduler.server.metrics import Metrics
from prometheus_client import CollectorRegistry

JOB = "zh:en:{1}01JDZ8X9Q4M2T6V7W8Y9Z0ABCD"


class Context:
    """The little of a ServicerContext the wrappers use."""

    def code(self) -> None:
        return None

    def cancelled(self) -> bool:
        return False

    async def write(self, message: Any) -> None:
        pass


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def watch(request: Any, context: Any) -> AsyncIterator[int]:
    for i in range(5):
        yield i


async def submit(request: Any, context: Any) -> int:
    return 1


async def session(requests: AsyncIterator[int], context: Any) -> None:
    counts = stream()  # counted in the handler's own loops, as server/node.py does (a no-op when bare)
    async for r in requests:
        counts.received.inc()
        counts.sent.inc()
        await context.write(r)


async def messages(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def main(jobs: int, rounds: int) -> None:
    registry = CollectorRegistry()
    grpc_metrics, metrics = GrpcMetrics(registry, counted_by_handler=("/s/NodeSession",)), Metrics(registry)
    handlers = {
        "/s/WatchJob": grpc.unary_stream_rpc_method_handler(watch),
        "/s/Submit": grpc.unary_unary_rpc_method_handler(submit),
        "/s/NodeSession": grpc.stream_stream_rpc_method_handler(session),
    }

    async def lookup(details: Any) -> Any:
        return handlers[details.method]

    watch_details, submit_details, session_details = (Details(m) for m in handlers)
    context = Context()

    async def bare() -> None:
        for i in range(jobs):
            await lookup(watch_details)
            async for _ in watch(None, context):
                pass
            if i % 10 == 0:
                await lookup(submit_details)
                await submit(None, context)
        await session(messages(jobs), context)

    async def metered() -> None:
        for i in range(jobs):
            handler = await grpc_metrics.intercept_service(lookup, watch_details)
            async for _ in handler.unary_stream(None, context):
                pass
            pool = metrics.of_job(JOB)
            pool.submitted.inc()
            metrics.claimed(JOB, 3, 5)
            metrics.changed(JOB, "complete", "running", "succeeded", 7)
            if i % 3 == 0:
                metrics.redis.observe("claim_job", 0.0004)
            if i % 10 == 0:
                await (await grpc_metrics.intercept_service(lookup, submit_details)).unary_unary(None, context)
        await (await grpc_metrics.intercept_service(lookup, session_details)).stream_stream(messages(jobs), context)

    results: dict[str, list[float]] = {"bare": [], "metered": []}
    for _ in range(rounds):
        for name, work in (("bare", bare), ("metered", metered)):
            start = time.process_time()
            await work()
            results[name].append((time.process_time() - start) / jobs * 1e6)
    bare_us, metered_us = min(results["bare"]), min(results["metered"])
    print(f"per job: bare {bare_us:.1f} us, metered {metered_us:.1f} us: metrics cost {metered_us - bare_us:.1f} us "
          f"(best of {rounds} rounds of {jobs} jobs)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    asyncio.run(main(args.jobs, args.rounds))
