"""Back-pressure (issue 11): a node gets new assignments only while it acknowledges them; a job its
node never acknowledged goes back to the queue with its attempt given back (ack_timeout); a stream
that lets an assignment pass its ack timeout is quarantined until it acknowledges one or reconnects.

The stalled nodes here are raw NodeSession streams (no SDK), so they do exactly what they are told:
register, and then read or not, ack or not."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.protobuf.duration_pb2 import Duration
from helpers import pair, spec, until, watch_until
from lingua_scheduler.server.app import App
from lingua_sdk import pb, pb_grpc
from simnode import Behaviour, SimNode

ACK_TIMEOUT_MS = 1_000  # tests/conftest.py FAST
SWEEP_MS = 50


class RawNode:
    """A node on the raw protocol: registers, then reads its stream (or never does) and acks only
    what the test tells it to."""

    def __init__(self, stub: pb_grpc.SchedulerStub, node_id: str, max_concurrency: int, *, reads: bool) -> None:
        self.stub = stub
        self.node_id = node_id
        self.max_concurrency = max_concurrency
        self.reads = reads
        self.assignments: list[pb.Assignment] = []
        self.refused: list[pb.LeaseStatus] = []
        self.call: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> RawNode:
        self.call = self.stub.NodeSession()
        await self.call.write(pb.NodeMessage(register=pb.Register(
            node_id=self.node_id, pairs=[pair()], max_concurrency=self.max_concurrency)))
        if self.reads:
            self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while (m := await self.call.read()) is not grpc.aio.EOF:
            self.assignments += m.assignments
            self.refused += m.refused
            if m.HasField("ping"):  # a node that reads answers pings (liveness), and acks only as told
                await self.call.write(pb.NodeMessage(pong=pb.Pong(id=m.ping.id)))

    async def send(self, message: pb.NodeMessage) -> None:
        await self.call.write(message)

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader


def lease(a: pb.Assignment) -> pb.JobLease:
    return pb.JobLease(job_id=a.job_id, attempt=a.attempt, lease_token=a.lease_token)


async def listed(stub: pb_grpc.SchedulerStub, node_id: str) -> pb.NodeInfo | None:
    nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
    return next((n for n in nodes if n.node_id == node_id), None)


async def submit_many(stub: pb_grpc.SchedulerStub, count: int, tenants: int = 1, **overrides: Any) -> list[str]:
    batch = uuid.uuid4().hex[:8]  # new sessions: a repeat identity would answer an earlier job
    jobs = [spec(tenant_id=f"tenant-{i % tenants}", session_id=f"{batch}-{i}", **overrides) for i in range(count)]
    out: list[str] = []
    for start in range(0, count, 100):
        out += [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=jobs[start:start + 100]))).results]
    return out


# A node that never reads cannot answer pings either: liveness would end its stream (tests/test_liveness.py).
# Long pings keep such a stream connected, so what is tested with it is back-pressure alone.
PATIENT = dict(ping_interval_ms=60_000, ping_timeout_ms=60_000, node_ttl_ms=200_000)


@pytest.fixture
async def patient(make_app: Any) -> AsyncIterator[tuple[App, grpc.aio.Channel]]:
    app = await make_app(**PATIENT)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield app, channel


@pytest.fixture
async def ch(app: App) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


async def test_a_stalled_node_cannot_make_any_job_fail_or_wait_past_its_ack_timeout(
        patient: tuple[App, grpc.aio.Channel]) -> None:
    """The issue's reproduction: a node registering max_concurrency 1024 that never reads its stream.
    It is handed one ack window of jobs, never more; each comes back once (ack_timeout, attempt given
    back) within the ack timeout plus a sweep; every job, of every tenant, succeeds on its first
    counted attempt although max_attempts is 1."""
    app, ch = patient
    stub = pb_grpc.SchedulerStub(ch)
    stalled = await RawNode(stub, "stalled", 1024, reads=False).open()
    await until(lambda: listed(stub, "stalled"), what="the stalled node registered")
    job_ids = await submit_many(stub, 240, tenants=4, max_attempts=1)
    window = app.settings.ack_window
    # Alone in the pool, it is handed one window of jobs (not 240, not 1,024) ...
    await until(lambda: len(app.nodes.sessions["stalled"].in_flight) >= window, what="a window handed out")
    # A healthy node that needs a few seconds for the lot, so work is still queued when the stalled
    # node's jobs come back (and after their avoid window).
    healthy = await SimNode(ch, "healthy", [("zh", "en")], max_concurrency=8,
                            behaviour=Behaviour(processing_s=lambda: 0.1)).start()
    ends = [await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED, timeout=60) for job_id in job_ids]
    held = 0
    for job_id, events in zip(job_ids, ends, strict=True):
        assert all(e.state != pb.JOB_STATE_FAILED for e in events), job_id
        names = [e.event for e in events]
        stalled_claims = [i for i, e in enumerate(events) if e.event == "assign" and e.node_id == "stalled"]
        assert len(stalled_claims) <= 1, (job_id, names)  # ... each job at most once ...
        if stalled_claims:
            held += 1
            i = stalled_claims[0]
            back = events[i + 1]  # the next change: taken back unacknowledged, the attempt given back
            assert (back.event, back.attempt, back.error.code) == ("ack_timeout", 0, "LINGUA_ACK_TIMEOUT"), names
            waited = back.at.ToMilliseconds() - events[i].at.ToMilliseconds()
            assert ACK_TIMEOUT_MS <= waited < ACK_TIMEOUT_MS + SWEEP_MS + 2_000, (job_id, waited)
        else:
            assert [n for n in names if n != "start"] == ["submit", "assign", "complete"], (job_id, names)
        assert (events[-1].node_id, events[-1].attempt) == ("healthy", 1)
    assert held == window  # ... and, quarantined after the first ack timeout, nothing more after that
    assert app.nodes.sessions["stalled"].quarantined and not app.nodes.sessions["stalled"].in_flight
    await healthy.stop()
    await stalled.close()


async def test_a_stream_holds_at_most_ack_window_unacknowledged_and_gets_more_as_it_acks(
        make_app: AppFactory) -> None:
    app = await make_app(ack_window=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        # A node with 64 slots that reads but acknowledges nothing: 4 assignments, no more.
        mute = await RawNode(stub, "mute", 64, reads=True).open()
        job_ids = await submit_many(stub, 80, max_attempts=1)
        await until(lambda: len(mute.assignments) >= 4, what="a window sent")
        # It acks two of them: two more are sent (the window refills as it acknowledges).
        await mute.send(pb.NodeMessage(acks=[lease(a) for a in mute.assignments[:2]]))
        await until(lambda: len(mute.assignments) >= 6, what="the window refilled")
        await mute.send(pb.NodeMessage(completions=[pb.Completion(lease=lease(a), result=pb.JobResult())
                                                    for a in mute.assignments[:2]]))
        # Its last four are never acknowledged: taken back after the ack timeout, attempts given back,
        # and the stream is quarantined; a node that acks takes everything from there on.
        unacked = [a.job_id for a in mute.assignments[2:]]
        for job_id in unacked:
            await until(lambda j=job_id: _last_event(app, j, "ack_timeout"), what="ack_timeout")
        keen = await SimNode(ch, "keen", [("zh", "en")], max_concurrency=64,
                             behaviour=Behaviour(processing_s=lambda: 30)).start()
        # The keen node acks at once, so its 64 slots fill although the window is 4.
        await until(lambda: len(app.nodes.sessions["keen"].in_flight) == 64, what="keen holds 64")
        for job_id in unacked:
            events = await app.store.events(job_id)
            assert [e["e"] for e in events][:3] == ["submit", "assign", "ack_timeout"], events
            assert events[2]["a"] == 0 and events[2]["n"] == "mute"
        served = [a.job_id for a in mute.assignments]
        assert len(served) == 6 == len(set(served)) and set(served) <= set(job_ids)
        await until(lambda: app.nodes.sessions["mute"].quarantined, what="mute quarantined")
        await keen.crash()
        await mute.close()


async def test_a_quarantined_stream_gets_work_again_once_it_acknowledges(
        app: App, ch: grpc.aio.Channel) -> None:
    stub = pb_grpc.SchedulerStub(ch)
    laggard = await RawNode(stub, "laggard", 4, reads=True).open()
    first = await submit_many(stub, 2, max_attempts=1)
    await until(lambda: len(laggard.assignments) == 2, what="both handed to the laggard")
    # Neither is acknowledged: both come back (attempts given back), and the stream is quarantined,
    # which ListNodes shows.
    for job_id in first:
        await until(lambda j=job_id: _last_event(app, j, "ack_timeout"), what="ack_timeout")
    await until(lambda: _quarantined(stub, "laggard"), what="ListNodes shows the quarantine")
    # While quarantined it gets nothing new, though it has free slots: another node takes all.
    helper = await SimNode(ch, "helper", [("zh", "en")], max_concurrency=8).start()
    later = await submit_many(stub, 6, max_attempts=1)
    for job_id in first + later:
        events = await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
        assert (events[-1].node_id, events[-1].attempt) == ("helper", 1)
        assert [e.node_id for e in events if e.event == "assign"][-1] == "helper"
    assert len(laggard.assignments) == 2
    await helper.stop()
    # A late ack of one of its old assignments (the job went elsewhere: refused) ends the quarantine:
    # the node is reading its stream again.
    await laggard.send(pb.NodeMessage(acks=[lease(laggard.assignments[0])]))
    await until(lambda: len(laggard.refused) == 1, what="the late ack answered")
    assert laggard.refused[0].error_code == "FAILED_PRECONDITION"
    (again,) = await submit_many(stub, 1, max_attempts=1)
    await until(lambda: len(laggard.assignments) == 3, what="work for the laggard again")
    a = laggard.assignments[2]
    assert a.job_id == again
    await laggard.send(pb.NodeMessage(acks=[lease(a)], completions=[
        pb.Completion(lease=lease(a), result=pb.JobResult(text_asr="late but fine"))]))
    events = await watch_until(stub, again, pb.JOB_STATE_SUCCEEDED)
    assert (events[-1].node_id, events[-1].attempt) == ("laggard", 1)
    await until(lambda: _quarantined(stub, "laggard", False), what="ListNodes shows it back")
    await laggard.close()


async def test_a_quarantined_node_that_reconnects_gets_work_on_its_new_stream(
        patient: tuple[App, grpc.aio.Channel]) -> None:
    app, ch = patient
    stub = pb_grpc.SchedulerStub(ch)
    stuck = await RawNode(stub, "stuck", 4, reads=False).open()
    (job_id,) = await submit_many(stub, 1, max_attempts=1)
    await until(lambda: _last_event(app, job_id, "ack_timeout"), what="ack_timeout")
    await until(lambda: "stuck" in app.nodes.sessions and app.nodes.sessions["stuck"].quarantined,
                what="quarantined")
    fresh = await RawNode(stub, "stuck", 4, reads=True).open()  # same node id: replaces the old stream
    await until(lambda: len(fresh.assignments) == 1, what="work on the new stream")
    a = fresh.assignments[0]
    assert (a.job_id, a.attempt) == (job_id, 1)  # the first attempt again: the stalled one was given back
    await fresh.send(pb.NodeMessage(completions=[pb.Completion(lease=lease(a), result=pb.JobResult())]))
    await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
    await stuck.close()
    await fresh.close()


async def test_an_assignment_never_acknowledged_before_its_stream_closed_keeps_its_attempt(
        app: App, ch: grpc.aio.Channel) -> None:
    """The stream ends with an assignment unacknowledged: after the grace the job is requeued as an
    ack timeout (attempt given back), not node_lost, so max_attempts 1 does not fail it."""
    stub = pb_grpc.SchedulerStub(ch)
    gone = await RawNode(stub, "gone", 4, reads=True).open()
    (job_id,) = await submit_many(stub, 1, max_attempts=1)
    await until(lambda: len(gone.assignments) == 1, what="assigned")
    await gone.close()
    await until(lambda: _last_event(app, job_id, "ack_timeout"), what="requeued")
    rescuer = await SimNode(ch, "rescuer", [("zh", "en")]).start()
    events = await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
    names = [e.event for e in events if e.event != "start"]
    assert names == ["submit", "assign", "ack_timeout", "assign", "complete"]
    assert (events[2].attempt, events[2].node_id, events[-1].attempt) == (0, "gone", 1)
    # Whichever came first, this instance after the stream's grace or a sweeper at the shortened lease.
    assert events[2].error.code in ("LINGUA_NODE_LOST", "LINGUA_ACK_TIMEOUT")
    await rescuer.stop()


async def test_a_long_poll_assignment_never_acknowledged_is_requeued_with_its_attempt(
        app: App, stub: pb_grpc.SchedulerStub) -> None:
    (job_id,) = await submit_many(stub, 1, max_attempts=1)
    (a,) = (await stub.Assign(pb.AssignRequest(node_id="poller", pairs=[pair()], max_jobs=1))).assignments
    # Never acknowledged: after the ack timeout another node's long-poll gets it, on attempt 1 again.
    (b,) = (await stub.Assign(pb.AssignRequest(node_id="poller-2", pairs=[pair()], max_jobs=1,
                                               wait=Duration(seconds=10)))).assignments
    assert (a.attempt, b.job_id, b.attempt) == (1, job_id, 1)
    events = await app.store.events(job_id)
    assert [e["e"] for e in events] == ["submit", "assign", "ack_timeout", "assign"]
    assert (events[2]["a"], events[2]["ec"]) == (0, "LINGUA_ACK_TIMEOUT")


async def _last_event(app: App, job_id: str, name: str) -> bool:
    events = await app.store.events(job_id)
    return bool(events) and events[-1]["e"] == name


async def _quarantined(stub: pb_grpc.SchedulerStub, node_id: str, want: bool = True) -> bool:
    info = await listed(stub, node_id)
    return info is not None and info.quarantined == want
