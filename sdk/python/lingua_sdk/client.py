"""`Client` (blocking) and `AsyncClient` (asyncio): one vocabulary, one core.

The core (`_Core`) builds every request and turns every answer and error into the SDK's types; each
client only carries the call over its channel (grpc or grpc.aio), the way httpx shares its models
between its sync and async transports. The generated stub is `client.stub`, for anything not covered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Generator, Iterable, Mapping, Sequence
from contextlib import aclosing, closing
from datetime import datetime
from types import TracebackType
from typing import Any, Self, Unpack

import grpc

from . import _otel
from ._channel import Connection, TLSOption, TokenOption
from ._proto import scheduler_pb2 as pb
from ._proto import scheduler_pb2_grpc as pb_grpc
from .errors import DeadlineExceeded, Unavailable, from_rpc_error
from .models import (
    Job,
    JobEvent,
    JobFields,
    JobPage,
    JobSpec,
    JobState,
    NodeInfo,
    PoolState,
    SessionCancelled,
    SessionEvent,
    Stats,
    SubmitResult,
)

_RETRY_PAUSE = 0.2  # seconds between two watches of one wait (after an instance went away)

SpecLike = JobSpec | Mapping[str, Any] | pb.JobSpec


class _Resume:
    """Where a session watch resumes after its stream broke: the last resume_index, minus the jobs at
    that index already delivered (the server sends them again)."""

    def __init__(self, from_index: int) -> None:
        self.index = from_index
        self.sent: set[str] = set()  # job ids delivered at self.index

    def fresh(self, event: pb.SessionEvent) -> SessionEvent | None:
        """The event without the jobs already delivered (None when nothing is left)."""
        jobs = [j for j in event.jobs if j.job_id not in self.sent]
        self.sent = {j.job_id for j in event.jobs if j.spec.utterance_index == event.resume_index} | {
            j for j in self.sent if event.resume_index == self.index}
        self.index = event.resume_index
        if not jobs:
            return None
        del event.jobs[:]
        event.jobs.extend(jobs)
        return SessionEvent.from_proto(event)


class _Core:
    """Requests in, plain data out: everything the two clients share."""

    def __init__(self, target: str, token: TokenOption, tls: TLSOption, options: Sequence[tuple[str, Any]],
                 timeout: float | None) -> None:
        self.connection = Connection.of(target, token, tls, options)
        self.metadata = self.connection.metadata or None
        self.timeout = timeout  # default deadline of unary calls, seconds

    @staticmethod
    def submit_request(specs: Iterable[SpecLike]) -> pb.SubmitRequest:
        request = pb.SubmitRequest(jobs=[JobSpec.of(s) for s in specs])  # copies: the caller's specs stay as given
        _otel.inject(request)
        return request

    @staticmethod
    def submitted(reply: pb.SubmitResponse) -> list[SubmitResult]:
        return [SubmitResult.from_proto(r) for r in reply.results]

    @staticmethod
    def session_request(tenant_id: str, session_id: str, from_index: int, tgt_lang: str) -> pb.WatchSessionRequest:
        return pb.WatchSessionRequest(tenant_id=tenant_id, session_id=session_id, from_index=from_index,
                                      tgt_lang=tgt_lang)

    @staticmethod
    def list_jobs_request(pool: str, state: JobState | str | None, tenant_id: str, session_id: str, page_size: int,
                          page_token: str) -> pb.ListJobsRequest:
        number = getattr(pb, f"JOB_STATE_{JobState(state).name}") if state else pb.JOB_STATE_UNSPECIFIED
        return pb.ListJobsRequest(pool=pool, state=number, tenant_id=tenant_id, session_id=session_id,
                                  page_size=page_size, page_token=page_token)

    @staticmethod
    def retry_request(job_id: str, reason: str, deadline: datetime | None, max_attempts: int) -> pb.RetryJobRequest:
        request = pb.RetryJobRequest(job_id=job_id, reason=reason, max_attempts=max_attempts)
        if deadline is not None:
            request.deadline.FromDatetime(deadline)
        return request

    @staticmethod
    def left(deadline: float | None) -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    @staticmethod
    def late(job_id: str, timeout: float | None, state: JobState | None) -> DeadlineExceeded:
        """wait's timeout, in the caller's terms rather than gRPC's ("Deadline Exceeded")."""
        known = f"its last known state is {state}" if state else "its state is not known"
        return DeadlineExceeded(f"job {job_id} did not finish within {timeout or 0:g} s; {known} "
                                "(the job stays: wait again, or cancel it)")


class AsyncClient:
    """The scheduler's client API for asyncio code. `target` is a gRPC target ("host:port",
    "dns:///name:port", "ipv4:a:p,b:p"); `token` is sent as `authorization: Bearer <token>`; `tls` is
    False (plaintext), True (system roots) or a `TLS`. Use as `async with AsyncClient(...) as c:`."""

    def __init__(self, target: str, *, token: TokenOption = None, tls: TLSOption = False,
                 options: Sequence[tuple[str, Any]] = (), timeout: float | None = 30.0) -> None:
        self._core = _Core(target, token, tls, options, timeout)
        self.channel = self._core.connection.aio_channel()
        self.stub = pb_grpc.SchedulerStub(self.channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._core.metadata, timeout=self._core.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def submit(self, **spec: Unpack[JobFields]) -> SubmitResult:
        """Submit one job, given as the keyword fields of a JobSpec."""
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Iterable[SpecLike]) -> list[SubmitResult]:
        """Submit a batch (JobSpec, dict of its fields, or pb.JobSpec each): all stored, or none."""
        return _Core.submitted(await self._unary(self.stub.Submit, _Core.submit_request(specs)))

    async def get(self, job_id: str, *, include_payload: bool = False) -> Job:
        return Job.from_proto(await self._unary(self.stub.GetJob, pb.GetJobRequest(
            job_id=job_id, include_payload=include_payload)))

    async def cancel(self, job_id: str, *, reason: str = "") -> Job:
        return Job.from_proto(await self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id, reason=reason)))

    async def list_nodes(self) -> list[NodeInfo]:
        reply = await self._unary(self.stub.ListNodes, pb.ListNodesRequest())
        return [NodeInfo.from_proto(n) for n in reply.nodes]

    # -- administration: the admin role (docs/operations.md) ---------------------------------------

    async def list_jobs(self, *, pool: str = "", state: JobState | str | None = None, tenant_id: str = "",
                        session_id: str = "", page_size: int = 0, page_token: str = "") -> JobPage:
        """One page of jobs, newest first, filtered (every filter optional; session_id needs tenant_id)."""
        return JobPage.from_proto(await self._unary(self.stub.ListJobs, _Core.list_jobs_request(
            pool, state, tenant_id, session_id, page_size, page_token)))

    async def get_stats(self, pool: str = "") -> Stats:
        """Per pool (every pool, or one): jobs by state, nodes, capacity, in-flight, rates, paused."""
        return Stats.from_proto(await self._unary(self.stub.GetStats, pb.GetStatsRequest(pool=pool)))

    async def retry(self, job_id: str, *, reason: str = "", deadline: datetime | None = None,
                    max_attempts: int = 0) -> Job:
        """A FAILED or EXPIRED job back to QUEUED, with a fresh attempt budget and deadline."""
        return Job.from_proto(await self._unary(self.stub.RetryJob, _Core.retry_request(
            job_id, reason, deadline, max_attempts)))

    async def cancel_session(self, tenant_id: str, session_id: str, *, reason: str = "") -> SessionCancelled:
        """Cancel every unfinished job of a session (a speaker hung up)."""
        return SessionCancelled.from_proto(await self._unary(self.stub.CancelSession, pb.CancelSessionRequest(
            tenant_id=tenant_id, session_id=session_id, reason=reason)))

    async def pause_pool(self, pool: str, *, reason: str = "") -> PoolState:
        """Stop dispatching a pool ("src:tgt"): submits still queue, nothing is assigned until resumed."""
        return PoolState.from_proto(await self._unary(self.stub.PausePool, pb.PausePoolRequest(pool=pool, reason=reason)))

    async def resume_pool(self, pool: str) -> PoolState:
        return PoolState.from_proto(await self._unary(self.stub.ResumePool, pb.ResumePoolRequest(pool=pool)))

    async def drain_node(self, node_id: str) -> NodeInfo:
        """The node finishes what it holds and gets nothing new (on whichever instance holds it)."""
        return NodeInfo.from_proto(await self._unary(self.stub.DrainNode, pb.DrainNodeRequest(node_id=node_id)))

    async def watch(self, job_id: str, *, timeout: float | None = None) -> AsyncGenerator[JobEvent, None]:
        """Every state change of the job, oldest first; ends after the terminal one."""
        call = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._core.metadata, timeout=timeout)
        try:
            async for event in call:
                yield JobEvent.from_proto(event)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """The job once terminal (succeeded, failed, cancelled or expired). After `timeout` seconds
        raises DeadlineExceeded (a TimeoutError) naming the job and its last known state; the job is
        left as it is. A watch cut by an instance going away is resumed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        state: JobState | None = None  # the last one seen, for the timeout's message
        while True:
            left = _Core.left(deadline)
            if left is not None and left <= 0:
                raise _Core.late(job_id, timeout, state)
            try:
                try:
                    async with aclosing(self.watch(job_id, timeout=left)) as events:
                        async for event in events:
                            state = event.state
                            if state.terminal:
                                break
                except DeadlineExceeded:  # the watch's deadline is the wait's
                    raise _Core.late(job_id, timeout, state) from None
                job = await self.get(job_id)
                if job.state.terminal:
                    return job
                state = job.state
            except Unavailable:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(_RETRY_PAUSE)

    async def watch_session(self, tenant_id: str, session_id: str, from_index: int = 0, *, tgt_lang: str = "",
                            timeout: float | None = None) -> AsyncGenerator[SessionEvent, None]:
        """The session's finished jobs (succeeded, failed, cancelled, expired) in utterance order, in
        batches, from utterance `from_index` on (only `tgt_lang`'s, when given); runs until closed or
        `timeout` seconds. A stream cut by an instance going away resumes from the last resume_index,
        without repeating a job."""
        resume = _Resume(from_index)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _Core.left(deadline)
            if left is not None and left <= 0:
                return
            request = _Core.session_request(tenant_id, session_id, resume.index, tgt_lang)
            call = self.stub.WatchSession(request, metadata=self._core.metadata, timeout=left)
            try:
                async for message in call:
                    event = resume.fresh(message)
                    if event is not None:
                        yield event
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if isinstance(error, DeadlineExceeded) and deadline is not None:
                    return  # the watch ran for `timeout` seconds
                if not isinstance(error, Unavailable):
                    raise error from None
            finally:
                call.cancel()
            await asyncio.sleep(_RETRY_PAUSE)


class Client:
    """The blocking twin of AsyncClient: same constructor, same methods, same types. Use as
    `with Client(...) as c:`."""

    def __init__(self, target: str, *, token: TokenOption = None, tls: TLSOption = False,
                 options: Sequence[tuple[str, Any]] = (), timeout: float | None = 30.0) -> None:
        self._core = _Core(target, token, tls, options, timeout)
        self.channel = self._core.connection.channel()
        self.stub = pb_grpc.SchedulerStub(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._core.metadata, timeout=self._core.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def submit(self, **spec: Unpack[JobFields]) -> SubmitResult:
        """Submit one job, given as the keyword fields of a JobSpec."""
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[SpecLike]) -> list[SubmitResult]:
        """Submit a batch (JobSpec, dict of its fields, or pb.JobSpec each): all stored, or none."""
        return _Core.submitted(self._unary(self.stub.Submit, _Core.submit_request(specs)))

    def get(self, job_id: str, *, include_payload: bool = False) -> Job:
        return Job.from_proto(self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id, include_payload=include_payload)))

    def cancel(self, job_id: str, *, reason: str = "") -> Job:
        return Job.from_proto(self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id, reason=reason)))

    def list_nodes(self) -> list[NodeInfo]:
        return [NodeInfo.from_proto(n) for n in self._unary(self.stub.ListNodes, pb.ListNodesRequest()).nodes]

    # -- administration: the admin role (docs/operations.md) ---------------------------------------

    def list_jobs(self, *, pool: str = "", state: JobState | str | None = None, tenant_id: str = "",
                        session_id: str = "", page_size: int = 0, page_token: str = "") -> JobPage:
        """One page of jobs, newest first, filtered (every filter optional; session_id needs tenant_id)."""
        return JobPage.from_proto(self._unary(self.stub.ListJobs, _Core.list_jobs_request(
            pool, state, tenant_id, session_id, page_size, page_token)))

    def get_stats(self, pool: str = "") -> Stats:
        """Per pool (every pool, or one): jobs by state, nodes, capacity, in-flight, rates, paused."""
        return Stats.from_proto(self._unary(self.stub.GetStats, pb.GetStatsRequest(pool=pool)))

    def retry(self, job_id: str, *, reason: str = "", deadline: datetime | None = None,
                    max_attempts: int = 0) -> Job:
        """A FAILED or EXPIRED job back to QUEUED, with a fresh attempt budget and deadline."""
        return Job.from_proto(self._unary(self.stub.RetryJob, _Core.retry_request(
            job_id, reason, deadline, max_attempts)))

    def cancel_session(self, tenant_id: str, session_id: str, *, reason: str = "") -> SessionCancelled:
        """Cancel every unfinished job of a session (a speaker hung up)."""
        return SessionCancelled.from_proto(self._unary(self.stub.CancelSession, pb.CancelSessionRequest(
            tenant_id=tenant_id, session_id=session_id, reason=reason)))

    def pause_pool(self, pool: str, *, reason: str = "") -> PoolState:
        """Stop dispatching a pool ("src:tgt"): submits still queue, nothing is assigned until resumed."""
        return PoolState.from_proto(self._unary(self.stub.PausePool, pb.PausePoolRequest(pool=pool, reason=reason)))

    def resume_pool(self, pool: str) -> PoolState:
        return PoolState.from_proto(self._unary(self.stub.ResumePool, pb.ResumePoolRequest(pool=pool)))

    def drain_node(self, node_id: str) -> NodeInfo:
        """The node finishes what it holds and gets nothing new (on whichever instance holds it)."""
        return NodeInfo.from_proto(self._unary(self.stub.DrainNode, pb.DrainNodeRequest(node_id=node_id)))

    def watch(self, job_id: str, *, timeout: float | None = None) -> Generator[JobEvent, None, None]:
        """Every state change of the job, oldest first; ends after the terminal one."""
        call: Any = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._core.metadata, timeout=timeout)
        try:
            for event in call:
                yield JobEvent.from_proto(event)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """The job once terminal (succeeded, failed, cancelled or expired). After `timeout` seconds
        raises DeadlineExceeded (a TimeoutError) naming the job and its last known state; the job is
        left as it is. A watch cut by an instance going away is resumed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        state: JobState | None = None  # the last one seen, for the timeout's message
        while True:
            left = _Core.left(deadline)
            if left is not None and left <= 0:
                raise _Core.late(job_id, timeout, state)
            try:
                try:
                    with closing(self.watch(job_id, timeout=left)) as events:
                        for event in events:
                            state = event.state
                            if state.terminal:
                                break
                except DeadlineExceeded:  # the watch's deadline is the wait's
                    raise _Core.late(job_id, timeout, state) from None
                job = self.get(job_id)
                if job.state.terminal:
                    return job
                state = job.state
            except Unavailable:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            time.sleep(_RETRY_PAUSE)

    def watch_session(self, tenant_id: str, session_id: str, from_index: int = 0, *, tgt_lang: str = "",
                      timeout: float | None = None) -> Generator[SessionEvent, None, None]:
        """The session's finished jobs (succeeded, failed, cancelled, expired) in utterance order, in
        batches, from utterance `from_index` on (only `tgt_lang`'s, when given); runs until closed or
        `timeout` seconds. A stream cut by an instance going away resumes from the last resume_index,
        without repeating a job."""
        resume = _Resume(from_index)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _Core.left(deadline)
            if left is not None and left <= 0:
                return
            request = _Core.session_request(tenant_id, session_id, resume.index, tgt_lang)
            call: Any = self.stub.WatchSession(request, metadata=self._core.metadata, timeout=left)
            try:
                for message in call:
                    event = resume.fresh(message)
                    if event is not None:
                        yield event
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if isinstance(error, DeadlineExceeded) and deadline is not None:
                    return  # the watch ran for `timeout` seconds
                if not isinstance(error, Unavailable):
                    raise error from None
            finally:
                call.cancel()
            time.sleep(_RETRY_PAUSE)
