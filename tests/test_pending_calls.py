"""Calls gRPC has received but the server has not yet started (--grpc-max-pending-calls): a burst of
streams opened at once queues there, since grpc.aio starts calls one at a time. gRPC's own default
refused some from 1000 on with a bare CANCELLED (32 clients x 50 WatchJobs cut the bench)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import AppFactory
from helpers import spec
from lingua_scheduler.server.settings import Settings
from lingua_sdk import AsyncClient, pb, pb_grpc
from lingua_sdk.errors import Cancelled

BURST = 2000  # WatchJob streams opened at once: well over gRPC's default backlog of 1000


async def submit(stub: pb_grpc.SchedulerStub, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 500):  # the batch cap
        batch = [spec(utterance_index=i) for i in range(start, min(count, start + 500))]
        ids += [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=batch))).results]
    return ids


async def test_a_burst_of_watches_opened_at_once_all_start(stub: pb_grpc.SchedulerStub) -> None:
    ids = await submit(stub, BURST)  # no node: every job stays QUEUED, every watch stays open
    calls = [stub.WatchJob(pb.WatchJobRequest(job_id=job_id)) for job_id in ids]
    try:
        firsts = await asyncio.gather(*[call.read() for call in calls], return_exceptions=True)
    finally:
        for call in calls:
            call.cancel()
    refused = [f for f in firsts if not isinstance(f, pb.JobEvent)]
    assert not refused, f"{len(refused)} of {BURST} watches refused, first: {refused[0]!r}"
    assert {f.state for f in firsts if isinstance(f, pb.JobEvent)} == {pb.JOB_STATE_QUEUED}


async def test_calls_over_the_bound_are_refused_and_the_sdk_names_the_bound(make_app: AppFactory) -> None:
    app = await make_app(grpc_max_pending_calls=4)
    async with AsyncClient(f"127.0.0.1:{app.port}", tls=False) as client:
        ids = [r.job_id for r in await client.submit_many([spec(utterance_index=i) for i in range(300)])]

        async def first_state(job_id: str) -> pb.JobState | Cancelled:
            try:
                async for event in client.watch(job_id):
                    return event.state
            except Cancelled as err:
                return err
            raise AssertionError("the watch ended without an event")

        outcomes = await asyncio.gather(*[first_state(job_id) for job_id in ids])
    refused = [o for o in outcomes if isinstance(o, Cancelled)]
    assert refused, "300 calls at once over a bound of 4: some must be refused"
    assert all(err.code == grpc.StatusCode.CANCELLED and "--grpc-max-pending-calls" in str(err) for err in refused)
    started = [o for o in outcomes if not isinstance(o, Cancelled)]
    assert started and {s.name for s in started} == {"QUEUED"}  # the rest were served as usual


def test_the_bound_is_read_from_its_flag_and_must_be_positive() -> None:
    assert Settings.load(["--grpc-max-pending-calls", "50000"], env={}).grpc_max_pending_calls == 50_000
    assert Settings.load([], env={"LINGUA_GRPC_MAX_PENDING_CALLS": "20"}).grpc_max_pending_calls == 20
    with pytest.raises(ValueError, match="grpc_max_pending_calls must be at least 1"):
        Settings.load(["--grpc-max-pending-calls", "0"], env={})
