"""Entry point: `lingua-scheduler [--redis-url URL] [--listen HOST:PORT] ...` (or python -m);
`lingua-scheduler token ...` mints a bearer token instead (server/tokens.py).

With no Redis URL it starts an embedded redis-server (data in --data-dir, AOF on) and stops it on exit;
it refuses to start when another scheduler's embedded Redis has that folder (see embedded.py).
SIGTERM/SIGINT: health goes NOT_SERVING, no new work is handed out, streams drain within the grace,
then Redis is closed. SIGHUP: the TLS certificate files, the --auth-jwt-key files and the --tenants file
are read again.

With --workers N (N > 1) this process supervises N such processes on one port instead (server/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from redis.exceptions import RedisClusterException, RedisError

from . import logs, tracing, workers
from .app import ListenError, PartitionsMismatch, check_redis, close_redis, create_server, resolve_partitions
from .auth import AuthKeyError
from .embedded import DataDirInUse, EmbeddedRedis
from .http import HttpListenError
from .settings import Settings
from .tenants import TenantConfigError
from .tenants import load as load_tenants
from .tls import CertificateError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("lingua_scheduler")


GC_THRESHOLDS = (50_000, 50, 1_000)  # gen0 allocations, gen1 and gen2 collection counts (gc.set_threshold)


class RedisUnusable(RuntimeError):
    """Redis cannot be used at the start: unreachable, credentials refused, no master, no cluster."""


@contextlib.contextmanager
def _redis_at_start(settings: Settings) -> Iterator[None]:
    """Redis' errors while starting as one RedisUnusable naming the address (a line, not a traceback)."""
    try:
        yield
    except (RedisError, RedisClusterException) as err:
        where = _redacted(settings.redis_cluster or settings.redis_sentinel or settings.redis_url)
        raise RedisUnusable(f"cannot use Redis at {where}: {type(err).__name__}: {err} (check its address and "
                            "credentials: docs/deployment.md)") from err


async def serve(settings: Settings, provider: TracerProvider | None = None) -> None:
    with _redis_at_start(settings):  # --partitions 0 (auto): what Redis holds, else the topology's
        settings = await resolve_partitions(settings)
    app = create_server(settings, tracer_provider=provider)
    if provider is not None:
        log.info("tracing on: exporting spans to %s", ", ".join(tracing.exporters_wanted(os.environ)))
    if app.auth is not None:
        log.info("authentication on: bearer JWTs, keys %s",
                 ", ".join(f"{k.kid} ({k.algorithm})" for k in app.auth.keys))
    else:
        log.info("authentication off (no --auth-jwt-key): every caller may call everything")
    # Signals are handled before the port is announced: a SIGINT or SIGTERM that follows the "listening on"
    # line at once (a terminal's Ctrl-C, an orchestrator's stop) drains like any other.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    try:
        with _redis_at_start(settings):
            for warning in await check_redis(app.redis):
                log.warning("%s", warning)
            await app.start()
    except BaseException:
        await close_redis(app.redis)
        raise
    log.info("listening on %s, port %d (instance %s, redis %s, %d partition(s)): %s", settings.listen, app.port,
             settings.instance_id, _redacted(settings.redis_cluster or settings.redis_sentinel or settings.redis_url),
             settings.partitions, app.describe())
    print(f"lingua-scheduler listening on {settings.listen.rsplit(':', 1)[0]}:{app.port}", flush=True)
    if app.http is not None:
        log.info("operations HTTP port: http://%s:%d/ (dashboard), /metrics (Prometheus)", app.http.host, app.http.port)
        print(f"lingua-scheduler http on {app.http.host}:{app.http.port}", flush=True)
    if workers.slot():  # a worker: its stdin is a pipe from the supervisor, closed when the supervisor is gone
        loop.add_reader(sys.stdin.fileno(), _supervisor_gone, stop)
    await stop.wait()
    log.info("shutting down: draining streams for up to %.1f s", settings.shutdown_grace_s)
    await app.stop()
    if provider is not None:
        provider.shutdown()  # exports the spans still batched
    log.info("stopped")


def _supervisor_gone(stop: asyncio.Event) -> None:
    if not os.read(sys.stdin.fileno(), 512):  # end of file (the supervisor never writes)
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        log.error("the supervisor (--workers) is gone: stopping")
        stop.set()


def _redacted(url: str) -> str:
    """A Redis URL without its password (redis://user:secret@host -> redis://user:***@host)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:  # `lingua-scheduler token ...` mints a token (server/tokens.py)
        from .tokens import main as token_main

        return token_main(args[1:])
    argv = args
    try:
        settings = Settings.load(argv)
        logs.setup(settings.log_format, settings.log_level, instance=settings.instance_id if workers.slot() else "")
        if settings.tenants:
            load_tenants(settings.tenants)  # a bad file stops us before anything starts
        # None unless OTEL_* variables turn tracing on; a supervisor serves nothing, so traces nothing
        provider = tracing.provider_from_env() if settings.workers == 1 else None
    except ValueError as err:  # TenantConfigError too
        print(f"lingua-scheduler: {err}", file=sys.stderr)
        return 2
    embedded = None
    if not (settings.redis_url or settings.redis_cluster or settings.redis_sentinel):
        try:
            embedded = EmbeddedRedis(settings.data_dir).start()
        except DataDirInUse as err:
            print(f"lingua-scheduler: {err}", file=sys.stderr)
            return 1
        if embedded.adopted_pid is not None:
            log.warning("adopted the embedded redis-server (pid %d) that a stopped scheduler left running in %s; "
                        "it stops with this one", embedded.adopted_pid, embedded.data_dir)
        else:
            log.info("started embedded redis-server (data in %s)", embedded.data_dir)
        settings = dataclasses.replace(settings, redis_url=embedded.url)
    # Garbage collection in fewer, younger rounds: with thousands of node streams grpc.aio keeps about
    # 100 objects per stream alive, and the default thresholds ran full collections of ~500,000 objects
    # (80-1,080 ms with the event loop stopped) every few seconds of ping traffic. Measured with 5,000
    # streams (docs/benchmarks.md, "Fleet"): dispatch p99 151 -> 46 ms.
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        if settings.workers > 1:
            return workers.supervise(settings, argv)
        if settings.uvloop:
            import uvloop

            uvloop.run(serve(settings, provider))
        else:
            asyncio.run(serve(settings, provider))
    except (PartitionsMismatch, CertificateError, HttpListenError, ListenError, RedisUnusable) as err:
        print(f"lingua-scheduler: {err}", file=sys.stderr)
        return 1
    except (AuthKeyError, TenantConfigError) as err:
        print(f"lingua-scheduler: {err}", file=sys.stderr)
        return 2
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
