"""Simulated worker nodes built on the Python SDK's `Node` (lingua_sdk): what a simulated node does
with a job is its handler; crashes, cut streams, silence and drains are the Node's own controls
(`abort()`, `disconnect()`, `silent`, `stop()`).

Used by scripts/simulate.py, scripts/chaos.py and scripts/bench.py. (scripts/simnode.py is the raw
protocol node the tests use for malformed messages and stale leases, and bench's baseline row.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lingua_sdk import TLS, Assignment, FatalError, ModelUnavailable, Node, RetryableError, pb
from lingua_sdk.node import Handler


@dataclass
class Behaviour:
    """What a simulated node does with each job: "works" for processing_s() seconds, then reports a
    result, a retryable failure (SIM_FAIL), a fatal one (SIM_FATAL) or "model not available"."""

    processing_s: Callable[[], float] = lambda: 0.0
    fail_rate: float = 0.0  # retryable failure
    fatal_rate: float = 0.0  # non-retryable failure
    unavailable_rate: float = 0.0  # "model not available" (handed back at once)
    rng: random.Random = field(default_factory=random.Random)


Received = Callable[[Assignment, float], None]  # (assignment, time.perf_counter() when the handler got it)


def handler(node_id: str, behaviour: Behaviour, on_receive: Received | None = None) -> Handler:
    """The simulated work as an SDK handler. Results carry extra["node"] = node_id (chaos checks it)."""
    b = behaviour

    async def handle(a: Assignment) -> pb.JobResult:
        if on_receive is not None:
            on_receive(a, time.perf_counter())
        roll = b.rng.random()
        if roll < b.unavailable_rate:
            raise ModelUnavailable("simulated")
        seconds = b.processing_s()
        if seconds > 0:
            await asyncio.sleep(seconds)
        if roll < b.unavailable_rate + b.fail_rate:
            raise RetryableError("simulated", code="SIM_FAIL")
        if roll < b.unavailable_rate + b.fail_rate + b.fatal_rate:
            raise FatalError("simulated", code="SIM_FATAL")
        spec = a.proto.spec  # the message itself: no JobSpec built per job
        return pb.JobResult(text_asr=f"asr {spec.utterance_index}", text_translated=f"{spec.tgt_lang}:{a.job_id}",
                            extra={"node": node_id})

    return handle


class SimulatedNode:
    """An SDK Node with a simulated handler, run as a task: start(), then stop() (drain) or crash()."""

    def __init__(self, target: str, node_id: str, pairs: list[tuple[str, str]], concurrency: int = 4,
                 behaviour: Behaviour | None = None, on_receive: Received | None = None,
                 drain_timeout: float = 10.0, token: str | None = None, tls: TLS | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.node_id, self.pairs, self.concurrency = node_id, pairs, concurrency
        self.behaviour = behaviour or Behaviour()
        self.node = Node(target, node_id=node_id, pairs=pairs, concurrency=concurrency, token=token, tls=tls or False,
                         handler=handler(node_id, self.behaviour, on_receive), version="sim-sdk-1",
                         handle_signals=False, backoff=(0.05, 1.0), drain_timeout=drain_timeout, options=options)
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> SimulatedNode:
        """Run the node; return once it registered (or raise what stopped it)."""
        self.task = asyncio.create_task(self.node.run())
        deadline = time.monotonic() + timeout
        while self.node.instance_id is None:  # the SDK has no "registered" event; a script may poll
            if self.task.done():
                self.task.result()
                raise RuntimeError(f"{self.node_id}: run() ended before registering")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.node_id}: not registered in {timeout} s")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        """Drain: no new work, finish and have confirmed what runs."""
        if self.task is not None:
            self.node.stop()
            with contextlib.suppress(Exception):
                await self.task

    async def crash(self) -> None:
        """The process dies: the stream is cut, running work and unconfirmed results are lost."""
        if self.task is not None:
            self.node.abort()
            with contextlib.suppress(Exception):
                await self.task
