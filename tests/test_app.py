"""App wiring: the partition count is stored in Redis at first start and every later instance must match it
(or, without a count of its own, adopts it)."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import sys
from typing import Any

import pytest
from conftest import AppFactory
from lingua_scheduler.server import keys
from lingua_scheduler.server.app import (
    PartitionsMismatch,
    check_partitions,
    close_redis,
    create_server,
    resolve_partitions,
)
from lingua_scheduler.server.settings import Settings


async def start_refused(settings: Settings) -> PartitionsMismatch:
    """Start an instance that must refuse; returns the refusal after closing what it opened."""
    app = create_server(settings)
    try:
        with pytest.raises(PartitionsMismatch) as refusal:
            await app.start()
    finally:
        await app.server.stop(None)
        await close_redis(app.redis)
    return refusal.value


async def test_an_instance_with_another_partition_count_refuses_to_start(
        make_app: AppFactory, settings: Settings, redis: Any) -> None:
    await make_app()  # the first instance stores its count
    assert await redis.get(keys.PARTITIONS) == str(settings.partitions).encode()
    refusal = await start_refused(dataclasses.replace(settings, partitions=settings.partitions + 1))
    assert f"start every instance with --partitions {settings.partitions}" in str(refusal)
    assert await redis.get(keys.PARTITIONS) == str(settings.partitions).encode(), "the refused one changed nothing"
    await make_app()  # the same count still starts


async def test_the_first_count_is_kept_when_its_instances_are_gone(settings: Settings, redis: Any) -> None:
    first = create_server(dataclasses.replace(settings, partitions=3))
    await first.start()
    await first.stop(grace=0)
    await start_refused(dataclasses.replace(settings, partitions=5))
    await redis.delete(keys.PARTITIONS)  # what docs/deployment.md tells an operator to do, all instances stopped
    second = create_server(dataclasses.replace(settings, partitions=5))
    await second.start()
    await second.stop(grace=0)
    assert await redis.get(keys.PARTITIONS) == b"5"


async def test_the_server_process_prints_the_mismatch_and_exits(make_app: AppFactory, settings: Settings) -> None:
    await make_app()
    where = ["--redis-cluster", settings.redis_cluster] if settings.redis_cluster else ["--redis-url", settings.redis_url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", *where,
        "--partitions", str(settings.partitions + 1),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first_line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on" not in first_line, "an instance with another partition count started serving"
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert f"--partitions {settings.partitions}".encode() in err and b"docs/deployment.md" in err, err
    assert b"Traceback" not in err, err


async def test_without_a_count_an_instance_adopts_the_stored_one_else_its_topologys(
        settings: Settings, redis: Any) -> None:
    """--partitions 0 (auto, the default): the count Redis holds, else 1 on one Redis and 4 on a cluster."""
    auto = dataclasses.replace(settings, partitions=0)
    assert (await resolve_partitions(auto)).partitions == (4 if settings.redis_cluster else 1)  # an empty Redis
    assert await redis.get(keys.PARTITIONS) is None, "resolving stores nothing: the start does (check_partitions)"
    await redis.set(keys.PARTITIONS, b"3")
    assert (await resolve_partitions(auto)).partitions == 3
    assert (await resolve_partitions(dataclasses.replace(settings, partitions=5))).partitions == 5, \
        "a count given is kept, for the start to check (and refuse)"
    for junk in (b"three", b"0", b"2000"):
        await redis.set(keys.PARTITIONS, junk)
        with pytest.raises(PartitionsMismatch, match="not a partition count"):
            await resolve_partitions(auto)
    with pytest.raises(ValueError, match="auto"):
        create_server(auto)  # Store and the dispatcher need the count: resolved first


async def test_the_server_process_without_a_count_adopts_the_stored_one(
        make_app: AppFactory, settings: Settings) -> None:
    await make_app()  # stores settings.partitions (2), which neither auto default would pick
    where = ["--redis-cluster", settings.redis_cluster] if settings.redis_cluster else ["--redis-url", settings.redis_url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--http-listen", "", *where,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on" in line, line
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert f"redis {where[1]}, {settings.partitions} partition(s))".encode() in err, err[-2000:]


async def run_server(settings: Settings, *flags: str) -> tuple[int | None, bytes, bytes]:
    """The scheduler process on the test's Redis with `flags`, run until it exits (30 s at most): its exit
    status, stdout and stderr."""
    where = ["--redis-cluster", settings.redis_cluster] if settings.redis_cluster else ["--redis-url", settings.redis_url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lingua_scheduler.server", *where, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out, err


async def test_an_http_port_taken_stops_the_start_with_a_message(settings: Settings, redis: Any) -> None:
    """Nothing runs yet when the operations port cannot be bound: the process says why and exits 1
    (it once hung for ever with the dispatcher's tasks started)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        code, out, err = await run_server(settings, "--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{taken}")
    finally:
        holder.close()
    assert code == 1 and b"listening on" not in out
    assert f"--http-listen 127.0.0.1:{taken}".encode() in err and b"--http-listen ''" in err, err
    assert b"Traceback" not in err, err


async def test_instances_starting_together_on_an_empty_redis_agree(settings: Settings, redis: Any) -> None:
    """The layout is set before the partition count, on different slots of a cluster: an instance that
    reads no layout, then the count another instance set meanwhile, reads the layout again rather than
    taking the Redis for one of the earlier layout (workers of --workers N start together)."""
    for _ in range(5):
        await redis.delete(keys.LAYOUT, keys.PARTITIONS)
        await asyncio.gather(*(check_partitions(redis, settings.partitions) for _ in range(8)))
        assert await redis.get(keys.LAYOUT) == keys.LAYOUT_VERSION.encode()


async def test_a_grpc_port_another_scheduler_holds_stops_the_start_with_a_message(
        make_app: AppFactory, settings: Settings) -> None:
    """A lone scheduler does not share its port (SO_REUSEPORT is for the workers of one supervisor only):
    a second one asked for it says so and exits 1, where it once listened too and the kernel split the
    clients between the two."""
    held = await make_app()
    code, out, err = await run_server(settings, "--listen", f"127.0.0.1:{held.port}", "--http-listen", "")
    assert code == 1 and b"listening on" not in out, (out, err)
    assert f"--listen 127.0.0.1:{held.port}".encode() in err and b"another process holds the port" in err, err
    assert b"Traceback" not in err, err


def test_help_documents_every_flag_from_its_settings_comment(capsys: pytest.CaptureFixture[str]) -> None:
    """`lingua-scheduler --help` gives each flag the comment above its field in server/settings.py (the
    later fields under one comment point to the first) and its default."""
    texts = Settings.help_texts()
    names = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(texts) == sorted(names) and all(texts.values()), [n for n in names if not texts.get(n)]
    assert texts["tls_key"] == "see --tls-cert" and texts["tls_cert"].startswith("Server TLS")
    with pytest.raises(SystemExit) as exit_:
        Settings.load(["--help"], env={})
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--partitions PARTITIONS Shards" in out and "(default: 0)" in out and "0 (auto)" in out, out[:500]
    assert "LINGUA_REDIS_URL" in out and "--tls-key TLS_KEY see --tls-cert (default: none)" in out
