"""Commands packed into the Redis protocol by hiredis (C) instead of redis.asyncio's Python loop.

redis-py's synchronous client packs with hiredis when it is installed (HiredisRespSerializer); its
asyncio client always packs in Python, one encode and two joins per argument: ~17 us for a submit's
34-argument EVALSHA on the dev machine, against ~2.5 us with hiredis.pack_command, and every job
sends three such calls. Same bytes, same rules (a first argument "CONFIG GET" is split, a bool or
None is a DataError), for every connection class (plain, TLS, Unix socket, Sentinel, cluster).
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError

PYTHON_PACK = AbstractConnection.pack_command  # redis-py's own, kept for comparison (tests/test_resp.py)


def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    if isinstance(args[0], str):
        args = tuple(args[0].encode().split()) + args[1:]
    elif b" " in args[0]:
        args = tuple(args[0].split()) + args[1:]
    try:
        return [hiredis.pack_command(args)]
    except TypeError:  # a bytearray or memoryview (packed as bytes, as redis-py does), or a bool or None
        args = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
    try:
        return [hiredis.pack_command(args)]
    except TypeError as err:
        raise DataError(f"{err} (command {args[0]!r})") from None


def use_hiredis() -> None:
    """Pack every redis.asyncio command with hiredis (idempotent; the process's clients, all modes)."""
    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
