"""A simulated worker node on a real NodeSession stream, built on the generated stubs.

A node written on the raw protocol on purpose: the tests use it where they test the protocol itself
(malformed messages, stale leases, holding), and scripts/bench runs it as the baseline the SDK's Node
is measured against. The simulator, the chaos run and the benchmark's rows use the SDK's Node
(scripts/simulated.py). It acks each
assignment at once, "works" for a drawn processing time, heartbeats while working, and reports a
result, a failure or "model not available"; it can crash (drop its stream, report nothing), go
silent (keep the stream, stop heartbeating), hang (keep the stream, answer no ping) or drain. It answers
the scheduler's pings at once (unless hung). Messages are batched: everything that is
ready when the writer runs goes out in one NodeMessage.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from lingua_sdk import pb, pb_grpc


@dataclass
class Behaviour:
    """What a simulated node does with each job."""

    processing_s: Callable[[], float] = lambda: 0.0
    fail_rate: float = 0.0  # retryable failure
    fatal_rate: float = 0.0  # non-retryable failure
    unavailable_rate: float = 0.0  # "model not available"
    heartbeat: bool = True  # False: a silent node (stream open, no heartbeats)
    answer_pings: bool = True  # False: a hung node (stream open, pings unanswered: the scheduler ends it)
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class Received:
    job_id: str
    attempt: int
    at: float  # time.perf_counter() when the assignment arrived
    spec: pb.JobSpec
    lease_token: str = ""

    @property
    def lease(self) -> pb.JobLease:
        return pb.JobLease(job_id=self.job_id, attempt=self.attempt, lease_token=self.lease_token)


class SimNode:
    def __init__(self, channel: grpc.aio.Channel, node_id: str, pairs: list[tuple[str, str]],
                 max_concurrency: int = 4, behaviour: Behaviour | None = None,
                 on_receive: Callable[[Received], None] | None = None) -> None:
        self.stub = pb_grpc.SchedulerStub(channel)
        self.node_id = node_id
        self.pairs = pairs
        self.max_concurrency = max_concurrency
        self.behaviour = behaviour or Behaviour()
        self.on_receive = on_receive
        self.received: list[Received] = []
        self.completed: list[str] = []
        self.cancels: list[pb.JobLease] = []
        self.refused: list[pb.LeaseStatus] = []
        self.errors: list[str] = []
        self.pings = 0  # pings received from the scheduler
        self.drained = False  # the scheduler said an operator drained this node (SchedulerMessage.drain)
        self.registered: pb.RegisterAck | None = None
        self.working: dict[str, tuple[asyncio.Task[None], pb.JobLease]] = {}  # job id -> (work, lease)
        self.changed = asyncio.Event()  # set on every message from the scheduler
        self._out: asyncio.Queue[pb.NodeMessage | None] = asyncio.Queue()
        self._call: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.closed = asyncio.Event()
        self.status: grpc.StatusCode | None = None  # how the stream ended, and the status message
        self.details = ""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, holding: list[pb.JobLease] | None = None) -> SimNode:
        self._call = self.stub.NodeSession(self._requests())
        self.send(pb.NodeMessage(register=pb.Register(
            node_id=self.node_id, max_concurrency=self.max_concurrency, version="sim-1",
            pairs=[pb.LanguagePair(src_lang=s, tgt_lang=t) for s, t in self.pairs], holding=holding or [],
        )))
        first = await self._call.read()
        if first is grpc.aio.EOF or not first.HasField("registered"):
            raise RuntimeError(f"{self.node_id}: not registered: {first}")
        self.registered = first.registered
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._heartbeats())]
        return self

    async def _requests(self) -> Any:
        while (message := await self._out.get()) is not None:
            # Batch whatever else is ready into the same message.
            while not self._out.empty():
                more = self._out.get_nowait()
                if more is None:
                    yield message
                    return
                message.MergeFrom(more)
            yield message

    def send(self, message: pb.NodeMessage) -> None:
        self._out.put_nowait(message)

    async def stop(self) -> None:
        """Close the stream politely (half-close), stop working."""
        self._out.put_nowait(None)
        await self._shutdown()

    async def crash(self) -> None:
        """Drop the stream abruptly and lose all work, as a killed process would."""
        self._out.put_nowait(None)  # ends the request generator, so no task is left waiting on it
        if self._call is not None:
            self._call.cancel()
        await self._shutdown()

    async def drain(self) -> None:
        self.send(pb.NodeMessage(drain=True))

    async def _shutdown(self) -> None:
        tasks = [t for t, _ in self.working.values()] + self._tasks
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.working.clear()
        self.closed.set()

    # -- the stream -----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while (m := await self._call.read()) is not grpc.aio.EOF:
                if m.HasField("ping"):
                    self.pings += 1
                    if self.behaviour.answer_pings:
                        self.send(pb.NodeMessage(pong=pb.Pong(id=m.ping.id)))
                for a in m.assignments:
                    got = Received(a.job_id, a.attempt, time.perf_counter(), a.spec, a.lease_token)
                    self.received.append(got)
                    if self.on_receive:
                        self.on_receive(got)
                    self._start_work(a)
                for c in m.cancels:
                    self.cancels.append(c)
                    work = self.working.get(c.job_id)
                    if work and work[1].lease_token == c.lease_token:
                        del self.working[c.job_id]
                        work[0].cancel()
                self.refused.extend(m.refused)
                if m.drain:
                    self.drained = True
                if m.error:
                    self.errors.append(m.error)
                self.changed.set()
        except grpc.aio.AioRpcError as err:
            self.status, self.details = err.code(), err.details() or ""
        except asyncio.CancelledError:
            raise
        else:
            self.status = grpc.StatusCode.OK
        finally:
            self.closed.set()
            self.changed.set()

    def _start_work(self, a: pb.Assignment) -> None:
        b = self.behaviour
        lease = pb.JobLease(job_id=a.job_id, attempt=a.attempt, lease_token=a.lease_token)
        roll = b.rng.random()
        if roll < b.unavailable_rate:
            self.send(pb.NodeMessage(unavailable=[lease]))
            return
        seconds = b.processing_s()
        if seconds <= 0 and roll >= b.unavailable_rate + b.fail_rate + b.fatal_rate:
            # Quick work: the ack rides with the result, in one message.
            self.completed.append(a.job_id)
            self.send(pb.NodeMessage(acks=[lease], completions=[self._result(a, lease)]))
            return
        self.send(pb.NodeMessage(acks=[lease]))
        self.working[a.job_id] = (asyncio.create_task(self._work(a, lease, roll, seconds)), lease)

    def _result(self, a: pb.Assignment, lease: pb.JobLease) -> pb.Completion:
        return pb.Completion(lease=lease, result=pb.JobResult(
            text_asr=f"asr {a.spec.utterance_index}", text_translated=f"{a.spec.tgt_lang}:{a.job_id}",
            extra={"node": self.node_id}))

    async def _work(self, a: pb.Assignment, lease: pb.JobLease, roll: float, seconds: float) -> None:
        b = self.behaviour
        if seconds > 0:
            await asyncio.sleep(seconds)
        if roll < b.unavailable_rate + b.fail_rate:
            outcome = pb.Completion(lease=lease, error=pb.JobError(code="SIM_FAIL", message="simulated", retryable=True))
        elif roll < b.unavailable_rate + b.fail_rate + b.fatal_rate:
            outcome = pb.Completion(lease=lease, error=pb.JobError(code="SIM_FATAL", message="simulated"))
        else:
            outcome = self._result(a, lease)
        self.working.pop(a.job_id, None)
        self.completed.append(a.job_id)
        self.send(pb.NodeMessage(completions=[outcome]))

    async def _heartbeats(self) -> None:
        assert self.registered is not None
        interval = self.registered.heartbeat_interval.ToMilliseconds() / 1000
        while True:
            await asyncio.sleep(interval)
            if self.behaviour.heartbeat and self.working:
                self.send(pb.NodeMessage(heartbeats=[lease for _, lease in self.working.values()]))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until predicate() holds, re-checking on every message from the scheduler."""
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)


class _Bearer:
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details._replace(metadata=tuple(details.metadata or ()) + self.metadata), request)


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    intercept_unary_unary = _Bearer._call


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    intercept_unary_stream = _Bearer._call


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    intercept_stream_stream = _Bearer._call


def bearer(token: str, streams: bool = True) -> list[Any]:
    """Client interceptors that send `authorization: Bearer <token>` with every call; one per call
    kind, since a channel files each interceptor under one kind only. `streams=False` leaves
    stream-stream calls (NodeSession) alone: an intercepted one leaves a request-feeding task behind
    when the server ends the call, so tests pass its metadata themselves."""
    return [_UnaryUnary(token), _UnaryStream(token), *([_StreamStream(token)] if streams else [])]


def open_channel(target: str, token: str | None = None) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls carry `authorization: Bearer <token>` (when given;
    --token / LINGUA_TOKEN in the scripts)."""
    return grpc.aio.insecure_channel(target, interceptors=bearer(token) if token else None)
