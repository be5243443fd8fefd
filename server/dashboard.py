"""The live dashboard on the operations HTTP port (server/http.py): the page at /, its files shipped in
the package (server/static/: plain HTML, JavaScript and CSS, no build step), and a JSON API under /api/
over Admin (server/admin.py), the node registry and the jobs' event lists. Messages are written with
protobuf's JSON mapping: field names as in the proto, enums by name, int64 as strings.

Live updates: GET /api/events is a server-sent-events stream of snapshots (pool stats, nodes, recent
failed jobs), about one a second. One producer per instance reads them, once per interval whatever the
number of browsers, and only while one is connected.

Security (docs/operations.md, "Dashboard"):
- Without --auth-jwt-key the API is open, so it is served on loopback only: on a --http-listen that is
  not a loopback address it is off (/metrics stays) unless --insecure; and a request must name a
  loopback host (a page of another site, its name re-pointed at 127.0.0.1, cannot read it).
- With --auth-jwt-key every /api/ call needs a token of role admin: `Authorization: Bearer <token>`, or
  the cookie POST /api/session sets from one (EventSource cannot send headers): HttpOnly,
  SameSite=Strict, Path=/api/, expiring with the token; it holds the token itself, so every instance
  verifies it as it verifies the header, and a removed key stops it at once.
- Only POST changes anything, and a POST needs the header X-Lingua-Dashboard (a form of another site
  cannot send it, and a script of another site would need a CORS preflight, which is never granted) and,
  when the browser sends one, an Origin of this host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from lingua_sdk import pb

from . import auth, validate
from .admin import Admin
from .auth import AUTH_OFF, Caller, Role, Verifier
from .errors import InvalidArgument, PermissionDenied, SchedulerError, Unauthenticated
from .http import HttpServer
from .node import NodeSessions, node_info_pb
from .service import job_pb, scheduler_error, watch_event_pb
from .settings import Settings, is_local, is_loopback_name
from .store import Store
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

STATIC = Path(__file__).with_name("static")
CSRF_HEADER = "X-Lingua-Dashboard"
COOKIE = "lingua_dashboard_{port}"  # per port: two instances on one host keep their own sign-in
SNAPSHOT_INTERVAL_S = 1.0
FAILED_SHOWN = 20  # failed jobs in each snapshot, the latest to fail first
FAILED_READ = 100  # of the newest failed jobs (ListJobs orders by creation): those sorted by when they failed
# The page's own files only: no inline script, no other origin, never framed (a pause button in a frame
# of another site could be clicked by trickery).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
EVERYONE: Callable[[str], bool] = lambda _tenant: True  # noqa: E731  # the admin sees every tenant's jobs


def as_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def job_json(job: pb.Job, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A job without its bulk (payload, audio), with its timeline when `events` are given."""
    if job.spec.payload or job.result.tts_audio:
        job = pb.Job.FromString(job.SerializeToString())
        job.spec.ClearField("payload")
        job.result.ClearField("tts_audio")
    out = as_json(job)
    if events is not None:
        out["timeline"] = [as_json(watch_event_pb(job.job_id, e)) for e in events]
    return out


def parse(fields: dict[str, Any], message: M) -> M:
    """`fields` (a query string or a JSON body) into `message`; INVALID_ARGUMENT naming what is wrong."""
    try:
        return json_format.ParseDict(fields, message)
    except json_format.ParseError as err:
        raise InvalidArgument("request", str(err)) from None


def error_body(err: BaseException) -> web.Response:
    """An error as JSON, with the HTTP status of its gRPC status; the unexpected is logged."""
    error = scheduler_error(err)
    if error.status is grpc.StatusCode.INTERNAL:
        log.error("dashboard API call failed", exc_info=err)
    headers = {"WWW-Authenticate": "Bearer"} if error.status is grpc.StatusCode.UNAUTHENTICATED else None
    return web.json_response({"error": {"code": error.status.name, "reason": error.reason, "message": str(error)}},
                             status=HTTP_STATUS.get(error.status, 500), headers=headers)


def _loopback_host(host: str) -> bool:
    """Whether a Host header ("name", "name:port", "[v6]:port") names this machine's loopback."""
    return is_loopback_name(host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0])


class Feed:
    """Snapshots for every subscriber from one producer: a task that runs while anyone subscribes and
    reads once per interval, whatever their number. A subscriber holds the latest snapshot only (a slow
    one skips, it never queues); None ends its stream (the server stops)."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], interval: float = SNAPSHOT_INTERVAL_S) -> None:
        self._read = read
        self.interval = interval
        self.reads = 0  # snapshots read: the tests count them against the subscribers served
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._latest: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[bytes | None]]:
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        if self._closed:
            inbox.put_nowait(None)
        elif self._task is not None and not self._task.done() and self._latest is not None:
            inbox.put_nowait(self._latest)  # at most an interval old
        self._subscribers.add(inbox)
        if not self._closed and (self._task is None or self._task.done()):
            # As the admin, whoever subscribed first: the snapshots are every subscriber's.
            self._task = asyncio.get_running_loop().create_task(self._run(), context=auth.open_context())
        try:
            yield inbox
        finally:
            self._subscribers.discard(inbox)

    def _offer(self, inbox: asyncio.Queue[bytes | None], item: bytes | None) -> None:
        if inbox.full():
            inbox.get_nowait()
        inbox.put_nowait(item)

    async def _run(self) -> None:
        try:
            while self._subscribers:
                self._latest = await self._read()
                self.reads += 1
                for inbox in self._subscribers:
                    self._offer(inbox, self._latest)
                await asyncio.sleep(self.interval)  # the feed's period
        finally:
            self._latest = None

    async def close(self) -> None:
        self._closed = True
        for inbox in self._subscribers:
            self._offer(inbox, None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Dashboard:
    def __init__(self, admin: Admin, nodes: NodeSessions, store: Store, settings: Settings,
                 verifier: Verifier | None) -> None:
        self.admin = admin
        self.nodes = nodes
        self.store = store
        self.settings = settings
        self.verifier = verifier
        # An open API on loopback answers requests naming a loopback host only (DNS rebinding).
        self.loopback_only = verifier is None and is_local(settings.http_listen)
        self.feed = Feed(self.snapshot)
        self._failing = {name: ThrottledWarning(log) for name in ("stats", "nodes", "failed")}

    def mount(self, app: web.Application) -> None:
        app.middlewares.append(self._guard)
        app.on_shutdown.append(lambda _app: self.feed.close())
        app.router.add_get("/", self._page)
        app.router.add_static("/static/", STATIC, append_version=False)
        app.router.add_get("/api/session", self._session_state)
        app.router.add_post("/api/session", self._sign_in)
        app.router.add_post("/api/session/end", self._sign_out)
        app.router.add_get("/api/stats", self._stats)
        app.router.add_get("/api/nodes", self._nodes)
        app.router.add_get("/api/jobs", self._jobs)
        app.router.add_get("/api/jobs/{job_id:[^/]+}", self._job)
        app.router.add_post("/api/jobs/{job_id:[^/]+}/retry", self._retry)
        app.router.add_post("/api/pools/{pool:[^/]+}/pause", self._pause)
        app.router.add_post("/api/pools/{pool:[^/]+}/resume", self._resume)
        app.router.add_get("/api/events", self._events)

    # -- the guard: host, CSRF, caller ------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            if request.path == "/" or request.path.startswith("/static/"):
                try:
                    self._check_host(request)
                except PermissionDenied as err:
                    return web.Response(status=403, text=f"{err}\n")
            return await handler(request)
        try:
            self._check_host(request)
            if request.method == "POST":
                self._check_csrf(request)
            if request.path == "/api/session":  # says whether auth is on; POST verifies its own token
                return await handler(request)
            with auth.acting_as(self._caller(request)):
                return await handler(request)
        except web.HTTPException as err:  # no such route, or not this method: JSON like every API answer
            if err.status < 400:
                raise
            return web.json_response({"error": {"code": err.reason.upper().replace(" ", "_"), "reason": "",
                                                "message": f"{request.method} {request.path}: {err.reason}"}},
                                     status=err.status, headers={k: v for k, v in err.headers.items() if k == "Allow"})
        except Exception as err:
            return error_body(err)

    def _check_host(self, request: web.Request) -> None:
        if self.loopback_only and not _loopback_host(request.host):
            raise PermissionDenied(f"host: {request.host!r} is not a loopback name; without --auth-jwt-key the "
                                   "dashboard answers on loopback only (http://127.0.0.1:PORT/)")

    def _check_csrf(self, request: web.Request) -> None:
        if request.headers.get(CSRF_HEADER) != "1":
            raise PermissionDenied(f"{CSRF_HEADER}: a POST needs this header (set to 1), which pages of other "
                                   "sites cannot send")
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise PermissionDenied(f"origin: {origin!r} is not this dashboard's")

    def _cookie(self, request: web.Request) -> str:
        return COOKIE.format(port=request.url.port or 0)

    def _verify(self, authorization: str | None) -> Caller:
        assert self.verifier is not None
        caller = self.verifier.verify(authorization)
        if caller.role is not Role.ADMIN:
            raise PermissionDenied(f"authorization: the dashboard needs a token of role admin, not {caller.role}")
        return caller

    def _caller(self, request: web.Request) -> Caller:
        if self.verifier is None:
            return AUTH_OFF
        authorization = request.headers.get("Authorization")
        if authorization is None and (token := request.cookies.get(self._cookie(request))):
            authorization = f"Bearer {token}"
        if authorization is None:
            raise Unauthenticated("authorization: the dashboard API needs an admin token "
                                  "(Authorization: Bearer <token>, or the cookie POST /api/session sets)")
        return self._verify(authorization)

    # -- the page and the session -----------------------------------------------------------------

    async def _page(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    async def _session_state(self, request: web.Request) -> web.Response:
        """Whether the API needs a token, and whether this browser's cookie holds a valid one."""
        if self.verifier is None:
            return web.json_response({"auth": False, "signed_in": True})
        try:
            caller = self._caller(request)
        except SchedulerError:
            return web.json_response({"auth": True, "signed_in": False})
        return web.json_response({"auth": True, "signed_in": True, "expires_at": _iso(caller.expires * 1000)})

    async def _sign_in(self, request: web.Request) -> web.Response:
        """Bearer token in, cookie out (for EventSource): the cookie holds the token and expires with it."""
        if self.verifier is None:
            return web.json_response({"auth": False, "signed_in": True})
        caller = self._verify(request.headers.get("Authorization"))
        _scheme, _, token = request.headers["Authorization"].partition(" ")
        response = web.json_response({"auth": True, "signed_in": True, "expires_at": _iso(caller.expires * 1000)})
        response.set_cookie(self._cookie(request), token.strip(), max_age=max(1, int(caller.expires - time.time())),
                            path="/api/", httponly=True, samesite="Strict")
        return response

    async def _sign_out(self, request: web.Request) -> web.Response:
        response = web.json_response({"auth": self.verifier is not None, "signed_in": False})
        response.del_cookie(self._cookie(request), path="/api/")
        return response

    # -- reads -------------------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        stats = await self.admin.get_stats(parse(dict(request.query), pb.GetStatsRequest()))
        return web.json_response(as_json(stats))

    async def _nodes(self, _request: web.Request) -> web.Response:
        return web.json_response({"nodes": await self.node_list()})

    async def node_list(self) -> list[dict[str, Any]]:
        """ListNodes' nodes, each with when its registry entry was last renewed (its last proof of life)."""
        entries = sorted(await self.nodes.node_entries(), key=lambda e: e.node_id)
        return [as_json(node_info_pb(e)) | {"last_seen": _iso(e.seen_ms)} for e in entries]

    async def _jobs(self, request: web.Request) -> web.Response:
        """ListJobs; with timeline=1 each job carries its state changes too (one more round trip)."""
        query = dict(request.query)
        timeline = query.pop("timeline", "") in ("1", "true")
        if query.get("state") and not query["state"].startswith("JOB_STATE_"):
            query["state"] = f"JOB_STATE_{query['state'].upper()}"
        found = await self.admin.list_jobs(parse(query, pb.ListJobsRequest()))
        return web.json_response(await self.jobs_json(found, timeline))

    async def jobs_json(self, found: pb.ListJobsResponse, timeline: bool) -> dict[str, Any]:
        timelines = await self.store.timelines([job.job_id for job in found.jobs]) if timeline else None
        return {"jobs": [job_json(job, timelines[i] if timelines else None) for i, job in enumerate(found.jobs)],
                "next_page_token": found.next_page_token}

    async def _job(self, request: web.Request) -> web.Response:
        """One job and its timeline (every state change: time, event, state, node, error)."""
        job_id = request.match_info["job_id"]
        validate.job_id(job_id, self.settings)
        view, (events,) = await asyncio.gather(self.store.get(job_id, EVERYONE), self.store.timelines([job_id]))
        return web.json_response({"jobs": [job_json(job_pb(view), events)], "next_page_token": ""})

    # -- changes (POST) ----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise InvalidArgument("body", "not JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgument("body", "a JSON object is expected")
        return body

    async def _retry(self, request: web.Request) -> web.Response:
        fields = await self._body(request) | {"job_id": request.match_info["job_id"]}
        job = await self.admin.retry_job(parse(fields, pb.RetryJobRequest()))
        return web.json_response(job_json(job))

    async def _pause(self, request: web.Request) -> web.Response:
        fields = await self._body(request) | {"pool": request.match_info["pool"]}
        state = await self.admin.pause_pool(parse(fields, pb.PausePoolRequest()))
        return web.json_response(as_json(state))

    async def _resume(self, request: web.Request) -> web.Response:
        fields = await self._body(request) | {"pool": request.match_info["pool"]}
        state = await self.admin.resume_pool(parse(fields, pb.ResumePoolRequest()))
        return web.json_response(as_json(state))

    # -- live updates ------------------------------------------------------------------------------

    async def snapshot(self) -> bytes:
        """Stats, nodes and the latest jobs to fail, as one JSON text; a part that cannot be read carries
        its error instead (the others are still shown)."""
        async def stats() -> Any:
            return as_json(await self.admin.get_stats(pb.GetStatsRequest()))

        async def failed() -> Any:
            found = await self.admin.list_jobs(pb.ListJobsRequest(state=pb.JOB_STATE_FAILED, page_size=FAILED_READ))
            latest = sorted(found.jobs, key=lambda job: job.updated_at.ToMilliseconds(), reverse=True)[:FAILED_SHOWN]
            return await self.jobs_json(pb.ListJobsResponse(jobs=latest), timeline=False)

        parts = await asyncio.gather(stats(), self.node_list(), failed(), return_exceptions=True)
        out: dict[str, Any] = {"at": _iso(time.time() * 1000)}
        for name, part in zip(("stats", "nodes", "failed"), parts, strict=True):
            if isinstance(part, BaseException):
                if not isinstance(part, Exception):
                    raise part
                error = scheduler_error(part)
                if error.status is grpc.StatusCode.INTERNAL:  # every second while it lasts: throttled
                    self._failing[name]("dashboard snapshot: %s could not be read: %r", name, part)
                out[name] = {"error": {"code": error.status.name, "reason": error.reason, "message": str(error)}}
            else:
                out[name] = part
        return json.dumps(out, separators=(",", ":")).encode()

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `snapshot` about once a second; `expired` when the token that opened the
        stream runs out (the page then asks for a new one)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        left = auth.expires_in()  # the caller's token's
        deadline = asyncio.get_running_loop().time() + left if math.isfinite(left) else None
        # Known to the verifier as an open stream: a SIGHUP that removes its token's key revokes it
        # (it ends at the next snapshot, within about a second).
        caller = auth.current()  # verified by the middleware (acting_as)
        opened = self.verifier.opened(caller) if self.verifier is not None and caller is not None else None
        try:
            async with self.feed.subscribe() as inbox:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            snapshot = await inbox.get()
                    except TimeoutError:
                        snapshot = b""
                    if snapshot is None:
                        break
                    if not snapshot or (opened is not None and opened.revoked):
                        await response.write(b"event: expired\ndata: {}\n\n")
                        break
                    try:
                        await response.write(b"event: snapshot\ndata: " + snapshot + b"\n\n")
                    except ConnectionError:
                        break  # the browser went away
        finally:
            if opened is not None and self.verifier is not None:
                self.verifier.closed(opened)
        return response


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def mount(http: HttpServer, admin: Admin, nodes: NodeSessions, store: Store, settings: Settings,
          verifier: Verifier | None) -> Dashboard | None:
    """Add the dashboard to the HTTP port. Without authentication on a non-loopback --http-listen it is
    left off (its API could pause pools and retry jobs for anyone who reaches the port), unless --insecure."""
    if verifier is None and not settings.insecure and not is_local(settings.http_listen):
        log.warning("dashboard off: --http-listen %s is not a loopback address and --auth-jwt-key is not given "
                    "(anyone reaching the port could pause pools and retry jobs); /metrics is served. Give "
                    "--auth-jwt-key, listen on 127.0.0.1, or add --insecure on a network you trust "
                    "(docs/operations.md, Dashboard)", settings.http_listen)
        return None
    dashboard = Dashboard(admin, nodes, store, settings, verifier)
    dashboard.mount(http.app)
    return dashboard
