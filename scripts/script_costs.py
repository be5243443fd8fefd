#!/usr/bin/env python3
"""Redis CPU per job of the batched scripts (submit_job-n, claim_job-n, finish_job-n, forget_job-n), by jobs
per call, without gRPC: Store.submit, claim, complete_many and forget straight on a private redis-server,
the jobs of one session (one partition), one call at a time. The forget (a finished job leaving ListJobs'
indexes as its record expires, a retention later) fires the jobs' forget timers, made due first. Per
job: Redis CPU (INFO cpu), and the time Redis spent in the commands run inside the scripts (INFO
commandstats: elapsed time, so under load it can exceed the CPU) and the difference (Lua, the call
itself, the socket). The first batch size also counts the scripts' loading.

  .venv/bin/python scripts/script_costs.py --batches 1,5,25,100 --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lingua_scheduler.server import keys, wire
from lingua_scheduler.server.dispatch import new_lease_token
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Claim, Lease, Store
from lingua_sdk import pb
from redis_cluster import free_ports


async def counters(r: Any) -> tuple[float, float]:
    """Redis CPU seconds, and usec of every command but EVALSHA (the scripts' commands; INFO left out)."""
    cpu, stats = await r.info("cpu"), await r.info("commandstats")
    inner = sum(float(v["usec"]) for k, v in stats.items() if k not in ("cmdstat_evalsha", "cmdstat_info"))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), inner


async def phase(r: Any, jobs: int, work: Awaitable[None]) -> str:
    c0, i0 = await counters(r)
    await work
    c1, i1 = await counters(r)
    cpu, inner = (c1 - c0) / jobs * 1e6, (i1 - i0) / jobs
    return f"{cpu:6.1f} us (time in commands {inner:5.1f}, the rest {cpu - inner:5.1f})"


async def submit(store: Store, specs: list[pb.JobSpec], batch: int, ids: list[str]) -> None:
    for i in range(0, len(specs), batch):
        ids.extend(s.job_id for s in await store.submit(specs[i:i + batch]))


async def claim(store: Store, ids: list[str], batch: int, claims: list[Claim]) -> None:
    for i in range(0, len(ids), batch):
        claims.extend(await store.claim("n1", [(j, new_lease_token()) for j in ids[i:i + batch]]))


async def complete(store: Store, claims: list[Claim], batch: int) -> None:
    result = pb.JobResult(text_asr="ni hao", text_translated="hello")
    for i in range(0, len(claims), batch):
        await store.complete_many("n1", [(Lease(c.job_id, c.token), result) for c in claims[i:i + batch]])


async def forget(store: Store, members: list[str], batch: int) -> None:
    for i in range(0, len(members), batch):
        await store.forget(members[i:i + batch])


async def due_forgets(r: Any, ids: list[str]) -> list[str]:
    """The forget timers of `ids`, made due now (their score 0): what the sweeper would fire a retention later."""
    timers = keys.PartitionKeys.of(keys.tag_of(ids[0])).timers
    wanted = {f"{wire.FORGET}:{j}" for j in ids}
    members = [m.decode() for m in await r.zrange(timers, 0, -1)]
    members = [m for m in members if m.split(" ", 1)[0] in wanted]
    await r.zadd(timers, {m: 0 for m in members}, xx=True)
    return members


async def run(url: str, batches: list[int], jobs: int) -> None:
    r = aioredis.from_url(url)
    store = Store(r, Settings(redis_url=url, partitions=4))  # 4, as in the figures of docs/performance.md
    for n, batch in enumerate(batches):
        specs = [pb.JobSpec(tenant_id="costs", session_id="s", utterance_index=n * jobs + i, src_lang="zh",
                            tgt_lang="en", payload_ref=f"session://s/{n * jobs + i}") for i in range(jobs)]
        ids: list[str] = []
        claims: list[Claim] = []
        figures = [await phase(r, jobs, submit(store, specs, batch, ids)),
                   await phase(r, jobs, claim(store, ids, batch, claims)),
                   await phase(r, jobs, complete(store, claims, batch))]
        members = await due_forgets(r, ids)
        assert len(members) == jobs, f"{len(members)} forget timers for {jobs} jobs"
        figures.append(await phase(r, jobs, forget(store, members, batch)))
        print(f"{batch:4} jobs per call: submit {figures[0]} | claim {figures[1]} | complete {figures[2]} | forget "
              f"{figures[3]}", flush=True)
    await r.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,5,25,100", help="jobs per call, comma-separated")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per batch size")
    parser.add_argument("--redis-server", default="",
                        help="the redis-server to start (default: as the scheduler's embedded one finds it; e.g. "
                             "one built with symbols, for perf)")
    args = parser.parse_args()
    if args.jobs < 1 or any(int(b) < 1 for b in args.batches.split(",")):
        parser.error("--jobs and every --batches size must be at least 1")
    with tempfile.TemporaryDirectory() as folder:
        server = Server(args.redis_server, folder).start()
        try:
            asyncio.run(run(server.url, [int(b) for b in args.batches.split(",")], args.jobs))
        finally:
            server.stop()


class Server(EmbeddedRedis):
    """The scheduler's embedded Redis (no persistence, a free port), from `binary` when given."""

    def __init__(self, binary: str, folder: str) -> None:
        super().__init__(folder, port=free_ports(1)[0], persistent=False)
        self.binary = binary

    def command(self) -> list[str]:
        command = super().command()
        return [self.binary or command[0], *command[1:]]


if __name__ == "__main__":
    main()
