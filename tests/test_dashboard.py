"""The dashboard (server/dashboard.py) in a real browser: Debian's chromium (/usr/bin/chromium, which
scripts/test installs when missing) driven by Playwright, against real schedulers, real nodes (the SDK's
Node) and jobs submitted over gRPC. Plus its API's guards (auth, CSRF, host) and the one shared
snapshot producer, over plain HTTP.

Never `playwright install`: Playwright is only the driver here, the browser is the system's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from conftest import AppFactory
from helpers import spec, until
from lingua_scheduler.server.app import App, create_server
from lingua_scheduler.server.settings import Settings
from lingua_sdk import Assignment, FatalError, Node, pb, pb_grpc
from playwright.async_api import Browser, Page, async_playwright, expect
from test_sdk_python import make_node, running, target, translate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 15_000  # for the page to show what the scheduler did (live updates come about once a second)
POOL = '#pools tr[data-pool="zh:en"]'


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the dashboard's browser tests need Debian's chromium. scripts/test "
                    "installs it (apt-get install -y chromium, as root); install it so, and run the tests again")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = await context.new_page()
    yield opened
    await context.close()


def url(app: App, path: str = "/") -> str:
    assert app.http is not None
    return f"http://127.0.0.1:{app.http.port}{path}"


@contextlib.asynccontextmanager
async def grpc_stub(app: App) -> AsyncIterator[pb_grpc.SchedulerStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.SchedulerStub(channel)


def sdk_node(app: App, handler: Any, **kw: Any) -> Node:
    return make_node(target(app), handler, concurrency=2, **kw)


async def submit(stub: pb_grpc.SchedulerStub, **overrides: Any) -> str:
    done = await stub.Submit(pb.SubmitRequest(jobs=[spec(**overrides)]))
    return done.results[0].job_id


async def search_session(page: Page, tenant: str, session: str) -> None:
    await page.fill("#search-tenant", tenant)
    await page.fill("#search-session", session)
    await page.click("#search-form button[type=submit]")


# -- in the browser -----------------------------------------------------------------------------------


async def test_a_job_from_submit_to_done_in_pools_nodes_and_search(make_app: AppFactory, page: Page) -> None:
    app = await make_app(http_listen="127.0.0.1:0")
    await page.goto(url(app))
    await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    async with grpc_stub(app) as stub:
        job_id = await submit(stub, session_id="talk-1", utterance_index=3)
        await expect(page.locator(f'{POOL} [data-field="queued"]')).to_have_text("1", timeout=WAIT_MS)
        await search_session(page, "acme", "talk-1")
        card = page.locator(f'article.job[data-job="{job_id}"]')
        await expect(card.locator('[data-field="state"]')).to_have_text("QUEUED", timeout=WAIT_MS)

        started = asyncio.Event()
        release = asyncio.Event()

        async def held(a: Assignment) -> dict[str, Any]:
            started.set()
            await release.wait()
            return await translate(a)

        async with running(sdk_node(app, held, labels={"gpu": "a100"})):
            await asyncio.wait_for(started.wait(), 20)
            node = page.locator('#nodes tr[data-node="gpu-1"]')
            await expect(node.locator('[data-field="load"]')).to_contain_text("1 / 2", timeout=WAIT_MS)
            await expect(node.locator('[data-field="labels"]')).to_have_text("gpu=a100")
            await expect(node.locator('[data-field="state"]')).to_have_text("serving")
            await expect(page.locator(f'{POOL} [data-field="running"]')).to_have_text("1", timeout=WAIT_MS)
            await expect(card.locator('[data-field="state"]')).to_have_text("RUNNING", timeout=WAIT_MS)
            release.set()
            # The search result follows the job (refreshed with the live updates) to its end.
            await expect(card.locator('[data-field="state"]')).to_have_text("SUCCEEDED", timeout=WAIT_MS)
            await expect(page.locator(f'{POOL} [data-field="succeeded"]')).to_have_text("1", timeout=WAIT_MS)
    events = await card.locator("table.timeline tbody tr").evaluate_all("rows => rows.map(r => r.dataset.event)")
    assert events[0] == "submit" and "complete" in events[-1], events
    assert await card.locator("table.timeline tbody tr").last.locator("td").nth(4).text_content() == "gpu-1"


async def test_failed_job_listed_and_retried_from_the_page(make_app: AppFactory, page: Page) -> None:
    app = await make_app(http_listen="127.0.0.1:0")
    seen: set[str] = set()

    async def fails_first(a: Assignment) -> dict[str, Any]:
        if a.job_id not in seen:
            seen.add(a.job_id)
            raise FatalError("the model cannot read this audio", code="BAD_AUDIO")
        return await translate(a)

    await page.goto(url(app))
    async with grpc_stub(app) as stub, running(sdk_node(app, fails_first)):
        job_id = await submit(stub, session_id="talk-2")
        row = page.locator(f'#failed tr[data-job="{job_id}"]')
        await expect(row.locator('[data-field="error"]')).to_have_text(
            "BAD_AUDIO: the model cannot read this audio", timeout=WAIT_MS)
        await expect(page.locator(f'{POOL} [data-field="failed"]')).to_have_text("1", timeout=WAIT_MS)
        await row.locator("button.retry").click()
        # The retried job is shown in the search panel, runs again and succeeds; it leaves the failed list.
        card = page.locator(f'article.job[data-job="{job_id}"]')
        await expect(card.locator('[data-field="state"]')).to_have_text("SUCCEEDED", timeout=WAIT_MS)
        await expect(row).to_have_count(0, timeout=WAIT_MS)
        job = await stub.GetJob(pb.GetJobRequest(job_id=job_id))
        assert job.state == pb.JOB_STATE_SUCCEEDED
    events = await card.locator("table.timeline tbody tr").evaluate_all("rows => rows.map(r => r.dataset.event)")
    failed_at = next(i for i, e in enumerate(events) if "fail" in e)
    assert events[-1].startswith("complete") and failed_at < len(events) - 1, events


@pytest.mark.single_redis
async def test_pause_and_resume_a_pool_from_the_page(make_app: AppFactory, page: Page) -> None:
    app = await make_app(http_listen="127.0.0.1:0")
    await page.goto(url(app))
    async with grpc_stub(app) as stub, running(sdk_node(app, translate)):
        pool = page.locator(POOL)  # a pool with a node is listed before it has jobs
        await expect(pool.locator('[data-field="nodes"]')).to_have_text("1", timeout=WAIT_MS)
        await pool.locator("button.pause").click()
        await expect(pool.locator('[data-field="dispatch"]')).to_have_text("paused", timeout=WAIT_MS)
        await expect(pool.locator("button.pause")).to_have_text("Resume")
        job_id = await submit(stub, session_id="talk-3")
        await expect(pool.locator('[data-field="queued"]')).to_have_text("1", timeout=WAIT_MS)
        # Nothing is dispatched: two more snapshots (each read after the submit) still show it queued,
        # and the job never left QUEUED (a dispatch takes milliseconds when the pool runs).
        assert app.dashboard is not None
        reads = app.dashboard.feed.reads
        await until(lambda: app.dashboard is not None and app.dashboard.feed.reads >= reads + 2, 10, "two snapshots")
        await expect(pool.locator('[data-field="queued"]')).to_have_text("1")
        await expect(pool.locator('[data-field="dispatch"]')).to_have_text("paused")
        assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_QUEUED
        await pool.locator("button.pause").click()
        await expect(pool.locator('[data-field="dispatch"]')).to_have_text("dispatching", timeout=WAIT_MS)
        await expect(pool.locator('[data-field="succeeded"]')).to_have_text("1", timeout=WAIT_MS)
        assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_SUCCEEDED


# -- with authentication ----------------------------------------------------------------------------


def token(secret: str, role: str, ttl: float = 600, **claims: Any) -> str:
    return jwt.encode({"role": role, "exp": int(time.time() + ttl), **claims}, secret, algorithm="HS256")


@pytest.fixture
def secret_file(tmp_path: Path) -> tuple[str, str]:
    secret = os.urandom(32).hex()
    path = tmp_path / "k1.secret"
    path.write_text(secret)
    return str(path), secret


@pytest.mark.single_redis
async def test_with_auth_the_api_wants_an_admin_token_and_the_page_asks_for_one(
        make_app: AppFactory, page: Page, secret_file: tuple[str, str]) -> None:
    key, secret = secret_file
    app = await make_app(http_listen="127.0.0.1:0", auth_jwt_key=(key,))
    admin = token(secret, "admin")
    async with aiohttp.ClientSession() as http:
        for path in ("/api/stats", "/api/nodes", "/api/jobs?state=FAILED", "/api/events"):
            async with http.get(url(app, path)) as r:
                assert r.status == 401, path
                assert (await r.json())["error"]["code"] == "UNAUTHENTICATED"
        client = token(secret, "client", tenants=["*"])
        async with http.get(url(app, "/api/nodes"), headers={"Authorization": f"Bearer {client}"}) as r:
            assert r.status == 403 and "admin" in (await r.json())["error"]["message"]
        async with http.get(url(app, "/api/nodes"), headers={"Authorization": f"Bearer {token(secret, 'admin', ttl=-5)}"}) as r:
            assert r.status == 401 and "expired" in (await r.json())["error"]["message"]
        async with http.post(url(app, "/api/pools/zh:en/pause"), headers={"Authorization": f"Bearer {admin}"}) as r:
            assert r.status == 403 and "X-Lingua-Dashboard" in (await r.json())["error"]["message"]  # CSRF guard
        async with http.get(url(app, "/api/nodes"), headers={"Authorization": f"Bearer {admin}"}) as r:
            assert r.status == 200 and await r.json() == {"nodes": []}
        async with http.get(url(app, "/metrics")) as r:
            assert r.status == 200  # Prometheus needs no token
        # An event stream ends when the token that opened it expires (the page then asks for a new one).
        async with http.get(url(app, "/api/events"), headers={"Authorization": f"Bearer {token(secret, 'admin', ttl=2)}"}) as r:
            assert r.status == 200
            assert (await asyncio.wait_for(r.content.read(), 10)).endswith(b"event: expired\ndata: {}\n\n")

    await page.goto(url(app))
    await expect(page.locator("#sign-in")).to_be_visible(timeout=WAIT_MS)
    assert await page.locator("#board").is_hidden()
    await page.fill("#token", token(secret, "node", node_ids=["*"]))
    await page.click("#sign-in-form button[type=submit]")
    await expect(page.locator("#sign-in-error")).to_contain_text("role admin", timeout=WAIT_MS)
    await page.fill("#token", admin)
    await page.click("#sign-in-form button[type=submit]")
    await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)  # the cookie opened the stream
    cookie = next(c for c in await page.context.cookies() if c["name"].startswith("lingua_dashboard"))
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/api/"
    assert cookie["expires"] == pytest.approx(time.time() + 600, abs=30)
    async with grpc_stub(app) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError):
            await submit(anonymous)  # gRPC wants its token too
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        await stub.Submit(pb.SubmitRequest(jobs=[spec()]), metadata=[("authorization", f"Bearer {admin}")])
    await expect(page.locator(f'{POOL} [data-field="queued"]')).to_have_text("1", timeout=WAIT_MS)
    await page.reload()  # the token is kept for the tab: no second sign-in
    await expect(page.locator(f'{POOL} [data-field="queued"]')).to_have_text("1", timeout=WAIT_MS)
    assert await page.locator("#sign-in").is_hidden()
    await page.click("#sign-out")
    await expect(page.locator("#sign-in")).to_be_visible()
    assert not [c for c in await page.context.cookies() if c["name"].startswith("lingua_dashboard")]


# -- the API over plain HTTP --------------------------------------------------------------------------


@pytest.mark.single_redis
async def test_one_snapshot_producer_whatever_the_number_of_browsers(make_app: AppFactory) -> None:
    app = await make_app(http_listen="127.0.0.1:0")
    assert app.dashboard is not None
    feed = app.dashboard.feed

    async def snapshots(http: aiohttp.ClientSession, count: int) -> list[bytes]:
        got: list[bytes] = []
        async with http.get(url(app, "/api/events")) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            async for line in r.content:
                if line.startswith(b"data: {") and b'"stats"' in line:
                    got.append(line)
                    if len(got) == count:
                        return got
        raise AssertionError("the stream ended")

    start = feed.reads
    async with aiohttp.ClientSession() as http:
        streams = await asyncio.gather(*(snapshots(http, 3) for _ in range(5)))
    assert all(len(s) == 3 for s in streams)
    # Five streams of three snapshots: one read per snapshot interval, not one per stream.
    assert feed.reads - start <= 5, feed.reads - start
    await until(lambda: feed._task is None or feed._task.done(), 10, "the producer to stop with no one listening")
    # A stream still open when the server stops is ended by it (the stop does not wait for the browser).
    assert app.http is not None
    async with aiohttp.ClientSession() as http, http.get(url(app, "/api/events")) as r:
        async for line in r.content:
            if line.startswith(b"event: snapshot"):
                break
        stopping = asyncio.create_task(app.http.stop())
        await asyncio.wait_for(r.content.read(), 5)
        await asyncio.wait_for(stopping, 5)


@pytest.mark.single_redis
async def test_api_guards_without_auth(make_app: AppFactory, settings: Settings) -> None:
    app = await make_app(http_listen="127.0.0.1:0")
    async with aiohttp.ClientSession() as http:
        # A page of another site whose name points at 127.0.0.1 (DNS rebinding) names its own host.
        async with http.get(url(app, "/api/nodes"), headers={"Host": "evil.example:80"}) as r:
            error = (await r.json())["error"]
            assert r.status == 403 and "loopback" in error["message"]
            assert (error["code"], error["reason"]) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
        async with http.get(url(app, "/"), headers={"Host": "evil.example"}) as r:
            assert r.status == 403 and "loopback" in await r.text()
        async with http.get(url(app, "/metrics"), headers={"Host": "evil.example"}) as r:
            assert r.status == 200  # metrics are no secret
        async with http.post(url(app, "/api/pools/zh:en/pause"), headers={"X-Lingua-Dashboard": "1",
                                                                            "Origin": "http://evil.example"}) as r:
            assert r.status == 403 and "origin" in (await r.json())["error"]["message"]
        async with http.get(url(app, "/api/pools/zh:en/pause")) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"  # changes are POST only
            assert (await r.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
        async with http.get(url(app, "/api/jobs/not-a-job")) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "INVALID_ARGUMENT"
        async with http.get(url(app, "/api/jobs?colour=red")) as r:
            assert r.status == 400 and "colour" in (await r.json())["error"]["message"]
        async with http.get(url(app, "/")) as r:
            assert r.status == 200 and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert "<title>Lingua Scheduler</title>" in await r.text()
        for asset in ("/static/app.js", "/static/style.css"):
            async with http.get(url(app, asset)) as r:
                assert r.status == 200, asset
    # Without auth on a port others can reach, the dashboard is left off (/metrics is still served).
    exposed = create_server(dataclasses.replace(settings, http_listen="0.0.0.0:0"))
    assert exposed.http is not None and exposed.dashboard is None
    trusted = create_server(dataclasses.replace(settings, http_listen="0.0.0.0:0", insecure=True))
    assert trusted.dashboard is not None and not trusted.dashboard.loopback_only
    for unstarted in (exposed, trusted):
        await unstarted.redis.aclose()


async def test_the_failed_list_shows_the_latest_to_fail_first(make_app: AppFactory) -> None:
    """Ordered by when each job failed, not when it was submitted: an old job failing now comes first."""
    import json

    from lingua_scheduler.server.calls import ReadClock
    from lingua_scheduler.server.store import Store

    app = await make_app(http_listen="127.0.0.1:0")
    assert app.dashboard is not None
    store: Store = app.store
    old, new = [s.job_id for s in await store.submit([spec(utterance_index=i) for i in range(2)])]
    await store.claim("n1", [(old, "t-old"), (new, "t-new")])
    await store.fail(new, "n1", "t-new", pb.JobError(code="E", message="first to fail"))
    first = (await store.record(new)).updated

    async def later() -> bool:  # (the two failures in different milliseconds)
        return int(await store.scripts.call(store.redis, ReadClock().call())) > first

    await until(later, 5, "Redis' clock to pass the first failure")
    await store.fail(old, "n1", "t-old", pb.JobError(code="E", message="last to fail"))
    snapshot = json.loads(await app.dashboard.snapshot())
    assert [job["job_id"] for job in snapshot["failed"]["jobs"]] == [old, new]


@pytest.mark.single_redis
async def test_an_event_stream_ends_when_its_tokens_key_is_removed(make_app: AppFactory, tmp_path: Path) -> None:
    """A SIGHUP that removes the key of the token that opened an event stream ends the stream (as it
    ends gRPC streams), at the next snapshot, not at the token's expiry."""
    secrets = {}
    for name in ("k1", "k2"):
        secrets[name] = os.urandom(32).hex()
        (tmp_path / f"{name}.secret").write_text(secrets[name])
    app = await make_app(http_listen="127.0.0.1:0", auth_jwt_key=tuple(str(tmp_path / f"{n}.secret") for n in secrets))
    assert app.auth is not None
    admin = jwt.encode({"role": "admin", "exp": int(time.time() + 600)}, secrets["k1"], algorithm="HS256",
                       headers={"kid": "k1"})
    async with aiohttp.ClientSession() as http, \
            http.get(url(app, "/api/events"), headers={"Authorization": f"Bearer {admin}"}) as r:
        assert r.status == 200
        first = await asyncio.wait_for(r.content.readuntil(b"event: snapshot"), 10)
        assert first.endswith(b"event: snapshot")
        (tmp_path / "k1.secret").unlink()  # the operator revokes k1, then SIGHUP
        assert app.auth.reload()
        rest = await asyncio.wait_for(r.content.read(), 10)
        assert rest.endswith(b"event: expired\ndata: {}\n\n")
