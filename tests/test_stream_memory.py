"""What an idle node stream keeps, and how liveness work on thousands of them is spread (issue 11:
memory per idle stream, dispatch p99 with the fleet connected; docs/benchmarks.md, "Per-stream memory
and p99"). Real streams, real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import uuid
from typing import Any

from helpers import pair
from lingua_scheduler.server.app import App
from lingua_scheduler.server.liveness import Liveness, Pulse
from lingua_scheduler.server.registry import NodeEntry, Registry
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc


def registrations_alive(prefix: str) -> int:
    """Register messages alive in this process (server and client) for node ids starting with `prefix`."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is pb.Register and o.node_id.startswith(prefix))


async def test_an_idle_stream_does_not_keep_its_registration_message(app: App, stub: pb_grpc.SchedulerStub) -> None:
    """The first message (its Register, and the parse arena behind it) is copied out and let go: kept,
    it cost every idle stream of a fleet its whole registration for the stream's life."""
    prefix = f"idle-{uuid.uuid4().hex[:8]}-"
    calls = []
    for i in range(50):
        call = stub.NodeSession()
        await call.write(pb.NodeMessage(register=pb.Register(node_id=f"{prefix}{i}", pairs=[pair()], max_concurrency=2,
                                                             labels={"zone": "a"}, version="1.0")))
        assert (await call.read()).HasField("registered")
        # A second message, answered, so gRPC's own reader has let the first go too.
        await call.write(pb.NodeMessage(heartbeats=[pb.JobLease(job_id="nope", lease_token="t")]))
        assert (await call.read()).refused
        calls.append(call)
    assert len(app.nodes.sessions) == 50
    entry = app.nodes.sessions[f"{prefix}7"].entry()  # what the registry is renewed with is still all there
    assert (entry.max_concurrency, entry.labels, entry.version) == (2, {"zone": "a"}, "1.0")
    assert registrations_alive(prefix) < 5  # 50 before: one per stream
    for call in calls:
        call.cancel()


class _Stream:
    """A stand-in for a silent node stream (server/node.py's Session): what Liveness reads of one."""

    def __init__(self, node_id: str, sent: list[str], all_sent: asyncio.Event, fleet: int) -> None:
        self.node_id, self.token, self.pulse = node_id, "tok-" + node_id, Pulse()
        self._sent, self._all_sent, self._fleet = sent, all_sent, fleet

    def send(self, message: pb.SchedulerMessage) -> None:
        assert message.HasField("ping")
        self._sent.append(self.node_id)
        if len(self._sent) == self._fleet:
            self._all_sent.set()

    def unresponsive(self) -> None:
        raise AssertionError("no ping can time out within this test")

    def entry(self) -> NodeEntry:
        return NodeEntry(self.node_id, ["zh:en"], 1, 0, "me", {}, "v", 1, False)

    def on_message(self, verb: str, args: list[str]) -> None:
        raise AssertionError("not replaced")


async def test_pings_of_a_fleet_gone_silent_at_once_go_out_a_few_per_tick(redis: Any, settings: Settings,
                                                                            app: App) -> None:
    """500 streams silent since the same moment: each is pinged once, and no check sends more than a
    small slice of them (a ping and its pong hold the event loop ~0.2 ms: ~100 at once stalled every
    dispatch behind them; they went out ~200 at a time with a 100 ms check here)."""
    settings = dataclasses.replace(settings, ping_interval_ms=1_000, ping_timeout_ms=5_000)
    sent: list[str] = []
    all_sent = asyncio.Event()
    streams = [_Stream(f"n{i}", sent, all_sent, 500) for i in range(500)]
    bursts: list[int] = []

    class Counted(Liveness):
        def check(self, now: float, streams: list[Any] | None = None) -> None:
            before = len(sent)
            super().check(now, streams)
            bursts.append(len(sent) - before)

    stopping = asyncio.Event()
    checker = asyncio.create_task(Counted(Registry(redis, app.store.scripts, settings.node_ttl_ms), settings,
                                          lambda: streams).check_forever(stopping))
    # Every stream is due within the interval (less its spread) plus one liveness tick (250 ms).
    await asyncio.wait_for(all_sent.wait(), timeout=5)
    stopping.set()
    await checker
    assert sorted(sent) == sorted(s.node_id for s in streams)  # each pinged, once
    assert max(bursts) <= len(streams) // 10
