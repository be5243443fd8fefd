"""`Node`: the worker runtime. The user owns one async function; the runtime owns the protocol.

It holds a NodeSession stream, registers, runs the handler for every assignment (at most
`concurrency` at once), acks at once, heartbeats at the interval the scheduler asks for, answers the
scheduler's pings at once (a stream that leaves one unanswered is ended as dead), reports each
outcome, and keeps every outcome until the scheduler confirms it was stored (`confirmed`) or refuses
it for good (`refused`). Answers are matched to leases by job id + lease token: an answer about an
earlier claim of a job never settles a newer claim's outcome. A refusal that means "the store could
not be reached, send it again" (error_code UNAVAILABLE or ABORTED: reasons STORE_UNAVAILABLE,
CONCURRENT_MODIFICATION) forgets nothing: the outcome is sent again with backoff, and a heartbeat so
refused leaves the job running. An outcome left unanswered for three heartbeat intervals (the
scheduler's whole store call failed: `SchedulerMessage.error`) is sent again on the same stream; the
scheduler confirms a repeat idempotently.

When the stream breaks it reconnects with jittered exponential backoff, resumes the leases of the
jobs still running (`register.holding`, with their lease tokens) and sends every unconfirmed outcome
again. `cancels` cancel the handler's task. `stop()` (also on SIGTERM or SIGINT; a second signal stops
at once) drains: no new work, the running jobs finish and are confirmed, then the node half-closes
its stream and `run()` returns. A draining node holding no job settles what is left with the unary
Complete call instead of a stream (a stream would only be handed work to give back).

Simulations and tests of failures (scripts/simulate.py, scripts/chaos.py) use three controls:
`abort()` (the process dies: no drain, running work and unconfirmed results lost), `disconnect()` (the
network cuts the stream: the node reconnects and resumes its leases) and `silent` (no heartbeats).

Everything ready when the writer runs goes out in one NodeMessage: acks, heartbeats and results of
many jobs share one message, and a handler that finishes at once sends its ack with its result.

On Python 3.12+ handlers start eagerly (asyncio's `eager_start`): the first step of a handler (up to
its first await that suspends) runs as the assignment is read, and one that finishes there (a cache
hit, a quick model) costs no loop turn. On 3.11 each handler runs in a plain Task (see `_eager`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from . import __version__
from ._channel import Connection, TLSOption, TokenOption
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


def _eager(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Start `coro` as a Task: on Python 3.12+ eagerly (its first step runs now, and None comes back
    when it finished there); on 3.11 as a plain Task. Python 3.11 has no eager tasks, and running a
    handler's first step outside its own Task would make asyncio.timeout() entered there cancel the
    runtime's reader instead of the handler."""
    if sys.version_info >= (3, 12):
        task = asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)
        return None if task.done() else task
    return asyncio.get_running_loop().create_task(coro)


# Refusals that mean "send the same entry again": the store could not be reached (STORE_UNAVAILABLE)
# or the job kept changing under the call (CONCURRENT_MODIFICATION). Any other refusal is for good.
_AGAIN = frozenset({"UNAVAILABLE", "ABORTED"})
_UNARY_AGAIN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED})
_RESEND_INTERVALS = 3  # heartbeat intervals an outcome may stay unanswered before it is sent again
_CLOSE_TIMEOUT = 5.0  # after the node half-closed its stream: how long the scheduler has to end it

_Key = tuple[str, str]  # job id, lease token: the claim an outcome (or an answer) is about


def _matches(token: str, other: str) -> bool:
    """Lease tokens match. An answer without one (from a scheduler older than LeaseStatus.lease_token)
    matches any claim of its job."""
    return not token or not other or token == other


@dataclass
class _Held:
    """A job this node holds: its lease and the task running the handler (None for a handler that
    finished in its eager first step, and while that step runs)."""

    lease: pb.JobLease
    task: asyncio.Task[None] | None = None


@dataclass
class _Result:
    """An outcome not yet confirmed: when it was last written on the current stream (None while it
    waits to be sent), how often it was refused "send again", and the timer that sends it again."""

    completion: pb.Completion
    sent_at: float | None = None
    tries: int = 0
    timer: asyncio.TimerHandle | None = None


class Node:
    """A worker node. `pairs` are "src:tgt" strings or (src, tgt) tuples; `handler` is
    `async def handle(assignment) -> JobResult | dict`, raising RetryableError or FatalError (any other
    exception counts as retryable) to report a failure. `await node.run()` serves until `stop()` (or
    SIGTERM/SIGINT, when run in the main thread; a second signal stops at once) has drained the node.
    `drain_timeout` bounds the drain: past it, running handlers are cancelled and run() returns.
    `token` is a bearer token, or a callable returning the current one (called for every new stream
    and call, so a long-running node can renew a token that expires)."""

    def __init__(self, target: str, *, node_id: str, pairs: Iterable[PairLike], concurrency: int, handler: Handler,
                 token: TokenOption = None, tls: TLSOption = False, labels: Mapping[str, str] | None = None,
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
        self._results: dict[_Key, _Result] = {}  # outcomes until confirmed or refused for good
        self._unsent: set[_Key] = set()  # outcomes to write on the current stream
        self._resend_after = _RESEND_INTERVALS * 1.0
        self._acks: list[pb.JobLease] = []
        self._unavailable: list[pb.JobLease] = []
        self._beat = False
        self._pong: int | None = None  # the id of a ping to answer in the next message
        self._drain_sent = False
        self._stopping = False
        self._flush = asyncio.Event()  # something is ready to send (or the node may be drained)
        self._wake = asyncio.Event()  # cuts a reconnect backoff short: stop(), abort(), the drain ran out
        self._give_up = asyncio.Event()  # the drain ran out of time (or a second signal, or abort())
        self._slots = asyncio.Semaphore(concurrency)
        self._running = False
        self._call: Any = None  # the current stream, once registered
        self._aborted = False
        # True: send no heartbeats (the stream stays open; acks and outcomes still go). The scheduler
        # then takes the leases back at their timeout, as from a hung node. For simulations and tests.
        self.silent = False
        self.refused_results = 0  # outcomes the scheduler refused for good (the lease was gone): never stored

    @property
    def in_flight(self) -> int:
        """Jobs whose handler is running."""
        return len(self._held)

    @property
    def unconfirmed(self) -> int:
        """Outcomes reported but not yet confirmed stored (nor refused) by the scheduler."""
        return len(self._results)

    def stop(self) -> None:
        """Drain: take no new work, finish (and have confirmed) what runs, then run() returns. Call it
        from the node's event loop (or a signal handler on it); from another thread use
        loop.call_soon_threadsafe(node.stop)."""
        if self._stopping:
            return
        self._stopping = True
        asyncio.get_running_loop().call_later(self.drain_timeout, self._stop_now)
        self._wake.set()
        self._flush.set()

    def _stop_now(self) -> None:
        self._give_up.set()
        self._wake.set()

    def _on_signal(self, signum: int) -> None:
        if self._stopping:
            log.warning("node %s: %s again: stopping at once", self.node_id, signal.Signals(signum).name)
            self._stop_now()
        else:
            log.info("node %s: %s: draining", self.node_id, signal.Signals(signum).name)
            self.stop()

    def abort(self) -> None:
        """Stop at once, as if the process died: the stream is cut without a drain, running handlers
        are cancelled and unconfirmed outcomes are dropped; run() returns. The scheduler requeues the
        jobs when it sees the stream gone. For crash simulations and emergency exits; stop() drains."""
        self._aborted = True
        if self._call is not None:
            self._call.cancel()
        self._stop_now()

    def disconnect(self) -> None:
        """Cut the current stream, as a network failure would. The node reconnects (with backoff),
        resumes the leases of the jobs still running and sends its unconfirmed outcomes again. Does
        nothing while not registered."""
        if self._call is not None:
            self._call.cancel()

    def _drained(self) -> bool:
        return self._stopping and not self._held and not self._results

    def _done(self) -> bool:
        return self._give_up.is_set() or self._drained()

    async def run(self) -> None:
        """Serve until drained (see stop()). Raises the typed error when the scheduler refuses the
        node for good (INVALID_ARGUMENT, UNAUTHENTICATED, ...); transient failures are retried."""
        if self._running:
            raise RuntimeError("Node.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        signals: dict[signal.Signals, Any] = {}
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signals[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._on_signal, sig)
        channel = self._connection.aio_channel()
        stub = pb_grpc.SchedulerStub(channel)
        failures = 0
        try:
            while not self._done():
                if self._stopping and not self._held:
                    await self._unless_given_up(self._settle(stub))
                    break
                registered = await self._session(stub)
                failures = 0 if registered else failures + 1
                if self._done() or (self._stopping and not self._held):
                    continue
                delay = random.uniform(0, min(self.backoff[1], self.backoff[0] * 2 ** failures))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            if (self._results or self._held) and not self._aborted:
                log.warning("node %s stopped with %d jobs running and %d results unconfirmed", self.node_id,
                            len(self._held), len(self._results))
        finally:
            for sig, previous in signals.items():
                loop.remove_signal_handler(sig)
                if previous is not None:  # asyncio.run's own SIGINT handler, say
                    signal.signal(sig, previous)
            for result in self._results.values():
                if result.timer is not None:
                    result.timer.cancel()
            tasks = [h.task for h in self._held.values() if h.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close(None)

    async def _unless_given_up(self, coro: Coroutine[Any, Any, None]) -> None:
        work, give_up = asyncio.ensure_future(coro), asyncio.ensure_future(self._give_up.wait())
        try:
            await asyncio.wait([work, give_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, give_up):
                task.cancel()
            await asyncio.gather(work, give_up, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    async def _settle(self, stub: pb_grpc.SchedulerStub) -> None:
        """Draining with no job held, only outcomes left: each goes by the unary Complete (a stream
        would be handed new work only to hand it back), again with backoff while the scheduler cannot
        store it."""
        complete: Any = stub.Complete  # grpc-stubs types only the sync form; this is grpc.aio's
        for key, result in list(self._results.items()):
            c = result.completion
            request = pb.CompleteRequest(job_id=c.lease.job_id, attempt=c.lease.attempt, node_id=self.node_id,
                                         lease_token=c.lease.lease_token)
            if c.WhichOneof("outcome") == "result":
                request.result.CopyFrom(c.result)
            else:
                request.error.CopyFrom(c.error)
            tries = 0
            while key in self._results:
                try:
                    await complete(request, metadata=self._connection.metadata or None, timeout=_REGISTER_TIMEOUT)
                    self._forget(key)
                except grpc.RpcError as err:
                    error = from_rpc_error(err)
                    if error.code not in _UNARY_AGAIN:
                        self._refused_for_good(key, f"refused: {error.reason or error.code.name}: {error.message}")
                        break
                    await asyncio.sleep(random.uniform(0.5, 1.0) * min(self.backoff[1], self.backoff[0] * 2 ** tries))
                    tries += 1

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
            self._resend_after = _RESEND_INTERVALS * interval
            log.info("node %s registered with instance %s", self.node_id, self.instance_id)
            if self._aborted:
                return True
            self._call = call  # disconnect() and abort() cut it from here on
            # A new stream: the leases held were resumed by register.holding (which acks them too);
            # every outcome not confirmed yet goes again.
            self._acks.clear()
            self._unavailable.clear()
            self._pong = None
            for result in self._results.values():
                result.sent_at = None
                if result.timer is not None:
                    result.timer.cancel()
                    result.timer = None
            self._unsent = set(self._results)
            self._drain_sent = False
            self._flush.set()
            reader, writer = asyncio.create_task(self._read(call)), asyncio.create_task(self._write(call))
            give_up = asyncio.create_task(self._give_up.wait())
            tasks = [reader, writer, asyncio.create_task(self._heartbeats(interval)), give_up]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and not reader.done():  # half-closed (drained): the scheduler ends the stream
                await asyncio.wait([reader, give_up], timeout=_CLOSE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
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
            if m.HasField("ping"):  # answered by the next message, written at once
                self._pong = m.ping.id
                self._flush.set()
            for a in m.assignments:
                self._start(a)
            for lease in m.cancels:
                self._take_back(lease.job_id, lease.lease_token, "cancelled by the scheduler")
            for status in m.refused:
                self._refused(status)
            for status in m.confirmed:
                self._confirmed(status)
            if m.drain and not self._stopping:  # DrainNode: as stop(), and run() returns once drained
                log.info("node %s: drained by an operator: finishing what it holds", self.node_id)
                self.stop()
            if m.error:
                if m.error.startswith("replaced"):
                    raise FailedPrecondition(f"node_id {self.node_id!r} was registered by another stream: {m.error}")
                # The scheduler could not use a message (its store call failed as a whole): the
                # outcomes awaiting an answer may have been in it, and go again (repeats are confirmed).
                log.warning("node %s: scheduler says: %s", self.node_id, m.error)
                for key, result in self._results.items():
                    if result.sent_at is not None:
                        self._again(key, result)

    async def _write(self, call: Any) -> None:
        """Writes what is ready; once the node is drained, half-closes the stream and returns."""
        while True:
            await self._flush.wait()
            if self._acks and sys.version_info < (3, 12):
                # Let the handlers just started take their first step: a result they have at once rides
                # with its ack in this message (one state change, one Redis call, instead of two).
                await asyncio.sleep(0)
            self._flush.clear()
            message = self._take()
            try:
                if message is not None:
                    await call.write(message)
                if self._drained():
                    await call.done_writing()
                    return
            except asyncio.InvalidStateError:
                return  # the stream already ended (cut, or closed): the session ends; outcomes go again

    def _take(self) -> pb.NodeMessage | None:
        """Everything ready, as one message (None when nothing is)."""
        acks, self._acks = self._acks, []
        unavailable, self._unavailable = self._unavailable, []
        now = asyncio.get_running_loop().time()
        completions = []
        for key in self._unsent:
            if (result := self._results.get(key)) is not None:
                result.sent_at = now
                completions.append(result.completion)
        self._unsent.clear()
        heartbeats: list[pb.JobLease] = []
        if self._beat:
            self._beat = False
            acking = {a.job_id for a in acks}
            heartbeats = [h.lease for job_id, h in self._held.items() if job_id not in acking]
        drain = self._stopping and not self._drain_sent
        pong, self._pong = self._pong, None
        if not (acks or completions or heartbeats or unavailable or drain or pong is not None):
            return None
        self._drain_sent = self._drain_sent or drain
        message = pb.NodeMessage(acks=acks, heartbeats=heartbeats, completions=completions, unavailable=unavailable,
                                 drain=drain)
        if pong is not None:
            message.pong.id = pong
        return message

    async def _heartbeats(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            if self._held and not self.silent:
                self._beat = True
                self._flush.set()
            # Outcomes left unanswered (their message got no answer): send them again.
            for key, result in self._results.items():
                if result.sent_at is not None and loop.time() - result.sent_at >= self._resend_after:
                    result.sent_at = None
                    self._unsent.add(key)
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
        old = self._held.get(a.job_id)
        if old is not None:
            if old.lease.lease_token == a.lease_token:
                return  # a repeat of the claim it runs
            # A new claim of the job (its old lease is gone): the new one replaces the old work.
            del self._held[a.job_id]
            if old.task is not None:
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
            key = (lease.job_id, lease.lease_token)
            self._results[key] = _Result(completion)
            self._unsent.add(key)
        self._flush.set()

    def _take_back(self, job_id: str, token: str, why: str) -> None:
        held = self._held.get(job_id)
        if held is not None and _matches(held.lease.lease_token, token):
            del self._held[job_id]
            if held.task is not None:
                held.task.cancel()
            log.info("node %s: job %s: %s", self.node_id, job_id, why)
            self._flush.set()  # the node may be drained now

    def _find(self, job_id: str, token: str) -> _Key | None:
        """The unconfirmed outcome an answer about (job_id, token) settles."""
        if (job_id, token) in self._results:
            return (job_id, token)
        return next((k for k in self._results if not token and k[0] == job_id), None)

    def _forget(self, key: _Key) -> None:
        result = self._results.pop(key)
        if result.timer is not None:
            result.timer.cancel()
        self._unsent.discard(key)
        self._flush.set()  # the node may be drained now

    def _refused_for_good(self, key: _Key, why: str) -> None:
        self._forget(key)
        self.refused_results += 1
        log.warning("node %s: result of job %s %s", self.node_id, key[0], why)

    def _again(self, key: _Key, result: _Result) -> None:
        """Send an outcome again after a backoff (growing with each "send again")."""
        result.sent_at = None
        if result.timer is not None:
            result.timer.cancel()
        delay = random.uniform(0.5, 1.0) * min(self.backoff[1], self.backoff[0] * 2 ** result.tries)
        result.tries += 1
        result.timer = asyncio.get_running_loop().call_later(delay, self._resend, key)

    def _resend(self, key: _Key) -> None:
        if (result := self._results.get(key)) is not None:
            result.timer = None
            self._unsent.add(key)
            self._flush.set()

    def _confirmed(self, status: pb.LeaseStatus) -> None:
        if (key := self._find(status.job_id, status.lease_token)) is not None:
            self._forget(key)

    def _refused(self, status: pb.LeaseStatus) -> None:
        again = status.error_code in _AGAIN
        why = f"refused: {status.reason or status.error_code}: {status.error_message}"
        key = self._find(status.job_id, status.lease_token)
        if key is not None:
            if again:
                log.info("node %s: result of job %s %s; sending it again", self.node_id, status.job_id, why)
                self._again(key, self._results[key])
            else:
                self._refused_for_good(key, why)
        elif again:  # an ack or heartbeat the store could not take: the lease still stands
            log.info("node %s: job %s: %s; it keeps running", self.node_id, status.job_id, why)
        else:
            self._take_back(status.job_id, status.lease_token, why)
