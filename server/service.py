"""The Scheduler servicer: validates requests, converts protobuf <-> domain, maps errors to statuses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from lingua_sdk import pb, pb_grpc
from redis.exceptions import RedisError

from ..fsm import TERMINAL, JobState
from . import auth, keys, logs, validate
from .admin import Admin
from .dispatch import Consumer, Dispatcher
from .errors import (
    DOMAIN,
    FieldError,
    InvalidArgument,
    JobNotFound,
    NotEnabled,
    SchedulerError,
    ScriptCode,
    Unavailable,
    error_class,
)
from .session import SessionWatch
from .settings import Settings
from .store import Claim, JobView, Lease, Store, Touched
from .throttle import ThrottledWarning
from .tracing import Tracing

log = logging.getLogger(__name__)
T = TypeVar("T")
_store_down = ThrottledWarning(log)
_internal: dict[str, ThrottledWarning] = {}  # per method (a bounded set of names): a bug's line, not one per call

_STATE = {s.value: getattr(pb, f"JOB_STATE_{s.name}", pb.JOB_STATE_UNSPECIFIED) for s in JobState}


def state_pb(state: str) -> int:
    return _STATE.get(state, pb.JOB_STATE_UNSPECIFIED)


def job_pb(view: JobView) -> pb.Job:
    rec = view.record
    job = pb.Job(job_id=rec.job_id, spec=view.spec, state=state_pb(rec.state), version=rec.version,  # type: ignore[arg-type]
                 attempt=rec.attempt, node_id=rec.node, max_attempts=rec.max_attempts)
    if view.payload:
        job.spec.payload = view.payload
    job.created_at.FromMilliseconds(rec.created)
    job.updated_at.FromMilliseconds(rec.updated)
    if rec.lease:
        job.lease_deadline.FromMilliseconds(rec.lease)
    if rec.error_code:
        job.last_error.CopyFrom(pb.JobError(code=rec.error_code, message=rec.error_message,
                                            retryable=rec.error_retryable))
    if view.result is not None:
        job.result.CopyFrom(view.result)
    return job


def assignment_pb(claim: Claim) -> pb.Assignment:
    a = pb.Assignment(job_id=claim.job_id, attempt=claim.attempt, spec=pb.JobSpec.FromString(claim.meta),
                      lease_token=claim.token)
    if claim.payload:
        a.spec.payload = claim.payload
    a.lease_deadline.FromMilliseconds(claim.lease)
    return a


def lease_status_pb(t: Touched, token: str = "") -> pb.LeaseStatus:
    status = pb.LeaseStatus(job_id=t.job_id, ok=t.code >= 0, state=state_pb(t.state),  # type: ignore[arg-type]
                            lease_token=token)
    if t.code >= 0:
        status.lease_deadline.FromMilliseconds(t.lease)
    else:
        status.reason = error_class(t.code).reason
        status.error_code = "NOT_FOUND" if t.code == ScriptCode.JOB_NOT_FOUND else "FAILED_PRECONDITION"
        status.error_message = {
            ScriptCode.JOB_NOT_FOUND: "job not found",
            ScriptCode.INVALID_TRANSITION: f"job is {t.detail}: the lease is no longer held",
            ScriptCode.STALE_LEASE: f"the lease token is not the job's current claim (stale lease; the job's current "
                                    f"attempt is {t.detail})",
            ScriptCode.NOT_LEASE_HOLDER: "job is held by another node",
        }.get(t.code, t.code.name)
    return status


def watch_event_pb(job_id: str, e: dict[str, Any]) -> pb.JobEvent:
    event = pb.JobEvent(job_id=job_id, state=state_pb(e["s"]), version=int(e["v"]),  # type: ignore[arg-type]
                        attempt=int(e["a"]), node_id=e["n"], event=e["e"])
    event.at.FromMilliseconds(int(e["t"]))
    if e.get("ec"):
        event.error.CopyFrom(pb.JobError(code=e["ec"], message=e["em"], retryable=e["er"] in ("1", 1)))
    return event


def scheduler_error(err: BaseException) -> SchedulerError:
    """What a client sees of any exception: itself if typed; the store down as Unavailable; else INTERNAL."""
    if isinstance(err, SchedulerError):
        return err
    if isinstance(err, RedisError | ConnectionError | OSError):
        # The detail names Redis's host and port: for the operator's log, not for callers.
        _store_down("job store unavailable: %s", err)
        return Unavailable("job store unavailable")
    return SchedulerError("internal error")


def error_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message of an error (for in-stream answers: SchedulerMessage.error, LeaseStatus)."""
    typed = scheduler_error(err)
    return typed.status, str(typed)


def refused_pb(job_id: str, token: str, err: BaseException) -> pb.LeaseStatus:
    """An in-stream refusal of one lease: code name, message and stable reason of `err`."""
    typed = scheduler_error(err)
    return pb.LeaseStatus(job_id=job_id, ok=False, error_code=typed.status.name, error_message=str(typed),
                          reason=typed.reason, lease_token=token)


def rich_status(err: BaseException) -> status_pb2.Status:
    """The one place that turns errors into gRPC statuses: code and message, plus google.rpc details
    (docs/errors.md): ErrorInfo (stable reason, domain) always; BadRequest naming the field of a
    FieldError; RetryInfo when retrying the same call may succeed."""
    typed = scheduler_error(err)
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=typed.reason, domain=DOMAIN, metadata=typed.metadata)]
    if isinstance(typed, FieldError):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=typed.field, description=typed.description)]))
    if typed.retry_delay is not None:
        delay = Duration()
        delay.FromMilliseconds(int(typed.retry_delay * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=typed.status.value[0], message=str(typed))
    for detail in details:
        status.details.add().Pack(detail)
    return status


async def abort(context: grpc.aio.ServicerContext, err: BaseException, what: str) -> NoReturn:  # type: ignore[type-arg]
    """End the call with the rich status of `err`; the unexpected (INTERNAL) is logged with its traceback."""
    status = rich_status(err)
    if status.code == grpc.StatusCode.INTERNAL.value[0]:
        _internal.setdefault(what, ThrottledWarning(log, interval_s=10, level=logging.ERROR))(
            "%s failed", what, exc_info=err)
    grpc_status = rpc_status.to_status(status)
    context.set_code(grpc_status.code)  # what tracing's wrapper of the context records (abort_with_status bypasses it)
    context.set_details(grpc_status.details)
    await context.abort_with_status(grpc_status)  # type: ignore[attr-defined]  # grpc-stubs lacks it
    raise AssertionError("unreachable: abort_with_status raises")


def handled(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Unary handlers: typed errors become their status; the unexpected is logged as INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:  # type: ignore[type-arg]
        try:
            return await method(self, request, context)
        except Exception as err:
            await abort(context, err, method.__name__)

    return wrapper


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, store: Store, dispatcher: Dispatcher, settings: Settings,
                 nodes: Any = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings
        self.nodes = nodes  # server.node.NodeSessions, set by the app
        self.admin = Admin(store, settings, nodes)
        self.tracing: Tracing | None = None  # set by the app when tracing is on (server/tracing.py)

    @handled
    async def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitResponse:
        validate.submit(request, self.settings)
        for i, spec in enumerate(request.jobs):
            auth.check_tenant(spec.tenant_id, f"jobs[{i}].tenant_id")
        logs.TENANT_ID.set(request.jobs[0].tenant_id)
        if self.tracing is None:
            done = await self.store.submit(list(request.jobs))
        else:
            done = await self.tracing.submit(self.store, request.jobs)
        if log.isEnabledFor(logging.DEBUG):
            for spec, d in zip(request.jobs, done, strict=True):
                log.debug("submitted job %s (%s)", d.job_id, "new" if d.created else f"repeat, {d.state}",
                          extra=logs.fields(d.job_id, tenant_id=spec.tenant_id, trace_context=spec.trace_context,
                                            trace_id=spec.trace_id))
        return pb.SubmitResponse(results=[
            pb.SubmitResult(job_id=d.job_id, created=d.created, state=state_pb(d.state))  # type: ignore[arg-type]
            for d in done
        ])

    @handled
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        validate.job_id(request.job_id, self.settings)
        return job_pb(await self.store.get(request.job_id, auth.tenant_visible, include_payload=request.include_payload))

    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.JobEvent]:
        try:
            validate.job_id(request.job_id, self.settings)
            # The record's history is the truth. Subscribed first, then the job is marked watched (from then
            # on every change is published on its channel) as its history is read, in one step: no change is
            # missed. A published change is delivered as is when it is the next version, else (a gap, a lost
            # message, the backstop) the history is read again.
            async with self.dispatcher.watching(keys.JobKeys.of(request.job_id).channel) as inbox:
                entries, tenant = await self.store.watch(request.job_id)
                if not auth.tenant_visible(tenant):
                    raise JobNotFound(f"job {request.job_id} not found")
                version = 0
                while True:
                    for i, e in enumerate(entries):
                        if int(e["v"]) <= version:
                            continue  # already sent (read from the record and heard on the channel)
                        version = int(e["v"])
                        yield watch_event_pb(request.job_id, e)
                        if e["s"] in TERMINAL and i == len(entries) - 1:
                            return  # (a terminal state followed by more is a job RetryJob put back)
                    try:
                        async with asyncio.timeout(5.0):
                            e = json.loads(await inbox.get())
                    except TimeoutError:
                        entries = await self.store.events(request.job_id, version)  # (JobNotFound once it expired)
                        continue
                    entries = [e] if int(e["v"]) <= version + 1 else await self.store.events(request.job_id, version)
        except Exception as err:
            await abort(context, err, "WatchJob")

    async def WatchSession(self, request: pb.WatchSessionRequest, context: Any) -> AsyncIterator[pb.SessionEvent]:
        try:
            validate.watch_session(request)
            auth.check_tenant(request.tenant_id, "tenant_id")
            watch = SessionWatch(self.store, self.dispatcher, request.tenant_id, request.session_id,
                                 request.from_index, request.tgt_lang)
            async for views, resume_index in watch.events():
                yield pb.SessionEvent(jobs=[job_pb(v) for v in views], resume_index=resume_index)
        except Exception as err:
            await abort(context, err, "WatchSession")

    @handled
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.Job:
        validate.job_id(request.job_id, self.settings)
        if len(request.reason) > 1024:
            raise InvalidArgument("reason", "at most 1024 characters")
        await self.store.cancel(request.job_id, request.reason, auth.tenant_visible)
        return job_pb(await self.store.get(request.job_id, auth.tenant_visible))

    @handled
    async def Assign(self, request: pb.AssignRequest, context: Any) -> pb.AssignResponse:
        pools = validate.assign(request, self.settings)
        auth.check_node(request.node_id, "node_id")
        want = request.max_jobs or 1
        wait = request.wait.ToMilliseconds() / 1000 if request.HasField("wait") else 0
        until = time.monotonic() + min(wait, auth.expires_in())  # no work for a token that expired meanwhile
        got: list[Claim] = []
        waiting = False
        arrived = asyncio.Event()

        def deliver(claims: list[Claim]) -> None:
            got.extend(claims)
            arrived.set()

        # Added before the first claim, so a wake-up heard meanwhile is kept; served by the dispatch
        # task only once that claim found nothing and the call waits (one delivery ends the wait).
        consumer = Consumer(request.node_id, pools, lambda: want if waiting and not got else 0, deliver)
        self.dispatcher.add(consumer)
        try:
            got += await self.dispatcher.claim_for(consumer, want)
            remaining = until - time.monotonic()
            if not got and remaining > 0:
                waiting = True
                self.dispatcher.ready(consumer)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await arrived.wait()
            answer = pb.AssignResponse(assignments=[assignment_pb(c) for c in got])
            got = []  # answered: nothing left to give back
            return answer
        finally:
            self.dispatcher.remove(consumer)  # before any await: nothing is delivered after the answer
            consumer.pending.update((c.job_id, c.token) for c in got)  # delivered, never answered (cancelled)
            if consumer.pending or consumer.round is not None:  # a claim whose reply was lost, or on its way
                await asyncio.shield(asyncio.ensure_future(self.dispatcher.release_pending(consumer)))

    @handled
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        validate.node_id(request.node_id)
        auth.check_node(request.node_id, "node_id")
        if not request.leases or len(request.leases) > 1000:
            raise InvalidArgument("leases", "1 to 1000 leases are required")
        for i, item in enumerate(request.leases):
            validate.lease(item, self.settings, f"leases[{i}]")
        touched = await self.store.touch(request.node_id, [Lease(x.job_id, x.lease_token, x.attempt)
                                                           for x in request.leases])
        return pb.HeartbeatResponse(leases=[lease_status_pb(t, x.lease_token)
                                            for t, x in zip(touched, request.leases, strict=True)])

    @handled
    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        validate.complete(request, self.settings)
        auth.check_node(request.node_id, "node_id")
        if request.WhichOneof("outcome") == "result":
            changed = await self.store.complete(request.job_id, request.node_id, request.lease_token, request.result)
        else:
            changed = await self.store.fail(request.job_id, request.node_id, request.lease_token, request.error)
        return pb.CompleteResponse(state=state_pb(changed.state), version=changed.version)  # type: ignore[arg-type]

    async def NodeSession(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]  # writes with context.write
        if self.nodes is None:
            await abort(context, NotEnabled("NodeSession is not enabled on this server"), "NodeSession")
        await self.nodes.serve(request_iterator, context)

    @handled
    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        if self.nodes is None:
            return pb.ListNodesResponse()
        return pb.ListNodesResponse(nodes=await self.nodes.list_nodes())

    # -- administration (admin role: server/auth.py RULES leaves these to it) -------------------------

    @handled
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        return await self.admin.list_jobs(request)

    @handled
    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        return await self.admin.get_stats(request)

    @handled
    async def RetryJob(self, request: pb.RetryJobRequest, context: Any) -> pb.Job:
        return await self.admin.retry_job(request)

    @handled
    async def CancelSession(self, request: pb.CancelSessionRequest, context: Any) -> pb.CancelSessionResponse:
        return await self.admin.cancel_session(request)

    @handled
    async def PausePool(self, request: pb.PausePoolRequest, context: Any) -> pb.PoolState:
        return await self.admin.pause_pool(request)

    @handled
    async def ResumePool(self, request: pb.ResumePoolRequest, context: Any) -> pb.PoolState:
        return await self.admin.resume_pool(request)

    @handled
    async def DrainNode(self, request: pb.DrainNodeRequest, context: Any) -> pb.NodeInfo:
        return await self.admin.drain_node(request)


# -- registration: request bytes that do not decode ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request deserializer of this server returns for bytes that are not the method's request
    message. grpc's own deserializer raises there, and grpc answers UNKNOWN with a traceback in the
    log for every such request; anyone can send junk, so it is refused as bad input instead."""

    message: str  # the request message's name, e.g. "SubmitRequest"

    def refusal(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid {self.message}")


def _lenient(parse: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:  # DecodeError (or anything else the parser raises): not a request we can read
            return Undecodable(message)

    return deserialize


class _MethodTable:
    """Stands in for the server in the generated add_SchedulerServicer_to_server, to read its table."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(servicer: SchedulerService, server: grpc.aio.Server) -> None:
    """pb_grpc.add_SchedulerServicer_to_server (its method table: names, arities, serializers), with
    request deserializers that never raise. A request that does not decode is INVALID_ARGUMENT
    "request: not a valid <Message>"; on a client stream, a first message that does not decode ends
    the call so, and a later one reaches the method as an `Undecodable` (NodeSession answers it with
    an error message and keeps the stream). Junk is logged by one ThrottledWarning per server."""
    table = _MethodTable()
    pb_grpc.add_SchedulerServicer_to_server(servicer, table)  # type: ignore[arg-type]  # a stand-in that records the method table
    inputs = pb.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name
    warn = ThrottledWarning(log)
    handlers = {name: _guarded(handler, name, inputs[name].input_type.name, warn)
                for name, handler in table.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(table.service, handlers),))
    server.add_registered_method_handlers(table.service, handlers)  # type: ignore[attr-defined]


def _guarded(handler: Any, method: str, message: str, warn: ThrottledWarning) -> Any:
    """The generated handler, its deserializer lenient and its behaviour refusing Undecodable."""
    kind = ("stream_" if handler.request_streaming else "unary_") + \
        ("stream" if handler.response_streaming else "unary")
    behaviour = getattr(handler, kind)

    async def refuse(junk: Undecodable, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        warn("%s from %s: refused a request that is not a valid %s", method, context.peer(), junk.message)
        await abort(context, junk.refusal(), method)

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
        first = True
        async for request in requests:
            if isinstance(request, Undecodable):
                if first:
                    await refuse(request, context)
                warn("%s from %s: a message that is not a valid %s", method, context.peer(), request.message)
            first = False
            yield request
            del request  # not held while the stream waits for its next message (idle node streams)

    async def accept(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        if handler.request_streaming:
            return checked(request, context)
        if isinstance(request, Undecodable):
            await refuse(request, context)
        logs.from_request(request)
        return request

    if inspect.isasyncgenfunction(behaviour):
        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
            async for response in behaviour(await accept(request, context), context):
                yield response
        wrapped: Any = stream_out
    else:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
            return await behaviour(await accept(request, context), context)
        wrapped = call
    return handler._replace(request_deserializer=_lenient(handler.request_deserializer, message),
                            **{kind: wrapped})
