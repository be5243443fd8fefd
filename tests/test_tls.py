"""Server TLS and mutual TLS with real certificates made here: the SDK, the CLI, health and reflection
over TLS, refused client certificates, certificate rotation on a live server, and SIGHUP."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import CA, Issued
from conftest import AppFactory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import spec, watch_until
from lingua_scheduler.server.app import App
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.tls import CertificateError, ServerCertificates
from lingua_sdk import TLS, AsyncClient, JobState, pb, pb_grpc
from lingua_sdk.cli import main as lingua
from simnode import SimNode
from test_sdk_python import make_node, running, translate

pytestmark = pytest.mark.single_redis  # TLS is between the clients and the scheduler: one Redis is enough


class Pki:
    """A CA, the server's files in a folder, and a client certificate from that CA."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = CA()
        self.ca_file = folder / "ca.crt"
        self.ca_file.write_bytes(self.ca.pem)
        self.server = self.ca.issue("scheduler", server=True)
        self.cert_file, self.key_file = self.server.write(folder, "server")
        self.client = self.ca.issue("gpu-1", server=False)

    def settings(self, mutual: bool = False) -> dict[str, Any]:
        return dict(tls_cert=str(self.cert_file), tls_key=str(self.key_file),
                    tls_client_ca=str(self.ca_file) if mutual else "")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


def secure(app: App, root: bytes, client: Issued | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root, client.key if client else None, client.cert if client else None)
    return grpc.aio.secure_channel(target(app), creds)


async def health_check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of a health check that must fail (the handshake is refused)."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return failed.value.code()


@pytest.fixture
async def tls_app(make_app: AppFactory, pki: Pki) -> App:
    return await make_app(**pki.settings())


@pytest.fixture
async def mtls_app(make_app: AppFactory, pki: Pki) -> App:
    return await make_app(**pki.settings(mutual=True))


async def test_tls_serves_the_sdk_health_and_reflection_and_refuses_plaintext(tls_app: App, pki: Pki) -> None:
    async with AsyncClient(target(tls_app), tls=TLS(root_certificates=pki.ca.pem)) as client:
        job_id = (await client.submit(tenant_id="acme", session_id="t1", src_lang="zh", tgt_lang="en",
                                      payload_ref="s3://a/0.opus")).job_id
        assert (await client.get(job_id)).state == JobState.QUEUED
    async with secure(tls_app, pki.ca.pem) as channel:
        assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        assert "lingua.scheduler.v1.Scheduler" in {s.name for s in reply.list_services_response.service}
    async with grpc.aio.insecure_channel(target(tls_app)) as plain:
        assert await refused(plain) == grpc.StatusCode.UNAVAILABLE
    async with secure(tls_app, CA("a stranger").pem) as untrusted:  # the client does not trust the server
        assert await refused(untrusted) == grpc.StatusCode.UNAVAILABLE
    assert tls_app.describe().startswith("TLS on (no client certificates)")


async def test_mtls_refuses_a_missing_or_foreign_client_certificate_and_serves_a_good_one(
        mtls_app: App, pki: Pki) -> None:
    async with secure(mtls_app, pki.ca.pem) as without:
        assert await refused(without) == grpc.StatusCode.UNAVAILABLE
    foreign = CA("another CA").issue("gpu-1", server=False)
    async with secure(mtls_app, pki.ca.pem, foreign) as wrong:
        assert await refused(wrong) == grpc.StatusCode.UNAVAILABLE
    async with secure(mtls_app, pki.ca.pem, pki.client) as good:
        assert await health_check(good) == health_pb2.HealthCheckResponse.SERVING
    assert mtls_app.describe().startswith("TLS on (mutual: client certificates required)")


async def test_sdk_client_and_node_over_mutual_tls(mtls_app: App, pki: Pki) -> None:
    tls = TLS(root_certificates=pki.ca.pem, certificate_chain=pki.client.cert, private_key=pki.client.key)
    async with running(make_node(target(mtls_app), translate, tls=tls)), AsyncClient(target(mtls_app), tls=tls) as client:
        job = await client.wait((await client.submit(tenant_id="acme", session_id="m1", src_lang="zh", tgt_lang="en",
                                                     payload_ref="s3://a/0.opus")).job_id, timeout=20)
        assert job.state == JobState.SUCCEEDED and job.result is not None and job.result.text_translated == "hello 0"


async def test_cli_tls_flags_against_mutual_tls(mtls_app: App, pki: Pki) -> None:
    cert, key = pki.client.write(pki.folder, "client")

    async def run(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        rc = await asyncio.to_thread(lingua, ["--target", target(mtls_app), *argv], out)
        return rc, out.getvalue()

    rc, out = await run("--ca", str(pki.ca_file), "--cert", str(cert), "--key", str(key), "--json", "nodes")
    assert (rc, out.strip()) == (0, "[]")
    rc, _ = await run("--ca", str(pki.ca_file), "nodes")  # no client certificate
    assert rc != 0


async def test_rotation_on_a_live_server_keeps_open_streams(tls_app: App, pki: Pki) -> None:
    old_ca = pki.ca
    old_channel = secure(tls_app, old_ca.pem)
    try:
        sim = await SimNode(old_channel, "gpu-1", [("zh", "en")]).start()
        new_ca = CA("rotated CA")
        new_ca.issue("scheduler", server=True).write(pki.folder, "server")  # overwrite both files in place
        async with secure(tls_app, new_ca.pem) as fresh:  # new connections get the new certificate
            assert await health_check(fresh) == health_pb2.HealthCheckResponse.SERVING
            async with secure(tls_app, old_ca.pem) as stale:
                assert await refused(stale) == grpc.StatusCode.UNAVAILABLE
            stub = pb_grpc.SchedulerStub(fresh)
            job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec(session_id="rot")]))).results[0].job_id
            await watch_until(stub, job_id, pb.JOB_STATE_SUCCEEDED)  # served by the stream opened before
        assert [r.job_id for r in sim.received] == [job_id] and not sim.closed.is_set() and not sim.errors
        await sim.stop()
    finally:
        await old_channel.close()


async def test_a_broken_rotation_keeps_the_current_certificate(tls_app: App, pki: Pki) -> None:
    pki.key_file.write_bytes(CA("x").issue("scheduler", server=True).key)  # a key of another certificate
    async with secure(tls_app, pki.ca.pem) as channel:
        assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    assert tls_app.certificates is not None and not tls_app.certificates.reload()


def test_bad_files_are_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    other = CA().issue("x", server=True)
    with pytest.raises(CertificateError, match="does not belong"):
        ServerCertificates(str(pki.cert_file), str(other.write(tmp_path, "other")[1]))
    with pytest.raises(CertificateError, match="cannot read"):
        ServerCertificates(str(tmp_path / "missing.crt"), str(pki.key_file))
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        Settings.load(["--tls-cert", str(pki.cert_file)], env={})
    with pytest.raises(ValueError, match="--tls-client-ca"):
        Settings.load(["--tls-client-ca", str(pki.ca_file)], env={})


def _pad(issued: Issued, size: int) -> Issued:
    """PEM with trailing blank lines up to `size` bytes (PEM readers skip text outside the blocks), so a
    rewrite can keep a file's size."""
    return Issued(issued.cert.ljust(size, b"\n"), issued.key.ljust(size, b"\n"))


async def test_sighup_reloads_files_whose_change_a_stat_cannot_see(pki: Pki, redis_server: Any, redis: Any) -> None:
    _pad(pki.server, 4096).write(pki.folder, "server")
    before = {p: os.stat(p) for p in (pki.cert_file, pki.key_file)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--redis-url", redis_server.url,
        "--tls-cert", str(pki.cert_file), "--tls-key", str(pki.key_file), "--uvloop", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on" in line, line
        port = int(line.split(b":")[-1])

        async def serves(root: bytes) -> bool:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root)) as ch:
                try:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.aio.AioRpcError:
                    return False
                return True

        assert await serves(pki.ca.pem)
        new_ca = CA("rotated CA")
        _pad(new_ca.issue("scheduler", server=True), 4096).write(pki.folder, "server")
        for path, st in before.items():  # same inode, size and mtime: invisible to the change check
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert await serves(pki.ca.pem) and not await serves(new_ca.pem)
        proc.send_signal(signal.SIGHUP)
        while True:  # the reload is logged once done
            log = await asyncio.wait_for(proc.stderr.readline(), 10)
            assert log, "the server ended"
            if b"TLS: loaded certificate CN=scheduler" in log:
                break
        assert await serves(new_ca.pem) and not await serves(pki.ca.pem)
        assert proc.returncode is None  # SIGHUP does not end it
    finally:
        proc.terminate()
        await proc.wait()


async def test_startup_log_names_the_mode(pki: Pki, redis_server: Any, redis: Any) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0",
        "--redis-url", redis_server.url, "--uvloop", "0", *[
            arg for name, value in pki.settings(mutual=True).items() for arg in ("--" + name.replace("_", "-"), value)],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert b"listening on" in await asyncio.wait_for(proc.stdout.readline(), 30)
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"TLS on (mutual: client certificates required); authentication off (loopback only)" in err
