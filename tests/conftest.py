"""Shared fixtures: a private real redis-server per test session, real gRPC servers on free ports.

Never the machine's shared Redis: every server here is started by the tests (unix socket in a temp
folder) and only those are flushed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from lingua_scheduler.server.app import App, connect_redis, create_server
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.settings import Settings
from lingua_scheduler.server.store import Store
from lingua_sdk import pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # simnode

from redis_cluster import LocalCluster

# Schedulers the tests start as processes: an operations HTTP port on a free port, never 8081.
os.environ.setdefault("LINGUA_HTTP_LISTEN", "127.0.0.1:0")

# Short timings so lease, grace and backoff paths run in well under a second.
FAST = dict(
    partitions=2, ack_timeout_ms=1_000, heartbeat_interval_ms=150, lease_ms=1_000, stream_grace_ms=300,
    backoff_base_ms=50, backoff_max_ms=200, affinity_wait_ms=300, poll_interval_ms=100,
    sweep_interval_ms=50, node_ttl_ms=3_000, shutdown_grace_s=0.5, avoid_ms=300,
    ping_interval_ms=500, ping_timeout_ms=1_500,
    http_listen="",  # no operations HTTP port unless a test asks for one (127.0.0.1:0)
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3).start()
    yield cluster
    cluster.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "single_redis: run against one Redis only (not the cluster)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that touches Redis runs against one Redis and against a 3-master Redis Cluster."""
    if "backend" in metafunc.fixturenames:
        single = metafunc.definition.get_closest_marker("single_redis") is not None
        metafunc.parametrize("backend", ["single"] if single else ["single", "cluster"])


@pytest.fixture
def settings(backend: str, request: pytest.FixtureRequest) -> Settings:
    if backend == "cluster":
        seeds = request.getfixturevalue("redis_cluster").seeds
        return Settings(listen="127.0.0.1:0", redis_cluster=seeds, **FAST)  # type: ignore[arg-type]
    url = request.getfixturevalue("redis_server").url
    return Settings(listen="127.0.0.1:0", redis_url=url, **FAST)  # type: ignore[arg-type]


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Any]:
    client = connect_redis(settings)
    await client.flushall()  # our private servers only
    await client.script_flush()
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis: Any, settings: Settings) -> Store:
    return Store(redis, settings)


AppFactory = Callable[..., Awaitable[App]]


@pytest.fixture
async def make_app(redis: Any, settings: Settings) -> AsyncIterator[AppFactory]:
    """Start scheduler instances (each with its own Redis client) on free ports; all stopped after."""
    apps: list[App] = []

    async def start(**overrides: Any) -> App:
        app = create_server(dataclasses.replace(settings, **overrides))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(grace=0)


@pytest.fixture
async def app(make_app: AppFactory) -> App:
    return await make_app()


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.SchedulerStub:
    return pb_grpc.SchedulerStub(channel)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
