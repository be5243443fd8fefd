"""Liveness of node streams, for the whole instance: pings, the ping timeout, registry renewals.

A stream open at the TCP level proves nothing (a half-dead connection, a hung node), so the scheduler
asks: a stream that carried no message from its node for --ping-interval-ms is sent a ping, and one
that then stays silent for --ping-timeout-ms is ended UNAVAILABLE (NODE_UNRESPONSIVE); its jobs go as
those of any lost stream. Any message from the node counts as an answer.

The registry entries of the instance's streams are renewed together, pipelined (one round trip per
tick, per RENEW_CHUNK entries due), and only those of nodes that proved alive since their last
renewal: the scheduler no longer vouches for a node it has not heard from, so ListNodes (which shows
only entries renewed lately) drops a silent node even before its stream is ended.

Two tasks per instance, whatever the number of streams: one checks every stream each tick (no
Redis), one renews (Redis); a slow Redis never delays a ping or a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from lingua_sdk import pb

from . import logs, wire
from .dispatch import sleep_unless
from .registry import NodeEntry, Registry
from .settings import Settings
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)
# A fleet that loses its network, or Redis down: a line per interval, with a count, not one per node or tick.
_unanswered = ThrottledWarning(log, interval_s=10)
_renewals = ThrottledWarning(log, interval_s=10)


# How often the pings due are sent (at most; shorter with short ping settings). A ping and its pong
# cost the event loop ~0.2 ms: 5,000 silent streams pinged every 5 s took ~100 pings a 100 ms tick,
# and the loop was busy over 8 ms at a stretch ~6 times a second, every dispatch behind waiting (its
# p99); ~10 pings a 10 ms tick: none over 8 ms (docs/benchmarks.md, "Per-stream memory and p99").
CHECK_TICK_S = 0.01
RENEW_CHUNK = 20  # renewals per round trip: each holds the event loop ~1 ms at ~50 us a renewal


@dataclass(slots=True)
class Pulse:
    """What liveness knows of one stream (time.monotonic() seconds)."""

    last_seen: float = field(default_factory=time.monotonic)  # the node's last message
    # This stream is pinged after (1 - spread / 4) x ping_interval of silence, so streams that went quiet
    # together (a fleet registering at once, answering the same round of pings) drift apart instead
    # of being pinged in one burst that stalls the event loop every interval.
    spread: float = field(default_factory=random.random)
    renewed_at: float = field(default_factory=time.monotonic)  # its registry entry's last renewal
    ping_id: int = 0  # of the last ping sent
    ping_sent: float | None = None  # when the unanswered ping went out; None: none outstanding
    dead: bool = False  # the stream is ended (no answer)

    def beat(self) -> None:
        """The node said something: it is alive, and any ping is answered."""
        self.last_seen = time.monotonic()
        self.ping_sent = None


class Stream(Protocol):
    """What liveness needs of a node stream (server/node.py's Session)."""

    node_id: str
    token: str
    pulse: Pulse

    def send(self, message: pb.SchedulerMessage) -> None: ...
    def unresponsive(self) -> None: ...
    def entry(self) -> NodeEntry: ...
    def on_message(self, verb: str, args: list[str]) -> None: ...


class Liveness:
    def __init__(self, registry: Registry, settings: Settings, streams: Callable[[], Iterable[Stream]]) -> None:
        self.registry = registry
        self.settings = settings
        self.streams = streams  # the instance's current streams (one per node id)
        self._failing = 0  # renewals that failed in the last round

    async def check_forever(self, stopping: asyncio.Event) -> None:
        # Each stream is checked once a liveness tick, as before, but the streams are taken a slice
        # every CHECK_TICK_S: the loop is held well under 1 ms at a time with 5,000 streams, and the
        # pings due go out a few at a time, not thousands at once.
        tick = min(CHECK_TICK_S, self.settings.liveness_tick_ms() / 1000)
        slices = max(1, round(self.settings.liveness_tick_ms() / 1000 / tick))
        turn = 0
        while not await sleep_unless(stopping, tick):
            self.check(time.monotonic(), list(itertools.islice(self.streams(), turn % slices, None, slices)))
            turn += 1

    def check(self, now: float, streams: list[Stream] | None = None) -> None:
        """Ping the streams (all, or `streams`) silent for ping_interval; end those whose ping is
        unanswered after ping_timeout."""
        interval, timeout = self.settings.ping_interval_ms / 1000, self.settings.ping_timeout_ms / 1000
        sent_at: Timestamp | None = None
        for stream in list(self.streams()) if streams is None else streams:
            p = stream.pulse
            if p.dead:
                continue
            if p.ping_sent is not None:
                if now - p.ping_sent >= timeout:
                    _unanswered("node %s: no answer to ping %d within %d ms; ending its stream", stream.node_id,
                                p.ping_id, self.settings.ping_timeout_ms, extra=logs.fields(node_id=stream.node_id))
                    stream.unresponsive()
            elif now - p.last_seen >= interval * (1 - p.spread / 4):
                if sent_at is None:
                    sent_at = Timestamp()
                    sent_at.GetCurrentTime()
                p.ping_id += 1
                p.ping_sent = now
                stream.send(pb.SchedulerMessage(ping=pb.Ping(id=p.ping_id, sent_at=sent_at)))

    async def renew_forever(self, stopping: asyncio.Event) -> None:
        tick = self.settings.liveness_tick_ms() / 1000
        while not await sleep_unless(stopping, tick):
            await self.renew(time.monotonic())

    async def renew(self, now: float) -> None:
        """Renew, pipelined, the entries due (a renewal period, node_ttl / 3, since the last)
        of the nodes heard from since their last renewal. A renewal refused because a newer stream
        took the node id over ends this stream (`replaced`); one that failed is tried again next tick."""
        period = self.settings.node_ttl_ms / 3000
        due = [s for s in self.streams()
               if s.pulse.last_seen > s.pulse.renewed_at and now - s.pulse.renewed_at >= period
               and not s.pulse.dead]
        if not due:
            return
        before = [s.pulse.renewed_at for s in due]
        for s in due:
            s.pulse.renewed_at = now  # a message from now on counts for the next renewal
        replies: list[str | Exception | None] = []
        for start in range(0, len(due), RENEW_CHUNK):  # entries built per chunk: short holds of the loop
            chunk = due[start:start + RENEW_CHUNK]
            try:
                replies += await self.registry.renew_many([(s.entry(), s.token) for s in chunk])
            except Exception as err:
                replies += [err] * len(chunk)
        failed: list[Exception] = []
        gone: list[Stream] = []
        for stream, previous, reply in zip(due, before, replies, strict=True):
            if reply is None:
                stream.on_message(wire.REPLACED, [stream.token])
            elif isinstance(reply, Exception):
                stream.pulse.renewed_at = previous
                failed.append(reply)
            elif reply == "":
                gone.append(stream)  # the entry was gone: expired, or released by a stream that just closed
        if gone:
            current = set(map(id, self.streams()))
            for stream in gone:
                if id(stream) not in current:  # closed while the renewal was on its way: release it again
                    with contextlib.suppress(Exception):  # else it expires, and leaves ListNodes sooner
                        await self.registry.release(stream.node_id, stream.token)
        if failed:  # at most one line a tick, whatever the number of streams
            _renewals("renewing %d of %d registry entries failed (%r); retrying", len(failed), len(due), failed[0])
        elif self._failing:
            log.info("registry renewals succeed again")
        self._failing = len(failed)
