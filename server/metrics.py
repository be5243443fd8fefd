"""What this instance did, as Prometheus counters and histograms (docs/operations.md, "Metrics").

One `Metrics` per App, on the App's CollectorRegistry, made only when the HTTP port is on: with it
off the store, the scripts and the gRPC server hold None and count nothing. Counters and histograms
are per process, as Prometheus expects (a sum over instances is the fleet's figure: each transition
is made by one instance). Figures about the whole fleet (queue depth, jobs by state, nodes) are
gauges read from Redis elsewhere, not counted here.

The hot paths stay lean: every labelled child is bound once (per pool, per script, per outcome) and
kept, and children are server/tally.py's lock-free ones, so counting is a dict lookup and an add.
Durations come from the times Redis recorded (the scripts return them), never from two instances'
clocks, and cost no extra round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..fsm import HELD, MACHINE, TERMINAL, Event, JobState, dests_of, sources_of
from .tally import Counter, Histogram

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .node import NodeSessions

# Real-time work: most of it within a second, the tail in tens of seconds (a deadline).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_TICK_S = 0.25  # how often the event loop's lag is sampled
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

# How an attempt ended (lingua_job_attempts_total{outcome}): the events that take a job out of a held
# state (assigned, running), by name, except `complete` ("succeeded") and `fail`, which is "retried"
# when it queues the job again and "failed" when it ends it. tests/test_metrics.py checks that every
# such event of the machine has its outcome here.
ATTEMPT_OUTCOMES: dict[str, str] = {
    Event.COMPLETE: "succeeded",
    Event.FAIL: "failed",
    Event.LEASE_EXPIRED: "lease_expired",
    Event.NODE_LOST: "node_lost",
    Event.ACK_TIMEOUT: "ack_timeout",
    Event.UNAVAILABLE: "unavailable",
    Event.RELEASE: "released",
    Event.CANCEL: "cancelled",
    Event.EXPIRE: "expired",
}
RETRIED = "retried"  # `fail` with attempts left: the job is queued again
OUTCOMES: tuple[str, ...] = (*ATTEMPT_OUTCOMES.values(), RETRIED)
TERMINAL_STATES: tuple[str, ...] = tuple(str(s) for s in JobState if s in TERMINAL)


def attempt_outcome(event: str, dest: str) -> str:
    """The outcome label of an attempt ended by `event` leading to `dest`."""
    if event == Event.FAIL and dest == JobState.QUEUED:
        return RETRIED
    return ATTEMPT_OUTCOMES.get(event, event)


def attempt_ending_events() -> set[str]:
    """The machine's events that end an attempt: they fire from a held state and leave it."""
    return {str(e) for e in MACHINE.events
            if any(s in HELD and d not in HELD for s in sources_of(e) for d in dests_of(e))}


class PoolMetrics:
    """The children of one pool, bound once."""

    __slots__ = ("attempts", "dispatch", "finished", "name", "queue_wait", "run", "submitted")

    def __init__(self, m: Metrics, pool: str) -> None:
        self.name = pool
        self.submitted = m.submitted.labels(pool)
        self.finished = {state: m.finished.labels(pool, state) for state in TERMINAL_STATES}
        self.attempts = {outcome: m.attempts.labels(pool, outcome) for outcome in OUTCOMES}
        self.dispatch = m.dispatch_latency.labels(pool)
        self.queue_wait = m.queue_wait.labels(pool)
        self.run = m.run.labels(pool)


class Metrics:
    """This instance's job, Redis and gRPC metrics on `registry` (gRPC's: server/grpc_metrics.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.submitted = Counter("lingua_jobs_submitted_total", "Jobs created by Submit on this instance "
                                 "(a repeat of an idempotent submit creates nothing).", ["pool"], registry=registry)
        self.finished = Counter("lingua_jobs_finished_total", "Jobs this instance moved to a terminal state.",
                                ["pool", "state"], registry=registry)
        self.attempts = Counter("lingua_job_attempts_total", "Attempts (claims) ended by this instance, by how "
                                "they ended.", ["pool", "outcome"], registry=registry)
        self.dispatch_latency = Histogram(
            "lingua_dispatch_latency_seconds", "Submit -> first assignment, by Redis' clock (claims made here).",
            ["pool"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram(
            "lingua_queue_wait_seconds", "Entering queued -> assigned, every attempt (retry backoff included), "
            "by Redis' clock (claims made here).", ["pool"], buckets=LATENCY_BUCKETS, registry=registry)
        self.run = Histogram(
            "lingua_run_seconds", "Last assignment -> terminal state, by Redis' clock (jobs finished here).",
            ["pool"], buckets=LATENCY_BUCKETS, registry=registry)
        self.loop_lag = Histogram(
            "lingua_event_loop_lag_seconds", f"How late the event loop ran a timer due every {LAG_TICK_S} s: "
            "everything this instance does waits that long (CPU-bound instance, a long callback).", [],
            buckets=LAG_BUCKETS, registry=registry).labels()
        self.redis = RedisMetrics(registry)
        self._lag_task: asyncio.Task[None] | None = None
        self._by_tag: dict[str, PoolMetrics] = {}  # partition tag (`zh:en:{3}`) -> its pool's children
        self._by_pool: dict[str, PoolMetrics] = {}

    def pool(self, pool: str) -> PoolMetrics:
        found = self._by_pool.get(pool)
        if found is None:
            found = self._by_pool[pool] = PoolMetrics(self, pool)
        return found

    def of_job(self, job_id: str) -> PoolMetrics:
        """The children of a job's pool, from its id (`zh:en:{3}01J...`)."""
        tag = job_id[: job_id.find("}") + 1]
        found = self._by_tag.get(tag)
        if found is None:
            found = self._by_tag[tag] = self.pool(tag[: tag.find(":{")])
        return found

    def start(self) -> None:
        self._lag_task = asyncio.get_running_loop().create_task(self._sample_lag(), name="metrics-loop-lag")

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None

    async def _sample_lag(self) -> None:
        while True:
            due = time.monotonic() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            self.loop_lag.observe(max(0.0, time.monotonic() - due))

    # -- what the store tells -------------------------------------------------------------------

    def claimed(self, job_id: str, wait_ms: int, dispatch_ms: int) -> None:
        """A new claim: queued for `wait_ms`; `dispatch_ms` since submit for a job's first claim, else < 0."""
        p = self.of_job(job_id)
        p.queue_wait.observe(wait_ms / 1000)
        if dispatch_ms >= 0:
            p.dispatch.observe(dispatch_ms / 1000)

    def changed(self, job_id: str, event: str, source: str, dest: str, run_ms: int) -> None:
        """A transition this instance committed: `source` -> `dest` by `event`; `run_ms` since the last
        assignment for a job that ended while held, else < 0."""
        p = self.of_job(job_id)
        if source in _HELD and dest not in _HELD:
            outcome = attempt_outcome(event, dest)
            child = p.attempts.get(outcome)
            if child is None:  # an event added to the machine without an outcome here: counted by name
                child = p.attempts[outcome] = self.attempts.labels(p.name, outcome)
            child.inc()
        if dest in _TERMINAL:
            p.finished[dest].inc()
            if run_ms >= 0:
                p.run.observe(run_ms / 1000)


_HELD = frozenset(str(s) for s in HELD)
_TERMINAL = frozenset(TERMINAL_STATES)


class RedisMetrics:
    """Latency and errors of the Redis round trips of server/scripts.py, by script (`op`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram("lingua_redis_call_seconds", "Redis round trips of the scheduler's scripts "
                                 "(a pipelined batch is one), by script.", ["op"], buckets=REDIS_BUCKETS,
                                 registry=registry)
        self.errors = Counter("lingua_redis_errors_total", "Redis script calls that failed, by script and "
                              "error class (ConnectionError, TimeoutError, ResponseError, ...).", ["op", "error"],
                              registry=registry)
        self._seconds: dict[str, Any] = {}
        self._errors: dict[tuple[str, str], Any] = {}

    def observe(self, op: str, seconds: float) -> None:
        child = self._seconds.get(op)
        if child is None:
            child = self._seconds[op] = self.seconds.labels(op)
        child.observe(seconds)

    def error(self, op: str, err: BaseException) -> None:
        key = (op, type(err).__name__)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self.errors.labels(*key)
        child.inc()


class InstanceCollector(Collector):
    """Gauges of this instance's own state, read at scrape time (nothing is counted on the hot path):
    `figures` returns (name, help, value) triples."""

    def __init__(self, figures: Callable[[], list[tuple[str, str, float]]]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, text, value in self.figures():
            yield GaugeMetricFamily(name, text, value=value)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # names vary with nothing, but registering must not call figures() early


def instance_figures(nodes: NodeSessions, dispatcher: Dispatcher) -> Callable[[], list[tuple[str, str, float]]]:
    """This instance's gauges, computed at scrape time (O(streams), a scrape every few seconds)."""

    def figures() -> list[tuple[str, str, float]]:
        sessions = list(nodes.sessions.values())
        local = list(dispatcher.local.values())
        return [
            ("lingua_node_streams", "NodeSession streams open (registered) on this instance.", len(sessions)),
            ("lingua_node_stream_jobs", "Jobs the nodes of this instance's streams hold (claimed, not finished).",
             sum(len(s.in_flight) for s in sessions)),
            ("lingua_node_stream_unacked", "Assignments sent down this instance's streams and not acknowledged yet.",
             sum(len(s.unacked) for s in sessions)),
            ("lingua_node_streams_quarantined", "Streams of this instance that get no work for an assignment they "
             "let pass its ack timeout.", sum(1 for s in sessions if s.quarantined)),
            ("lingua_dispatch_known_jobs", "Queued jobs this instance's dispatcher heard of and has not claimed "
             "(its backlog; bounded per pool).", sum(len(p.hints) for p in local)),
            ("lingua_dispatch_waiting_consumers", "Local consumers (streams, waiting Assigns) in line for work.",
             sum(len(p.ready) for p in local)),
        ]

    return figures
