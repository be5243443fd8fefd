"""Bad input through a real server: malformed Timestamps and Durations, src == tgt, job ids that are
not the scheduler's, undecodable bytes. Each is INVALID_ARGUMENT naming the field, changes nothing,
and a burst of it logs at most one line."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import all_keys, pair, spec
from lingua_scheduler.server import keys
from lingua_sdk import pb, pb_grpc

pytestmark = pytest.mark.single_redis  # validation happens before Redis: one backend is enough

INVALID = grpc.StatusCode.INVALID_ARGUMENT
JOB = "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZZ"  # well-formed, never issued: NOT_FOUND


def _soon(**fields: int) -> Timestamp:
    return Timestamp(seconds=int(time.time()) + 60, **fields)


async def snapshot(redis: Any) -> dict[bytes, bytes]:
    return {k: await redis.dump(k) for k in await all_keys(redis) if k != keys.INSTANCES.encode()}  # not job data


async def refused(call: Any, request: Any) -> str:
    """The details of the INVALID_ARGUMENT a unary call answers."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request)
    assert err.value.code() == INVALID, err.value.details()
    return err.value.details() or ""


BAD_TIMES: list[tuple[str, Any, str]] = [
    ("Submit", pb.SubmitRequest(jobs=[spec(), spec(utterance_index=1, deadline=_soon(nanos=2_000_000_000))]),
     "jobs[1].deadline: nanos"),
    ("Submit", pb.SubmitRequest(jobs=[spec(deadline=_soon(nanos=-1))]), "jobs[0].deadline: nanos"),
    ("Submit", pb.SubmitRequest(jobs=[spec(deadline=Timestamp(seconds=10**12))]), "jobs[0].deadline: seconds"),
    ("Submit", pb.SubmitRequest(jobs=[spec(deadline=Timestamp(seconds=-10**12))]), "jobs[0].deadline: seconds"),
    ("Submit", pb.SubmitRequest(jobs=[spec(execution_timeout=Duration(seconds=5, nanos=-1))]),
     "jobs[0].execution_timeout: seconds and nanos must have the same sign"),
    ("Submit", pb.SubmitRequest(jobs=[spec(execution_timeout=Duration(seconds=-5, nanos=1))]),
     "jobs[0].execution_timeout: seconds and nanos must have the same sign"),
    ("Submit", pb.SubmitRequest(jobs=[spec(execution_timeout=Duration(seconds=1, nanos=2_000_000_000))]),
     "jobs[0].execution_timeout: nanos"),
    ("Submit", pb.SubmitRequest(jobs=[spec(execution_timeout=Duration(seconds=10**13))]),
     "jobs[0].execution_timeout: seconds"),
    ("Assign", pb.AssignRequest(node_id="n1", pairs=[pair()], wait=Duration(seconds=1, nanos=-1)),
     "wait: seconds and nanos must have the same sign"),
    ("Assign", pb.AssignRequest(node_id="n1", pairs=[pair()], wait=Duration(nanos=1_000_000_000)), "wait: nanos"),
    ("Assign", pb.AssignRequest(node_id="n1", pairs=[pair()], wait=Duration(seconds=-10**13)), "wait: seconds"),
]


async def test_malformed_timestamps_and_durations_name_the_field_and_log_nothing(
        stub: pb_grpc.SchedulerStub, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before = await snapshot(redis)
    for method, request, text in BAD_TIMES:
        assert text in await refused(getattr(stub, method), request), (method, text)
    assert await snapshot(redis) == before
    assert len(caplog.records) <= 1, [r.getMessage() for r in caplog.records]
    # Well-formed ones still pass: a negative Duration with both parts negative is just negative.
    ok = await stub.Submit(pb.SubmitRequest(jobs=[spec(deadline=_soon(nanos=999_999_999),
                                                       execution_timeout=Duration(seconds=1, nanos=5))]))
    assert ok.results[0].created
    assert "wait: must be 0 to 60 s" in await refused(
        stub.Assign, pb.AssignRequest(node_id="n1", pairs=[pair()], wait=Duration(seconds=-1, nanos=-1)))


async def test_src_equal_to_tgt_is_refused_for_jobs_and_pairs(stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    before = await snapshot(redis)
    assert "jobs[1].tgt_lang: must differ from src_lang" in await refused(
        stub.Submit, pb.SubmitRequest(jobs=[spec(), spec(utterance_index=1, src_lang="en", tgt_lang="en")]))
    assert "pairs[1].tgt_lang: must differ from src_lang" in await refused(
        stub.Assign, pb.AssignRequest(node_id="n1", pairs=[pair(), pair("en", "en")]))
    assert await snapshot(redis) == before


async def register(stub: pb_grpc.SchedulerStub, reg: pb.Register) -> tuple[Any, pb.SchedulerMessage]:
    """Open a NodeSession, send `reg`, return the call and the first answer."""
    call = stub.NodeSession()
    await call.write(pb.NodeMessage(register=reg))
    return call, await call.read()


async def register_refused(stub: pb_grpc.SchedulerStub, reg: pb.Register) -> str:
    call = stub.NodeSession()
    await call.write(pb.NodeMessage(register=reg))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == INVALID, err.value.details()
    return err.value.details() or ""


async def test_registration_skips_or_refuses_same_language_pools(stub: pb_grpc.SchedulerStub) -> None:
    assert "register.pairs[1].tgt_lang: must differ from src_lang" in await register_refused(
        stub, pb.Register(node_id="n1", max_concurrency=1, pairs=[pair(), pair("ja", "ja")]))
    assert "register.tts_langs" in await register_refused(
        stub, pb.Register(node_id="n1", max_concurrency=1, asr_langs=["en"], tts_langs=["en"]))
    # asr x tts: every combination but the same-language ones.
    call, first = await register(stub, pb.Register(node_id="n1", max_concurrency=1, asr_langs=["en", "zh"],
                                                   tts_langs=["en", "zh", "ja"]))
    assert list(first.registered.pools) == ["en:zh", "en:ja", "zh:en", "zh:ja"]
    nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
    assert [list(n.pools) for n in nodes] == [["en:zh", "en:ja", "zh:en", "zh:ja"]]
    call.cancel()


BAD_IDS = [
    "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZ ",  # a trailing space
    "zh:en:{0}01JDZZZZZZZZZZ\nZZZZZZZZZZZ",  # a newline
    "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZé",  # non-ASCII
    "zh:en:{0}01jdzzzzzzzzzzzzzzzzzzzzzz",  # lower case: another key than the job's
    "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZZZ",  # 27 characters
    "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZ",  # 25 characters
    "zh:en:{0}81JDZZZZZZZZZZZZZZZZZZZZZZ",  # past the largest ULID
    "zh:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZU",  # U is not Crockford base32
    "zh:en:{0}01J",
    "zh:en:{01}01JDZZZZZZZZZZZZZZZZZZZZZZ",  # a partition with a leading zero
    "zh:en:{\u00b2}01JDZZZZZZZZZZZZZZZZZZZZZZ",  # a superscript two: isdigit() but not a partition
    "zh:en:{\u0661}01JDZZZZZZZZZZZZZZZZZZZZZZ",  # an Arabic-Indic one
    "en:en:{0}01JDZZZZZZZZZZZZZZZZZZZZZZ",  # src == tgt: never issued
]


async def test_job_ids_not_issued_by_the_scheduler_are_refused_everywhere(
        stub: pb_grpc.SchedulerStub, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before = await snapshot(redis)
    for bad in BAD_IDS:
        lease = pb.JobLease(job_id=bad, attempt=1)
        assert "job_id: " in await refused(stub.GetJob, pb.GetJobRequest(job_id=bad)), bad
        assert "job_id: " in await refused(stub.CancelJob, pb.CancelJobRequest(job_id=bad)), bad
        assert "leases[0].job_id: " in await refused(
            stub.Heartbeat, pb.HeartbeatRequest(node_id="n1", leases=[lease])), bad
        assert "job_id: " in await refused(
            stub.Complete, pb.CompleteRequest(job_id=bad, attempt=1, node_id="n1", result=pb.JobResult())), bad
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchJob(pb.WatchJobRequest(job_id=bad)):
                pass
        assert err.value.code() == INVALID and "job_id: " in (err.value.details() or ""), bad
    assert await snapshot(redis) == before
    assert len(caplog.records) <= 1, [r.getMessage() for r in caplog.records]
    # The well-formed id passes validation and is simply not found.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(pb.GetJobRequest(job_id=JOB))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_job_ids_on_the_node_stream_are_refused_naming_the_field(
        stub: pb_grpc.SchedulerStub, redis: Any) -> None:
    bad = [pb.JobLease(job_id=b, attempt=1) for b in BAD_IDS]
    call, first = await register(stub, pb.Register(node_id="n1", max_concurrency=1, pairs=[pair()], holding=bad))
    assert first.HasField("registered")
    await call.write(pb.NodeMessage(acks=bad, heartbeats=bad, unavailable=bad,
                                    completions=[pb.Completion(lease=x, result=pb.JobResult()) for x in bad]))
    got: list[pb.LeaseStatus] = []
    while len(got) < 5 * len(bad):
        got += (await call.read()).refused
    n = len(bad)
    for i, field in enumerate(["register.holding", "completions", "acks", "heartbeats", "unavailable"]):
        for j, status in enumerate(got[i * n:(i + 1) * n]):
            assert not status.ok and status.error_code == "INVALID_ARGUMENT"
            suffix = ".lease.job_id" if field == "completions" else ".job_id"
            assert status.error_message.startswith(f"{field}[{j}]{suffix}: "), status.error_message
    assert not [k for k in await all_keys(redis, "*") if b":job:" in k]
    call.cancel()


PATH = "/lingua.scheduler.v1.Scheduler/"
JUNK = [b"\xff" * 11, b"\x0a\xff", b"junk junk"]
UNARY = {"Submit": pb.SubmitRequest, "GetJob": pb.GetJobRequest, "CancelJob": pb.CancelJobRequest,
         "Assign": pb.AssignRequest, "Heartbeat": pb.HeartbeatRequest, "Complete": pb.CompleteRequest,
         "ListNodes": pb.ListNodesRequest}


def test_the_junk_is_really_undecodable() -> None:
    for message in [*UNARY.values(), pb.WatchJobRequest, pb.NodeMessage]:
        for junk in JUNK:
            with pytest.raises(Exception, match="Error parsing message"):
                message.FromString(junk)


async def test_undecodable_requests_are_invalid_argument_and_log_one_line(
        channel: grpc.aio.Channel, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before = await snapshot(redis)
    for _ in range(3):  # a burst
        for method, message in UNARY.items():
            raw = channel.unary_unary(PATH + method, request_serializer=None, response_deserializer=None)
            for junk in JUNK:
                assert await refused(raw, junk) == f"request: not a valid {message.__name__}"
        watch = channel.unary_stream(PATH + "WatchJob", request_serializer=None, response_deserializer=None)
        for junk in JUNK:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in watch(junk):
                    pass
            assert err.value.code() == INVALID and err.value.details() == "request: not a valid WatchJobRequest"
    assert await snapshot(redis) == before
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no tracebacks
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert "not a valid" in caplog.records[0].getMessage()


async def test_junk_on_a_node_stream_is_answered_and_the_stream_and_others_go_on(
        channel: grpc.aio.Channel, stub: pb_grpc.SchedulerStub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    raw = channel.stream_stream(PATH + "NodeSession", request_serializer=None,
                                response_deserializer=pb.SchedulerMessage.FromString)
    # Junk instead of the registration ends the stream.
    call = raw()
    await call.write(JUNK[0])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == INVALID and err.value.details() == "request: not a valid NodeMessage"
    # On a registered stream, each junk message is answered with an error; the stream stays open.
    junky = raw()
    await junky.write(pb.NodeMessage(register=pb.Register(node_id="junky", max_concurrency=1,
                                                         pairs=[pair()])).SerializeToString())
    assert (await junky.read()).HasField("registered")
    other, first = await register(stub, pb.Register(node_id="other", max_concurrency=1, pairs=[pair("ja", "en")]))
    assert first.HasField("registered")
    for junk in JUNK * 3:
        await junky.write(junk)
        assert (await junky.read()).error == "INVALID_ARGUMENT: request: not a valid NodeMessage"
    for utterance, (stream, src) in enumerate(((junky, "zh"), (other, "ja"))):
        job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(src_lang=src, utterance_index=utterance)]))).results[0].job_id
        got = await stream.read()
        assert [a.job_id for a in got.assignments] == [job_id]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    junky.cancel()
    other.cancel()


def test_throttled_warning_logs_the_first_then_one_line_per_interval_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    from lingua_scheduler.server.throttle import ThrottledWarning

    now = [100.0]
    warn = ThrottledWarning(logging.getLogger("test.throttle"), interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        assert warn("junk from %s", "a")
        for _ in range(5):
            now[0] += 1
            assert not warn("junk from %s", "b")
        now[0] = 160.0
        assert warn("junk from %s", "c")
        assert not warn("junk from %s", "d")
    assert [r.getMessage() for r in caplog.records] == [
        "junk from a", "junk from c (5 more like it suppressed in the last 60 s)"]
