"""scripts/simulate.py with authentication on: its spawned schedulers read LINGUA_AUTH_JWT_KEY, its
nodes and client send --token; without a token the run is refused (UNAUTHENTICATED)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from lingua_scheduler.server.tokens import mint

SIMULATE = Path(__file__).resolve().parent.parent / "scripts" / "simulate.py"


def simulate(key: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LINGUA_TOKEN"} | {"LINGUA_AUTH_JWT_KEY": str(key)}
    return subprocess.run([sys.executable, str(SIMULATE), "--spawn", "1", "--nodes", "2", "--jobs", "40", "--rate", "0",
                           "--proc-ms", "1,0", "--timeout", "30", *flags], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.timeout(120)
def test_simulate_with_auth_on(tmp_path: Path) -> None:
    key = tmp_path / "k1.secret"
    key.write_text(secrets.token_hex(32))
    done = simulate(key, "--token", mint(str(key), "admin"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "outcome: succeeded 40" in done.stdout
    refused = simulate(key)
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stderr
