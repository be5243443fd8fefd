"""App wiring: Redis client, store, dispatcher, servicers, health and reflection on one grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lingua_sdk import pb
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from . import keys
from .auth import AuthInterceptor, Verifier
from .dispatch import Dispatcher
from .node import NodeSessions
from .service import SchedulerService, add_to_server
from .settings import Settings
from .store import Store

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


def connect_redis(settings: Settings) -> Any:
    """A redis.asyncio client (bytes replies): a RedisCluster for settings.redis_cluster seeds, else
    a Redis for settings.redis_url."""
    if settings.redis_cluster:
        seeds = [ClusterNode(host, port) for host, port in _addresses(settings.redis_cluster)]
        return RedisCluster(startup_nodes=seeds, decode_responses=False,
                            max_connections=settings.redis_max_connections)
    if settings.redis_sentinel:
        sentinel = Sentinel(_addresses(settings.redis_sentinel), socket_timeout=5)  # type: ignore[no-untyped-call]
        return sentinel.master_for(settings.redis_sentinel_master, decode_responses=False,
                                   max_connections=settings.redis_max_connections)
    return aioredis.from_url(
        settings.redis_url, decode_responses=False, max_connections=settings.redis_max_connections,
        health_check_interval=30,
    )


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
    policy = await _config(client, "maxmemory-policy")
    if policy != "noeviction":
        warnings.append(f"Redis maxmemory-policy is {policy!r}: it may evict job keys; set it to noeviction")
    if await _config(client, "appendonly") != "yes":
        warnings.append("Redis runs without AOF (appendonly no): a Redis restart loses jobs; "
                        "production should run appendonly yes, appendfsync everysec")
    return warnings


class PartitionsMismatch(RuntimeError):
    """This instance's --partitions differs from the count stored in Redis by the first instance."""


async def check_partitions(client: Any, partitions: int) -> None:
    """Store the partition count at first start (SET NX); PartitionsMismatch when Redis holds another.

    Job ids carry their partition, so instances that disagree split one idempotency key over two
    partitions and never sweep each other's partitions."""
    wanted = str(partitions).encode()
    while not await client.set(keys.PARTITIONS, wanted, nx=True):
        stored = await client.get(keys.PARTITIONS)
        if stored is None:
            continue  # deleted between the two calls: try to set it again
        if stored != wanted:
            raise PartitionsMismatch(
                f"--partitions is {partitions} but this Redis holds jobs laid out in {stored.decode(errors='replace')} "
                f"partitions (key {keys.PARTITIONS}, set by the first instance): start every instance with "
                f"--partitions {stored.decode(errors='replace')}, or change the count as docs/deployment.md "
                "(\"Changing the partition count\") describes")
        return


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
    auth: Verifier | None = None  # None: no authentication

    def reload(self) -> None:
        """SIGHUP: re-read the files named by flags (auth keys)."""
        if self.auth is not None:
            self.auth.reload()

    async def start(self) -> None:
        await self.redis.ping()  # fail fast on a wrong address; on a cluster, learns the slot map
        await check_partitions(self.redis, self.settings.partitions)
        await self.dispatcher.start()
        await self.nodes.start()
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
            ("node sessions", self.nodes.stop(), 5),
            ("dispatcher", self.dispatcher.stop(), 5),
            ("redis", close_redis(self.redis), 5),
        ):
            try:
                await asyncio.wait_for(step, limit)
            except TimeoutError:
                log.error("shutdown: %s did not stop within %.1f s; going on", name, limit)


def create_server(settings: Settings, redis: Any = None) -> App:
    """Build the server bound to settings.listen (port 0 picks one: see App.port). Call start()."""
    # Raises AuthKeyError (a ValueError naming the file) for a key file that cannot be used.
    verifier = (Verifier(settings.auth_jwt_key, settings.auth_jwt_audience, settings.auth_jwt_issuer)
                if settings.auth_jwt_key else None)
    client = redis if redis is not None else connect_redis(settings)
    store = Store(client, settings)
    dispatcher = Dispatcher(store, settings)
    nodes = NodeSessions(store, dispatcher, settings)
    server = grpc.aio.server(interceptors=[AuthInterceptor(verifier)] if verifier else None, options=[
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", settings.max_payload_bytes * 4 + 1_048_576),
    ])
    add_to_server(SchedulerService(store, dispatcher, settings, nodes), server)  # undecodable bytes: INVALID_ARGUMENT
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lacks aio
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise RuntimeError(f"could not listen on {settings.listen}")
    return App(settings, server, port, client, store, dispatcher, nodes, health_servicer, verifier)
