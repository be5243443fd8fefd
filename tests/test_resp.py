"""server/resp.py: commands packed by hiredis are byte for byte what redis.asyncio's Python packer sends,
and they round-trip through a real Redis (one and a cluster); a write or a batch starts no task, and a
write that Redis does not take still times out; BatchRedis's plain pipelines answer as redis-py's do,
and one cut halfway leaves no reply behind for the next caller."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import until
from lingua_scheduler.server import resp
from lingua_scheduler.server.embedded import EmbeddedRedis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

PYTHON_PACK = resp.PYTHON_PACK


ARGS: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "k1", b"k2\x00\r\n", 0, -7, 2**70, 1.5, 1e20, "é ü", b"", ""),
    ("CONFIG GET", "maxmemory-policy"),  # a command name of two words is split
    (b"SET", b"key", bytearray(b"ba"), memoryview(b"mv")),
    ("SET", "k", "x" * 100_000),  # past redis-py's buffer cutoff: it sends chunks, hiredis one buffer
]


@pytest.mark.parametrize("args", ARGS)
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    conn = Connection()
    python = b"".join(bytes(chunk) for chunk in PYTHON_PACK(conn, *args))
    assert b"".join(bytes(chunk) for chunk in resp.pack_command(conn, *args)) == python


class Pair(enum.IntEnum):
    ZH_EN = 1


@pytest.mark.parametrize(("encoding", "args"), [
    ("latin-1", ("SET", "k", "é")),  # another encoder: its bytes, not utf-8's
    ("utf-8", ("SET", "k", Pair.ZH_EN)),  # an int subclass: redis-py's own rendering
])
def test_what_hiredis_would_pack_otherwise_is_packed_by_redis_py(encoding: str, args: tuple[Any, ...]) -> None:
    conn = Connection(encoding=encoding)
    python = b"".join(bytes(chunk) for chunk in PYTHON_PACK(conn, *args))
    assert b"".join(bytes(chunk) for chunk in resp.pack_command(conn, *args)) == python


@pytest.mark.parametrize("bad", [True, None, object()])
def test_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(DataError):
        resp.pack_command(Connection(), "SET", "k", bad)


async def test_round_trip(redis: Any) -> None:
    assert AbstractConnection.pack_command is resp.pack_command  # the scheduler's clients use it
    value = b"\x00\r\n\xff" + "é".encode()
    await redis.set("resp:{t}:a", value)
    assert await redis.get("resp:{t}:a") == value
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set("resp:{t}:b", 12)
        pipe.incrbyfloat("resp:{t}:b", 0.5)
        pipe.get("resp:{t}:a")
        assert await pipe.execute() == [True, 12.5, value]


@pytest.mark.single_redis
async def test_batch_pipeline_replies_as_redis_py(redis: Any) -> None:
    """The scheduler's client (BatchRedis) gives a plain pipeline's replies as redis-py's Pipeline does:
    response callbacks applied, a failed command's error in its place or raised, annotated."""
    assert isinstance(redis, resp.BatchRedis)
    plain = Redis(connection_pool=redis.connection_pool)  # redis-py's own Pipeline, on the same server

    async def both(build: Any, raise_on_error: bool = False) -> list[Any]:
        got = []
        for client in (redis, plain):
            await redis.delete("b:h", "b:z")
            async with client.pipeline(transaction=False) as pipe:
                build(pipe)
                got.append(await pipe.execute(raise_on_error=raise_on_error))
        return got

    def queue(pipe: Any) -> None:
        pipe.hset("b:h", mapping={"a": "1", "b": b"\x00"})
        pipe.hgetall("b:h")
        pipe.zadd("b:z", {"x": 1.5, "y": 2})
        pipe.zrangebyscore("b:z", 0, "+inf", withscores=True)
        pipe.get("b:none")
        pipe.incr("b:h")  # WRONGTYPE: an error in its place
        pipe.memory_usage("b:z")  # a command of two words ("MEMORY USAGE"), packed as redis-py packs it
        pipe.exists("b:h")

    ours, theirs = await both(queue)
    assert isinstance(ours.pop(), int) and isinstance(theirs.pop(), int)
    assert isinstance(ours[5], ResponseError) and str(ours[5]) == str(theirs[5])
    assert isinstance(ours[6], int) and isinstance(theirs[6], int)  # MEMORY USAGE answered, not refused
    assert ours[:5] == theirs[:5] == [2, {b"a": b"1", b"b": b"\x00"}, 2, [(b"x", 1.5), (b"y", 2.0)], None]
    await redis.set("b:s", "x")
    with pytest.raises(ResponseError, match=r"Command # 1 .*not an integer"):
        await both(lambda pipe: pipe.incr("b:s").get("b:none"), raise_on_error=True)
    async with redis.pipeline(transaction=False) as pipe:
        assert await pipe.execute() == []


@pytest.mark.single_redis  # BatchRedis serves one Redis (or Sentinel's master); a cluster keeps redis-py's pipeline
async def test_a_response_callback_that_returns_an_awaitable_is_awaited(redis: Any) -> None:
    """A plain reply skips the awaitable check (resp._PLAIN), a callback's coroutine is still awaited."""

    async def later(reply: Any, **_: Any) -> str:
        return f"awaited {reply!r}"

    client = resp.BatchRedis(connection_pool=redis.connection_pool)
    client.set_response_callback("ECHO", later)
    async with client.pipeline(transaction=False) as pipe:
        assert await pipe.echo("hi").exists("b:none").execute() == ["awaited b'hi'", 0]


@pytest.mark.single_redis
async def test_a_caller_that_gives_up_leaves_its_batch_going(redis: Any) -> None:
    """A batch's caller cancelled while the replies are on their way: the batch goes on (the batches of
    its turn get their replies), it reads its own replies, and the next commands on the pool get theirs."""
    async def other() -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get("b:k")
            return list(await pipe.execute())

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):  # cut while the BLPOP's reply is awaited
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set("b:k", "first")
                pipe.blpop(["b:empty"], timeout=5)
                along = asyncio.ensure_future(other())  # asked for in the same turn: sent in the same batch
                await pipe.execute()
    await redis.rpush("b:empty", "late")  # answers the BLPOP, still waiting
    assert await along == [b"first"]  # the batch's other caller got its reply
    async def taken() -> bool:
        return await redis.exists("b:empty") == 0

    await until(taken, what="the cut batch's BLPOP to take the element")  # its connection read that reply
    for _ in range(20):  # every pooled connection answers its own command
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set("b:k", "again")
            pipe.get("b:k")
            assert await pipe.execute() == [True, b"again"]


async def tasks_started(work: Any) -> list[str]:
    """The coroutines of the tasks started while `work()` runs."""
    loop = asyncio.get_running_loop()
    started: list[str] = []
    factory = loop.get_task_factory()

    def counted(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counted)
    try:
        await work()
    finally:
        loop.set_task_factory(factory)
    return started


async def test_a_write_starts_no_task(redis: Any) -> None:
    """Commands are written in their caller's task: redis-py's write under asyncio.wait_for started a
    Task for each (Python 3.11)."""
    assert AbstractConnection.send_packed_command is resp.send_packed_command
    await redis.set("resp:{t}:w", "0")  # connected

    async def commands() -> None:
        for i in range(20):
            await redis.set("resp:{t}:w", i)
            assert await redis.get("resp:{t}:w") == str(i).encode()

    assert await tasks_started(commands) == []


@pytest.mark.single_redis
async def test_the_batches_of_one_turn_go_in_one_round_trip(redis: Any) -> None:
    """The batches asked for in one turn of the event loop are sent together: one task and one write for
    all of them, each caller with its own replies; the connection goes back to the scheduler's pool at
    once (GatedConnectionPool), not in a shielded task as redis-py's release needs."""
    await redis.set("resp:{t}:w", "0")  # connected
    writes = 0
    send = AbstractConnection.send_packed_command

    async def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal writes
        writes += 1
        await send(self, *args, **kwargs)

    async def batch(i: int) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(f"resp:{{t}}:w{i}", i)
            pipe.get(f"resp:{{t}}:w{i}")
            assert await pipe.execute() == [True, str(i).encode()]

    async def together() -> None:
        await asyncio.gather(*[batch(i) for i in range(20)])

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        started = await tasks_started(together)
        assert [name.rsplit(".", 1)[-1] for name in started] == [*["batch"] * 20, "_send_batches"]  # gather's, one
        assert writes == 1
        assert await tasks_started(lambda: batch(0)) == ["_send_batches"]
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    assert writes == 2
    assert len(redis.connection_pool._in_use_connections) == 0  # every one given back


@pytest.mark.single_redis
async def test_a_batch_that_cannot_be_packed_fails_alone_in_its_turn(redis: Any) -> None:
    """A command redis-py refuses to pack (a None) fails its own caller only: the other batches of the
    turn are sent and answered."""
    async def run(key: str, value: Any) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(key, value)
            pipe.get(key)
            return list(await pipe.execute())

    first, bad, last = await asyncio.gather(run("pack:a", "1"), run("pack:b", None), run("pack:c", "3"),
                                            return_exceptions=True)
    assert first == [True, b"1"] and last == [True, b"3"]
    assert isinstance(bad, DataError)
    assert await redis.exists("pack:b") == 0


@pytest.mark.single_redis
async def test_each_batch_of_a_turn_is_answered_once_its_own_replies_are_read(redis: Any) -> None:
    """A batch before a slow one in the same round trip gets its replies without waiting for the slow
    one's (here a BLPOP that Redis answers only when an element comes)."""
    async def quick() -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set("early:k", "v")
            return list(await pipe.execute())

    async def slow() -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.blpop(["early:list"], timeout=10)
            return list(await pipe.execute())

    first, waiting = asyncio.ensure_future(quick()), asyncio.ensure_future(slow())  # one turn: one round trip
    assert await first == [True]
    assert not waiting.done()  # still blocked: the first was answered before it
    await redis.rpush("early:list", "x")
    assert await waiting == [(b"early:list", b"x")]


async def test_a_write_redis_does_not_take_times_out(tmp_path: Path) -> None:
    """A Redis that stops reading (its process stopped) leaves a big write in the transport: the write
    fails after the socket timeout, as redis-py's does, and the next command gets a new connection."""
    server = EmbeddedRedis(tmp_path / "stopped", persistent=False).start()
    client = Redis.from_url(server.url, socket_timeout=0.3)
    try:
        await client.set("k", "before")
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError, match="Timeout writing to socket"):
                await client.set("k", b"x" * (32 << 20))  # far more than the socket's buffers take
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        await client.set("k", "after")
        assert await client.get("k") == b"after"
    finally:
        await client.aclose()
        server.stop()


async def test_pubsub_messages_logged_only_at_debug(redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Each pub/sub message read goes through resp.pubsub_pushed: redis-py's DEBUG line about it, built
    only when DEBUG is on (redis-py built it for every message)."""
    assert _AsyncHiredisParser.handle_pubsub_push_response is resp.pubsub_pushed
    pubsub = redis.pubsub()
    await pubsub.subscribe("resp:{t}:ch")
    try:
        async def heard() -> Any:
            while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)) is None:
                pass
            return message

        caplog.set_level(logging.INFO, logger="push_response")
        await redis.publish("resp:{t}:ch", "quiet")
        assert (await heard())["data"] == b"quiet"
        assert not [r for r in caplog.records if r.name == "push_response"]
        caplog.set_level(logging.DEBUG, logger="push_response")
        await redis.publish("resp:{t}:ch", "told")
        assert (await heard())["data"] == b"told"
        assert any("told" in r.getMessage() for r in caplog.records if r.name == "push_response")
    finally:
        await pubsub.aclose()
