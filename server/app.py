"""App wiring: Redis client, store, dispatcher, servicers, health and reflection on one grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from lingua_sdk import pb
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from . import dashboard, keys, reflection
from .auth import AuthInterceptor, Verifier, open_context
from .dashboard import Dashboard
from .dispatch import Dispatcher
from .grpc_metrics import GrpcMetrics
from .http import HttpServer
from .metrics import InstanceCollector, Metrics, instance_figures
from .node import NodeSessions
from .resp import BatchRedis
from .service import SchedulerService, add_to_server
from .settings import Settings, is_local
from .stats import PoolGauges
from .store import Store
from .tenants import Tenants
from .tls import ServerCertificates
from .tracing import Tracing
from .workers import slot as worker_slot

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name


def _addresses(text: str) -> list[tuple[str, int]]:
    """ "host:port,host:port" -> [(host, port), ...]"""
    out = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if item.strip():
            out.append((host, int(port)))
    return out


def _redis_tls(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS options from --redis-tls-ca/-cert/-key (certificate checked, host name too)."""
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if settings.redis_tls_ca:
        options["ssl_ca_certs"] = settings.redis_tls_ca
    if settings.redis_tls_cert:
        options.update(ssl_certfile=settings.redis_tls_cert, ssl_keyfile=settings.redis_tls_key)
    return options


def _redis_auth(settings: Settings) -> dict[str, Any]:
    """The ACL user and password, only those given (a URL's own credentials are not overridden)."""
    return {name: value for name, value in (("username", settings.redis_username),
                                            ("password", settings.redis_password)) if value}


class GatedConnectionPool(aioredis.ConnectionPool):
    """At most max_connections, and a caller that finds them all busy waits for one (up to `timeout`
    seconds, then ConnectionError: UNAVAILABLE) instead of failing at once as ConnectionPool does.
    redis-py's BlockingConnectionPool does the same with a condition and a timeout on every call,
    which cost ~50 us per Redis call on this machine's profile; here a free connection costs one
    uncontended semaphore. A permit is held from get_connection() to release().

    An idle connection is handed out and taken back without redis-py's lock, deprecation check and
    connection counters for its optional OpenTelemetry metrics (off in the scheduler): ~15 us of
    every Redis call or batch. It is checked as redis-py checks it (connected, nothing unread); one to
    reconnect or re-authenticate, or none idle, takes redis-py's own way."""

    def __init__(self, *args: Any, timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_s = timeout
        self._gate = asyncio.Semaphore(self.max_connections)

    def reset(self) -> None:  # forgets every connection (a fork): their permits with them
        super().reset()  # type: ignore[no-untyped-call]
        self._gate = asyncio.Semaphore(self.max_connections)
        self.__dict__.pop("_lingua_turn", None)  # and the batches waiting for a turn (server/resp.py)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._gate.locked():
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._gate.acquire()
            except TimeoutError as err:
                raise RedisConnectionError("No connection available.") from err
        else:
            await self._gate.acquire()
        idle = self._available_connections
        if not idle or args or kwargs:
            # A connection that fails its check is released by ConnectionPool itself (release() below).
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        connection = idle.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        if self.release_at_once(connection):
            return
        try:
            await super().release(connection)
        finally:
            self._gate.release()

    def release_at_once(self, connection: Any) -> bool:
        """Take `connection` back without awaiting anything (so no cancel can cut it, and a caller needs
        no shield) when nothing is to be done with it: no reconnect asked, no re-authentication waiting.
        False: release() it."""
        if (connection.should_reconnect() or getattr(connection, "_re_auth_token", None) is not None
                or connection not in self._in_use_connections):
            return False
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
        self._gate.release()
        return True


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The Sentinel-followed master's pool, waiting for a free connection as BlockingConnectionPool
    does (redis-py's SentinelConnectionPool raises MaxConnectionsError instead)."""


_holding_slot: contextvars.ContextVar[bool] = contextvars.ContextVar("lingua_redis_slot", default=False)


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client.slot():  # type: ignore[attr-defined]
            return await super().execute(raise_on_error, allow_redirections)


class BoundedRedisCluster(RedisCluster):
    """A RedisCluster whose callers wait for a free connection. redis-py's cluster client has no
    blocking pool: past a node's max_connections it raises MaxConnectionsError. Here every command and
    pipeline first takes one of `slots` permits (waiting up to `slot_timeout` seconds, then
    ConnectionError) and holds it while it runs; each uses at most one connection per node at a time,
    so no node's pool is asked for more than `slots` connections, plus the pub/sub's."""

    def __init__(self, *args: Any, slots: int, slot_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = asyncio.Semaphore(slots)
        self._slot_timeout = slot_timeout

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if _holding_slot.get():  # a redirection retried inside a command or pipeline that holds one
            yield
            return
        try:
            async with asyncio.timeout(self._slot_timeout):
                await self._slots.acquire()
        except TimeoutError as err:
            raise RedisConnectionError("No connection available.") from err
        held = _holding_slot.set(True)
        try:
            yield
        finally:
            _holding_slot.reset(held)
            self._slots.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.slot():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _ClusterPipeline(self)  # type: ignore[abstract]  # (the stubs; redis-py builds it so)


def connect_redis(settings: Settings) -> Any:
    """A redis.asyncio client (bytes replies): a RedisCluster for settings.redis_cluster seeds, a
    Sentinel-followed master for settings.redis_sentinel, else a Redis for settings.redis_url; with the
    --redis-username/--redis-password and --redis-tls* settings in every mode.

    Whatever the number of streams and calls, the client holds at most settings.redis_max_connections
    connections (per node on a cluster, plus its pub/sub connection there); a call that finds them all
    busy waits for one, up to settings.redis_pool_timeout_ms, instead of failing at once."""
    tls = _redis_tls(settings) if settings.redis_tls else {}
    bound, wait = settings.redis_max_connections, settings.redis_pool_timeout_ms / 1000
    if settings.redis_cluster:
        seeds = [ClusterNode(host, port) for host, port in _addresses(settings.redis_cluster)]
        return BoundedRedisCluster(startup_nodes=seeds, decode_responses=False, slots=bound, slot_timeout=wait,
                                   max_connections=bound + 2,  # + the pub/sub, + a topology refresh
                                   ssl=bool(tls), **tls, **_redis_auth(settings))
    if settings.redis_sentinel:
        # The sentinels get the TLS settings (they serve TLS alongside their master), not the ACL user:
        # that one is the data's.
        sentinel = Sentinel(_addresses(settings.redis_sentinel), socket_timeout=5,  # type: ignore[no-untyped-call]
                            sentinel_kwargs={"ssl": True, **tls} if tls else None)
        return sentinel.master_for(settings.redis_sentinel_master, decode_responses=False,
                                   connection_pool_class=_BlockingSentinelPool, max_connections=bound, timeout=wait,
                                   redis_class=BatchRedis,
                                   **({"ssl": True, **tls} if tls else {}), **_redis_auth(settings))
    url = settings.redis_url
    if tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    if url.startswith("rediss://"):
        tls = _redis_tls(settings)  # --redis-tls-ca/-cert/-key apply to a rediss:// URL too
    pool = GatedConnectionPool.from_url(
        url, decode_responses=False, max_connections=bound, timeout=wait,
        health_check_interval=30, **tls, **_redis_auth(settings),
    )
    return BatchRedis.from_pool(pool)


async def close_redis(client: Any) -> None:
    """Close the client, and for Sentinel mode its connections to the sentinels too."""
    await client.aclose()
    sentinels = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if sentinels is not None:
        for sentinel in sentinels.sentinels:
            await sentinel.aclose()


async def _config(client: Any, name: str) -> str:
    reply = await client.config_get(name)
    value = next(iter(reply.values()), b"") if reply else b""
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_redis(client: Any) -> list[str]:
    """Warnings about a Redis that can lose jobs (eviction on; no persistence)."""
    warnings = []
    try:
        policy = await _config(client, "maxmemory-policy")
    except NoPermissionError:  # a least-privilege ACL user (docs/deployment.md) may not read the config
        return ["the Redis user may not run CONFIG GET, so maxmemory-policy and appendonly go unchecked: "
                "make sure they are noeviction and yes"]
    if policy != "noeviction":
        warnings.append(f"Redis maxmemory-policy is {policy!r}: it may evict job keys; set it to noeviction")
    if await _config(client, "appendonly") != "yes":
        warnings.append("Redis runs without AOF (appendonly no): a Redis restart loses jobs; "
                        "production should run appendonly yes, appendfsync everysec")
    return warnings


class ListenError(RuntimeError):
    """The --listen address cannot be bound (taken, or not an address of this host)."""


class PartitionsMismatch(RuntimeError):
    """This instance's --partitions differs from the count stored in Redis by the first instance."""


AUTO_PARTITIONS = 1  # --partitions 0 (auto) on one Redis, standalone or Sentinel, that holds no count yet
AUTO_PER_PRIMARY = 4  # ... and on a Redis Cluster, per primary (docs/deployment.md, "How many partitions")


async def resolve_partitions(settings: Settings) -> Settings:
    """Settings with --partitions 0 (auto, the default) replaced by a count: the one stored in Redis, else
    this topology's, stored at once (SET NX, as check_partitions does) so that instances starting together
    agree: 1 on one Redis (partitions only split its work among more Lua calls there), 4 per primary on a
    Redis Cluster. A count given is kept: check_partitions checks it at the start.

    Through a client of its own: Store and the dispatcher are built with the count."""
    if settings.partitions:
        return settings
    client = connect_redis(settings)
    try:
        if settings.redis_cluster:
            await client.initialize()
            wanted = min(1024, AUTO_PER_PRIMARY * max(1, len(client.get_primaries())))
        else:
            wanted = AUTO_PARTITIONS
        count, new = await store_partitions(client, wanted)
    finally:
        await close_redis(client)
    log.info("--partitions auto: %d, %s", count, "this topology's count for a new deployment, now stored in Redis"
             if new else "the count stored in Redis by the first instance")
    return dataclasses.replace(settings, partitions=count)


async def check_partitions(client: Any, partitions: int) -> None:
    """Store the partition count at first start (SET NX); PartitionsMismatch when Redis holds another.

    Job ids carry their partition, so instances that disagree split one idempotency key over two
    partitions and never sweep each other's partitions."""
    stored, _ = await store_partitions(client, partitions)
    if stored != partitions:
        raise PartitionsMismatch(
            f"--partitions (LINGUA_PARTITIONS) is {partitions} but this Redis is laid out in {stored} partition(s) (key "
            f"{keys.PARTITIONS}, set by the first instance): start every instance with --partitions {stored} (or "
            "without --partitions, which adopts it), or change the count as docs/deployment.md (\"Changing the "
            "partition count\") describes")


async def store_partitions(client: Any, wanted: int) -> tuple[int, bool]:
    """The partition count stored in Redis, after storing `wanted` where none is (SET NX), and whether this
    call stored it. The key layout is checked and stored first: a Redis holding jobs of the earlier layout
    (per-pool timers, `{src:tgt:p}` ids) is refused (PartitionsMismatch), as is a stored count that is not one."""
    layout = await client.get(keys.LAYOUT)
    if layout is None and await client.get(keys.PARTITIONS) is not None:
        # This version sets the layout before the count: an instance starting beside this one may have
        # set both between the two reads (they are on different slots of a cluster): read it again.
        # Still none: the earlier layout (timers per pool partition, no layout key).
        layout = await client.get(keys.LAYOUT) or b"pools"
    if layout is not None and layout.decode(errors="replace") != keys.LAYOUT_VERSION:
        raise PartitionsMismatch(
            f"this Redis holds jobs in the key layout {layout.decode(errors='replace')!r}, not "
            f"{keys.LAYOUT_VERSION!r}: let those jobs finish with the version that wrote them, then start this "
            "version on an empty Redis (or another key prefix); see docs/deployment.md. (A Redis that never ran "
            f"an earlier release but lost only this key: SET {keys.LAYOUT} {keys.LAYOUT_VERSION})")
    await client.set(keys.LAYOUT, keys.LAYOUT_VERSION, nx=True)
    while not await client.set(keys.PARTITIONS, str(wanted), nx=True):
        stored = await client.get(keys.PARTITIONS)
        if stored is None:
            continue  # deleted between the two calls: try to set it again
        if not (stored.isdigit() and stored == str(int(stored)).encode() and 1 <= int(stored) <= 1024):
            raise PartitionsMismatch(
                f"key {keys.PARTITIONS} holds {stored!r}, not a partition count (1 to 1024): set it right, as "
                "docs/deployment.md (\"Changing the partition count\") describes")
        return int(stored), False
    return wanted, True


@dataclass
class App:
    settings: Settings
    server: grpc.aio.Server
    port: int
    redis: Any
    store: Store
    dispatcher: Dispatcher
    nodes: NodeSessions
    health: health.aio.HealthServicer  # type: ignore[name-defined]
    certificates: ServerCertificates | None = None  # with TLS: the files, re-read on change or reload()
    auth: Verifier | None = None  # None: no authentication
    http: HttpServer | None = None  # the operations HTTP port (--http-listen); None when off
    dashboard: Dashboard | None = None  # on the HTTP port (server/dashboard.py); None when off
    tracing: Tracing | None = None  # OpenTelemetry spans (server/tracing.py); None when off

    def reload(self) -> None:
        """SIGHUP: re-read the files named by flags: TLS certificates (new connections get them; open ones
        keep theirs), auth keys and the tenants file."""
        if self.certificates is not None:
            self.certificates.reload()
        if self.auth is not None:
            self.auth.reload()
        self.store.tenants.reload()
        if self.certificates is None and self.auth is None and not self.settings.tenants:
            log.info("SIGHUP: no TLS certificates, auth keys or tenants file to reload")

    def describe(self) -> str:
        """The security mode, for the startup log."""
        if self.certificates is None:
            transport = "TLS off (plaintext)"
        else:
            clients = "mutual: client certificates required" if self.certificates.mutual else "no client certificates"
            transport = f"TLS on ({clients})"
        if self.settings.auth_jwt_key:
            auth = f"authentication on ({len(self.settings.auth_jwt_key)} JWT key file(s))"
        elif self.settings.insecure and not is_local(self.settings.listen):
            auth = "authentication OFF on a non-loopback address (--insecure)"
        else:
            auth = "authentication off (loopback only)"
        return f"{transport}; {auth}"

    async def start(self) -> None:
        await self.redis.ping()  # fail fast on a wrong address; on a cluster, learns the slot map
        await check_partitions(self.redis, self.settings.partitions)
        await self.store.rates.fold_waiting(self.settings.partitions)  # before any job leaves QUEUED here
        if self.http is not None:  # first: a port that cannot be bound stops the start before any task runs
            await self.http.start()
        await self.dispatcher.start()
        self.store.quotas.start()
        self.store.rates.start()
        await self.nodes.start()
        if self.store.metrics is not None:
            self.store.metrics.start()
        if self.auth is None:  # every RPC's caller is AUTH_OFF (grpc.aio's tasks inherit the context)
            await asyncio.get_running_loop().create_task(self.server.start(), context=open_context())
        else:  # the interceptor sets each RPC's caller; none set is no one (server/auth.py)
            await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, stop accepting, let streams drain within the grace, close Redis."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.nodes.drain_all(grace)
        for name, step, limit in (
            ("grpc server", self.server.stop(0), 5.0),
            ("http server", self.http.stop() if self.http is not None else asyncio.sleep(0), 5),
            ("metrics", self.store.metrics.stop() if self.store.metrics is not None else asyncio.sleep(0), 5),
            ("node sessions", self.nodes.stop(), 5),
            ("dispatcher", self.dispatcher.stop(), 5),
            ("quotas", self.store.quotas.stop(), 5),
            ("rates", self.store.rates.stop(), 5),
            ("redis", close_redis(self.redis), 5),
        ):
            try:
                await asyncio.wait_for(step, limit)
            except TimeoutError:
                log.error("shutdown: %s did not stop within %.1f s; going on", name, limit)


def create_server(settings: Settings, redis: Any = None, tracer_provider: Any = None) -> App:
    """Build the server bound to settings.listen (port 0 picks one: see App.port). Call start().
    With an OpenTelemetry `tracer_provider` (server/tracing.py), it makes spans; without, none.

    ValueError when it would serve without authentication beyond loopback (Settings.check_exposure), for
    a key file that cannot be used (AuthKeyError), or for a tenants file that cannot (TenantConfigError);
    tls.CertificateError when the TLS files cannot serve."""
    settings.check_exposure()
    tenants = Tenants(settings.tenants)
    if settings.auth_jwt_key and not settings.tls_cert and not is_local(settings.listen):
        log.warning("authentication on but TLS off on %s: bearer tokens cross the network in plaintext, where "
                    "anyone on the path can read and replay them; give --tls-cert and --tls-key "
                    "(docs/deployment.md)", settings.listen)
    if settings.auth_jwt_key and settings.http_listen and not is_local(settings.http_listen):
        log.warning("authentication on and the dashboard's HTTP port %s is not loopback: it speaks plain HTTP, so "
                    "an admin token typed into the dashboard crosses the network in the clear; reach it through "
                    "an SSH tunnel or a proxy that terminates TLS (docs/operations.md)", settings.http_listen)
    certificates = ServerCertificates(settings.tls_cert, settings.tls_key, settings.tls_client_ca) \
        if settings.tls_cert else None
    verifier = (Verifier(settings.auth_jwt_key, settings.auth_jwt_audience, settings.auth_jwt_issuer)
                if settings.auth_jwt_key else None)
    client = redis if redis is not None else connect_redis(settings)
    store = Store(client, settings, tenants=tenants)
    dispatcher = Dispatcher(store, settings)
    nodes = NodeSessions(store, dispatcher, settings)
    tracing = Tracing(tracer_provider) if tracer_provider is not None else None
    store.tracing = dispatcher.tracing = tracing
    # Metrics only with the HTTP port on (nothing would read them otherwise): server/metrics.py.
    registry = CollectorRegistry() if settings.http_listen else None
    interceptors: list[Any] = []
    if registry is not None:
        store.metrics = Metrics(registry)
        store.scripts.metrics = store.metrics.redis
        registry.register(InstanceCollector(instance_figures(nodes, dispatcher)))
        # First: it counts what the interceptors after it refuse. NodeSession counts its own messages.
        interceptors.append(GrpcMetrics(registry, counted_by_handler=(f"/{SERVICE_NAME}/NodeSession",)))
    if tracing:
        interceptors.append(tracing.interceptor())
    if verifier:
        interceptors.append(AuthInterceptor(verifier))
    server = grpc.aio.server(interceptors=interceptors or None, options=[
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", settings.max_payload_bytes * 4 + 1_048_576),
        # SO_REUSEPORT only for the workers of one supervisor (server/workers.py), which share the port on
        # purpose: a lone scheduler must not silently share a port another one holds (the kernel would
        # split the clients between them).
        ("grpc.so_reuseport", 1 if worker_slot() else 0),
        # One bound, no random early drop between gRPC's soft and hard limits: see Settings.
        ("grpc.server.max_pending_requests", settings.grpc_max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.grpc_max_pending_calls),
    ])
    service = SchedulerService(store, dispatcher, settings, nodes)
    service.tracing = tracing
    add_to_server(service, server)  # undecodable bytes: INVALID_ARGUMENT
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lacks aio
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # v1 and v1alpha, with the proto comments (server/reflection.py)
    reflection.enable(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                      [health_pb2.DESCRIPTOR])
    # Health and reflection share the port, so with TLS they are reached over TLS too.
    reason: RuntimeError | None = None
    try:
        port = server.add_secure_port(settings.listen, certificates.credentials()) if certificates is not None \
            else server.add_insecure_port(settings.listen)
    except RuntimeError as err:  # grpc: "Failed to bind to address ..."
        port, reason = 0, err
    if port == 0:
        raise ListenError(f"--listen {settings.listen}: cannot listen there (another process holds the port? "
                          f"give another one, e.g. --listen 127.0.0.1:0 for any free port){f': {reason}' if reason else ''}")
    http = HttpServer(settings.http_listen, registry) if registry is not None else None
    if http is not None:  # the cluster-wide gauges, from GetStats' cached snapshot
        gauges = PoolGauges(service.admin.stats)
        http.registry.register(gauges)
        http.before_scrape.append(gauges.refresh)
    board = dashboard.mount(http, service.admin, nodes, store, settings, verifier) if http is not None else None
    return App(settings, server, port, client, store, dispatcher, nodes, health_servicer, certificates, verifier, http,
               board, tracing)
