"""The promise, in short: 3 scheduler processes, 8 nodes, instances SIGKILLed and restarted, nodes
crashed, streams cut, Redis restarted (single mode) -- and no job lost or completed twice.
scripts/chaos.py runs the long version (5,000+ jobs)."""

from __future__ import annotations

import pytest
from chaos import chaos_run


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
