"""server/resp.py: commands packed by hiredis are byte for byte what redis.asyncio's Python packer sends,
and they round-trip through a real Redis (one and a cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from lingua_scheduler.server import resp
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import DataError

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
    assert resp.pack_command(conn, *args) == [python]


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
