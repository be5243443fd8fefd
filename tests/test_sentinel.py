"""Sentinel mode: the scheduler finds its Redis through a real redis-sentinel and works through it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import FAST
from helpers import pair, spec
from lingua_scheduler.server.app import create_server, resolve_partitions
from lingua_scheduler.server.embedded import EmbeddedRedis, redis_server_binary
from lingua_scheduler.server.settings import Settings
from lingua_sdk import pb, pb_grpc
from redis_cluster import free_ports


class EmbeddedSentinel(EmbeddedRedis):
    """redis-server --sentinel with a config monitoring one master as "lingua"."""

    ready_marker = b"+monitor master"

    def __init__(self, data_dir: Path, port: int, master_port: int) -> None:
        super().__init__(data_dir, port=port, persistent=False)
        self.master_port = master_port

    def command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
                        f"sentinel monitor lingua 127.0.0.1 {self.master_port} 1\n")
        return [redis_server_binary(), str(conf), "--sentinel"]


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    master_port, sentinel_port = free_ports(2)
    root = tmp_path_factory.mktemp("sentinel")
    master = EmbeddedRedis(root / "master", port=master_port, persistent=False).start()
    watcher = EmbeddedSentinel(root / "sentinel", sentinel_port, master_port).start()
    yield f"127.0.0.1:{sentinel_port}"
    watcher.stop()
    master.stop()


async def test_scheduler_through_sentinel(sentinel: str) -> None:
    settings = Settings(listen="127.0.0.1:0", redis_sentinel=sentinel, redis_sentinel_master="lingua",
                        **{**FAST, "partitions": 0})  # type: ignore[arg-type]
    app = create_server(await resolve_partitions(settings))  # auto through Sentinel: one Redis, 1 partition
    assert app.settings.partitions == 1
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = pb_grpc.SchedulerStub(ch)
            job_id = (await stub.Submit(pb.SubmitRequest(jobs=[spec()]))).results[0].job_id
            got = await stub.Assign(pb.AssignRequest(node_id="n1", pairs=[pair()], max_jobs=1))
            assert got.assignments[0].job_id == job_id
            await stub.Complete(pb.CompleteRequest(job_id=job_id, attempt=1, node_id="n1", result=pb.JobResult(),
                                                   lease_token=got.assignments[0].lease_token))
            assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).state == pb.JOB_STATE_SUCCEEDED
    finally:
        await app.stop(grace=0)
