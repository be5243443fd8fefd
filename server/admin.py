"""Administration (admin role): the operations behind ListJobs, GetStats, RetryJob, CancelSession,
PausePool/ResumePool and DrainNode. Plain async methods taking and returning the contract's messages,
so that the gRPC servicer (server/service.py) and the dashboard's HTTP API (server/dashboard.py) share
them; errors are SchedulerError subclasses, as everywhere. Every change goes through the state machine
and the compare-and-set scripts (server/operations.py); reads come from indexes and counts the scripts
keep (server/listing.py, server/stats.py)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import text_format
from lingua_sdk import pb

from . import auth, validate
from .errors import FieldError, InvalidArgument, InvalidTransition, JobNotFound, NodeNotFound
from .listing import Filter, Listing, decode_cursor, encode_cursor
from .operations import Operations, Pause
from .settings import Settings
from .stats import STATES, Stats
from .store import Store

PAGE_DEFAULT, PAGE_MAX = 50, 500
REASON_MAX = 1024

# One INFO line per change an operator made (gRPC or dashboard): what, with which arguments, by whom.
audit = logging.getLogger("lingua_scheduler.audit")
R = TypeVar("R")
UNCHANGED = (FieldError, JobNotFound, NodeNotFound, InvalidTransition)  # refusals that change nothing


def audited(method: Callable[[Any, Any], Awaitable[R]]) -> Callable[[Any, Any], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any) -> R:
        what = f"{type(request).__name__.removesuffix('Request')}({text_format.MessageToString(request, as_one_line=True)})"
        try:
            reply = await method(self, request)
        except UNCHANGED:
            raise  # refused before any change: nothing to audit
        except Exception as err:  # e.g. Redis lost midway through a CancelSession's cancels
            audit.warning("admin %s by %s failed, maybe part way: %s", what, auth.who(), err)
            raise
        audit.info("admin %s by %s", what, auth.who())
        return reply

    return wrapper


def _pool(value: str, settings: Settings, field: str = "pool") -> str:
    """A pool name "src:tgt" of two valid, different languages, served here (--pools)."""
    src, sep, tgt = value.partition(":")
    if not sep:
        raise InvalidArgument(field, f"{value!r} is not a pool: expected src:tgt such as zh:en")
    validate.lang(src, field)
    validate.lang(tgt, field)
    if src == tgt:
        raise InvalidArgument(field, "source and target languages must differ")
    validate.served(value, settings, field)
    return value


def _reason(value: str) -> str:
    if len(value) > REASON_MAX:
        raise InvalidArgument("reason", f"at most {REASON_MAX} characters")
    return value


def _pool_state(p: Pause) -> pb.PoolState:
    out = pb.PoolState(pool=p.pool, paused=p.paused, reason=p.reason)
    if p.paused:
        out.paused_at.FromMilliseconds(p.at_ms)
    return out


class Admin:
    def __init__(self, store: Store, settings: Settings, nodes: Any = None) -> None:
        self.store = store
        self.settings = settings
        self.nodes = nodes  # server.node.NodeSessions
        self.ops = Operations(store)
        self.listing = Listing(store)
        self.stats = Stats(store, nodes)

    async def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        from .service import job_pb  # (service imports this module)

        if request.pool:
            _pool(request.pool, self.settings)
        if request.state and request.state not in pb.JobState.values():
            raise InvalidArgument("state", f"{request.state} is not a JobState")
        if request.session_id and not request.tenant_id:
            raise InvalidArgument("tenant_id", "required with session_id")
        if request.session_id:
            validate.session(request.tenant_id, request.session_id)
        elif request.tenant_id:
            validate.tenant_id(request.tenant_id)
        if not 0 <= request.page_size <= PAGE_MAX:
            raise InvalidArgument("page_size", f"must be 0 (default {PAGE_DEFAULT}) to {PAGE_MAX}")
        after = decode_cursor(request.page_token) if request.page_token else None
        state = pb.JobState.Name(request.state).removeprefix("JOB_STATE_").lower() if request.state else ""
        views, cursor = await self.listing.page(
            Filter(request.pool, state, request.tenant_id, request.session_id),
            request.page_size or PAGE_DEFAULT, after)
        return pb.ListJobsResponse(jobs=[job_pb(v) for v in views],
                                   next_page_token=encode_cursor(cursor) if cursor else "")

    async def get_stats(self, request: pb.GetStatsRequest) -> pb.GetStatsResponse:
        if request.pool:
            _pool(request.pool, self.settings)
        snap = await self.stats.snapshot()
        out = pb.GetStatsResponse()
        out.as_of.FromMilliseconds(snap.as_of_ms)
        allowed = self.settings.allowed_pools()
        names = [request.pool] if request.pool else sorted(
            p for p, f in snap.pools.items()
            if (allowed is None or p in allowed) and f.active)
        for name in names:
            f = snap.pools.get(name)
            entry = out.pools.add(pool=name)
            entry.jobs.extend(pb.StateCount(state=pb.JobState.Value(f"JOB_STATE_{s.name}"),  # type: ignore[arg-type]
                                            count=f.jobs.get(s, 0) if f else 0) for s in STATES)
            if f is None:  # (a pool without jobs or nodes: paused, say)
                p = (await self.ops.paused([name]))[name]
                paused, reason, at = p.paused, p.reason, p.at_ms
            else:
                paused, reason, at = f.paused, f.paused_reason, f.paused_at_ms
            entry.paused = paused
            if paused:
                entry.paused_reason = reason
                entry.paused_at.FromMilliseconds(at)
            if f is None:
                continue
            entry.nodes, entry.capacity, entry.in_flight = f.nodes, f.capacity, f.in_flight
            entry.submitted_per_second, entry.finished_per_second = f.submitted_per_second, f.finished_per_second
            entry.oldest_queued_age.FromMilliseconds(f.oldest_queued_age_ms)
        return out

    @audited
    async def retry_job(self, request: pb.RetryJobRequest) -> pb.Job:
        from .service import job_pb

        validate.job_id(request.job_id, self.settings)
        reason = _reason(request.reason)
        deadline_ms = validate.deadline(request.deadline, self.settings, "deadline") if request.HasField("deadline") else 0
        if not 0 <= request.max_attempts <= self.settings.max_attempts_cap:
            raise InvalidArgument("max_attempts", f"must be 0 (the job's own) to {self.settings.max_attempts_cap}")
        await self.ops.retry(request.job_id, deadline_ms=deadline_ms, max_attempts=request.max_attempts,
                             reason=reason)
        self.stats.invalidate()
        return job_pb(await self.store.get(request.job_id, lambda _tenant: True))

    @audited
    async def cancel_session(self, request: pb.CancelSessionRequest) -> pb.CancelSessionResponse:
        validate.session(request.tenant_id, request.session_id)
        done = await self.ops.cancel_session(request.tenant_id, request.session_id, _reason(request.reason))
        self.stats.invalidate()
        return pb.CancelSessionResponse(cancelled_job_ids=done.cancelled, already_finished=done.already_finished)

    @audited
    async def pause_pool(self, request: pb.PausePoolRequest) -> pb.PoolState:
        if not request.pool:
            raise InvalidArgument("pool", "required")
        pool = _pool(request.pool, self.settings)
        state = await self.ops.set_paused(pool, True, _reason(request.reason))
        self.stats.invalidate()
        return _pool_state(state)

    @audited
    async def resume_pool(self, request: pb.ResumePoolRequest) -> pb.PoolState:
        if not request.pool:
            raise InvalidArgument("pool", "required")
        state = await self.ops.set_paused(_pool(request.pool, self.settings), False)
        self.stats.invalidate()
        return _pool_state(state)

    @audited
    async def drain_node(self, request: pb.DrainNodeRequest) -> pb.NodeInfo:
        validate.node_id(request.node_id)
        if not await self.ops.drain(request.node_id):
            raise NodeNotFound(f"node {request.node_id} is not registered")
        found = await self.nodes.node_info(request.node_id) if self.nodes is not None else None
        return found or pb.NodeInfo(node_id=request.node_id, draining=True)  # (as stored: draining)

