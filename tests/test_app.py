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
from helpers import until
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
    """--partitions 0 (auto, the default): the count Redis holds, else 1 on one Redis and 4 per primary on a
    cluster, stored at once (instances starting together agree)."""
    auto = dataclasses.replace(settings, partitions=0)
    picked = 4 * 3 if settings.redis_cluster else 1  # the test cluster has 3 primaries
    assert (await resolve_partitions(auto)).partitions == picked  # an empty Redis
    assert await redis.get(keys.PARTITIONS) == str(picked).encode() and await redis.get(keys.LAYOUT)
    await redis.set(keys.PARTITIONS, b"3")
    assert (await resolve_partitions(auto)).partitions == 3
    assert (await resolve_partitions(dataclasses.replace(settings, partitions=5))).partitions == 5, \
        "a count given is kept, for the start to check (and refuse)"
    for junk in (b"three", b"0", b"2000", b"04", b"4 "):
        await redis.set(keys.PARTITIONS, junk)
        with pytest.raises(PartitionsMismatch, match="not a partition count"):
            await resolve_partitions(auto)
        with pytest.raises(PartitionsMismatch, match="not a partition count"):
            await check_partitions(redis, 4)
    with pytest.raises(ValueError, match="auto"):
        create_server(auto)  # Store and the dispatcher need the count: resolved first


async def test_an_instance_without_a_count_never_loses_a_race_to_one_with_a_count(
        settings: Settings, redis: Any) -> None:
    """Started together on an empty Redis, one given --partitions 4 and one auto: whichever stores first,
    the auto one adopts what is stored (the one given 4 is refused only when 1 was stored first)."""
    auto = dataclasses.replace(settings, partitions=0)
    for _ in range(10):
        await redis.delete(keys.LAYOUT, keys.PARTITIONS)
        given, resolved = await asyncio.gather(check_partitions(redis, 4), resolve_partitions(auto),
                                               return_exceptions=True)
        assert isinstance(resolved, Settings), resolved
        stored = int(await redis.get(keys.PARTITIONS))
        assert resolved.partitions == stored
        assert given is None if stored == 4 else isinstance(given, PartitionsMismatch), (stored, given)


async def test_running_instances_store_their_count_again_when_redis_lost_it(
        make_app: AppFactory, settings: Settings, redis: Any) -> None:
    """A Redis restarted without its data while instances run: they store the layout and their count
    again (every --instance-heartbeat-ms), so an instance started then adopts theirs, not its own pick."""
    await make_app(instance_heartbeat_ms=50)
    await redis.delete(keys.LAYOUT, keys.PARTITIONS)
    await until(lambda: redis.exists(keys.PARTITIONS), what="the count stored again")
    assert await redis.get(keys.LAYOUT) == keys.LAYOUT_VERSION.encode()
    assert (await resolve_partitions(dataclasses.replace(settings, partitions=0))).partitions == settings.partitions


async def test_a_running_instance_says_when_redis_holds_another_count(
        make_app: AppFactory, settings: Settings, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Redis lost the count and an instance started before the running ones stored theirs again: it stored
    its own. The running ones cannot fix that (SET NX), but say so, as an error, at their next heartbeat."""
    await make_app(instance_heartbeat_ms=50)
    await redis.set(keys.PARTITIONS, b"3")  # what that instance stored
    await until(lambda: any("Redis now holds 3" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records),
                what="the error logged")
    assert await redis.get(keys.PARTITIONS) == b"3", "never overwritten"


async def test_the_server_process_says_when_redis_cannot_be_reached() -> None:
    """Unreachable at the start (auto reads the count before anything else): a line naming the address, exit 1."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{unused.getsockname()[1]}/0"  # bound, never listening: refused
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--redis-url", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"listening on" not in out, (out, err)
    assert f"cannot use Redis at {url}: ConnectionError".encode() in err, err
    assert b"Traceback" not in err, err


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
