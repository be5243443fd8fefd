"""The promise, in short: 3 scheduler processes, 8 nodes, instances SIGKILLed and restarted, nodes
crashed, streams cut, Redis restarted (single mode) -- and no job lost or completed twice.
scripts/chaos.py runs the long version (5,000+ jobs)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from chaos import chaos_run
from lingua_scheduler.server.tokens import mint
from lingua_sdk import PermissionDenied


@pytest.mark.parametrize("mode", ["single", "cluster"])
@pytest.mark.timeout(240)
async def test_chaos_loses_nothing(mode: str) -> None:
    report = await chaos_run(mode, jobs=900, nodes=8, seed=3, quiet=True, rate=120)
    print(report.table(mode))
    assert report.instance_kills >= 1 and report.node_crashes + report.stream_closes >= 1
    assert report.redis_restarts == (1 if mode == "single" else 0)
    assert report.submitted == report.given_ids == 900
    assert report.missing == 0 and report.duplicates == 0 and report.not_terminal == 0
    assert report.bad_completions == 0
    assert report.succeeded + sum(report.failed_by_reason.values()) == 900
    assert report.ok


@pytest.mark.timeout(180)
async def test_chaos_with_auth_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instances verify tokens (LINGUA_AUTH_JWT_KEY); an admin token carries the whole run, the
    out-of-band late completions included. A client-only token stops it at once: its nodes are refused."""
    key = tmp_path / "k1.secret"
    key.write_text(secrets.token_hex(32))
    monkeypatch.setenv("LINGUA_AUTH_JWT_KEY", str(key))
    report = await chaos_run("single", jobs=300, nodes=4, seed=5, quiet=True, rate=150, token=mint(str(key), "admin"))
    print(report.table("single"))
    assert report.submitted == report.given_ids == 300
    assert report.succeeded + sum(report.failed_by_reason.values()) == 300
    assert report.auth_refused == 0 and report.ok
    with pytest.raises(PermissionDenied, match="NodeSession"):
        await chaos_run("single", jobs=50, nodes=2, seed=5, quiet=True, token=mint(str(key), "client", tenants=["chaos"]))
