"""Rich error details (server/service.py rich_status; docs/errors.md): every error status carries a
google.rpc ErrorInfo with a stable reason, INVALID_ARGUMENT a BadRequest naming the field, UNAVAILABLE
a RetryInfo. Read through the Python SDK (lingua_sdk.errors) from a real server, unary calls and streams."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from lingua_scheduler.server.app import create_server
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.errors import DOMAIN
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.throttle import ThrottledWarning
from lingua_sdk import (
    AlreadyExists,
    AsyncClient,
    FailedPrecondition,
    InvalidArgument,
    JobResult,
    LinguaError,
    Node,
    NotFound,
    ResourceExhausted,
    Unavailable,
    pb,
)

pytestmark = pytest.mark.single_redis  # errors are built above the store: one Redis backend is enough

SPEC = dict(tenant_id="acme", session_id="s1", src_lang="zh", tgt_lang="en", payload_ref="s3://audio/s1/0.opus")
MISSING = "zh:en:{0}01JE0000000000000000000000"


def target(app: Any) -> str:
    return f"127.0.0.1:{app.port}"


async def test_invalid_argument_names_the_field(app: Any) -> None:
    async with AsyncClient(target(app)) as client:
        with pytest.raises(InvalidArgument) as bad:
            await client.submit_many([SPEC, {**SPEC, "utterance_index": 1, "src_lang": "ZH"}])
    assert bad.value.reason == "INVALID_ARGUMENT"
    ((field, description),) = bad.value.field_violations
    assert field == "jobs[1].src_lang"
    assert "not a language tag" in description
    assert bad.value.retry_delay is None


async def test_reasons_of_the_job_errors(app: Any) -> None:
    async with AsyncClient(target(app)) as client:
        with pytest.raises(NotFound) as missing:
            await client.get(MISSING)
        first = await client.submit(**SPEC)
        with pytest.raises(AlreadyExists) as conflict:  # same identity, other work
            await client.submit(**{**SPEC, "payload_ref": "s3://audio/s1/other.opus"})
        await client.cancel(first.job_id)
        await client.cancel(first.job_id)  # a repeat cancel of a cancelled job is answered, not refused
        other = await client.submit(**{**SPEC, "utterance_index": 1})
        stub = client.stub
        reply = await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pb.LanguagePair(src_lang="zh", tgt_lang="en")]))
        (a,) = reply.assignments
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, node_id="n1",
                                                   lease_token="not-the-token", result=pb.JobResult()))
        await stub.Complete(pb.CompleteRequest(job_id=a.job_id, attempt=a.attempt, node_id="n1",
                                               lease_token=a.lease_token, result=pb.JobResult()))
        with pytest.raises(FailedPrecondition) as terminal:
            await client.cancel(other.job_id)
    assert (missing.value.reason, conflict.value.reason, terminal.value.reason) == \
        ("JOB_NOT_FOUND", "IDENTITY_CONFLICT", "INVALID_TRANSITION")
    assert conflict.value.metadata == {"job_id": first.job_id, "index": "0"}  # no need to parse the text
    assert missing.value.metadata == {}
    status = rpc_status.from_call(stale.value)  # type: ignore[arg-type]  # the raw stub: read the details by hand
    assert status is not None and status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("STALE_LEASE", DOMAIN)


async def test_over_a_cap_is_resource_exhausted_naming_the_field_without_retry(make_app: Any) -> None:
    app = await make_app(max_payload_bytes=16)
    async with AsyncClient(target(app)) as client:
        with pytest.raises(ResourceExhausted) as big:
            await client.submit(**{**SPEC, "payload_ref": "", "payload": b"x" * 17})
    assert big.value.reason == "TOO_LARGE"
    assert [f for f, _ in big.value.field_violations] == ["jobs[0].payload"]
    assert big.value.retry_delay is None  # the same request never fits


async def test_streams_carry_the_details(app: Any) -> None:
    async with AsyncClient(target(app)) as client:
        with pytest.raises(NotFound) as missing:
            async for _ in client.watch(MISSING):
                pass
    assert missing.value.reason == "JOB_NOT_FOUND"

    async def never(_: Any) -> JobResult:
        raise AssertionError("no job is assigned to a node that is refused")

    node = Node(target(app), node_id="gpu-1", pairs=["zh:en"], concurrency=2000, handler=never,
                handle_signals=False)
    with pytest.raises(InvalidArgument) as refused:  # NodeSession ends at the register message
        await asyncio.wait_for(node.run(), 10)
    assert refused.value.reason == "INVALID_ARGUMENT"
    assert [f for f, _ in refused.value.field_violations] == ["register.max_concurrency"]


async def test_store_down_is_unavailable_with_a_retry_delay(settings: Settings, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from lingua_scheduler.server import service
    # The warning is throttled per process: a store-down logged by an earlier test would hide this one's.
    monkeypatch.setattr(service, "_store_down", ThrottledWarning(service.log))
    own = EmbeddedRedis(tmp_path, persistent=False).start()  # a Redis of this test alone, to stop
    app = create_server(dataclasses.replace(settings, redis_cluster="", redis_url=own.url, listen="127.0.0.1:0"))
    try:
        await app.start()
        own.stop()
        async with AsyncClient(target(app)) as client:
            with pytest.raises(Unavailable) as down:
                await client.get(MISSING)
    finally:
        own.stop()
        await app.stop(grace=0)
    assert down.value.reason == "STORE_UNAVAILABLE"
    assert down.value.retry_delay == 1.0
    # Where Redis lives is for the operator's log, not for callers.
    assert down.value.message == "job store unavailable"
    assert "job store unavailable: Error" in caplog.text and str(tmp_path) in caplog.text  # its socket's path
    assert isinstance(down.value, LinguaError)


def test_every_reason_is_listed_in_the_docs(repo_root: Path) -> None:
    """docs/errors.md lists every reason a SchedulerError class has (a contract: none goes unmentioned)."""
    from lingua_scheduler.server import errors

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    text = (repo_root / "docs" / "errors.md").read_text()
    assert {c.reason for c in subclasses(errors.SchedulerError) if f"`{c.reason}`" not in text} == set()
