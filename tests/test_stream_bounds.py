"""Per-stream buffers are bounded (issue 11): a client that stops reading has its stream ended with
RESOURCE_EXHAUSTED (STREAM_OVERFLOW) instead of growing the server's memory; other streams go on."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from conftest import AppFactory
from helpers import pair, spec, watch_until
from lingua_scheduler.server import keys
from lingua_scheduler.server.app import App
from lingua_scheduler.server.errors import StreamOverflow
from lingua_sdk import pb, pb_grpc
from simnode import SimNode

BOUND = 8


@pytest.fixture
async def app(make_app: AppFactory) -> App:
    return await make_app(stream_outbox_max=BOUND)


@pytest.fixture
async def ch(app: App) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel


def overflow_reason(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "STREAM_OVERFLOW" in str(err.trailing_metadata())


async def test_a_node_that_writes_junk_and_never_reads_is_closed_and_its_jobs_go_elsewhere(
        app: App, ch: grpc.aio.Channel) -> None:
    stub = pb_grpc.SchedulerStub(ch)
    bystander = await SimNode(ch, "bystander", [("en", "zh")]).start()
    call = stub.NodeSession()
    await call.write(pb.NodeMessage(register=pb.Register(node_id="flooder", pairs=[pair()], max_concurrency=4)))
    job_ids = [r.job_id for r in (await stub.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=i) for i in range(4)]))).results]
    for job_id in job_ids:  # all four handed to the flooder, which never reads them
        await watch_until(stub, job_id, pb.JOB_STATE_ASSIGNED)
    session = app.nodes.sessions["flooder"]
    deepest = 0
    junk = pb.NodeMessage(register=pb.Register(node_id="flooder"))  # each answered by an error message
    while not session.overflowed:
        await call.write(junk)
        deepest = max(deepest, len(session.outbox))
    assert deepest <= BOUND + 1  # the messages, and at most the closing marker
    await session.finished.wait()  # the server lets the stream go without the node reading a byte
    # What the node finds once it reads: what was already on the wire, then RESOURCE_EXHAUSTED.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert overflow_reason(ended.value)
    # Its jobs are handled as for any closed stream: another node finishes them.
    rescuer = await SimNode(ch, "rescuer", [("zh", "en")]).start()
    for job_id in job_ids:
        await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)
    # The other stream was never disturbed.
    other = (await stub.Submit(pb.SubmitRequest(jobs=[spec(src_lang="en", tgt_lang="zh")]))).results[0].job_id
    assert (await watch_until(stub, other, pb.JOB_STATE_SUCCEEDED))[-1].node_id == "bystander"
    for n in (bystander, rescuer):
        await n.stop()


async def test_a_watch_inbox_is_bounded_and_ends_the_watch_when_it_overflows(app: App, redis: Any) -> None:
    channel = "lingua:test:flood"
    async with app.dispatcher.watching(channel) as inbox, app.dispatcher.watching(channel + ":mark") as mark:
        for i in range(BOUND * 4):
            await redis.publish(channel, f"m{i}")
        await redis.publish(channel + ":mark", "after")
        assert await mark.get() == b"after"  # one subscription, in order: every flood message was offered
        assert inbox.qsize() == BOUND
        with pytest.raises(StreamOverflow):
            await inbox.get()
        with pytest.raises(StreamOverflow):
            inbox.get_nowait()


async def test_a_watch_job_client_that_does_not_read_is_ended_with_resource_exhausted(
        app: App, ch: grpc.aio.Channel, redis: Any) -> None:
    stub = pb_grpc.SchedulerStub(ch)
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    events = keys.JobKeys.of(job_id).channel
    watch = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
    first = await watch.read()
    assert first.version == 1
    # Events the server must forward, each large, so its writes soon wait on the unread stream.
    big = "x" * 200_000
    async with app.dispatcher.watching(events + ":mark") as mark:
        for v in range(2, 2 + 100):
            await redis.publish(events, json.dumps({"v": v, "s": "queued", "a": 0, "n": "", "e": "test", "t": 0,
                                                    "ec": "X", "em": big, "er": "0"}))
        await redis.publish(events + ":mark", "after")
        await mark.get()
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while (event := await watch.read()) is not grpc.aio.EOF:
            got.append(event.version)
    assert overflow_reason(ended.value)
    assert got == list(range(2, 2 + len(got))) and len(got) < 100
