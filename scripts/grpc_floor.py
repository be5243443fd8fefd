#!/usr/bin/env python3
"""How long a unary call takes on this machine with grpc.aio alone, without the scheduler (the floor
under issue 11's dispatch latency target): a server process with only the gRPC health service, and
calls to it from this process back to back and with a gap between them (an idle process wakes up for
each call: grpc.aio's poller thread, then the event loop). Prints p50 / p90 / p99 in ms for each gap.

Example (see docs/benchmarks.md, "Per-stream memory and p99"):
  .venv/bin/python scripts/grpc_floor.py --calls 300 --gaps 0,0.01
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def serve(ports: multiprocessing.Queue[int]) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(port: int, calls: int, gaps: list[float]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest())  # connected
        for gap in gaps:
            took = []
            for _ in range(calls):
                start = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest())
                took.append((time.perf_counter() - start) * 1000)
                if gap:
                    await asyncio.sleep(gap)
            print(f"gap {gap * 1000:g} ms: p50 {pct(took, 50):.2f} p90 {pct(took, 90):.2f} p99 {pct(took, 99):.2f} ms "
                  f"({calls} calls)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--gaps", default="0,0.01", help="seconds between calls, comma-separated")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ports,), daemon=True)
    server.start()
    try:
        asyncio.run(measure(ports.get(timeout=30), args.calls, [float(g) for g in args.gaps.split(",")]))
    finally:
        server.kill()
        server.join()


if __name__ == "__main__":
    main()
