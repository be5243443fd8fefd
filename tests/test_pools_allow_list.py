"""--pools (issue 11): with an allow-list, Submit, Assign and Register of another pair are refused with
INVALID_ARGUMENT naming the field, and nothing is stored; without one, every pair is served."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from conftest import AppFactory
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import all_keys, pair, spec
from lingua_scheduler.server.app import App
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc

pytestmark = pytest.mark.single_redis  # validation happens above the store


@pytest.fixture
async def app(make_app: AppFactory) -> App:
    return await make_app(pools="zh:en, en:zh")


@pytest.fixture
async def stub(app: App) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.SchedulerStub(channel)


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    raise AssertionError("no BadRequest detail")


async def test_submit_of_another_pair_is_refused_and_stores_nothing(stub: Any, redis: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Submit(pb.SubmitRequest(jobs=[spec(), spec(src_lang="fr", tgt_lang="de", utterance_index=1)]))
    assert bad_fields(refused.value) == ["jobs[1].tgt_lang"]
    assert "fr:de is not served here" in (refused.value.details() or "")
    assert await all_keys(redis, "*fr:de*") == [] and await all_keys(redis, "*zh:en:{*") == []  # the whole batch refused
    done = await stub.Submit(pb.SubmitRequest(jobs=[spec(), spec(src_lang="en", tgt_lang="zh")]))
    assert [r.created for r in done.results] == [True, True]


async def test_assign_of_another_pair_is_refused(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair("zh", "en"), pair("ja", "en")]))
    assert bad_fields(refused.value) == ["pairs[1]"]
    job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    got = await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair("zh", "en")]))
    assert [a.job_id for a in got.assignments] == [job_id]


async def register(stub: Any, reg: pb.Register) -> pb.SchedulerMessage:
    call = stub.NodeSession()
    await call.write(pb.NodeMessage(register=reg))
    try:
        return await call.read()
    finally:
        call.cancel()


async def test_register_of_another_pair_is_refused(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(stub, pb.Register(node_id="n1", max_concurrency=1, pairs=[pair("ja", "en")]))
    assert bad_fields(refused.value) == ["register.pairs[0]"]


async def test_register_by_languages_serves_the_allowed_pairs_only(stub: Any) -> None:
    ack = await register(stub, pb.Register(node_id="n1", max_concurrency=1, asr_langs=["zh", "en", "ja"],
                                           tts_langs=["zh", "en", "ja"]))
    assert sorted(ack.registered.pools) == ["en:zh", "zh:en"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(stub, pb.Register(node_id="n2", max_concurrency=1, asr_langs=["ja"], tts_langs=["fr"]))
    assert bad_fields(refused.value) == ["register.tts_langs"]


def test_the_setting() -> None:
    assert Settings.load([], env={}).allowed_pools() is None
    assert Settings.load(["--pools", "zh:en,en:zh"], env={}).allowed_pools() == {"zh:en", "en:zh"}
    assert Settings.load([], env={"LINGUA_POOLS": "zh:en"}).allowed_pools() == {"zh:en"}
    for wrong in ("zh:zh", "zh", "ZH:en", "zh:en,xx"):
        with pytest.raises(ValueError, match="--pools"):
            Settings.load(["--pools", wrong], env={})
