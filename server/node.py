"""NodeSession: a node's long-lived bidirectional stream.

The first message registers the node; then the server pushes assignments while the node has free
slots, and the node batches acks, heartbeats, results, "model not available" and drain in its
messages. Leases are extended only by messages on the stream. A stream silent for a while is
pinged, and ended when the ping goes unanswered (server/liveness.py). When the stream ends, the
node's leases shrink to a short grace; unless the node comes back (to any instance) and heartbeats
within it, its jobs are requeued (node_lost), or by any instance's sweeper.

Two live streams with one node id: the newest wins. The older stream is told `error: replaced` and
closed; its jobs stay with the node (same node id: the fence still matches), so a node that
reconnects after a network blip simply resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from lingua_sdk import pb

from ..fsm import Event
from . import auth, grpc_metrics, keys, logs, validate, wire
from .dispatch import Consumer, Dispatcher, finish, sleep_unless
from .errors import LEASE_GONE, InvalidArgument, NodeUnresponsive, SchedulerError, StreamOverflow
from .liveness import Liveness, Pulse
from .registry import NodeEntry, Registry
from .service import Undecodable, abort, assignment_pb, error_status, lease_status_pb, refused_pb, state_pb
from .settings import Settings
from .store import Changed, Claim, Lease, Store
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)
# A fleet of stalled nodes must not flood the log: one line per interval, with a count.
_quarantines = ThrottledWarning(log, interval_s=10)
_overflows = ThrottledWarning(log, interval_s=10)
_failures = ThrottledWarning(log, interval_s=10, level=logging.ERROR)


def _duration(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


def _confirmed(changed: Changed, token: str) -> pb.LeaseStatus:
    return pb.LeaseStatus(job_id=changed.job_id, ok=True, state=state_pb(changed.state),  # type: ignore[arg-type]
                          lease_token=token)


def lease_of(item: pb.JobLease) -> Lease:
    return Lease(item.job_id, item.lease_token, item.attempt)


def pools_of(reg: pb.Register, settings: Settings) -> list[str]:
    """The pools a registration serves: its pairs, plus every ASR language x TTS language (those of
    them that --pools allows: a node that can do more still serves what is served here)."""
    found = validate.pairs(reg.pairs, settings, "register.pairs")
    allowed = settings.allowed_pools()
    for i, lang in enumerate(reg.asr_langs):
        validate.lang(lang, f"register.asr_langs[{i}]")
    for i, lang in enumerate(reg.tts_langs):
        validate.lang(lang, f"register.tts_langs[{i}]")
    for src in reg.asr_langs:
        for tgt in reg.tts_langs:
            pool = keys.pool_of(src, tgt)
            if src != tgt and pool not in found and (allowed is None or pool in allowed):  # no en:en pool
                found.append(pool)
    if not found and reg.asr_langs and reg.tts_langs:
        raise InvalidArgument("register.tts_langs", "no pair with asr_langs has src != tgt" if allowed is None
                              else f"no pair with asr_langs is served here (served: {', '.join(sorted(allowed))})")
    if not found:
        raise InvalidArgument("register", "declare pairs, or asr_langs and tts_langs")
    if len(found) > 1024:
        raise InvalidArgument("register", "at most 1024 pools")
    return found


def check_register(reg: pb.Register, settings: Settings) -> list[str]:
    validate.node_id(reg.node_id, "register.node_id")
    auth.check_node(reg.node_id, "register.node_id")  # before anything is registered: a victim keeps its stream
    if not 1 <= reg.max_concurrency <= 1024:
        raise InvalidArgument("register.max_concurrency", "must be 1 to 1024")
    if len(reg.labels) > 64 or any(len(k) > 64 or len(v) > 256 for k, v in reg.labels.items()):
        raise InvalidArgument("register.labels", "at most 64, keys up to 64 and values up to 256 characters")
    if len(reg.version) > 64:
        raise InvalidArgument("register.version", "at most 64 characters")
    return pools_of(reg, settings)


def node_info_pb(e: NodeEntry) -> pb.NodeInfo:
    info = pb.NodeInfo(node_id=e.node_id, pools=e.pools, max_concurrency=e.max_concurrency, in_flight=e.in_flight,
                       instance_id=e.instance_id, labels=e.labels, version=e.version, draining=e.draining,
                       quarantined=e.quarantined)
    info.connected_at.FromMilliseconds(e.connected_ms)
    return info


class Session:
    """One open NodeSession stream.

    Slots, and nothing made that an idle stream does not need (the registration message is not kept,
    the `finished` event is made only when someone waits on it): an instance holds thousands of these
    (docs/benchmarks.md, "Per-stream memory and p99")."""

    __slots__ = ("_finished", "_more", "connected_ms", "consumer", "counts", "done", "draining", "in_flight",
                 "labels", "max_concurrency", "node_id", "outbox", "overflowed", "owner", "pools", "pulse",
                 "quarantined", "replaced", "timed_out", "token", "unacked", "unsent", "version", "writer")

    def __init__(self, owner: NodeSessions, reg: pb.Register, pools: list[str]) -> None:
        self.owner = owner
        # What the registration said, copied out: the message (and its parse arena) is let go.
        self.node_id: str = reg.node_id
        self.max_concurrency: int = reg.max_concurrency
        self.labels = dict(reg.labels)
        self.version: str = reg.version
        self.pools = pools
        self.token = uuid.uuid4().hex
        self.connected_ms = int(time.time() * 1000)
        self.in_flight: dict[str, Lease] = {}  # job id -> the lease this stream holds
        self.unsent: set[str] = set()  # job ids claimed for the node but not yet written to its stream
        self.draining = False
        self.replaced = False
        # Back-pressure. Job id -> when it was claimed for this stream (monotonic s), while the node has
        # not acknowledged it (an ack, a heartbeat, a completion or an unavailable report counts);
        # oldest first. At most ack_window of them (free_slots()).
        self.unacked: dict[str, float] = {}
        # Assignments taken back unacknowledged past the ack timeout (job id -> lease token), so that a
        # late ack of one still counts. At most the window: a quarantined stream gets nothing new.
        self.timed_out: dict[str, str] = {}
        self.quarantined = False
        # Messages for the node, in order; None closes the stream once what is before it is written.
        # Bounded by send(): the closing None must always fit. A list and a future made only while
        # the writer waits: an idle stream's buffer costs little (thousands of streams per instance).
        self.outbox: list[pb.SchedulerMessage | None] = []
        self._more: asyncio.Future[None] | None = None  # set when the outbox gets something
        self.overflowed = False
        self.writer: asyncio.Task[Any] | None = None  # the task writing the outbox: cancelled on overflow
        self.consumer = Consumer(self.node_id, pools, self.free_slots, self.assigned)
        self.done = False  # the stream's handler is done, leases released
        self._finished: asyncio.Event | None = None  # made by the first `finished` asked
        self.pulse = Pulse()  # the node's last message, pings, registry renewals (server/liveness.py)
        self.counts = grpc_metrics.stream()  # the stream's messages read and written (metrics on)

    @property
    def finished(self) -> asyncio.Event:
        """Set once the stream's handler is done and its leases released."""
        if self._finished is None:
            self._finished = asyncio.Event()
            if self.done:
                self._finished.set()
        return self._finished

    def _set_finished(self) -> None:
        self.done = True
        if self._finished is not None:
            self._finished.set()

    def free_slots(self) -> int:
        """How many more assignments the node may be sent now (the one capacity the dispatcher asks):
        none while it drains or is quarantined; else its free slots, with at most ack_window (never
        more than max_concurrency) unacknowledged at a time, so a node gets new work only while it
        acknowledges what it was sent."""
        if self.draining or self.is_quarantined():
            return 0
        window = min(self.owner.settings.ack_window, self.max_concurrency)
        return max(0, min(self.max_concurrency - len(self.in_flight), window - len(self.unacked)))

    def is_quarantined(self) -> bool:
        """A stream that let an assignment pass its ack timeout unacknowledged gets no new work until it
        acknowledges one or reconnects. Evaluated lazily, from the oldest unacknowledged assignment
        (no timer or task per stream); release() catches one taken back before this looked."""
        if not self.quarantined and self.unacked:
            job_id, sent = next(iter(self.unacked.items()))
            if time.monotonic() - sent > self.owner.settings.ack_timeout_ms / 1000:
                self._quarantine(job_id)
        return self.quarantined

    def _quarantine(self, job_id: str) -> None:
        self.quarantined = True
        _quarantines("node %s quarantined: job %s was not acknowledged within the ack timeout (%d ms); no new "
                     "work for this stream until the node acknowledges an assignment or reconnects",
                     self.node_id, job_id, self.owner.settings.ack_timeout_ms)

    def assigned(self, claims: list[Claim]) -> None:
        """From the dispatcher: claims made for this stream, handed to the node: tracked as in flight
        and unacknowledged, and queued as one message."""
        now = time.monotonic()
        for c in claims:
            self.in_flight[c.job_id] = Lease(c.job_id, c.token, c.attempt)
            self.unsent.add(c.job_id)
            self.unacked.pop(c.job_id, None)  # (re)inserted last: the dict stays oldest first
            self.unacked[c.job_id] = now
            self.timed_out.pop(c.job_id, None)
        message = pb.SchedulerMessage(assignments=[assignment_pb(c) for c in claims])
        if log.isEnabledFor(logging.DEBUG):  # the dispatch task's lines: the job's ids given, not in context
            for a in message.assignments:
                log.debug("assigned job %s (attempt %d) to node %s", a.job_id, a.attempt, self.node_id,
                          extra=logs.fields(a.job_id, self.node_id, a.spec.tenant_id, a.spec.trace_context, a.spec.trace_id))
        self.send(message)

    def acked(self, job_id: str, token: str) -> None:
        """The node answered about a lease it was sent (ack, heartbeat, completion, unavailable): the
        lease leaves the window, and a quarantine ends. A heartbeat of a job acknowledged before
        changes nothing, nor does a lease this stream never handed out."""
        before = self.free_slots()
        if self.holds(job_id, token):
            if self.unacked.pop(job_id, None) is None:
                return
        elif self.timed_out.get(job_id) == token:
            del self.timed_out[job_id]  # too late for the job (it went back), not for the node
        else:
            return
        if self.quarantined:
            self.quarantined = False
            self.timed_out.clear()
            log.info("node %s acknowledged an assignment: out of quarantine", self.node_id)
        if self.free_slots() > before:  # the window (or the quarantine) was what held it back
            self.owner.dispatcher.ready(self.consumer)

    def entry(self) -> NodeEntry:
        return NodeEntry(self.node_id, self.pools, self.max_concurrency, len(self.in_flight),
                         self.owner.settings.instance_id, dict(self.labels), self.version,
                         self.connected_ms, self.draining, self.is_quarantined())

    def holds(self, job_id: str, token: str) -> bool:
        lease = self.in_flight.get(job_id)
        return lease is not None and lease.token == token

    def release(self, job_id: str, token: str) -> None:
        """Free the slot of `job_id`, only if this stream holds it under `token` (a late message about
        an earlier claim of the job must not free the current one's slot)."""
        if self.holds(job_id, token):
            del self.in_flight[job_id]
            self.unsent.discard(job_id)
            sent = self.unacked.pop(job_id, None)
            # Taken back unacknowledged (ack_timeout). Half the timeout is enough to tell: this clock
            # started when the claim's reply came back, a little after Redis's, and a healthy node acks
            # in milliseconds (if it was a client's cancel instead, its late ack ends the quarantine).
            if sent is not None and (self.quarantined or
                                     time.monotonic() - sent > self.owner.settings.ack_timeout_ms / 2000):
                self.timed_out[job_id] = token
                if not self.quarantined:
                    self._quarantine(job_id)
            self.owner.dispatcher.ready(self.consumer)  # a slot is free: back in the turn for work
            self._maybe_done()

    def send(self, message: pb.SchedulerMessage) -> None:
        """Queue a message for the node. A node that does not read lets the outbox fill (its writes
        wait on flow control): at stream_outbox_max the stream is ended with RESOURCE_EXHAUSTED
        instead of the outbox growing, and its leases go as for any closed stream."""
        if self.overflowed:
            return
        if len(self.outbox) >= self.owner.settings.stream_outbox_max:
            self.overflowed = True
            if self.writer is not None:
                self.writer.cancel()  # stuck on flow control: the node does not read
            return
        self._put(message)

    def close(self) -> None:
        self._put(None)

    def unresponsive(self) -> None:
        """From liveness: a ping went unanswered. The stream ends (NODE_UNRESPONSIVE), even with its
        writer stuck on flow control."""
        self.pulse.dead = True
        if self.writer is not None:
            self.writer.cancel()

    def _put(self, message: pb.SchedulerMessage | None) -> None:
        self.outbox.append(message)
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def next_message(self) -> pb.SchedulerMessage | None:
        """The oldest message of the outbox, waiting for one."""
        while not self.outbox:
            self._more = asyncio.get_running_loop().create_future()
            try:
                await self._more
            finally:
                self._more = None
        return self.outbox.pop(0)

    def _maybe_done(self) -> None:
        if self.draining and not self.in_flight:
            self.close()

    def on_message(self, verb: str, args: list[str]) -> None:
        """From the dispatcher's subscription: cancels and take-overs for this node."""
        if verb == wire.CANCEL and len(args) == 2:
            job_id, token = args
            lease = self.in_flight.get(job_id)
            if lease is not None and lease.token == token:
                self.send(pb.SchedulerMessage(cancels=[
                    pb.JobLease(job_id=job_id, attempt=lease.attempt, lease_token=token)]))
                self.release(job_id, token)
        elif verb == wire.DRAIN:
            self.owner._spawn(self.owner.drain_quietly(self))
        elif verb == wire.REPLACED and args and args[0] == self.token:
            self.replaced = True
            self.send(pb.SchedulerMessage(error="replaced: a newer stream registered this node_id"))
            self.close()


class NodeSessions:
    """Every NodeSession stream this instance holds."""

    def __init__(self, store: Store, dispatcher: Dispatcher, settings: Settings) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings
        self.registry = Registry(store.redis, store.scripts, settings.node_ttl_ms)
        self.sessions: dict[str, Session] = {}  # node id -> its current stream
        self.liveness = Liveness(self.registry, settings, self.sessions.values)
        self._open: set[Session] = set()  # every stream whose handler has not finished
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        dispatcher.node_listeners = self
        self._drain_asked: set[str] = set()  # session tokens whose registration found a drain request
        self.registry.on_drain_requested = self._drain_requested

    def _drain_requested(self, node_id: str, token: str) -> None:
        """A registration or renewal found DrainNode's request in the entry (its message was missed, or
        the node reconnected here since): drain the stream."""
        session = self.sessions.get(node_id)
        if session is not None and session.token == token:
            self._spawn(self.drain_quietly(session))
        else:
            self._drain_asked.add(token)  # its own registration, in serve(): drained there

    # The dispatcher looks node ids up here to deliver node messages.
    def get(self, node_id: str) -> Any:
        session = self.sessions.get(node_id)
        return session.on_message if session else None

    async def start(self) -> None:
        self._spawn(self.liveness.check_forever(self._stopping))
        self._spawn(self.liveness.renew_forever(self._stopping))

    async def stop(self) -> None:
        self._stopping.set()
        await finish(self._background)

    async def drain_all(self, grace: float) -> None:
        """On shutdown: no new work for any node here; streams close as their work finishes, and
        those still open after `grace` are closed (their leases shrink, as for any closed stream)."""
        sessions = list(self._open)
        for session in sessions:
            session.draining = True
            session._maybe_done()
        waits = [asyncio.create_task(s.finished.wait()) for s in sessions]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for session in sessions:
                session.close()
            if pending:
                await asyncio.wait(pending, timeout=5)
            for task in pending:
                task.cancel()

    async def node_entries(self) -> list[NodeEntry]:
        """The registry's entries of the nodes ListNodes shows (live ones), with their last renewal."""
        return await self.registry.entries(self.settings.node_listed_ms())

    async def list_nodes(self) -> list[pb.NodeInfo]:
        return [node_info_pb(e) for e in await self.node_entries()]

    async def node_info(self, node_id: str) -> pb.NodeInfo | None:
        """One node as its registry entry shows it (None when it has none)."""
        entry = await self.registry.entry(node_id)
        return node_info_pb(entry) if entry is not None else None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- one stream -----------------------------------------------------------------------------

    async def serve(self, requests: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        it = requests.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), timeout=30)
            grpc_metrics.stream().received.inc()
        except (StopAsyncIteration, TimeoutError):
            await abort(context, InvalidArgument("register", "the first message must register"), "NodeSession")
        if not first.HasField("register"):
            await abort(context, InvalidArgument("register", "the first message must register"), "NodeSession")
        try:
            pools = check_register(first.register, self.settings)
        except SchedulerError as err:
            await abort(context, err, "NodeSession")
        session = Session(self, first.register, pools)
        logs.NODE_ID.set(session.node_id)  # this call's task and the tasks it starts (its reader)
        self._open.add(session)
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._register(session, first, context)
            del first  # not kept for the stream's life (nor its parse arena): Session copied what it needs
            self.dispatcher.add(session.consumer)
            reader = asyncio.create_task(self._read(session, it))
            reader.add_done_callback(lambda _t: session.close())
            tasks.append(reader)
            await self._write(session, context)  # in this task: one task per stream besides gRPC's own
        finally:
            # The cleanup runs as its own task: a client that drops the stream cancels this handler,
            # and a cleanup cut halfway would leave the leases long (and a Redis connection open).
            await asyncio.shield(self._spawn(self._end(session, tasks)))

    async def _end(self, session: Session, tasks: list[asyncio.Task[Any]]) -> None:
        try:
            self.dispatcher.remove(session.consumer)
            for task in tasks:
                task.cancel()
            await finish(tasks)
            await self.dispatcher.release_pending(session.consumer)
            if self.sessions.get(session.node_id) is session:
                del self.sessions[session.node_id]
            await self._closed(session)
        finally:
            session._set_finished()
            self._open.discard(session)
            self._drain_asked.discard(session.token)  # a registration that never got as far as using it

    async def _register(self, session: Session, first: pb.NodeMessage,
                        context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        """Register the stream's node (the newest stream of a node id wins), answer RegisterAck, and
        take back the leases it says it holds."""
        try:
            previous = await self.registry.register(session.entry(), session.token)
        except Exception as err:
            await abort(context, err, "NodeSession")
        if previous and previous != session.token:
            await self.store.redis.publish(keys.node_channel(session.node_id), wire.replaced(previous))
        old = self.sessions.get(session.node_id)
        if old is not None:
            old.on_message(wire.REPLACED, [old.token])
        self.sessions[session.node_id] = session
        s = self.settings
        session.counts.sent.inc()
        await context.write(pb.SchedulerMessage(registered=pb.RegisterAck(
            instance_id=s.instance_id, heartbeat_interval=_duration(s.heartbeat_interval_ms),
            lease_duration=_duration(s.lease_ms), ack_timeout=_duration(s.ack_timeout_ms), pools=session.pools,
            ping_interval=_duration(s.ping_interval_ms), ping_timeout=_duration(s.ping_timeout_ms),
        )))
        log.info("node %s registered: pools %s, concurrency %d%s", session.node_id, ",".join(session.pools),
                 session.max_concurrency, ", draining" if first.drain else "",
                 extra=logs.fields(node_id=session.node_id))
        asked = session.token in self._drain_asked
        self._drain_asked.discard(session.token)
        if first.drain:  # a draining node that reconnects: no new work, from the first message on
            session.draining = True
        elif asked:  # DrainNode asked for it before it reconnected
            session.draining = True
            session.send(pb.SchedulerMessage(drain=True))
        if first.register.holding:
            await self._resume(session, first.register.holding)
        session._maybe_done()  # a draining node that came back holding nothing (left) is done at once

    async def _write(self, session: Session, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        """Write the outbox until its closing marker. A node that does not read leaves this task stuck
        on flow control until send() finds the outbox full and cancels it: then RESOURCE_EXHAUSTED."""
        task = asyncio.current_task()
        session.writer = task  # only while writing: a cancel must never cut a Redis call halfway
        sent = session.counts.sent
        try:
            while not (session.overflowed or session.pulse.dead) and (message := await session.next_message()) is not None:
                # Taken from the outbox: maybe sent from here on, even if the write is cut (the node
                # may have it and come back holding it), so only what never left the outbox is unsent.
                for a in message.assignments:
                    session.unsent.discard(a.job_id)
                sent.inc()
                await context.write(message)
                del message  # not held while the outbox is empty (thousands of idle streams)
        except asyncio.CancelledError:
            if not (session.overflowed or session.pulse.dead) or task is None:
                raise
            task.uncancel()  # send()'s or liveness's cancel, not the RPC's
        finally:
            session.writer = None
        if session.pulse.dead:  # the node does not answer pings: maybe not reading either
            await abort(context, NodeUnresponsive(
                f"node {session.node_id}: no answer to ping within {self.settings.ping_timeout_ms} ms"), "NodeSession")
        if session.overflowed:
            _overflows("node %s: closing its stream, over %d messages unread", session.node_id,
                       self.settings.stream_outbox_max)
            await abort(context, StreamOverflow(
                f"node {session.node_id} left more than {self.settings.stream_outbox_max} messages unread"), "NodeSession")

    async def _resume(self, session: Session, holding: Any) -> None:
        leases = []
        for i, item in enumerate(holding):
            try:
                validate.lease(item, self.settings, f"register.holding[{i}]")
            except SchedulerError as err:
                session.send(pb.SchedulerMessage(refused=[refused_pb(item.job_id, item.lease_token, err)]))
                continue
            leases.append(lease_of(item))
        for lease, t in zip(leases, await self.store.touch(session.node_id, leases), strict=True):
            if t.code >= 0:
                session.in_flight[t.job_id] = lease
            else:
                session.send(pb.SchedulerMessage(refused=[lease_status_pb(t, lease.token)]))

    async def _read(self, session: Session, it: Any) -> None:
        received = session.counts.received
        async for message in it:
            received.inc()
            session.pulse.beat()  # any message, even one not understood, proves the node alive
            try:
                if isinstance(message, Undecodable):  # junk bytes (logged, throttled, on registration)
                    raise message.refusal()
                await self._handle(session, message)
            except SchedulerError as err:
                session.send(pb.SchedulerMessage(error=f"{err.status.name}: {err}"))
            except asyncio.CancelledError:
                raise
            except Exception as err:
                code, text = error_status(err)
                if code == grpc.StatusCode.INTERNAL:
                    _failures("node %s: message failed", session.node_id, exc_info=True)
                session.send(pb.SchedulerMessage(error=f"{code.name}: {text}"))
            del message  # not held while waiting for the next one (thousands of idle streams)

    async def _handle(self, session: Session, m: pb.NodeMessage) -> None:
        if not (m.acks or m.heartbeats or m.completions or m.unavailable or m.drain or m.HasField("register")):
            return  # a pong alone (every silent stream's, every ping interval): its arrival was the answer
        if m.HasField("register"):
            raise InvalidArgument("register", "only the first message may register")
        refused: list[pb.LeaseStatus] = []
        confirmed: list[pb.LeaseStatus] = []
        freed: list[Lease] = []  # slots to free once the answer is queued (a drain may close the stream)
        cancels: list[pb.JobLease] = []

        def valid(items: Any, field: str, check: Any = validate.lease) -> list[Any]:
            """The entries that pass `check`; each other one is refused, naming its field."""
            ok = []
            for i, item in enumerate(items):
                try:
                    check(item, self.settings, f"{field}[{i}]")
                    ok.append(item)
                except SchedulerError as err:
                    lease = getattr(item, "lease", item)
                    refused.append(refused_pb(lease.job_id, lease.lease_token, err))
            return ok

        try:
            completions = valid(m.completions, "completions", validate.completion)
            touched = valid(m.acks, "acks") + valid(m.heartbeats, "heartbeats")
            unavailable = valid(m.unavailable, "unavailable")
            for item in (*touched, *(c.lease for c in completions), *unavailable):
                session.acked(item.job_id, item.lease_token)  # back-pressure: the node answers what it got
            # An ack that rides with its job's result needs no state change of its own: complete is
            # allowed from assigned, so the result alone moves the job (one Lua call saved).
            finishing = {(c.lease.job_id, c.lease.lease_token) for c in completions}
            touches = [lease_of(t) for t in touched if (t.job_id, t.lease_token) not in finishing]
            if touches:
                for lease, t in zip(touches, await self.store.touch(session.node_id, touches), strict=True):
                    if t.code < 0:
                        refused.append(lease_status_pb(t, lease.token))
                        if session.holds(lease.job_id, lease.token):  # taken away (cancelled, expired): say stop
                            cancels.append(pb.JobLease(job_id=lease.job_id, attempt=lease.attempt, lease_token=lease.token))
                            freed.append(lease)
            results = [c for c in completions if c.WhichOneof("outcome") == "result"]
            if results:
                done = await self.store.complete_many(session.node_id, [(lease_of(c.lease), c.result) for c in results])
                for c, outcome in zip(results, done, strict=True):
                    self._settled(lease_of(c.lease), outcome, refused, confirmed, freed)
            for c in completions:
                if c.WhichOneof("outcome") == "error":
                    await self._fail(session, lease_of(c.lease), Event.FAIL, c.error, refused, confirmed, freed)
            for item in unavailable:
                error = pb.JobError(code="LINGUA_MODEL_UNAVAILABLE", retryable=True,
                                    message=f"node {session.node_id} has no model for this job")
                await self._fail(session, lease_of(item), Event.UNAVAILABLE, error, refused, confirmed, freed)
        finally:  # what was settled is answered even when a later part of the message failed (Redis down)
            if refused or cancels or confirmed:
                session.send(pb.SchedulerMessage(refused=refused, cancels=cancels, confirmed=confirmed))
            for lease in freed:
                session.release(lease.job_id, lease.token)
        if m.drain:
            await self.drain(session)

    async def drain_quietly(self, session: Session) -> None:
        """DrainNode's drain: the stream drains whatever happens; a registry that cannot be reached now
        shows it at the next renewal."""
        try:
            await self.drain(session, tell=True)
        except Exception as err:
            log.warning("node %s: draining, but its registry entry could not be updated (%r)", session.node_id, err)

    async def drain(self, session: Session, *, tell: bool = False) -> None:
        """The node's own drain, or DrainNode's (from any instance, over the node's channel; `tell`: the
        node is told, SchedulerMessage.drain): no new work; the stream closes once what it holds is
        finished. The registry shows it at once."""
        if session.draining:
            return
        session.draining = True
        log.info("node %s draining (%s): no new work, %d job(s) to finish", session.node_id,
                 "DrainNode" if tell else "asked by the node", len(session.in_flight),
                 extra=logs.fields(node_id=session.node_id))
        if tell:
            session.send(pb.SchedulerMessage(drain=True))
        await self.registry.register(session.entry(), session.token, renew=True)
        session._maybe_done()

    @staticmethod
    def _settled(lease: Lease, outcome: Changed | BaseException, refused: list[pb.LeaseStatus],
                 confirmed: list[pb.LeaseStatus], freed: list[Lease]) -> None:
        """A completion's outcome: confirmed when stored; refused otherwise. The slot is freed only
        when the lease is settled or gone, not when Redis could not be reached (the node resends)."""
        if isinstance(outcome, Changed):
            log.debug("job %s: %s", lease.job_id, outcome.state, extra=logs.fields(lease.job_id, tenant_id=outcome.tenant))
            confirmed.append(_confirmed(outcome, lease.token))
            freed.append(lease)
            return
        refused.append(refused_pb(lease.job_id, lease.token, outcome))
        if isinstance(outcome, LEASE_GONE):
            freed.append(lease)

    async def _fail(self, session: Session, lease: Lease, event: Event, error: pb.JobError,
                    refused: list[pb.LeaseStatus], confirmed: list[pb.LeaseStatus], freed: list[Lease]) -> None:
        outcome: Changed | BaseException
        try:
            outcome = await self.store.transition(lease.job_id, event, node=session.node_id, token=lease.token,
                                                  error=error, avoid=True)
        except SchedulerError as err:
            outcome = err
        self._settled(lease, outcome, refused, confirmed, freed)

    async def _closed(self, session: Session) -> None:
        """After a stream ends: shrink its leases to the grace; unless the node is back (on any
        instance) and heartbeats within it, its jobs are requeued: by this instance after the grace,
        or by any instance's sweeper if this one is gone by then.

        Releasing the registry entry and shrinking the leases are two calls (different slots). A node
        already back on another stream may have its leases shrunk too: it keeps them by heartbeating
        within the grace, which settings enforce (stream_grace_ms >= 2 x heartbeat_interval_ms).

        Assignments claimed for the node but never written to its stream go straight back to the
        queue with their attempts given back (`release`): no node ever saw them."""
        unsent = [session.in_flight.pop(job_id) for job_id in list(session.unsent) if job_id in session.in_flight]
        session.unsent.clear()
        if unsent:
            with contextlib.suppress(Exception):  # Redis down: their ack timeout takes them back
                await self.store.release(session.node_id, unsent)
        released = False
        with contextlib.suppress(Exception):
            released = await self.registry.release(session.node_id, session.token)
        if session.replaced or not released or not session.in_flight:
            log.info("node %s: stream closed%s", session.node_id, " (replaced by a newer stream)" if session.replaced
                     else "", extra=logs.fields(node_id=session.node_id))
            return  # the node is back on a newer stream (or held nothing): its leases are its own
        leases = list(session.in_flight.values())
        grace = self.settings.stream_grace_ms
        shortened = await self.store.touch(session.node_id, leases, mode="shorten", lease_ms=grace)
        held = [lease for lease, t in zip(leases, shortened, strict=True) if t.code >= 0]
        log.info("node %s: stream closed holding %d job(s): requeued in %d ms unless it is back", session.node_id,
                 len(held), grace, extra=logs.fields(node_id=session.node_id))
        if held:
            self._spawn(self._requeue_after_grace(session.node_id, held, grace))

    async def _requeue_after_grace(self, node_id: str, held: list[Lease], grace_ms: int) -> None:
        if await sleep_unless(self._stopping, grace_ms / 1000):
            return  # shutting down: the sweepers of the other instances take these leases back
        error = pb.JobError(code="LINGUA_NODE_LOST", retryable=True, message=f"the stream of node {node_id} closed")
        lost = 0
        for lease in held:
            with contextlib.suppress(SchedulerError):
                await self.store.transition(lease.job_id, Event.NODE_LOST, node=node_id, token=lease.token,
                                            error=error, guard="lease", avoid=True)
                lost += 1
        if lost:
            log.warning("node %s did not come back within %d ms: %d job(s) taken back (node_lost)", node_id, grace_ms,
                        lost, extra=logs.fields(node_id=node_id))
