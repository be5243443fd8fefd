"""The benchmark with its nodes in a process of their own (`scripts/bench.py --nodes-apart`,
scripts/bench_nodes.py): every job of a row reaches a node there, and its dispatch time (the client's
Submit starting -> the node's handler, both on this machine's monotonic clock) is counted once, with
the nodes' process's CPU in the row's clients + nodes CPU. A real scheduler and a private Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import bench
import pytest
from lingua_scheduler.server.embedded import EmbeddedRedis
from redis_cluster import free_ports


@pytest.fixture
def apart(tmp_path: Path) -> Iterator[str]:
    """A private Redis (the bench flushes it), and the bench's nodes run apart while the test runs."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_ports(1)[0], persistent=False).start()
    bench.NODES_APART[0] = True
    try:
        yield server.url
    finally:
        bench.NODES_APART[0] = False
        server.stop()


@pytest.mark.parametrize(("reader", "rate"), [("job", 0.0), ("session", 400.0)])
async def test_nodes_apart_count_every_dispatch(apart: str, reader: str, rate: float,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    children: list[int] = []
    asked: list[int] = []
    start_apart, cpu_seconds = bench.Lifecycle.start_apart, bench.cpu_seconds

    async def spied_start(self: bench.Lifecycle, run: bench.Run) -> object:
        proc = await start_apart(self, run)
        children.append(proc.pid)
        return proc

    async def no_node_here(self: bench.Lifecycle, run: bench.Run, i: int) -> None:
        raise AssertionError("a node started in the clients' process")

    def spied_cpu(pid: int) -> float:
        asked.append(pid)
        return cpu_seconds(pid)

    monkeypatch.setattr(bench.Lifecycle, "start_apart", spied_start)
    monkeypatch.setattr(bench.Lifecycle, "start_node", no_node_here)
    monkeypatch.setattr(bench, "cpu_seconds", spied_cpu)
    run = bench.Run("apart", 2, 2, 5, reader=reader)
    await bench.lifecycle(apart, run, 100, rate=rate)
    assert run.jobs == 100  # every result read back
    assert len(run.dispatch_ms) == 100  # and every job seen arriving at a node in the other process
    assert all(0 < ms < 10_000 for ms in run.dispatch_ms)
    assert len(children) == 1 and asked.count(children[0]) == 2  # its CPU read before and after the load
    assert run.bench_cpu_per_1000 > 0


async def test_the_nodes_process_ending_mid_row_ends_the_row(apart: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a wait for results that never come: an error naming the nodes' process."""
    start_apart = bench.Lifecycle.start_apart

    async def killed_soon(self: bench.Lifecycle, run: bench.Run) -> object:
        proc = await start_apart(self, run)
        asyncio.get_running_loop().call_later(0.3, proc.kill)
        return proc

    monkeypatch.setattr(bench.Lifecycle, "start_apart", killed_soon)
    with pytest.raises(RuntimeError, match=r"bench_nodes\.py exited .* in the middle of the row"):
        await asyncio.wait_for(bench.lifecycle(apart, bench.Run("apart", 2, 2, 5), 1_000_000), 60)


def test_nodes_apart_is_refused_with_the_rows_it_cannot_run() -> None:
    import subprocess
    import sys

    refused = {"--nodes-apart runs plaintext SDK Nodes only": (["--nodes-apart"], ["--nodes-apart", "--no-baseline", "--auth"]),
               "--load-fraction goes with --half-rate-only": (["--load-fraction", "0.25"],),
               "a fraction of the best rate, above 0 and at most 1": (["--half-rate-only", "--load-fraction", "0"],
                                                                      ["--half-rate-only", "--load-fraction", "1.5"]),
               "0 (the best row's batch) up to --jobs (400)": (["--half-rate-batch", "-1", "--jobs", "400"],
                                                               ["--half-rate-batch", "401", "--jobs", "400"])}
    for why, argvs in refused.items():
        for argv in argvs:
            done = subprocess.run([sys.executable, str(Path(bench.__file__)), *argv],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, argv
            assert why in done.stderr, (argv, done.stderr)


def test_the_half_rate_row_takes_its_own_batch_size() -> None:
    best = bench.Run("16 x 2, batch 25", 16, 2, 25, reader="session")
    own, ten = bench.half_run(best, 0, "session"), bench.half_run(best, 10, "session")
    assert (own.batch, own.label) == (25, "16 x 2, batch 25, WatchSession, at half rate")
    assert (ten.batch, ten.clients, ten.nodes, ten.reader) == (10, 16, 2, "session")
    assert ten.label == "16 x 2, batch 10, WatchSession, at half rate"
    quarter = bench.half_run(best, 10, "session", 0.25)
    assert quarter.label == "16 x 2, batch 10, WatchSession, at 0.25 of the best rate"
