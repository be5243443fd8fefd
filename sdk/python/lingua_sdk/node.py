"""`Node`: the worker runtime. The user owns one async function; the runtime owns the protocol.

It holds a NodeSession stream, registers, runs the handler for every assignment (at most
`concurrency` at once), acks at once, heartbeats at the interval the scheduler asks for, reports each
outcome, and keeps every outcome until the scheduler confirms it was stored (`confirmed`) or refuses
it (`refused`). When the stream breaks it reconnects with jittered exponential backoff, resumes the
leases of the jobs still running (`register.holding`, with their lease tokens) and sends every
unconfirmed outcome again. `cancels` cancel the handler's task. `stop()` (also on SIGTERM) drains:
no new work, the running jobs finish and are confirmed, then `run()` returns.

Simulations and tests of failures (scripts/simulate.py, scripts/chaos.py) use three controls:
`abort()` (the process dies: no drain, running work and unconfirmed results lost), `disconnect()` (the
network cuts the stream: the node reconnects and resumes its leases) and `silent` (no heartbeats).

Everything ready when the writer runs goes out in one NodeMessage: acks, heartbeats and results of
many jobs share one message, and a handler that finishes at once sends its ack with its result.

Handlers start eagerly: the first step of a handler (up to its first await that suspends) runs as
the assignment is read, and one that finishes there (a cache hit, a quick model) costs no Task and no
loop turn; one that suspends continues in its own Task. On Python 3.12+ that is the standard eager
Task (`eager_start`); on 3.11 the runtime takes the first step itself, in a copy of the context, and
a Task continues the coroutine from where it stopped (see `_eager`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from . import __version__
from ._channel import Connection, TLSOption
from ._proto import scheduler_pb2 as pb
from ._proto import scheduler_pb2_grpc as pb_grpc
from .errors import TRANSIENT, FailedPrecondition, HandlerError, ModelUnavailable, from_rpc_error
from .models import Assignment, JobResult, duration_seconds

log = logging.getLogger("lingua_sdk.node")

Outcome = JobResult | Mapping[str, Any] | pb.JobResult | None
Handler = Callable[[Assignment], Awaitable[Outcome]]
PairLike = str | tuple[str, str]

_MESSAGE_CAP = 4096  # JobError.message limit of the contract
_CODE = re.compile(r"[\x21-\x7e]{1,128}")
_REGISTER_TIMEOUT = 30.0
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lacks it


def _pair(p: PairLike) -> pb.LanguagePair:
    src, tgt = p.split(":", 1) if isinstance(p, str) else p
    return pb.LanguagePair(src_lang=src, tgt_lang=tgt)


def job_error(err: BaseException) -> pb.JobError:
    """The JobError a handler exception reports: HandlerError says its code and whether to retry;
    anything else is retryable, code HANDLER_EXCEPTION."""
    if isinstance(err, HandlerError) and _CODE.fullmatch(err.code) and not err.code.startswith("LINGUA_"):
        return pb.JobError(code=err.code, message=err.message[:_MESSAGE_CAP], retryable=err.retryable)
    return pb.JobError(code="HANDLER_EXCEPTION", message=f"{type(err).__name__}: {err}"[:_MESSAGE_CAP],
                       retryable=not isinstance(err, HandlerError) or err.retryable)


_STARTED: Any = object()


class _Resumed(Coroutine[Any, Any, None]):
    """The rest of a coroutine whose first step already ran (it stopped waiting for `pending`: a
    future, or None for a bare yield), as a coroutine a Task can run. The Task's first step gets
    `pending` to wait for; after that, what the Task sends or throws (the wake-up, a cancellation,
    also one that came before that first step) goes on to the coroutine, as it would in its own Task."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def send(self, value: Any) -> Any:
        if self.pending is not _STARTED:
            pending, self.pending = self.pending, _STARTED
            return pending
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.pending = _STARTED
        return self.coro.throw(typ) if val is None and tb is None else self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a Task runs it; it is not awaited")


def _eager(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` until it first suspends: None when it finished there, else the Task continuing it."""
    if sys.version_info >= (3, 12):
        task = asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)
        return None if task.done() else task
    # Python 3.11 has no eager tasks. The first step runs in a copy of the context, as a Task's would
    # (a handler's context variables stay its own); asyncio.current_task() there is the runtime's
    # reader, so a handler enters asyncio.timeout() only after its first await (or uses wait_for).
    context = contextvars.copy_context()
    try:
        pending = context.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_Resumed(coro, pending), context=context)


@dataclass
class _Held:
    """A job this node holds: its lease and the task running the handler (None while its handler
    takes its first step, and for one that finished there)."""

    lease: pb.JobLease
    task: asyncio.Task[None] | None = None


class Node:
    """A worker node. `pairs` are "src:tgt" strings or (src, tgt) tuples; `handler` is
    `async def handle(assignment) -> JobResult | dict`, raising RetryableError or FatalError (any other
    exception counts as retryable) to report a failure. `await node.run()` serves until `stop()` (or
    SIGTERM, when run in the main thread) has drained the node. `drain_timeout` bounds the drain:
    past it, running handlers are cancelled and run() returns."""

    def __init__(self, target: str, *, node_id: str, pairs: Iterable[PairLike], concurrency: int, handler: Handler,
                 token: str | None = None, tls: TLSOption = False, labels: Mapping[str, str] | None = None,
                 version: str = f"lingua-sdk-python/{__version__}", options: Sequence[tuple[str, Any]] = (),
                 backoff: tuple[float, float] = (0.1, 5.0), drain_timeout: float = 60.0,
                 handle_signals: bool = True) -> None:
        self.node_id = node_id
        self.pairs = [_pair(p) for p in pairs]
        self.concurrency = concurrency
        self.handler = handler
        self.labels = dict(labels or {})
        self.version = version
        self.backoff = backoff
        self.drain_timeout = drain_timeout
        self.handle_signals = handle_signals
        self._connection = Connection.of(target, token, tls, options)
        self.instance_id: str | None = None  # the scheduler instance holding the stream, while registered
        self._held: dict[str, _Held] = {}  # job id -> lease and handler task
        self._unconfirmed: dict[str, pb.Completion] = {}  # job id -> outcome, until confirmed or refused
        self._unsent: dict[str, pb.Completion] = {}  # the unconfirmed not yet written on the current stream
        self._acks: list[pb.JobLease] = []
        self._unavailable: list[pb.JobLease] = []
        self._beat = False
        self._drain_sent = False
        self._stopping = False
        self._flush = asyncio.Event()  # something is ready to send
        self._wake = asyncio.Event()  # stop() was called, or the drain ran out of time
        self._give_up = asyncio.Event()  # the drain ran out of time
        self._slots = asyncio.Semaphore(concurrency)
        self._running = False
        self._call: Any = None  # the current stream, once registered
        self._aborted = False
        # True: send no heartbeats (the stream stays open; acks and outcomes still go). The scheduler
        # then takes the leases back at their timeout, as from a hung node. For simulations and tests.
        self.silent = False
        self.refused_results = 0  # outcomes the scheduler refused (the lease was gone): never stored

    @property
    def in_flight(self) -> int:
        """Jobs whose handler is running."""
        return len(self._held)

    @property
    def unconfirmed(self) -> int:
        """Outcomes reported but not yet confirmed stored (nor refused) by the scheduler."""
        return len(self._unconfirmed)

    def stop(self) -> None:
        """Drain: take no new work, finish (and have confirmed) what runs, then run() returns. Call it
        from the node's event loop (or a signal handler on it); from another thread use
        loop.call_soon_threadsafe(node.stop)."""
        if self._stopping:
            return
        self._stopping = True
        asyncio.get_running_loop().call_later(self.drain_timeout, self._give_up.set)
        self._wake.set()
        self._flush.set()

    def abort(self) -> None:
        """Stop at once, as if the process died: the stream is cut without a drain, running handlers
        are cancelled and unconfirmed outcomes are dropped; run() returns. The scheduler requeues the
        jobs when it sees the stream gone. For crash simulations and emergency exits; stop() drains."""
        self._aborted = True
        if self._call is not None:
            self._call.cancel()
        self._give_up.set()
        self._wake.set()

    def disconnect(self) -> None:
        """Cut the current stream, as a network failure would. The node reconnects (with backoff),
        resumes the leases of the jobs still running and sends its unconfirmed outcomes again. Does
        nothing while not registered."""
        if self._call is not None:
            self._call.cancel()

    def _done(self) -> bool:
        return self._give_up.is_set() or (self._stopping and not self._held and not self._unconfirmed)

    async def run(self) -> None:
        """Serve until drained (see stop()). Raises the typed error when the scheduler refuses the
        node for good (INVALID_ARGUMENT, UNAUTHENTICATED, ...); transient failures are retried."""
        if self._running:
            raise RuntimeError("Node.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        on_signal = self.handle_signals and threading.current_thread() is threading.main_thread()
        if on_signal:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
        channel = self._connection.aio_channel()
        stub = pb_grpc.SchedulerStub(channel)
        failures = 0
        try:
            while not self._done():
                registered = await self._session(stub)
                failures = 0 if registered else failures + 1
                if self._done():
                    break
                delay = random.uniform(0, min(self.backoff[1], self.backoff[0] * 2 ** failures))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._give_up.wait(), delay)
            if (self._unconfirmed or self._held) and not self._aborted:
                log.warning("node %s stopped with %d jobs running and %d results unconfirmed", self.node_id,
                            len(self._held), len(self._unconfirmed))
        finally:
            if on_signal:
                loop.remove_signal_handler(signal.SIGTERM)
            tasks = [h.task for h in self._held.values() if h.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close(None)

    # -- one stream -----------------------------------------------------------------------------

    def _register(self) -> pb.NodeMessage:
        # A node that reconnects while draining (to deliver unconfirmed results) says so at once.
        return pb.NodeMessage(drain=self._stopping, register=pb.Register(
            node_id=self.node_id, pairs=self.pairs, max_concurrency=self.concurrency, labels=self.labels,
            version=self.version, holding=[h.lease for h in self._held.values()]))

    async def _session(self, stub: pb_grpc.SchedulerStub) -> bool:
        """One stream, from register to its end. True when it registered (the backoff starts over)."""
        open_stream: Any = stub.NodeSession  # grpc-stubs types only the sync form; this is grpc.aio's
        call = open_stream(metadata=self._connection.metadata or None)
        tasks: list[asyncio.Task[Any]] = []
        registered = False
        try:
            await call.write(self._register())
            first = await asyncio.wait_for(call.read(), _REGISTER_TIMEOUT)
            if first is _EOF or not first.HasField("registered"):
                log.warning("node %s: stream closed before registering", self.node_id)
                return False
            registered = True
            self.instance_id = first.registered.instance_id
            interval = duration_seconds(first.registered.heartbeat_interval) or 1.0
            log.info("node %s registered with instance %s", self.node_id, self.instance_id)
            if self._aborted:
                return True
            self._call = call  # disconnect() and abort() cut it from here on
            # A new stream: the leases held were resumed by register.holding (which acks them too);
            # every outcome not confirmed yet goes again.
            self._acks.clear()
            self._unavailable.clear()
            self._unsent = dict(self._unconfirmed)
            self._drain_sent = False
            self._flush.set()
            tasks = [asyncio.create_task(self._read(call)), asyncio.create_task(self._write(call)),
                     asyncio.create_task(self._heartbeats(interval)), asyncio.create_task(self._give_up.wait())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return True
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if error.code not in TRANSIENT:
                raise error from None
            log.info("node %s: stream ended: %s; reconnecting", self.node_id, error)
            return registered
        except TimeoutError:
            log.warning("node %s: no answer to register in %.0f s", self.node_id, _REGISTER_TIMEOUT)
            return False
        finally:
            self.instance_id = None
            self._call = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    async def _read(self, call: Any) -> None:
        while (m := await call.read()) is not _EOF:
            for a in m.assignments:
                self._start(a)
            for lease in m.cancels:
                self._take_back(lease.job_id, lease.attempt, "cancelled by the scheduler")
            for status in m.refused:
                self._refused(status)
            for status in m.confirmed:
                self._unconfirmed.pop(status.job_id, None)
                self._unsent.pop(status.job_id, None)
            if m.error:
                if m.error.startswith("replaced"):
                    raise FailedPrecondition(f"node_id {self.node_id!r} was registered by another stream: {m.error}")
                log.warning("node %s: scheduler says: %s", self.node_id, m.error)

    async def _write(self, call: Any) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            message = self._take()
            if message is None:
                continue
            try:
                await call.write(message)
            except asyncio.InvalidStateError:
                return  # the stream already ended (cut, or closed): the session ends; outcomes go again

    def _take(self) -> pb.NodeMessage | None:
        """Everything ready, as one message (None when nothing is)."""
        acks, self._acks = self._acks, []
        unavailable, self._unavailable = self._unavailable, []
        completions = list(self._unsent.values())
        self._unsent.clear()
        heartbeats: list[pb.JobLease] = []
        if self._beat:
            self._beat = False
            acking = {a.job_id for a in acks}
            heartbeats = [h.lease for job_id, h in self._held.items() if job_id not in acking]
        drain = self._stopping and not self._drain_sent
        if not (acks or completions or heartbeats or unavailable or drain):
            return None
        self._drain_sent = self._drain_sent or drain
        return pb.NodeMessage(acks=acks, heartbeats=heartbeats, completions=completions, unavailable=unavailable,
                              drain=drain)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._held and not self.silent:
                self._beat = True
                self._flush.set()

    # -- jobs -----------------------------------------------------------------------------------

    def _start(self, a: pb.Assignment) -> None:
        lease = pb.JobLease(job_id=a.job_id, attempt=a.attempt, lease_token=a.lease_token)
        if self._stopping:
            # Given before the scheduler saw the drain (a stream reopened while draining): hand it
            # back for another node rather than start work the drain would have to wait for.
            self._unavailable.append(lease)
            self._flush.set()
            return
        old = self._held.pop(a.job_id, None)
        if old is not None and old.task is not None:  # given again (a new attempt): the old lease is gone
            old.task.cancel()
        self._acks.append(lease)  # before the handler runs: a result it has at once rides with the ack
        self._flush.set()
        held = self._held[a.job_id] = _Held(lease)
        held.task = _eager(self._work(a, lease))

    async def _work(self, a: pb.Assignment, lease: pb.JobLease) -> None:
        completion: pb.Completion | None
        async with self._slots:
            try:
                completion = pb.Completion(lease=lease, result=JobResult.of(await self.handler(Assignment(a))))
            except asyncio.CancelledError:
                raise
            except ModelUnavailable:
                completion = None
            except Exception as err:
                if not isinstance(err, HandlerError):
                    log.warning("node %s: handler failed on %s", self.node_id, a.job_id, exc_info=True)
                completion = pb.Completion(lease=lease, error=job_error(err))
        held = self._held.get(lease.job_id)
        if held is None or held.lease is not lease:
            return  # taken back while it ran
        del self._held[lease.job_id]
        if completion is None:  # no model for it here (ModelUnavailable): requeued for another node
            self._unavailable.append(lease)
        else:
            self._unconfirmed[lease.job_id] = self._unsent[lease.job_id] = completion
        self._flush.set()

    def _take_back(self, job_id: str, attempt: int, why: str) -> None:
        held = self._held.get(job_id)
        if held is not None and (not attempt or held.lease.attempt == attempt):
            del self._held[job_id]
            if held.task is not None:
                held.task.cancel()
            log.info("node %s: job %s: %s", self.node_id, job_id, why)

    def _refused(self, status: pb.LeaseStatus) -> None:
        why = f"refused: {status.error_code}: {status.error_message}"
        if self._unconfirmed.pop(status.job_id, None) is not None:
            self._unsent.pop(status.job_id, None)
            self.refused_results += 1
            log.warning("node %s: result of job %s %s", self.node_id, status.job_id, why)
        else:
            self._take_back(status.job_id, 0, why)
