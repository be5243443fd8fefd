"""The operations HTTP port (`--http-listen`, default 127.0.0.1:8081; empty turns it off): Prometheus
metrics at /metrics, and the routes other modules add (the dashboard at /, its JSON API under /api/).

One aiohttp server on the scheduler's own event loop, so handlers read the instance's state directly.
Each App has its own prometheus CollectorRegistry (several servers can live in one process: tests)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .throttle import ThrottledWarning

log = logging.getLogger(__name__)

REFRESH_TIMEOUT_S = 3.0  # well within Prometheus' default scrape timeout (10 s)
RouteMaker = Callable[[web.Application], Iterable[web.RouteDef]]


class HttpListenError(RuntimeError):
    """The --http-listen address cannot be bound (taken, or not an address of this host)."""


def split_listen(listen: str) -> tuple[str, int]:
    """ "host:port" -> (host, port); ValueError naming the flag otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http-listen {listen!r}: expected HOST:PORT such as 127.0.0.1:8081 (empty turns it off)")
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)


class HttpServer:
    """The HTTP port. `registry` holds this instance's metrics; `app` is the aiohttp application, to
    which other modules add their routes before start()."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        self.host, self.wanted_port = split_listen(listen)
        self.registry = registry
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        # Awaited before every scrape, in order: collectors whose figures come from Redis refresh their
        # cached snapshot here (prometheus_client's collect() is synchronous).
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []
        self._refresh_errors = ThrottledWarning(log, interval_s=60)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        for refresh in self.before_scrape:
            # A hook that cannot refresh (Redis down or slow) leaves its figures as they were: the scrape
            # still answers, with this instance's own metrics, the Redis errors among them.
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_S):
                    await refresh()
            except Exception as err:
                self._refresh_errors("metrics: a refresh before the scrape failed (%s: %s); serving the "
                                     "figures of the last one", type(err).__name__, err)
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.wanted_port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            self._runner = None
            raise HttpListenError(f"--http-listen {self.host}:{self.wanted_port}: {err.strerror or err} "
                                  "(another process holds it? give another port, or --http-listen '' to turn "
                                  "the HTTP port off)") from err
        server = site._server  # the bound socket tells the port when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.wanted_port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
