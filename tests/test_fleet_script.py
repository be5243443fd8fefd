"""scripts/fleet.py end to end: ~20 node streams and a few jobs against the scheduler it spawns; its
report parses, every stream is registered and listed, and the jobs succeed. And the reports of
scripts/grpc_floor.py and scripts/script_costs.py parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FLEET = Path(__file__).resolve().parent.parent / "scripts" / "fleet.py"


@pytest.mark.timeout(120)
def test_fleet_script_small_run() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LINGUA_TOKEN", "LINGUA_TARGET")}
    done = subprocess.run([sys.executable, str(FLEET), "--spawn", "--streams", "20", "--channels", "2",
                           "--jobs", "12", "--rate", "0", "--idle-window", "2", "--timeout", "30",
                           # pinged after 0.2 s of silence, dropped 1 s after an unanswered ping: the idle
                           # window alone takes longer, so the streams must answer to stay
                           "--scheduler-arg=--ping-interval-ms=200", "--scheduler-arg=--ping-timeout-ms=1000"],
                          env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert report["streams registered"] == "20"
    assert report["registration failures"] == "0"
    assert report["streams listed"] == "20"
    assert report["outcome"] == "succeeded 12"
    assert report["unfinished"] == "0"
    assert int(report["scheduler rss after (KiB)"]) > 0
    assert float(report["redis commands/s idle"]) >= 0
    p50, p99 = (float(report["dispatch ms"].split()[i]) for i in (1, 3))
    assert 0 < p50 <= p99
    assert report["dispatch ms"].endswith("(n=12)")
    assert report["streams listed after jobs"] == "20" and report["streams open at end"] == "20"
    assert report["registry renewal failures"] == "0"


def report(script: str, *args: str, timeout: float) -> list[str]:
    """The lines scripts/`script` prints with `args`, once it exited 0."""
    done = subprocess.run([sys.executable, str(FLEET.parent / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return done.stdout.strip().splitlines()


@pytest.mark.timeout(60)
def test_grpc_floor_script_reports_each_gap() -> None:
    """scripts/grpc_floor.py: a bare grpc.aio server's unary latency, one line per gap, numbers that parse."""
    lines = report("grpc_floor.py", "--calls", "20", "--gaps", "0,0.005", timeout=50)
    assert [line.split(":")[0] for line in lines] == ["gap 0 ms", "gap 5 ms"]
    for line in lines:
        p50, p90, p99 = (float(line.split(name + " ")[1].split()[0]) for name in ("p50", "p90", "p99"))
        assert 0 < p50 <= p90 <= p99


@pytest.mark.timeout(90)
def test_script_costs_reports_each_batch_size() -> None:
    """scripts/script_costs.py: Redis CPU per job of each batched script, one line per batch size."""
    lines = report("script_costs.py", "--batches", "1,10", "--jobs", "40", timeout=80)
    assert [line.split(" jobs per call")[0].strip() for line in lines] == ["1", "10"]
    for line in lines:
        parts = line.split(": ", 1)[1].split(" | ")
        assert [p.split()[0] for p in parts] == ["submit", "claim", "complete", "forget"]
        for part in parts:
            assert float(part.split()[1]) > 0 and float(part.split("time in commands")[1].split(",")[0]) > 0, line
