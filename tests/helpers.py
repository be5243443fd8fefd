"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

from lingua_sdk import pb


def spec(**overrides: Any) -> pb.JobSpec:
    fields: dict[str, Any] = dict(tenant_id="acme", session_id="s1", utterance_index=0, src_lang="zh",
                                  tgt_lang="en", payload=b"audio")
    fields.update(overrides)
    return pb.JobSpec(**fields)


def pair(src: str = "zh", tgt: str = "en") -> pb.LanguagePair:
    return pb.LanguagePair(src_lang=src, tgt_lang=tgt)


async def watch_until(stub: Any, job_id: str, state: int, timeout: float = 10.0) -> list[pb.JobEvent]:
    """The job's events up to the first one entering `state` (WatchJob replays history first)."""
    import asyncio

    events: list[pb.JobEvent] = []

    async def run() -> None:
        async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id)):
            events.append(event)
            if event.state == state:
                return
        raise AssertionError(f"job ended in {events[-1].state}, never reached {state}")

    await asyncio.wait_for(run(), timeout)
    return events


async def all_keys(redis: Any, pattern: str = "*") -> list[bytes]:
    """KEYS on every primary (a cluster client sends KEYS to one node only)."""
    if hasattr(redis, "get_primaries"):
        return sorted(await redis.keys(pattern, target_nodes=redis.get_primaries()))
    return sorted(await redis.keys(pattern))


async def until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` (sync or async) until it holds, for state no event announces; fail after
    `timeout` seconds naming `what`."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        await asyncio.sleep(0.01)


async def set_maxmemory(redis: Any, value: str) -> None:
    """CONFIG SET maxmemory on the server, or on every primary of a cluster (a private one: "1" makes
    every write fail with OOM, "0" ends that)."""
    if hasattr(redis, "get_primaries"):
        await redis.execute_command("CONFIG SET", "maxmemory", value, target_nodes=redis.get_primaries())
    else:
        await redis.config_set("maxmemory", value)
