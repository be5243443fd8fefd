#!/usr/bin/env python3
"""What an idle bidirectional grpc.aio stream costs a server, without the scheduler (issue 11's memory
target): a minimal server process whose handler reads its stream, and N streams opened to it from this
process over a few shared channels. Prints the server's RSS at two stream counts and the slope (KiB per
stream), so that server options, allocator settings and handler shapes can be compared alone.

Examples (see docs/benchmarks.md, "Per-stream memory and p99"):
  python scripts/stream_floor.py --streams 1000,5000
  python scripts/stream_floor.py --streams 1000,5000 --handler task      # + one reader task per stream
  python scripts/stream_floor.py -o grpc.http2.hpack_table_size.decoder=256 --env MALLOC_ARENA_MAX=2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc

METHOD = "/floor.Floor/Stream"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def serve(handler: str, options: list[tuple[str, int]]) -> None:
    async def read_only(requests: Any, context: Any) -> None:
        it = requests.__aiter__()
        await it.__anext__()
        await context.write(b"ok")
        async for _ in it:
            pass

    async def with_task(requests: Any, context: Any) -> None:
        # The scheduler's shape before this work: a reader task, the handler waiting to write.
        it = requests.__aiter__()
        await it.__anext__()
        await context.write(b"ok")
        done = asyncio.get_running_loop().create_future()

        async def read() -> None:
            async for _ in it:
                pass

        task = asyncio.create_task(read())
        task.add_done_callback(lambda _t: done.done() or done.set_result(None))
        await done

    fn = {"read": read_only, "task": with_task}[handler]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", {
        "Stream": grpc.stream_stream_rpc_method_handler(fn)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if os.environ.get("FLOOR_PYHEAP"):  # --python-heap: the Python objects' share, on SIGUSR1
        import gc
        import signal
        import tracemalloc

        tracemalloc.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: print(
            f"python heap {tracemalloc.get_traced_memory()[0] // 1024} KiB, gc objects {len(gc.get_objects())}",
            file=sys.stderr, flush=True))
    print(port, flush=True)
    await server.wait_for_termination()


async def open_streams(port: int, channels: list[grpc.aio.Channel], n: int, held: list[Any]) -> None:
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with sem:
            call = channels[i % len(channels)].stream_stream(METHOD)()
            await call.write(b"hello")
            await call.read()
            held.append(call)

    await asyncio.gather(*(one(len(held) + i) for i in range(n)))


def spawn(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:
    """The minimal server, in a process of its own; its port."""
    env = dict(os.environ)
    if args.python_heap:
        env["FLOOR_PYHEAP"] = "1"
    for pair in args.env:
        k, _, v = pair.partition("=")
        env[k] = v
    cmd = [sys.executable, __file__, "--serve", "--handler", args.handler]
    for o in args.option:
        cmd += ["-o", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


async def measure(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int) -> None:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(args.channels)]
    held: list[Any] = []
    await open_streams(port, channels, 10, held)  # warm: first connections, thread pools
    await asyncio.sleep(1)
    points = [(len(held), rss_kib(proc.pid))]
    for n in [int(x) for x in args.streams.split(",")]:
        start = time.monotonic()
        await open_streams(port, channels, n - len(held) + 10, held)
        await asyncio.sleep(args.settle)
        points.append((len(held) - 10, rss_kib(proc.pid)))
        if args.python_heap:
            os.kill(proc.pid, signal.SIGUSR1)
            await asyncio.sleep(0.5)
        print(f"streams {points[-1][0]}: server rss {points[-1][1]} KiB (opened in {time.monotonic() - start:.1f} s)")
    (n0, r0), (n1, r1) = points[-2], points[-1]
    print(f"slope KiB per stream ({n0}->{n1}): {(r1 - r0) / (n1 - n0):.2f}")
    print(f"from empty KiB per stream: {(r1 - points[0][1]) / n1:.2f}")
    for c in held:
        c.cancel()
    for ch in channels:
        await ch.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--handler", choices=("read", "task"), default="read")
    p.add_argument("-o", "--option", action="append", default=[], help="server channel argument KEY=INT")
    p.add_argument("--env", action="append", default=[], help="environment variable for the server, KEY=VALUE")
    p.add_argument("--streams", default="1000,5000", help="stream counts to measure at, ascending")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--python-heap", action="store_true", help="the server also reports its Python heap (tracemalloc)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    args = p.parse_args()
    if args.serve:
        options = [(k, int(v)) for k, _, v in (o.partition("=") for o in args.option)]
        asyncio.run(serve(args.handler, options))
    else:
        proc, port = spawn(args)
        try:
            asyncio.run(measure(args, proc, port))
        finally:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
