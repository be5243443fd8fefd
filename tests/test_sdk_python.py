"""The Python SDK (sdk/python, lingua_sdk) against real scheduler instances: Client, AsyncClient, Node."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import subprocess
import sys
import time
import typing
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AppFactory
from lingua_scheduler.server.app import create_server
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.tokens import mint
from lingua_sdk import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    FatalError,
    InvalidArgument,
    JobResult,
    JobSpec,
    JobState,
    ModelUnavailable,
    Node,
    NotFound,
    RetryableError,
    Unauthenticated,
    pb,
)
from lingua_sdk.models import Assignment
from lingua_sdk.node import _eager, _Result

pytestmark = pytest.mark.single_redis  # the SDK sees only gRPC: one Redis backend is enough

SPEC = dict(tenant_id="acme", session_id="s1", src_lang="zh", tgt_lang="en", payload_ref="s3://audio/s1/0.opus")


def target(app: Any) -> str:
    return f"127.0.0.1:{app.port}"


def make_node(address: str, handler: Any, **kw: Any) -> Node:
    kw.setdefault("node_id", "gpu-1")
    kw.setdefault("concurrency", 4)
    return Node(address, pairs=["zh:en"], handler=handler, handle_signals=False, backoff=(0.05, 0.5), **kw)


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[asyncio.Task[None]]:
    """node.run() as a task; cancelled (not drained) at the end."""
    task = asyncio.create_task(node.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def translate(a: Assignment) -> dict[str, Any]:
    return {"text_asr": "ni hao", "text_translated": f"hello {a.spec.utterance_index}", "extra": {"attempt": str(a.attempt)}}


# -- clients ---------------------------------------------------------------------------------------


async def test_async_client_submit_wait_watch_get_with_a_node(app: Any) -> None:
    async with AsyncClient(target(app)) as client, running(make_node(target(app), translate)):
        submitted = await client.submit(**SPEC, utterance_index=7)
        assert submitted.created and submitted.state is JobState.QUEUED
        job = await client.wait(submitted.job_id, timeout=20)
        assert job.state is JobState.SUCCEEDED and job.state.terminal
        assert job.result == JobResult(text_asr="ni hao", text_translated="hello 7", extra={"attempt": "1"})
        assert (job.attempt, job.node_id, job.spec.utterance_index) == (1, "gpu-1", 7)
        assert (await client.get(job.job_id)).result == job.result
        events = [e async for e in client.watch(job.job_id)]
        assert events[0].state is JobState.QUEUED and events[-1].state is JobState.SUCCEEDED
        assert [e.version for e in events] == sorted({e.version for e in events})
        nodes = await client.list_nodes()
        assert [(n.node_id, n.pools, n.max_concurrency) for n in nodes] == [("gpu-1", ["zh:en"], 4)]


async def test_sync_client_submit_many_get_cancel_watch_wait(app: Any) -> None:
    # The blocking client runs in a thread: the scheduler under test shares this event loop.
    def scenario() -> None:
        with Client(target(app)) as client:
            first, second = client.submit_many([JobSpec(**SPEC, utterance_index=1), {**SPEC, "utterance_index": 2}])
            assert first.created and second.created and first.job_id != second.job_id
            again = client.submit(**SPEC, utterance_index=1)  # idempotent repeat
            assert (again.job_id, again.created) == (first.job_id, False)
            assert client.get(first.job_id).state is JobState.QUEUED
            cancelled = client.cancel(first.job_id, reason="user hung up")
            assert cancelled.state is JobState.CANCELLED
            assert cancelled.last_error is not None and "user hung up" in cancelled.last_error.message
            events = list(client.watch(first.job_id))
            assert [e.state for e in events] == [JobState.QUEUED, JobState.CANCELLED]
            assert client.wait(first.job_id, timeout=5).state is JobState.CANCELLED
            assert client.list_nodes() == []

    await asyncio.to_thread(scenario)


async def test_watch_session_delivers_in_utterance_order_and_resumes_on_another_instance(
        make_app: AppFactory, settings: Settings) -> None:
    """Jobs finish out of order; the session stream gives them in utterance order. The instance
    holding the stream stops; the client resumes on the other one without losing or repeating a job."""
    second = await make_app()
    first = create_server(settings)
    await first.start()
    gate = {i: asyncio.Event() for i in range(4)}

    async def gated(a: Assignment) -> dict[str, Any]:
        await gate[a.spec.utterance_index].wait()
        return await translate(a)

    both = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
    stopped = False
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(lambda: asyncio.sleep(0) if stopped else first.stop(grace=0))
        client = await stack.enter_async_context(AsyncClient(both))
        await stack.enter_async_context(running(make_node(target(second), gated)))
        await client.submit_many([{**SPEC, "utterance_index": i} for i in range(4)])
        batches = await stack.enter_async_context(contextlib.aclosing(client.watch_session("acme", "s1")))
        gate[1].set()
        gate[0].set()
        seen = (await asyncio.wait_for(anext(batches), 10)).jobs
        while len(seen) < 2:
            seen += (await asyncio.wait_for(anext(batches), 10)).jobs
        await first.stop(grace=0)  # the stream's instance goes away
        stopped = True
        gate[3].set()
        gate[2].set()
        while len(seen) < 4:
            seen += (await asyncio.wait_for(anext(batches), 20)).jobs
    assert [j.spec.utterance_index for j in seen] == [0, 1, 2, 3]
    assert [j.result.text_translated for j in seen if j.result] == [f"hello {i}" for i in range(4)]


async def test_sync_watch_session_in_batches_until_the_timeout(app: Any) -> None:
    def scenario() -> None:
        with Client(target(app)) as client:
            client.submit_many([{**SPEC, "utterance_index": i} for i in range(3)])
            for job in client.submit_many([{**SPEC, "utterance_index": 5}]):
                client.cancel(job.job_id)
            ids = client.submit_many([{**SPEC, "utterance_index": i} for i in range(3)])  # repeats
            for r in ids:
                client.cancel(r.job_id, reason="done")
            batches = list(client.watch_session("acme", "s1", from_index=1, timeout=1.0))
            jobs = [j for b in batches for j in b.jobs]
            assert [(j.spec.utterance_index, j.state) for j in jobs] == [(1, JobState.CANCELLED),
                                                                         (2, JobState.CANCELLED),
                                                                         (5, JobState.CANCELLED)]
            assert batches[-1].resume_index == 6
            with pytest.raises(InvalidArgument) as err:
                next(iter(client.watch_session("acme", "s1", from_index=-1)))
            assert err.value.field_violations or "from_index" in str(err.value)

    await asyncio.to_thread(scenario)


async def test_errors_are_typed_with_their_status(app: Any) -> None:
    async with AsyncClient(target(app)) as client:
        with pytest.raises(NotFound) as missing:
            await client.get("zh:en:{0}01JE0000000000000000000000")
        assert missing.value.code.name == "NOT_FOUND"
        with pytest.raises(InvalidArgument) as bad:
            await client.submit(**{**SPEC, "src_lang": "ZH"})
        assert "jobs[0].src_lang" in bad.value.message
        queued = await client.submit(**SPEC)
        with pytest.raises(DeadlineExceeded) as late:  # no node: it never finishes
            await client.wait(queued.job_id, timeout=0.3)
        assert isinstance(late.value, TimeoutError)
    with pytest.raises(NotFound):  # the sync client raises the same types
        await asyncio.to_thread(lambda: Client(target(app)).get("zh:en:{0}01JE0000000000000000000000"))


# -- the node runtime ------------------------------------------------------------------------------


async def test_node_reports_retryable_then_fatal_failure(app: Any) -> None:
    async def flaky(a: Assignment) -> JobResult:
        if a.attempt == 1:
            raise RetryableError("GPU hiccup", code="GPU_HICCUP")
        raise FatalError("audio is not speech", code="NOT_SPEECH")

    async with AsyncClient(target(app)) as client, running(make_node(target(app), flaky)):
        job = await client.wait((await client.submit(**SPEC)).job_id, timeout=20)
        assert (job.state, job.attempt) == (JobState.FAILED, 2)
        assert job.last_error is not None
        assert (job.last_error.code, job.last_error.retryable) == ("NOT_SPEECH", False)
        errors = [(e.error.code, e.error.retryable) async for e in client.watch(job.job_id) if e.error]
        assert errors == [("GPU_HICCUP", True), ("NOT_SPEECH", False)]


async def test_node_any_other_exception_is_retryable(app: Any) -> None:
    async def once_broken(a: Assignment) -> JobResult:
        if a.attempt == 1:
            raise ValueError("model not warmed up")
        return JobResult(text_translated="ok")

    async with AsyncClient(target(app)) as client, running(make_node(target(app), once_broken)):
        job = await client.wait((await client.submit(**SPEC)).job_id, timeout=20)
        assert (job.state, job.attempt, job.result and job.result.text_translated) == (JobState.SUCCEEDED, 2, "ok")
        errors = [e.error async for e in client.watch(job.job_id) if e.error]
        assert [(e.code, e.retryable) for e in errors] == [("HANDLER_EXCEPTION", True)]
        assert "ValueError: model not warmed up" in errors[0].message


async def test_cancel_reaches_the_handler(app: Any) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(a: Assignment) -> JobResult:
        started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    node = make_node(target(app), slow)
    async with AsyncClient(target(app)) as client, running(node):
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        assert (await client.cancel(job_id, reason="stop")).state is JobState.CANCELLED
        await asyncio.wait_for(cancelled.wait(), 10)
        assert node.in_flight == 0


async def test_node_bounds_concurrency(app: Any) -> None:
    now = peak = 0

    async def work(a: Assignment) -> JobResult:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.02)
        now -= 1
        return JobResult(text_translated="ok")

    async with AsyncClient(target(app)) as client, running(make_node(target(app), work, concurrency=2)):
        subs = await client.submit_many([{**SPEC, "utterance_index": i} for i in range(8)])
        jobs = await asyncio.gather(*[client.wait(s.job_id, timeout=20) for s in subs])
        assert {j.state for j in jobs} == {JobState.SUCCEEDED}
        assert 1 <= peak <= 2


async def test_node_rejected_for_good_raises(app: Any) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await asyncio.wait_for(make_node(target(app), translate, node_id="has space").run(), 10)
    assert "node_id" in bad.value.message


async def test_node_resumes_its_lease_on_another_instance(make_app: AppFactory, settings: Settings) -> None:
    """The instance holding the node's stream stops while the handler runs; the node reconnects to
    the other one (one target, two addresses), resumes the lease, and its result is stored."""
    second = await make_app()
    first = create_server(settings)  # stopped by the test itself (App.stop is not to be called twice)
    await first.start()
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        return JobResult(text_translated=f"done on attempt {a.attempt}")

    node = make_node(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}", held)
    stopped = False
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(lambda: asyncio.sleep(0) if stopped else first.stop(grace=0))
        client = await stack.enter_async_context(AsyncClient(target(second)))
        await stack.enter_async_context(running(node))
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        assert node.instance_id == first.settings.instance_id
        await first.stop(grace=0)
        stopped = True
        release.set()
        job = await client.wait(job_id, timeout=20)
        assert (job.state, job.attempt, job.node_id) == (JobState.SUCCEEDED, 1, "gpu-1")
        assert job.result is not None and job.result.text_translated == "done on attempt 1"
        assert [n.instance_id for n in await client.list_nodes()] == [second.settings.instance_id]


async def test_node_drains_on_stop(app: Any) -> None:
    """stop(): no new work, the running job finishes and its result is confirmed, then run() returns.
    Needs the scheduler to confirm stored results (SchedulerMessage.confirmed)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        return JobResult(text_translated="finished while draining")

    node = make_node(target(app), held, concurrency=1, drain_timeout=20)
    async with AsyncClient(target(app)) as client:
        task = asyncio.create_task(node.run())
        first = (await client.submit(**SPEC, utterance_index=0)).job_id
        await asyncio.wait_for(started.wait(), 10)
        node.stop()
        # The one slot is taken, and the drain goes out before the result: the second job can only
        # reach the node if the drain is ignored.
        second = (await client.submit(**SPEC, utterance_index=1)).job_id
        release.set()
        await asyncio.wait_for(task, 20)
        assert node.unconfirmed == 0 and node.in_flight == 0
        assert (await client.get(first)).state is JobState.SUCCEEDED
        assert (await client.get(second)).state is JobState.QUEUED  # never given to the draining node



@contextlib.contextmanager
def logged(text: str) -> Iterator[asyncio.Event]:
    """An event set when the node runtime logs a line containing `text`."""
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    logger, watch = logging.getLogger("lingua_sdk.node"), Watch()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield seen
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


async def test_result_refused_unavailable_is_sent_again_and_confirmed(app: Any, redis: Any) -> None:
    """The store refuses the result (Redis out of memory: every write fails, reason STORE_UNAVAILABLE):
    the node keeps it, sends it again with backoff, and it is stored once the store is back."""
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        return JobResult(text_translated=f"attempt {a.attempt}")

    node = make_node(target(app), held)
    async with AsyncClient(target(app)) as client, running(node):
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        with logged("sending it again") as refused:
            await redis.config_set("maxmemory", 1)  # our private Redis: writes now fail with OOM
            try:
                release.set()
                await asyncio.wait_for(refused.wait(), 10)
                assert node.unconfirmed == 1  # refused "send again": kept
            finally:
                await redis.config_set("maxmemory", 0)
        job = await client.wait(job_id, timeout=20)
        assert (job.state, job.attempt) == (JobState.SUCCEEDED, 1)
        assert job.result is not None and job.result.text_translated == "attempt 1"
        assert node.refused_results == 0


async def test_result_answered_only_by_an_error_is_sent_again(app: Any, redis: Any) -> None:
    """The scheduler's store call fails as a whole (a failure report while Redis refuses writes): the
    message is answered only with SchedulerMessage.error. The node sends the outcome again on the same
    stream until it is stored."""
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        raise FatalError("audio is not speech", code="NOT_SPEECH")

    node = make_node(target(app), held)
    async with AsyncClient(target(app)) as client, running(node):
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        with logged("scheduler says: UNAVAILABLE") as answered:
            await redis.config_set("maxmemory", 1)
            try:
                release.set()
                await asyncio.wait_for(answered.wait(), 10)
                assert node.unconfirmed == 1
            finally:
                await redis.config_set("maxmemory", 0)
        job = await client.wait(job_id, timeout=20)
        assert (job.state, job.attempt) == (JobState.FAILED, 1)
        assert job.last_error is not None and job.last_error.code == "NOT_SPEECH"
        assert (node.unconfirmed, node.refused_results) == (0, 0)


async def test_handler_timeout_at_its_start_times_out_the_handler_not_the_stream(app: Any) -> None:
    """A handler that opens asyncio.timeout() before it first awaits: its own attempt times out and
    is reported; the node's stream stays up (one registration) and the retry succeeds."""

    async def bounded(a: Assignment) -> JobResult:
        async with asyncio.timeout(0.05 if a.attempt == 1 else 10):
            if a.attempt == 1:
                await asyncio.Event().wait()
            return JobResult(text_translated=f"attempt {a.attempt}")

    with logged("registered with instance") as registered:
        node = make_node(target(app), bounded)
        async with AsyncClient(target(app)) as client, running(node):
            job = await client.wait((await client.submit(**SPEC, max_attempts=3)).job_id, timeout=20)
            registered.clear()
            assert node.instance_id is not None  # still on its first stream
    assert (job.state, job.attempt) == (JobState.SUCCEEDED, 2)
    assert job.last_error is not None and job.last_error.code == "HANDLER_EXCEPTION"
    assert job.last_error.message.startswith("TimeoutError")
    assert not registered.is_set()


@pytest.mark.parametrize("finish", ["while cut", "after reconnecting"])
async def test_drain_after_reconnect_returns_promptly(app: Any, finish: str) -> None:
    """stop(), then the stream is cut while a job runs: the node comes back draining, its result is
    confirmed, and run() returns at once (not at the drain timeout)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        return JobResult(text_translated="drained")

    node = make_node(target(app), held, drain_timeout=60)
    async with AsyncClient(target(app)) as client:
        with logged("registered with instance") as registered:
            task = asyncio.create_task(node.run())
            job_id = (await client.submit(**SPEC)).job_id
            await asyncio.wait_for(started.wait(), 10)
            node.stop()
            registered.clear()
            node.disconnect()
            if finish == "while cut":
                release.set()
            else:
                await asyncio.wait_for(registered.wait(), 10)
                release.set()
            await asyncio.wait_for(task, 15)
        assert (node.unconfirmed, node.in_flight, node.refused_results) == (0, 0, 0)
        job = await client.get(job_id)
        assert (job.state, job.attempt) == (JobState.SUCCEEDED, 1)
        assert await client.list_nodes() == []


async def test_answers_settle_only_the_claim_they_are_about() -> None:
    """An answer names job id + lease token: an answer about an earlier claim of a job leaves the
    newer claim's result (and its running work) alone; a "send again" refusal keeps the result."""
    node = make_node("127.0.0.1:1", translate)

    def result(token: str) -> None:
        lease = pb.JobLease(job_id="j", attempt=2, lease_token=token)
        node._results[("j", token)] = _Result(pb.Completion(lease=lease, result=pb.JobResult(text_translated=token)))

    result("new")
    node._refused(pb.LeaseStatus(job_id="j", lease_token="old", error_code="FAILED_PRECONDITION", reason="STALE_LEASE"))
    node._confirmed(pb.LeaseStatus(job_id="j", lease_token="old", ok=True))
    assert node.unconfirmed == 1
    node._refused(pb.LeaseStatus(job_id="j", lease_token="new", error_code="UNAVAILABLE", reason="STORE_UNAVAILABLE"))
    assert node.unconfirmed == 1 and node._results[("j", "new")].timer is not None  # sent again later
    node._refused(pb.LeaseStatus(job_id="j", lease_token="new", error_code="FAILED_PRECONDITION",
                                 reason="RESULT_CONFLICT"))
    assert (node.unconfirmed, node.refused_results) == (0, 1)
    result("newer")
    node._confirmed(pb.LeaseStatus(job_id="j", lease_token="newer", ok=True))
    assert node.unconfirmed == 0


async def test_node_and_clients_take_a_token_callable(make_app: AppFactory, tmp_path: Path) -> None:
    """`token` may be a callable: asked for every new stream and every call, so a long-running node
    (or client) renews a token that expires. The node asks again when it reconnects; a client's call
    carries whatever token the callable gives at that moment."""
    secret = tmp_path / "hs.secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef-sdk-test\n")
    app = await make_app(auth_jwt_key=(str(secret),))
    asked: list[str] = []

    def node_token() -> str:
        asked.append("node")
        return mint(str(secret), "node", node_ids=["gpu-*"], ttl_s=60)

    fresh = mint(str(secret), "client", tenants=["acme"], ttl_s=60)
    expired = mint(str(secret), "client", tenants=["acme"], ttl_s=60, now=time.time() - 3600)
    current = [fresh]
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        return JobResult(text_translated="renewed")

    node = make_node(target(app), held, token=node_token)
    async with AsyncClient(target(app), token=lambda: current[0]) as client, running(node):
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        assert asked == ["node"]
        with logged("registered with instance") as registered:
            node.disconnect()
            await asyncio.wait_for(registered.wait(), 10)
        assert asked == ["node", "node"]  # the new stream asked for the current token
        release.set()
        assert (await client.wait(job_id, timeout=20)).state is JobState.SUCCEEDED
        current[0] = expired
        with pytest.raises(Unauthenticated):
            await client.get(job_id)
        current[0] = fresh  # renewed: the same client goes on
        assert (await client.get(job_id)).result == JobResult(text_translated="renewed")

    def blocking() -> JobState:
        with Client(target(app), token=lambda: current[0]) as sync_client:  # the blocking client too
            return sync_client.get(job_id).state

    assert await asyncio.to_thread(blocking) is JobState.SUCCEEDED
    current[0] = expired
    with pytest.raises(Unauthenticated):
        await asyncio.to_thread(blocking)


async def test_sigint_drains_and_a_second_signal_stops_at_once(app: Any) -> None:
    """SIGINT (as SIGTERM) drains: no new work, the running handler goes on. A second signal stops at
    once: the handler is cancelled and run() returns. The previous SIGINT handler is restored."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hangs(a: Assignment) -> JobResult:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return JobResult()

    before = signal.getsignal(signal.SIGINT)
    node = Node(target(app), node_id="gpu-1", pairs=["zh:en"], concurrency=2, handler=hangs, backoff=(0.05, 0.5))
    with logged("draining") as draining:
        async with AsyncClient(target(app)) as client:
            task = asyncio.create_task(node.run())
            await client.submit(**SPEC)
            await asyncio.wait_for(started.wait(), 10)
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(draining.wait(), 10)
            assert not task.done() and not cancelled.is_set()  # draining: the handler runs on
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(task, 10)
    assert cancelled.is_set()
    assert signal.getsignal(signal.SIGINT) is before


# -- the controls simulations use: abort(), disconnect(), silent, ModelUnavailable ------------------


async def test_abort_loses_the_work_and_the_job_goes_to_another_node(app: Any) -> None:
    """abort() is a crash: run() returns at once, the handler is cancelled, nothing is reported; the
    scheduler sees the stream gone and another node gets the job (attempt 2)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hangs(a: Assignment) -> JobResult:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return JobResult()

    crashed = make_node(target(app), hangs, node_id="crashes")
    async with AsyncClient(target(app)) as client:
        task = asyncio.create_task(crashed.run())
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        crashed.abort()
        await asyncio.wait_for(task, 5)
        assert cancelled.is_set() and crashed.instance_id is None
        async with running(make_node(target(app), translate, node_id="survivor")):
            job = await client.wait(job_id, timeout=20)
        assert (job.state, job.attempt, job.node_id) == (JobState.SUCCEEDED, 2, "survivor")


async def test_disconnect_reconnects_and_resumes_the_lease(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """disconnect() cuts the stream as a network failure would: the node registers again, holding
    the running job, whose result is stored from attempt 1."""
    caplog.set_level(logging.INFO, logger="lingua_sdk.node")
    started, release = asyncio.Event(), asyncio.Event()

    async def held(a: Assignment) -> JobResult:
        started.set()
        await release.wait()
        return JobResult(text_translated=f"attempt {a.attempt}")

    node = make_node(target(app), held)
    async with AsyncClient(target(app)) as client, running(node):
        job_id = (await client.submit(**SPEC)).job_id
        await asyncio.wait_for(started.wait(), 10)
        node.disconnect()
        release.set()
        job = await client.wait(job_id, timeout=20)
        assert (job.state, job.attempt) == (JobState.SUCCEEDED, 1)
        assert job.result is not None and job.result.text_translated == "attempt 1"
    registrations = [r for r in caplog.records if "registered with instance" in r.getMessage()]
    assert len(registrations) == 2


async def test_silent_node_loses_its_lease(app: Any) -> None:
    """silent: no heartbeats while the stream stays open; the lease expires and the job is requeued."""
    started = asyncio.Event()

    async def slow(a: Assignment) -> JobResult:
        if a.attempt == 1:
            started.set()
            await asyncio.Event().wait()
        return JobResult(text_translated=f"attempt {a.attempt}")

    node = make_node(target(app), slow)
    node.silent = True
    async with AsyncClient(target(app)) as client, running(node):
        job_id = (await client.submit(**SPEC, max_attempts=3)).job_id
        await asyncio.wait_for(started.wait(), 10)
        job = await client.wait(job_id, timeout=20)  # attempt 2 finishes at once: no heartbeat needed
    assert (job.state, job.attempt) == (JobState.SUCCEEDED, 2)
    assert job.last_error is not None and job.last_error.code == "LINGUA_LEASE_EXPIRED"


async def test_model_unavailable_hands_the_job_back(app: Any) -> None:
    """ModelUnavailable: reported in NodeMessage.unavailable; the job is requeued, not failed."""

    async def no_model_at_first(a: Assignment) -> JobResult:
        if a.attempt == 1:
            raise ModelUnavailable("loading")
        return JobResult(text_translated=f"attempt {a.attempt}")

    async with AsyncClient(target(app)) as client, running(make_node(target(app), no_model_at_first)):
        job = await client.wait((await client.submit(**SPEC, max_attempts=3)).job_id, timeout=20)
    assert (job.state, job.attempt) == (JobState.SUCCEEDED, 2)
    assert job.last_error is not None and job.last_error.code == "LINGUA_MODEL_UNAVAILABLE"


# -- eager handler start (lingua_sdk.node._eager) ---------------------------------------------------

EAGER = sys.version_info >= (3, 12)  # asyncio's eager tasks; 3.11 starts a plain Task per handler


async def test_eager_start_runs_the_handler_to_its_end() -> None:
    ran: list[str] = []

    async def at_once() -> None:
        ran.append("done")

    task = _eager(at_once())
    if EAGER:  # finished in its first step: no Task left to run
        assert task is None and ran == ["done"]
    else:
        assert task is not None and ran == []
        await task
    assert ran == ["done"]


async def test_eager_start_continues_a_suspended_handler_in_a_task() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def waits() -> None:
        steps.append("first")
        steps.append(await gate)
        await asyncio.sleep(0)  # a bare yield, then a timed sleep
        await asyncio.sleep(0.001)
        steps.append("end")

    task = _eager(waits())
    assert task is not None
    await asyncio.sleep(0)  # one loop turn: on 3.11 the Task takes its first step here
    assert steps == ["first"]
    gate.set_result("woken")
    await task
    assert steps == ["first", "woken", "end"]


@pytest.mark.parametrize("where", ["future", "bare yield"])
async def test_eager_start_cancel_reaches_the_suspended_handler(where: str) -> None:
    seen: list[str] = []

    async def long() -> None:
        try:
            if where == "future":
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(0)  # cancelled while its wake-up is scheduled: thrown in
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = _eager(long())
    assert task is not None
    if not EAGER:
        await asyncio.sleep(0)  # let the plain Task take its first step
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and task.cancelled()


async def test_eager_start_keeps_the_handlers_context_its_own() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="runtime")
    seen: list[str] = []

    async def sets(value: str) -> None:
        seen.append(var.get())
        var.set(value)
        await asyncio.sleep(0)
        seen.append(var.get())

    tasks = [_eager(sets("a")), _eager(sets("b"))]
    assert var.get() == "runtime"
    await asyncio.gather(*[t for t in tasks if t is not None])
    assert seen == ["runtime", "runtime", "a", "b"]


async def test_eager_start_a_timeout_entered_at_the_start_is_the_handlers_own() -> None:
    """asyncio.timeout() before the handler's first suspension cancels the handler, never the task
    that started it (the runtime's reader)."""

    async def bounded() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.Event().wait()

    task = _eager(bounded())
    assert task is not None
    ended = asyncio.Event()  # not `await task`: the reader does not await its handlers either
    task.add_done_callback(lambda _: ended.set())
    await ended.wait()  # a timeout that belonged to this task would cancel it here
    assert isinstance(task.exception(), TimeoutError)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_an_idle_node_answers_pings_and_keeps_its_stream(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """No job, so no heartbeat: only the answers to the scheduler's pings keep the stream. The test
    scheduler pings after 0.5 s of silence and ends a stream 1.5 s after an unanswered ping: 6 pings
    (over 3 s) outlast that twice over."""
    caplog.set_level(logging.INFO, logger="lingua_sdk.node")
    node = make_node(target(app), translate, node_id="idle-1")
    async with AsyncClient(target(app)) as client, running(node):
        deadline = time.monotonic() + 20
        while (session := app.nodes.sessions.get("idle-1")) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        while session.pulse.ping_id < 6:
            assert time.monotonic() < deadline, "too few pings"
            assert app.nodes.sessions.get("idle-1") is session and not session.pulse.dead
            await asyncio.sleep(0.05)
        assert [n.node_id for n in await client.list_nodes()] == ["idle-1"]
        assert app.nodes.sessions.get("idle-1") is session and node.instance_id == app.settings.instance_id
    assert len([r for r in caplog.records if "registered with instance" in r.getMessage()]) == 1


def test_submit_keywords_are_type_checked(tmp_path: Path) -> None:
    """`submit(**fields)` is typed with JobSpec's fields (JobFields): a type checker flags a misspelt or
    mistyped field, where `**Any` would pass it on to fail at run time."""
    user = tmp_path / "user.py"
    user.write_text(
        "from lingua_sdk import AsyncClient, Client\n"
        "with Client('127.0.0.1:1') as c:\n"
        "    c.submit(tenant='acme', session_id='s', src_lang='zh', tgt_lang='en')\n"
        "    c.submit(tenant_id='acme', session_id='s', src_lang='zh', tgt_lang='en', priority='high')\n"
        "    c.submit(tenant_id='acme', session_id='s', src_lang='zh', tgt_lang='en', priority=1, payload=b'x')\n"
        "async def main(a: AsyncClient) -> None:\n"
        "    await a.submit(tenant_id='acme', session_id='s', src_lang='zh')\n")
    # As an application in this virtualenv would run it: the SDK found as installed (scripts/_venv.sh
    # installs it as a plain path, which mypy follows, where an import hook would hide it).
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir",
                           str(tmp_path / "cache"), user.name], capture_output=True, text=True, cwd=tmp_path)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [3, 4, 7], done.stdout
    assert '"tenant"' in errors[0] and '"priority"' in errors[1] and '"tgt_lang"' in errors[2], done.stdout


def test_job_fields_name_every_field_of_a_job_spec() -> None:
    """JobFields (submit's keywords) and the JobSpec dataclass list the same fields, of the same types, the
    same required."""
    import dataclasses

    from lingua_sdk import JobFields, JobSpec
    fields = {f.name: f for f in dataclasses.fields(JobSpec)}
    assert set(JobFields.__annotations__) == set(fields)
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    hints = typing.get_type_hints(JobFields, include_extras=True)  # (the module's annotations are strings)
    assert {n for n, hint in hints.items() if typing.get_origin(hint) is typing.Required} == required
    assert typing.get_type_hints(JobFields) == typing.get_type_hints(JobSpec)  # (Required stripped)
