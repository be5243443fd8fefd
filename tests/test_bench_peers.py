"""The benchmark's peer runners (scripts/bench_others.py) end to end: each peer, at its defaults and
tuned, runs a few dozen jobs on a private Redis and reports them with positive per-job figures.

One Redis only, never the cluster: the bench runs every peer on one private server (RQ, arq and
Celery do not speak Redis Cluster), and this checks the bench, not the scheduler. BullMQ's npm ci and
arq's virtualenv are made in the module's setup when missing (the bench makes the same, once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bench_others
import pytest
from lingua_scheduler.server.embedded import EmbeddedRedis
from redis_cluster import free_ports

JOBS = 60


@pytest.fixture(scope="module")
def peer_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A private server on a TCP port (BullMQ's runner takes host and port)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("peers"), port=free_ports(1)[0], persistent=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def arq_python() -> str:
    return bench_others.ensure_arq()


@pytest.fixture(scope="module")
def bullmq() -> None:
    bench_others.ensure_bullmq()


def run_peer(python: str, system: str, tuned: bool, url: str, jobs: int = JOBS) -> dict[str, object]:
    argv = [python, str(Path(bench_others.__file__)), system, "--redis-url", url, "--jobs", str(jobs)]
    done = subprocess.run(argv + ["--tuned"] * tuned, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(300)  # the first BullMQ or arq case may npm ci / make arq's virtualenv
@pytest.mark.parametrize(("system", "tuned"), [
    ("bullmq", False), ("bullmq", True), ("celery", True), ("arq", False), ("arq", True), ("rq", False), ("rq", True),
])
def test_peer_runs_its_jobs_and_reports_per_job_costs(system: str, tuned: bool, peer_redis: EmbeddedRedis,
                                                      request: pytest.FixtureRequest) -> None:
    python = request.getfixturevalue("arq_python") if system == "arq" else sys.executable
    if system == "bullmq":
        request.getfixturevalue("bullmq")
    result = run_peer(python, system, tuned, peer_redis.url)
    assert result["jobs"] == JOBS  # every result read back (the runner fails on a wrong one)
    assert result["system"] == system
    assert result["mode"] == ("tuned" if tuned else "default")
    assert result["settings"] == bench_others.SETTINGS[(system, tuned)]
    for figure in ("jobs_per_s", "drain_per_s", "redis_cpu_us", "client_cpu_us", "system_cpu_us", "commands"):
        assert isinstance(result[figure], float) and result[figure] > 0, (figure, result)
    assert result["system_cpu_us"] >= result["worker_cpu_us"] >= 0  # type: ignore[operator]


@pytest.mark.timeout(300)
def test_bullmq_reports_a_run_whose_report_is_over_64_kib(peer_redis: EmbeddedRedis, bullmq: None) -> None:
    """At the bench's size (2,000 jobs) the producer's one JSON line (every job's result time) is over
    64 KiB. A full bench run once got it cut at 65,536 characters (the producer exited before the pipe
    took it all; now it waits for the write): this runs that size. The cut depends on timing, so this
    does not reproduce it every time."""
    result = run_peer(sys.executable, "bullmq", True, peer_redis.url, jobs=2000)
    assert result["jobs"] == 2000
    assert isinstance(result["jobs_per_s"], float) and result["jobs_per_s"] > 0
