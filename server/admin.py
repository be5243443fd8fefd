"""Administration (admin role): the operations behind ListJobs, GetStats, RetryJob, CancelSession,
PausePool/ResumePool and DrainNode. Plain async methods taking and returning the contract's messages,
so that the gRPC servicer (server/service.py) and the dashboard's HTTP API (server/dashboard.py) share
them; errors are SchedulerError subclasses, as everywhere. Every change goes through the state machine
and the compare-and-set scripts."""

from __future__ import annotations

from typing import Any

from lingua_sdk import pb

from .errors import NotImplementedYet
from .settings import Settings
from .store import Store


class Admin:
    def __init__(self, store: Store, settings: Settings, nodes: Any = None) -> None:
        self.store = store
        self.settings = settings
        self.nodes = nodes  # server.node.NodeSessions

    async def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        raise NotImplementedYet("ListJobs")

    async def get_stats(self, request: pb.GetStatsRequest) -> pb.GetStatsResponse:
        raise NotImplementedYet("GetStats")

    async def retry_job(self, request: pb.RetryJobRequest) -> pb.Job:
        raise NotImplementedYet("RetryJob")

    async def cancel_session(self, request: pb.CancelSessionRequest) -> pb.CancelSessionResponse:
        raise NotImplementedYet("CancelSession")

    async def pause_pool(self, request: pb.PausePoolRequest) -> pb.PoolState:
        raise NotImplementedYet("PausePool")

    async def resume_pool(self, request: pb.ResumePoolRequest) -> pb.PoolState:
        raise NotImplementedYet("ResumePool")

    async def drain_node(self, request: pb.DrainNodeRequest) -> pb.NodeInfo:
        raise NotImplementedYet("DrainNode")
