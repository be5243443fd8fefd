"""Authentication and authorization (issue 10): real tokens signed here, a real server, a real Redis.

Every attack of the issue is a test: each succeeded on a server without authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from conftest import AppFactory
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import pair, spec
from lingua_scheduler.server.app import App
from lingua_scheduler.server.auth import (
    RULES,
    Caller,
    OpenStream,
    Role,
    Verifier,
    check_node,
    expires_in,
    open_context,
    tenant_visible,
)
from lingua_scheduler.server.errors import PermissionDenied, Unauthenticated
from lingua_scheduler.server.tokens import mint
from lingua_sdk import pb, pb_grpc
from simnode import bearer as simnode_bearer

pytestmark = pytest.mark.single_redis  # who may call what does not depend on the Redis topology

SECRET = b"0123456789abcdef0123456789abcdef-test-secret"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A key folder with an HS256 secret (kid "hs"), an RSA public key ("rsa") and an EC one ("ec");
    the private keys are kept outside it."""
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "hs.secret").write_bytes(SECRET + b"\n")
    for name, private in (("rsa", rsa.generate_private_key(65537, 2048)), ("ec", ec.generate_private_key(ec.SECP256R1()))):
        (tmp_path / f"{name}.key").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.pem").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return folder


@pytest.fixture
async def secured(make_app: AppFactory, keys: Path) -> App:
    return await make_app(auth_jwt_key=(str(keys),))


def token(keys: Path, role: str, **kw: Any) -> str:
    return mint(str(keys / "hs.secret"), role, **kw)


def bearer(token: str) -> list[Any]:
    """Interceptors adding the token to unary-request calls (NodeSession passes its metadata itself)."""
    return simnode_bearer(token, streams=False)


@pytest.fixture
async def connect(secured: App) -> AsyncIterator[Callable[[str | None], pb_grpc.SchedulerStub]]:
    """connect(token) -> a stub whose calls carry that token (None: no token)."""
    channels: list[grpc.aio.Channel] = []

    def open_stub(tok: str | None) -> pb_grpc.SchedulerStub:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}", interceptors=bearer(tok) if tok else None)
        channels.append(ch)
        stub = pb_grpc.SchedulerStub(ch)
        stub.token = tok  # type: ignore[attr-defined]  # for register()
        return stub

    yield open_stub
    for ch in channels:
        await ch.close()


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def stream_code(call: Any) -> grpc.StatusCode:
    """Read a stream to its end; its status (which must not be OK). A NodeSession answers the
    scheduler's pings, as a live node does: only what the test is about may end it."""
    try:
        while (m := await call.read()) is not grpc.aio.EOF:
            if isinstance(m, pb.SchedulerMessage) and m.HasField("ping"):
                await call.write(pb.NodeMessage(pong=pb.Pong(id=m.ping.id)))
    except grpc.aio.AioRpcError as err:
        return err.code()
    code: grpc.StatusCode = await call.code()
    assert code != grpc.StatusCode.OK
    return code


async def register(stub: pb_grpc.SchedulerStub, node_id: str) -> Any:
    tok = getattr(stub, "token", None)
    call = stub.NodeSession(metadata=(("authorization", f"Bearer {tok}"),) if tok else None)
    try:
        await call.write(pb.NodeMessage(register=pb.Register(node_id=node_id, pairs=[pair()], max_concurrency=1)))
    except grpc.aio.AioRpcError:
        pass  # the server refused the stream before the write: stream_code(call) reads why
    return call


# -- authentication ------------------------------------------------------------------------------


def bad_tokens(keys: Path) -> dict[str, str | None]:
    now = int(time.time())
    other = b"another-secret-of-enough-length-0123456789"
    good = {"role": "admin", "exp": now + 60}
    return {
        "missing": None,
        "not a JWT": "not-a-token",
        "expired": jwt.encode({"role": "admin", "exp": now - 5}, SECRET, "HS256", headers={"kid": "hs"}),
        "wrongly signed": jwt.encode(good, other, "HS256", headers={"kid": "hs"}),
        "unknown kid": jwt.encode(good, SECRET, "HS256", headers={"kid": "nope"}),
        "no exp": jwt.encode({"role": "admin"}, SECRET, "HS256"),
        "unsigned (alg none)": jwt.encode(good, None, "none"),
        "bad role": jwt.encode({"role": "root", "exp": now + 60}, SECRET, "HS256"),
        "client without tenants": jwt.encode({"role": "client", "exp": now + 60}, SECRET, "HS256"),
        "not valid yet": jwt.encode({**good, "nbf": now + 600}, SECRET, "HS256"),
        "nbf not a number": jwt.encode({**good, "nbf": "soon"}, SECRET, "HS256"),
    }


async def test_missing_malformed_expired_or_wrongly_signed_tokens_are_unauthenticated(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    for name, tok in bad_tokens(keys).items():
        stub = connect(tok)
        assert await code_of(stub.GetJob(pb.GetJobRequest(job_id="zh:en:{0}x"))) == grpc.StatusCode.UNAUTHENTICATED, name
        assert await code_of(stub.ListNodes(pb.ListNodesRequest())) == grpc.StatusCode.UNAUTHENTICATED, name
        assert await stream_code(stub.WatchJob(pb.WatchJobRequest(job_id="zh:en:{0}x"))) == \
            grpc.StatusCode.UNAUTHENTICATED, name
        call = await register(stub, "n1")
        assert await stream_code(call) == grpc.StatusCode.UNAUTHENTICATED, name


async def test_rsa_and_ec_keys_verify_their_tokens(keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    for name in ("rsa", "ec"):
        tok = mint(str(keys.parent / f"{name}.key"), "admin")  # kid "rsa"/"ec": the public key's file stem
        assert len((await connect(tok).ListNodes(pb.ListNodesRequest())).nodes) == 0
    # An RSA-signed token presented under the EC key's kid is refused (the key decides the algorithm).
    forged = jwt.encode({"role": "admin", "exp": int(time.time()) + 60},
                        (keys.parent / "rsa.key").read_bytes(), "RS256", headers={"kid": "ec"})
    assert await code_of(connect(forged).ListNodes(pb.ListNodesRequest())) == grpc.StatusCode.UNAUTHENTICATED


async def test_audience_and_issuer_when_configured(make_app: AppFactory, keys: Path) -> None:
    app = await make_app(auth_jwt_key=(str(keys / "hs.secret"),), auth_jwt_audience="lingua", auth_jwt_issuer="ops")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)

        async def code(**kw: Any) -> grpc.StatusCode:
            md = (("authorization", "Bearer " + token(keys, "admin", **kw)),)
            try:
                await stub.ListNodes(pb.ListNodesRequest(), metadata=md)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert await code(audience="lingua", issuer="ops") == grpc.StatusCode.OK
        assert await code(audience="other", issuer="ops") == grpc.StatusCode.UNAUTHENTICATED
        assert await code(audience="lingua") == grpc.StatusCode.UNAUTHENTICATED
        assert await code(issuer="ops") == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_stay_open(secured: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert "lingua.scheduler.v1.Scheduler" in names


# -- the attacks of issue 10 ---------------------------------------------------------------------


async def test_another_tenants_job_is_not_found_for_get_watch_and_cancel(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    victim = connect(token(keys, "client", tenants=["victim"]))
    attacker = connect(token(keys, "client", tenants=["acme"]))
    job_id = (await victim.Submit(pb.SubmitRequest(jobs=[spec(tenant_id="victim")]))).results[0].job_id
    unknown = job_id[:-1] + ("0" if job_id[-1] != "0" else "1")
    for jid in (job_id, unknown):  # the other tenant's job answers exactly as an unknown id
        for call in (attacker.GetJob(pb.GetJobRequest(job_id=jid, include_payload=True)),
                     attacker.CancelJob(pb.CancelJobRequest(job_id=jid))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.NOT_FOUND, f"job {jid} not found")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in attacker.WatchJob(pb.WatchJobRequest(job_id=jid)):
                pass
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.NOT_FOUND, f"job {jid} not found")
    job = await victim.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))
    assert job.state == pb.JOB_STATE_QUEUED and job.spec.payload == b"audio"  # the cancel changed nothing
    everyone = connect(token(keys, "client", tenants=["*"]))
    assert (await everyone.GetJob(pb.GetJobRequest(job_id=job_id))).spec.tenant_id == "victim"


async def test_submit_and_watch_session_only_for_held_tenants(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    acme = connect(token(keys, "client", tenants=["acme"]))
    batch = [spec(tenant_id="acme", utterance_index=0), spec(tenant_id="victim", utterance_index=1)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await acme.Submit(pb.SubmitRequest(jobs=batch))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "jobs[1].tenant_id" in caught.value.details()
    # Nothing of the refused batch was stored: its allowed job is created now, not found again.
    assert (await acme.Submit(pb.SubmitRequest(jobs=batch[:1]))).results[0].created
    assert await stream_code(acme.WatchSession(pb.WatchSessionRequest(tenant_id="victim", session_id="s1"))) == \
        grpc.StatusCode.PERMISSION_DENIED


async def test_a_node_token_cannot_take_a_victims_node_id_and_the_victim_keeps_its_stream(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    client = connect(token(keys, "client", tenants=["acme"]))
    victim = await register(connect(token(keys, "node", node_ids=["gpu-*"])), "gpu-1")
    assert (await victim.read()).HasField("registered")
    attacker = await register(connect(token(keys, "node", node_ids=["cpu-*"])), "gpu-1")
    assert await stream_code(attacker) == grpc.StatusCode.PERMISSION_DENIED
    job_id = (await client.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    message = await victim.read()  # not `replaced`: the victim still holds its stream, and gets the job
    assert [a.job_id for a in message.assignments] == [job_id]
    victim.cancel()


async def test_assign_heartbeat_complete_only_as_an_allowed_node_and_for_held_leases(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    client = connect(token(keys, "client", tenants=["acme"]))
    admin = connect(token(keys, "admin"))
    gpu = connect(token(keys, "node", node_ids=["gpu-*"]))
    job_id = (await client.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
    for stub, node_id in ((connect(token(keys, "node", node_ids=["cpu-*"])), "gpu-1"), (client, "gpu-1")):
        assert await code_of(stub.Assign(pb.AssignRequest(node_id=node_id, pairs=[pair()]))) == \
            grpc.StatusCode.PERMISSION_DENIED
    (assigned,) = (await gpu.Assign(pb.AssignRequest(node_id="gpu-1", pairs=[pair()]))).assignments
    assert assigned.job_id == job_id
    seen = await admin.GetJob(pb.GetJobRequest(job_id=job_id))  # discloses node id and attempt, never the lease token
    assert (seen.node_id, seen.attempt) == ("gpu-1", 1)
    assert assigned.lease_token.encode() not in seen.SerializeToString()
    events = [e async for e in _first_events(admin, job_id, 2)]
    assert all(assigned.lease_token.encode() not in e.SerializeToString() for e in events)
    # Forgeries built from what GetJob disclosed: as the victim node id (not allowed), or with a guessed token.
    guess = "0" * len(assigned.lease_token)  # well formed, but not the lease's token
    forged_lease = pb.JobLease(job_id=job_id, attempt=seen.attempt, lease_token=guess)
    cpu = connect(token(keys, "node", node_ids=["cpu-*"]))
    for stub in (cpu, client):
        assert await code_of(stub.Complete(pb.CompleteRequest(
            job_id=job_id, attempt=seen.attempt, node_id="gpu-1", lease_token=guess,
            result=pb.JobResult(text_asr="forged")))) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(stub.Heartbeat(pb.HeartbeatRequest(node_id="gpu-1", leases=[forged_lease]))) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(gpu.Complete(pb.CompleteRequest(
        job_id=job_id, attempt=seen.attempt, node_id="gpu-2", lease_token=guess, result=pb.JobResult(text_asr="forged")))) == \
        grpc.StatusCode.FAILED_PRECONDITION  # an allowed node id, but not the lease holder
    beat = await gpu.Heartbeat(pb.HeartbeatRequest(node_id="gpu-2", leases=[forged_lease]))
    assert not beat.leases[0].ok
    job = await admin.GetJob(pb.GetJobRequest(job_id=job_id))
    assert job.state == pb.JOB_STATE_ASSIGNED and not job.HasField("result")
    done = await gpu.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, node_id="gpu-1", lease_token=assigned.lease_token,
                                                 result=pb.JobResult(text_asr="real")))
    assert done.state == pb.JOB_STATE_SUCCEEDED


async def _first_events(stub: pb_grpc.SchedulerStub, job_id: str, count: int) -> AsyncIterator[pb.JobEvent]:
    call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
    for _ in range(count):
        yield await call.read()
    call.cancel()


async def test_list_nodes_is_for_admins_only(keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    for tok in (token(keys, "client", tenants=["*"]), token(keys, "node", node_ids=["*"])):
        assert await code_of(connect(tok).ListNodes(pb.ListNodesRequest())) == grpc.StatusCode.PERMISSION_DENIED
    node = await register(connect(token(keys, "node", node_ids=["gpu-1"])), "gpu-1")
    assert (await node.read()).HasField("registered")
    listed = await connect(token(keys, "admin")).ListNodes(pb.ListNodesRequest())
    assert [n.node_id for n in listed.nodes] == ["gpu-1"]
    node.cancel()


ADMIN_CALLS = {
    "ListJobs": pb.ListJobsRequest(), "GetStats": pb.GetStatsRequest(),
    "RetryJob": pb.RetryJobRequest(job_id="zh:en:{0}01JDZ000000000000000000000"),
    "CancelSession": pb.CancelSessionRequest(tenant_id="acme", session_id="s1"),
    "PausePool": pb.PausePoolRequest(pool="zh:en"), "ResumePool": pb.ResumePoolRequest(pool="zh:en"),
    "DrainNode": pb.DrainNodeRequest(node_id="gpu-1"),
}


async def test_admin_calls_are_for_admins_only(keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    """Client and node tokens (even for every tenant and node id) are refused every admin call; an admin's
    token reaches them (PausePool answers)."""
    for tok in (token(keys, "client", tenants=["*"]), token(keys, "node", node_ids=["*"])):
        stub = connect(tok)
        for method, request in ADMIN_CALLS.items():
            assert await code_of(getattr(stub, method)(request)) == grpc.StatusCode.PERMISSION_DENIED, method
    admin = connect(token(keys, "admin"))
    assert (await admin.PausePool(pb.PausePoolRequest(pool="zh:en"))).paused
    assert not (await admin.ResumePool(pb.ResumePoolRequest(pool="zh:en"))).paused


async def test_roles_outside_the_table_are_permission_denied(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    node = connect(token(keys, "node", node_ids=["*"]))
    client = connect(token(keys, "client", tenants=["*"]))
    assert await code_of(node.Submit(pb.SubmitRequest(jobs=[spec()]))) == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(node.GetJob(pb.GetJobRequest(job_id="zh:en:{0}x"))) == grpc.StatusCode.PERMISSION_DENIED
    assert await stream_code(await register(client, "n1")) == grpc.StatusCode.PERMISSION_DENIED
    assert set(RULES) == set(pb.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name)  # every RPC has its row


# -- streams and keys over time ------------------------------------------------------------------


async def test_expired_token_closes_an_open_stream(keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    """A stream is authenticated when it opens; when its token expires, it ends with UNAUTHENTICATED
    (a NodeSession even while idle: no more work goes to an expired token)."""
    soon = time.time() + 2
    node_stub = connect(mint(str(keys / "hs.secret"), "node", node_ids=["gpu-1"], ttl_s=2, now=soon - 2))
    node = await register(node_stub, "gpu-1")
    assert (await node.read()).HasField("registered")
    client = connect(mint(str(keys / "hs.secret"), "client", tenants=["acme"], ttl_s=2, now=soon - 2))
    job_id = (await client.Submit(pb.SubmitRequest(jobs=[spec(src_lang="ja")]))).results[0].job_id
    watch = client.WatchJob(pb.WatchJobRequest(job_id=job_id))
    assert (await watch.read()).state == pb.JOB_STATE_QUEUED
    assert await stream_code(node) == grpc.StatusCode.UNAUTHENTICATED
    assert await stream_code(watch) == grpc.StatusCode.UNAUTHENTICATED
    assert time.time() >= int(soon)  # they ended because the token expired, not before
    assert await code_of(client.GetJob(pb.GetJobRequest(job_id=job_id))) == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_from_an_issuer_whose_clock_is_ahead_is_valid_but_never_past_its_exp(keys: Path) -> None:
    """A token minted on a host whose clock runs ahead (iat and nbf in this host's future, up to
    CLOCK_SKEW_S) is valid at once: a token provider renewing just before expiry is not refused. Its exp
    gets no such grace."""
    verifier = Verifier([str(keys)])
    ahead = mint(str(keys / "hs.secret"), "admin", ttl_s=600, now=time.time() + 30)
    assert verifier.verify(f"Bearer {ahead}").role is Role.ADMIN
    with_nbf = jwt.encode({"role": "admin", "iat": int(time.time()) + 30, "nbf": int(time.time()) + 30,
                           "exp": int(time.time()) + 600}, SECRET, "HS256", headers={"kid": "hs"})
    assert verifier.verify(f"Bearer {with_nbf}").role is Role.ADMIN
    just_expired = jwt.encode({"role": "admin", "exp": int(time.time()) - 1}, SECRET, "HS256", headers={"kid": "hs"})
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(f"Bearer {just_expired}")


async def test_an_open_stream_ends_every_wait_at_its_tokens_expiry_and_only_then() -> None:
    """OpenStream's one timer per stream: waits nested in one task, and a task that swallowed an earlier
    cancellation, both end with TimeoutError at the expiry; a cancel from elsewhere stays a cancel."""
    never = asyncio.Event()

    async def idle() -> AsyncIterator[None]:
        await never.wait()
        yield None

    def stream(seconds: float) -> OpenStream:
        return OpenStream(Caller(Role.ADMIN, frozenset({"*"}), ("*",), time.time() + seconds))

    nested = stream(0.1)

    async def outer() -> Any:
        async def inner() -> AsyncIterator[Any]:
            yield await nested.next(idle())
        return await nested.next(inner())

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(outer(), 10)
    swallowing = stream(0.1)

    async def after_a_swallowed_cancel() -> Any:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1)
        assert task.cancelling() == 1
        return await swallowing.next(idle())

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(after_a_swallowed_cancel(), 10)
    waiting = asyncio.ensure_future(stream(60).next(idle()))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_verified_tokens_are_cached_until_they_expire(keys: Path) -> None:
    verifier = Verifier([str(keys)], cache_size=2)
    now = time.time()
    tokens = [mint(str(keys / "hs.secret"), "admin", ttl_s=10, now=now, subject=f"s{i}") for i in range(3)]
    for t in tokens:
        assert verifier.verify(f"Bearer {t}", now=now).role is Role.ADMIN
    assert len(verifier._cache) == 2  # bounded: the oldest went
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(f"Bearer {tokens[2]}", now=now + 11)  # a cached token is still checked for expiry
    assert len(verifier._cache) == 1


async def test_key_rotation_old_and_new_accepted_then_old_removed(
        secured: App, keys: Path, tmp_path: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    old = connect(token(keys, "admin"))
    assert (await old.ListNodes(pb.ListNodesRequest())) is not None
    (keys / "hs2.secret").write_bytes(b"a-brand-new-secret-for-the-rotation-0123456789")
    new_tok = mint(str(keys / "hs2.secret"), "admin")
    new = connect(new_tok)
    assert await code_of(new.ListNodes(pb.ListNodesRequest())) == grpc.StatusCode.UNAUTHENTICATED
    secured.reload()  # what SIGHUP does
    await old.ListNodes(pb.ListNodesRequest())
    await new.ListNodes(pb.ListNodesRequest())
    (keys / "hs.secret").unlink()
    secured.reload()
    assert await code_of(old.ListNodes(pb.ListNodesRequest())) == grpc.StatusCode.UNAUTHENTICATED  # even cached
    await new.ListNodes(pb.ListNodesRequest())
    (keys / "short.secret").write_bytes(b"too-short")  # a bad file: the reload is refused, the keys in use stay
    assert secured.auth is not None and not secured.auth.reload()
    await new.ListNodes(pb.ListNodesRequest())


async def test_tokens_never_reach_the_logs(keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub],
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [t for t in bad_tokens(keys).values() if t]
    secrets.append(token(keys, "client", tenants=["acme"]))
    for tok in secrets:
        stub = connect(tok)
        for call in (stub.GetJob(pb.GetJobRequest(job_id="zh:en:{0}x", include_payload=True)),
                     stub.ListNodes(pb.ListNodesRequest())):
            with pytest.raises(grpc.aio.AioRpcError):
                await call
    await asyncio.sleep(0)
    assert "refused" in caplog.text  # the failures were logged (by their reason) ...
    for tok in secrets:  # ... without the token, or any of its three parts
        assert all(part not in caplog.text for part in tok.split(".") if len(part) > 8)
    assert SECRET.decode() not in caplog.text


# -- removed keys, key files, expiry and the caller outside the interceptor --------------------------


async def stream_end(call: Any) -> tuple[grpc.StatusCode, str]:
    """Read a stream to its end: its status code and details."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return await call.code(), await call.details()


async def test_removing_a_key_closes_every_open_stream_it_authenticated(
        secured: App, keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    assert secured.auth is not None
    (keys / "hs2.secret").write_bytes(b"a-brand-new-secret-for-the-rotation-0123456789")
    assert secured.auth.reload()

    def old(role: str, **kw: Any) -> pb_grpc.SchedulerStub:
        return connect(token(keys, role, **kw))

    def new(role: str, **kw: Any) -> pb_grpc.SchedulerStub:
        return connect(mint(str(keys / "hs2.secret"), role, **kw))

    client = new("client", tenants=["acme"])
    job_id = (await client.Submit(pb.SubmitRequest(jobs=[spec(src_lang="ja")]))).results[0].job_id  # no node serves ja
    cancelled = (await client.Submit(pb.SubmitRequest(jobs=[spec(session_id="s2")]))).results[0].job_id
    await client.CancelJob(pb.CancelJobRequest(job_id=cancelled))
    session = old("client", tenants=["acme"]).WatchSession(pb.WatchSessionRequest(tenant_id="acme", session_id="s2"))
    assert [j.job_id for j in (await session.read()).jobs] == [cancelled]  # a finished job: the watch is open
    doomed_node = await register(old("node", node_ids=["gpu-1"]), "gpu-1")
    kept_node = await register(new("node", node_ids=["gpu-2"]), "gpu-2")
    for node in (doomed_node, kept_node):
        assert (await node.read()).HasField("registered")
    watch = old("client", tenants=["acme"]).WatchJob(pb.WatchJobRequest(job_id=job_id))
    kept_watch = client.WatchJob(pb.WatchJobRequest(job_id=job_id))
    for w in (watch, kept_watch):
        assert (await w.read()).state == pb.JOB_STATE_QUEUED
    assert len(secured.auth._streams) == 5

    (keys / "hs.secret").unlink()
    assert secured.auth.reload()
    for call in (doomed_node, watch, session):
        async with asyncio.timeout(10):
            end = await stream_end(call)
        assert end == (grpc.StatusCode.UNAUTHENTICATED, "authorization: the key that verified this stream's token was removed")
    # The streams of the key that stays are untouched: the node still gets work, the watch goes on.
    second = (await client.Submit(pb.SubmitRequest(jobs=[spec(utterance_index=1)]))).results[0].job_id
    assert [a.job_id for a in (await kept_node.read()).assignments] == [second]
    assert not kept_watch.done()
    kept_node.cancel()
    kept_watch.cancel()


async def test_a_deleted_listed_key_file_is_a_removed_key(make_app: AppFactory, keys: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    other = keys / "hs2.secret"
    other.write_bytes(b"a-brand-new-secret-for-the-rotation-0123456789")
    app = await make_app(auth_jwt_key=(str(keys / "hs.secret"), str(other)))
    assert app.auth is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)

        async def code(tok: str) -> grpc.StatusCode:
            try:
                await stub.ListNodes(pb.ListNodesRequest(), metadata=(("authorization", f"Bearer {tok}"),))
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        old_tok, new_tok = token(keys, "admin"), mint(str(other), "admin")
        assert (await code(old_tok), await code(new_tok)) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        (keys / "hs.secret").unlink()  # the operator revokes the old key by deleting its file, then SIGHUP
        assert app.auth.reload()
        assert "hs.secret is gone" in caplog.text
        assert (await code(old_tok), await code(new_tok)) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)
        other.unlink()  # no key would be left: the reload is refused, the last key stays
        assert not app.auth.reload()
        assert await code(new_tok) == grpc.StatusCode.OK


def _pem(private: Any, public: bool) -> bytes:
    if public:
        return private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[no-any-return]
                                 serialization.NoEncryption())


_EC = ec.generate_private_key(ec.SECP256R1())
_DER_PUBLIC = _EC.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(("name", "content", "refusal"), [
    ("k1.key", SECRET, "a key file is named *.secret or *.hs256"),
    ("k1", SECRET, "a key file is named *.secret or *.hs256"),
    ("k1.txt", SECRET, "a key file is named *.secret or *.hs256"),
    ("k1.secret", _pem(_EC, public=True), "holds a PEM key or certificate"),
    ("k1.secret", b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops\n", "OpenSSH"),
    ("k1.hs256", b'{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}', "JSON"),
    ("k1.secret", _DER_PUBLIC, "a DER key or certificate"),
    ("k1.pem", SECRET, "must hold a PEM public key"),
    ("k1.pem", _pem(_EC, public=False), "must hold a PEM public key"),
], ids=["key suffix", "no suffix", "txt suffix", "secret holding a PEM public key", "secret holding an ssh key",
        "secret holding a JWK", "secret holding a DER public key", "pem holding a secret", "pem holding a private key"])
def test_a_key_files_name_says_its_type(settings: Any, tmp_path: Path, name: str, content: bytes,
                                        refusal: str) -> None:
    from lingua_scheduler.server.app import create_server
    from lingua_scheduler.server.auth import AuthKeyError

    (tmp_path / name).write_bytes(content)
    with pytest.raises(AuthKeyError, match=re.escape(refusal)) as refused:
        create_server(dataclasses.replace(settings, auth_jwt_key=(str(tmp_path / name),)))
    assert str(tmp_path / name) in str(refused.value)


def test_secret_and_public_key_names_that_load(tmp_path: Path) -> None:
    (tmp_path / "a.hs256").write_text("0" + "1" * 63 + "\n")  # a hex secret may start with "0" (0x30, DER's first byte)
    (tmp_path / "b.pem").write_bytes(_pem(_EC, public=True))
    verifier = Verifier([str(tmp_path)])
    assert sorted((k.kid, k.algorithm) for k in verifier.keys) == [("a", "HS256"), ("b", "ES256")]
    (tmp_path / "c.key").write_bytes(_pem(_EC, public=False))  # a private key next to them: named wrongly
    with pytest.raises(ValueError, match=re.escape("c.key")):
        Verifier([str(tmp_path)])
    assert verifier.verify("Bearer " + mint(str(tmp_path / "a.hs256"), "admin")).role is Role.ADMIN
    assert verifier.verify("Bearer " + mint(str(tmp_path / "c.key"), "admin", kid="b")).role is Role.ADMIN
    (tmp_path / "d.txt").write_text("1" * 64)  # the token command reads a secret only from a secret's name
    with pytest.raises(ValueError, match=re.escape("an HS256 secret file is named *.secret or *.hs256")):
        mint(str(tmp_path / "d.txt"), "admin")


async def test_an_assign_long_poll_ends_when_its_token_expires(
        keys: Path, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    soon = time.time() + 2
    node = connect(mint(str(keys / "hs.secret"), "node", node_ids=["gpu-1"], ttl_s=2, now=soon - 2))
    wait = Duration(seconds=60)
    reply = await node.Assign(pb.AssignRequest(node_id="gpu-1", pairs=[pair()], wait=wait), timeout=30)
    assert not reply.assignments and time.time() >= int(soon)  # not DEADLINE_EXCEEDED: it ended at the expiry
    assert await code_of(node.Assign(pb.AssignRequest(node_id="gpu-1", pairs=[pair()]))) == \
        grpc.StatusCode.UNAUTHENTICATED


async def test_get_job_never_reads_another_tenants_payload(
        keys: Path, settings: Any, redis: Any, connect: Callable[[str | None], pb_grpc.SchedulerStub]) -> None:
    """The tenant check comes before the payload read: watched with Redis's MONITOR."""
    from lingua_scheduler.server import keys as store_keys
    from redis.asyncio import Redis

    victim = connect(token(keys, "client", tenants=["victim"]))
    attacker = connect(token(keys, "client", tenants=["acme"]))
    job_id = (await victim.Submit(pb.SubmitRequest(jobs=[spec(tenant_id="victim")]))).results[0].job_id
    payload_key = store_keys.JobKeys.of(job_id).payload
    async with Redis.from_url(settings.redis_url, decode_responses=True) as watcher, watcher.monitor() as monitor:
        assert await code_of(attacker.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))) == \
            grpc.StatusCode.NOT_FOUND
        assert (await victim.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))).spec.payload == b"audio"
        await redis.echo("end-of-test")
        commands: list[str] = []
        while "end-of-test" not in (command := (await monitor.next_command())["command"]):
            commands.append(command)
    assert len([c for c in commands if payload_key in c]) == 1  # the victim's read only


async def test_auth_without_tls_beyond_loopback_warns_naming_tls_cert(
        make_app: AppFactory, keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    await make_app(auth_jwt_key=(str(keys),))
    assert "--tls-cert" not in caplog.text  # loopback: nobody on the path
    await make_app(auth_jwt_key=(str(keys),), listen="0.0.0.0:0")
    (warning,) = [r for r in caplog.records if "--tls-cert" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "plaintext" in warning.getMessage()
    assert "HTTP port" not in caplog.text
    await make_app(auth_jwt_key=(str(keys),), http_listen="0.0.0.0:0")  # the dashboard: plain HTTP only
    (warning,) = [r for r in caplog.records if "HTTP port 0.0.0.0:0" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "in the clear" in warning.getMessage()


def test_a_call_outside_the_interceptor_fails_closed() -> None:
    """No caller set is no one (a code path that escaped the interceptor); AUTH_OFF is set explicitly
    for every RPC of a server without authentication."""
    outside = contextvars.Context()
    assert not outside.run(tenant_visible, "acme")
    with pytest.raises(PermissionDenied):
        outside.run(check_node, "gpu-1", "node_id")
    assert outside.run(expires_in) == 0
    opened = open_context()
    assert opened.run(tenant_visible, "acme") and opened.run(expires_in) == math.inf
    opened.run(check_node, "gpu-1", "node_id")


async def test_a_server_without_auth_serves_every_rpc_as_auth_off(make_app: AppFactory) -> None:
    app = await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.SchedulerStub(ch)
        job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(tenant_id="anyone")]))).results[0].job_id
        assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id, include_payload=True))).spec.payload == b"audio"
        assert [a.job_id for a in (await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair()]))).assignments] \
            == [job_id]
