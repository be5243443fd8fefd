"""Liveness of node streams (server/liveness.py): pings, the ping timeout, batched registry renewals,
and ListNodes showing only nodes heard from lately. Real streams, real Redis; the test settings ping
after 0.5 s of silence and end a stream 1.5 s after an unanswered ping."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from conftest import AppFactory
from helpers import spec, until, watch_until
from lingua_scheduler.server import keys
from lingua_scheduler.server import registry as registry_module
from lingua_scheduler.server.app import App
from lingua_scheduler.server.calls import ReadClock
from lingua_scheduler.server.liveness import Liveness, Pulse
from lingua_scheduler.server.registry import NodeEntry, Registry
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc
from simnode import Behaviour, SimNode


async def listed(stub: pb_grpc.SchedulerStub) -> list[str]:
    return sorted(n.node_id for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes)


async def test_a_node_that_stops_answering_pings_is_dropped_and_its_job_finished_elsewhere(
        make_app: AppFactory) -> None:
    # A lease far longer than ping interval + timeout: only liveness can take the job back in time.
    app = await make_app(lease_ms=60_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        hung = await SimNode(ch, "hung", [("zh", "en")], behaviour=Behaviour(
            processing_s=lambda: 3600, heartbeat=False, answer_pings=False)).start()
        assert hung.registered is not None
        assert (hung.registered.ping_interval.ToMilliseconds(), hung.registered.ping_timeout.ToMilliseconds()) == (500, 1500)
        job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
        await watch_until(stub, job_id, pb.JOB_STATE_RUNNING)  # acked: the node holds it, then hangs
        await hung.wait_for(lambda: hung.closed.is_set(), timeout=10)
        assert hung.status == grpc.StatusCode.UNAVAILABLE and "no answer to ping within 1500 ms" in hung.details
        assert hung.pings == 1  # one ping, unanswered: the stream ended (its TCP connection is still open)
        # The server releases the entry as the stream ends: the node may hear the end a moment before.
        async def none_listed() -> bool:
            return await listed(stub) == []
        await until(none_listed, timeout=10, what="the hung node off ListNodes")
        healthy = await SimNode(ch, "healthy", [("zh", "en")]).start()
        events = await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
        # Taken back at the end of the stream's grace: by this instance (node_lost), or by a sweep that
        # found the lease, shrunk to that same grace, due a moment earlier (lease_expired; a busy machine).
        lost = [e for e in events if e.error.code in ("LINGUA_NODE_LOST", "LINGUA_LEASE_EXPIRED")]
        assert lost and lost[0].node_id == "hung" and lost[0].state == pb.JOB_STATE_QUEUED, events
        assert (events[-1].node_id, events[-1].attempt) == ("healthy", 2)
        assert await listed(stub) == ["healthy"]
        await healthy.stop()
        await hung.stop()


async def test_a_node_that_answers_pings_stays_listed_without_any_job(app: App, redis: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        alive = await SimNode(ch, "alive", [("zh", "en")]).start()
        idle_hung = await SimNode(ch, "idle-hung", [("zh", "en")], behaviour=Behaviour(answer_pings=False)).start()
        first_seen = int(await redis.hget(keys.node("alive"), "seen"))
        assert await listed(stub) == ["alive", "idle-hung"]
        # A node with no job sends nothing but answers: 6 pings span over 3 s, more than the ping
        # interval + timeout and the ListNodes window: it stays listed only if its entry is renewed.
        while alive.pings < 6:
            assert await listed(stub) in (["alive"], ["alive", "idle-hung"])
            assert not alive.closed.is_set()
            await alive.wait_for(lambda n=alive.pings: alive.pings > n, timeout=5)
        assert idle_hung.closed.is_set() and idle_hung.status == grpc.StatusCode.UNAVAILABLE
        assert await listed(stub) == ["alive"] and not alive.closed.is_set() and not alive.errors
        assert int(await redis.hget(keys.node("alive"), "seen")) > first_seen  # renewed, not just registered
        assert not await redis.exists(keys.node("idle-hung"))  # released when its stream ended
        await alive.stop()
        await idle_hung.stop()


async def test_list_nodes_hides_an_entry_not_renewed_lately(app: App, redis: Any, settings: Settings) -> None:
    """An entry whose instance stopped renewing it (the instance hung or died, or its node went
    silent) is hidden at once, not kept until its TTL runs out; renewed again, it is back."""
    registry = Registry(redis, app.store.scripts, settings.node_ttl_ms)
    seconds, micros = await redis.time()
    clock = await app.store.scripts.call(redis, ReadClock().call())  # what ListNodes compares `seen` with
    assert 0 <= clock - (seconds * 1000 + micros // 1000) < 5_000
    for node_id in ("fresh", "stale"):
        await registry.register(NodeEntry(node_id, ["zh:en"], 1, 0, "gone-instance", {}, "v", 1, False), "tok-" + node_id)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        assert await listed(stub) == ["fresh", "stale"]
        (seen,) = await redis.hmget(keys.node("stale"), ["seen"])
        await redis.hset(keys.node("stale"), "seen", int(seen) - settings.node_listed_ms() - 1)
        assert await listed(stub) == ["fresh"]
        assert await redis.exists(keys.node("stale"))  # hidden, not deleted: a renewal brings it back
        (entry,) = [e for e in await registry.entries(10**9) if e.node_id == "stale"]
        assert await registry.renew_many([(entry, "tok-stale")]) == ["tok-stale"]
        assert await listed(stub) == ["fresh", "stale"]


async def test_renewals_in_one_batch_keep_newest_stream_wins(app: App, redis: Any, settings: Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """renew_many answers per entry, in order: renewed (the token), taken back after it expired (""; listed
    again), refused because a newer stream took the node id (None); also across pipelines."""
    monkeypatch.setattr(registry_module, "RENEW_BATCH", 2)  # 3 entries: two round trips
    registry = Registry(redis, app.store.scripts, settings.node_ttl_ms)

    def entry(node_id: str) -> NodeEntry:
        return NodeEntry(node_id, ["zh:en"], 2, 1, "me", {"zone": "a"}, "v", 7, False)

    for node_id in ("kept", "expired", "taken"):
        await registry.register(entry(node_id), "mine")
    await redis.delete(keys.node("expired"))
    await registry.entries(settings.node_listed_ms())  # drops "expired" from the index
    await registry.register(entry("taken"), "newer")
    replies = await registry.renew_many([(entry(n), "mine") for n in ("kept", "expired", "taken")])
    assert replies == ["mine", "", None]
    assert sorted(e.node_id for e in await registry.entries(settings.node_listed_ms())) == ["expired", "kept", "taken"]
    assert await redis.hget(keys.node("taken"), "session") == b"newer"


async def test_a_renewal_refused_by_a_newer_stream_ends_the_older_one(app: App, redis: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        node = await SimNode(ch, "twin", [("zh", "en")]).start()
        # Another stream of the node id took the entry over, and its announcement never came (lost
        # with a pub/sub reconnect): the next renewal, after the node answers a ping, finds out.
        await redis.hset(keys.node("twin"), "session", "a-newer-stream")
        await node.wait_for(lambda: node.closed.is_set(), timeout=10)
        assert any("replaced" in e for e in node.errors) and node.status == grpc.StatusCode.OK
        assert await redis.hget(keys.node("twin"), "session") == b"a-newer-stream"  # left to the newer stream


@pytest.mark.parametrize(("overrides", "problem"), [
    (dict(ping_interval_ms=0), "ping_interval_ms and ping_timeout_ms must be above 0"),
    (dict(ping_timeout_ms=0), "ping_interval_ms and ping_timeout_ms must be above 0"),
    (dict(node_ttl_ms=15_000), "node_ttl_ms must be at least 18750"),
])
def test_settings_refuse_ping_settings_that_cannot_work(overrides: dict[str, int], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings(**overrides).validate()  # type: ignore[arg-type]
    assert Settings().node_listed_ms() == 18_750  # the defaults: 5 s + 10 s, plus 3 ticks of 1.25 s


class _Stream:
    """A stand-in for a node stream (server/node.py's Session): what Liveness reads of one."""

    def __init__(self, node_id: str) -> None:
        self.node_id, self.token, self.pulse = node_id, "tok-" + node_id, Pulse(last_seen=1.0, renewed_at=0.0)
        self.sent: list[pb.SchedulerMessage] = []

    def send(self, message: pb.SchedulerMessage) -> None:
        self.sent.append(message)

    def entry(self) -> NodeEntry:
        return NodeEntry(self.node_id, ["zh:en"], 1, 0, "me", {}, "v", 1, False)

    def on_message(self, verb: str, args: list[str]) -> None:
        raise AssertionError("not replaced")


async def test_a_renewal_that_crosses_its_streams_close_does_not_leave_the_entry_behind(
        app: App, redis: Any, settings: Settings) -> None:
    """The stream closed (its entry released) while its renewal was on the way: the renewal finds no
    entry and takes it back; since the stream is gone by then, it releases it again. A live stream
    whose entry had expired keeps the entry it took back."""
    registry = Registry(redis, app.store.scripts, settings.node_ttl_ms)
    closing, live = _Stream("closing"), _Stream("live")
    calls = 0

    def streams() -> list[_Stream]:
        nonlocal calls
        calls += 1
        return [closing, live] if calls == 1 else [live]  # "closing" closed during the renewal

    await Liveness(registry, settings, streams).renew(now=1_000.0)
    assert not await redis.exists(keys.node("closing"))
    assert await redis.hget(keys.node("live"), "session") == b"tok-live"
    assert closing.pulse.renewed_at == live.pulse.renewed_at == 1_000.0
