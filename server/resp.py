"""How commands reach Redis: packed by hiredis (C), and plain pipelines sent without redis-py's per-command costs.

redis-py's synchronous client packs with hiredis when it is installed (HiredisRespSerializer); its
asyncio client always packs in Python, one encode and two joins per argument: ~17 us for a submit's
34-argument EVALSHA on the dev machine, against ~2.5 us with hiredis.pack_command, and every job
sends three such calls. use_hiredis() makes it so for every redis.asyncio connection of the process
(plain, TLS, Unix socket, Sentinel, cluster): the same bytes as redis-py's packing for a utf-8 (strict)
encoder, whose rules it keeps (a first argument "CONFIG GET" is split); any other encoder, or an
argument hiredis does not pack (a bytearray or memoryview, an IntEnum, a bool or None: redis-py's
DataError), is packed by redis-py itself. It replaces a redis-py method: pyproject.toml pins redis-py
below its next major version, and tests/test_resp.py compares both packers.

Every write of a command (redis-py's send_packed_command) hands the bytes to the socket at once and
waits under the socket timeout only when the kernel did not take them all: redis-py runs each write
under asyncio.wait_for, which on Python 3.11 starts a Task per write (~6 us, and a turn of the event
loop) to time out a write that almost never waits (send_packed_command below). And each pub/sub
message read no longer builds redis-py's DEBUG line about it unless DEBUG is on (pubsub_pushed).

A scheduler talking to one Redis (or Sentinel's master) pipelines through BatchRedis: a plain batch
(WatchSession's reads, a pass's claims, ...) is one buffer, one write and one timeout over its replies,
where redis-py's Pipeline arms a timer per reply and starts a task to give back the connection; and the
batches asked for in one turn of the event loop share that write and its round trip (send_batch). A
cluster keeps redis-py's ClusterPipeline (it routes each command to its node).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
from typing import Any

import hiredis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.client import Pipeline, Redis
from redis.asyncio.connection import AbstractConnection
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

PYTHON_PACK = AbstractConnection.pack_command  # redis-py's own, kept for comparison (tests/test_resp.py)
PYTHON_SEND = AbstractConnection.send_packed_command  # redis-py's own (a connection without a socket timeout)


def _hiredis_packed(args: tuple[Any, ...]) -> bytes | None:
    """A command packed by hiredis exactly as redis-py packs it with a utf-8 (strict) encoder (a first
    argument such as "CONFIG GET" is two); None for what hiredis does not pack alike (a bytearray or
    memoryview, an int subclass such as an IntEnum, a bool or None): redis-py's own packing takes those."""
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif isinstance(first, bytes) and b" " in first:
        args = (*first.split(), *args[1:])
    try:
        packed: bytes = hiredis.pack_command(args)
    except TypeError:
        return None
    return packed


def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    encoder = self.encoder
    if encoder.encoding == "utf-8" and encoder.encoding_errors == "strict":
        packed = _hiredis_packed(args)
        if packed is not None:
            return [packed]
    return PYTHON_PACK(self, *args)  # another encoding, or arguments hiredis would pack otherwise


async def send_packed_command(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
    """redis-py's send_packed_command without its Task per write: the bytes go to the transport at
    once, and the drain runs under the socket timeout only when the transport kept some of them (the
    kernel's buffer full: a Redis that does not read). Errors as redis-py's: a timeout or an OSError
    closes the connection and raises redis' TimeoutError or ConnectionError; any other interruption
    (a cancel) closes it too."""
    if not self.socket_timeout or not self.is_connected:
        return await PYTHON_SEND(self, command, check_health)
    if check_health:
        await self.check_health()  # type: ignore[no-untyped-call]
    try:
        if isinstance(command, str):
            command = command.encode()
        writer = self._writer
        assert writer is not None
        writer.writelines([command] if isinstance(command, bytes) else command)
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(self.socket_timeout):
                await writer.drain()
        else:
            await writer.drain()  # returns at once (raises if the connection was lost)
    except TimeoutError:
        await self.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as err:
        await self.disconnect(nowait=True)
        number, text = ("UNKNOWN", err.args[0]) if len(err.args) == 1 else err.args[:2]
        raise RedisConnectionError(f"Error {number} while writing to socket. {text}.") from err
    except BaseException:
        await self.disconnect(nowait=True)  # a write cut halfway: the connection is out of step
        raise


_push_log = logging.getLogger("push_response")  # redis-py's logger of pub/sub messages


async def pubsub_pushed(self: _AsyncHiredisParser, response: Any) -> Any:
    """redis-py's handler of each pub/sub message read, which builds its DEBUG line (a getLogger and the
    message's str()) even when DEBUG is off: ~3 us for every wake-up and announcement heard. The same
    line, built only when it is logged."""
    if _push_log.isEnabledFor(logging.DEBUG):
        _push_log.debug("Push response: " + str(response))
    return response


def use_hiredis() -> None:
    """Pack every redis.asyncio command with hiredis, send it without a Task per write, and read pub/sub
    messages without formatting a line that is not logged (idempotent; the process's clients, all modes)."""
    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    _AsyncHiredisParser.handle_pubsub_push_response = pubsub_pushed  # type: ignore[method-assign]


async def send_batch(pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Commands pipelined on one connection of `pool`: their raw replies (no response callbacks), a
    command's error in its place. What redis-py's Pipeline.execute() does for a batch, without its
    per-command costs (a timer per reply, a task to release the connection, its bookkeeping): one
    buffer packed by hiredis, one write, one timeout (the socket timeout) over all the replies (redis-py
    applies it to each reply). redis-py's own per-operation metrics do not see these batches.
    Retried as redis-py retries a pipeline (its Retry, on a connection or timeout error, on the
    connection made again).

    The batches asked for in one turn of the event loop go together: one write and one round trip for
    all of them (_Turn), so the WatchSession streams, claims and completions that wake up together do
    not each pay a round trip. Each batch is packed on its own (one that cannot be packed fails alone)
    and answered as soon as its own replies are read; a caller that gives up (cancelled) leaves the
    others' batches going. No blocking command (BLPOP...) may come this way: the batches after it in
    its round trip would wait for it."""
    turn = getattr(pool, "_lingua_turn", None)
    if turn is None:
        turn = pool._lingua_turn = _Turn(pool)
    return await turn.add(commands)


Batch = tuple[list[tuple[Any, ...]], "asyncio.Future[list[Any]]"]  # a caller's commands, and its replies to be


class _Turn:
    """The batches of one connection pool asked for in the current turn of the event loop: sent as one
    at the end of it (call_soon), in a task of its own (in a context of its own, not its first caller's)."""

    __slots__ = ("loop", "pool", "waiting")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the waiting batches' flush is due on
        self.waiting: list[Batch] = []

    def add(self, commands: list[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        if self.waiting and self.loop is not loop:  # left by a loop that stopped before its flush ran
            self.waiting = []
        if not self.waiting:
            self.loop = loop
            loop.call_soon(self._flush, context=contextvars.Context())
        done: asyncio.Future[list[Any]] = loop.create_future()
        self.waiting.append((commands, done))
        return done

    def _flush(self) -> None:
        batches, self.waiting = self.waiting, []
        _sending.add(task := asyncio.ensure_future(_send_batches(self.pool, batches)))
        task.add_done_callback(_sending.discard)


_sending: set[asyncio.Task[None]] = set()  # the batches in flight (a task must be referenced until done)


async def _send_batches(pool: Any, batches: list[Batch]) -> None:
    """One round trip for `batches` on a connection of `pool` (a retry sends again those not answered).
    What fails is each unanswered caller's error; only a cancel of this task is raised."""
    todo: list[tuple[bytes, int, asyncio.Future[list[Any]]]] = []
    answered = 0

    async def exchange(conn: Any) -> None:
        nonlocal answered
        await conn.send_packed_command(b"".join(packed for packed, _, _ in todo[answered:]))
        try:
            async with asyncio.timeout(conn.socket_timeout):
                for _, count, done in todo[answered:]:
                    replies: list[Any] = []
                    for _ in range(count):
                        try:
                            replies.append(await conn.read_response(timeout=math.inf))  # the batch's timeout covers it
                        except ResponseError as err:
                            replies.append(err)
                    answered += 1
                    if not done.done():  # (a caller that gave up)
                        done.set_result(replies)
        except TimeoutError:
            await conn.disconnect(nowait=True)  # replies may still come: the connection is out of step
            raise RedisTimeoutError("Timeout reading from Redis") from None
        except BaseException:
            await conn.disconnect(nowait=True)  # (cancelled halfway: the same)
            raise

    conn = None
    try:
        conn = await pool.get_connection()
        for commands, done in batches:
            if done.done():
                continue  # its caller gave up before anything was sent
            try:
                todo.append((b"".join(chunk for c in commands for chunk in conn.pack_command(*c)), len(commands), done))
            except Exception as err:  # (redis-py's DataError for a None, ...): this batch only
                done.set_exception(err)
        if todo:
            await conn.retry.call_with_retry(lambda: exchange(conn), lambda _err: conn.disconnect())
    except BaseException as err:
        _fail(batches if conn is None else [(None, done) for _, _, done in todo[answered:]], err)
        if not isinstance(err, Exception):
            raise
    finally:
        if conn is not None and not getattr(pool, "release_at_once", _not_at_once)(conn):  # (GatedConnectionPool)
            await asyncio.shield(pool.release(conn))  # as redis-py: a cancel must not cut the pool's bookkeeping


def _fail(batches: list[Any], err: BaseException) -> None:
    for _, done in batches:
        if not done.done():
            done.set_exception(err if isinstance(err, Exception) else RedisConnectionError("batch cancelled"))


def _not_at_once(_conn: Any) -> bool:
    return False


class BatchPipeline(Pipeline):
    """redis-py's Pipeline whose plain batches (no transaction, WATCH or Script) go by send_batch(), each
    reply then through the client's response callback as Pipeline.execute() does."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.is_transaction or self.explicit_transaction or self.watching or self.scripts:
            return await super().execute(raise_on_error)
        stack, self.command_stack = self.command_stack, []
        if not stack:
            return []
        replies = await send_batch(self.connection_pool, [args for args, _ in stack])
        out = []
        for (args, options), reply in zip(stack, replies, strict=True):
            if isinstance(reply, ResponseError):
                out.append(options.get(EMPTY_RESPONSE, reply))
                continue
            callback = self.response_callbacks.get(args[0])
            if callback is not None:
                reply = callback(reply, **{k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS})
                if type(reply) not in _PLAIN and inspect.isawaitable(reply):  # the ABC check costs ~0.6 us
                    reply = await reply
            out.append(reply)
        if raise_on_error:
            self.raise_first_error(stack, out)
        return out


_NOT_FOR_CALLBACKS = (EMPTY_RESPONSE, NEVER_DECODE, "keys")  # options Redis.parse_response takes out first
_PLAIN = frozenset((dict, list, tuple, bytes, str, int, float, bool, type(None)))  # what callbacks give: never awaitable


class BatchRedis(Redis):
    """A redis.asyncio.Redis whose non-transactional pipelines are BatchPipelines (the scheduler's
    batches of script calls and reads: one a few times per job)."""

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return BatchPipeline(self.connection_pool, self.response_callbacks, False, None)
