#!/usr/bin/env python3
"""The bench's nodes in a process of their own (`scripts/bench.py --nodes-apart`), as a fleet's nodes run
on machines of their own: the clients' process no longer delays what the nodes receive, nor the nodes
what the clients send.

Starts `--nodes` SDK Nodes (scripts/simulated.py, zero processing time) against `--target`, prints
"ready" once every one registered, and runs until its standard input closes. Then it stops them (a
drain) and prints one JSON line: when each job reached its node's handler, as
"session_id/utterance_index" -> time.perf_counter() (CLOCK_MONOTONIC: the same clock as the bench's on
this machine). The token, if any, comes in the environment (LINGUA_TOKEN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lingua_sdk import Assignment
from simulated import SimulatedNode


async def main_async(args: argparse.Namespace) -> None:
    arrived: dict[str, float] = {}

    def receive(a: Assignment, at: float) -> None:
        spec = a.proto.spec
        arrived.setdefault(f"{spec.session_id}/{spec.utterance_index}", at)

    options = [("grpc.use_local_subchannel_pool", 1)] if args.own_connection else []
    nodes = [await SimulatedNode(args.target, f"bench-{i}", [("zh", "en")], args.concurrency, on_receive=receive,
                                 token=os.environ.get("LINGUA_TOKEN") or None, options=options).start()
             for i in range(args.nodes)]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our standard input
    for node in nodes:
        await node.stop()
    print(json.dumps(arrived), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the scheduler's host:port")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64, help="slots per node")
    p.add_argument("--own-connection", action="store_true", help="a connection per node (bench --workers)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
