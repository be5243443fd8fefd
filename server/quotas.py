"""Per-tenant Submit limits in Redis: a submit-rate token bucket and a cap on unfinished jobs.

Each limited tenant has two keys under its own hash tag (keys.TenantKeys), shared by every instance.
A Submit batch costs one more round trip, for the tenants with a limit only: one admit_jobs call per
tenant (pipelined), before any job is created. A tenant's jobs of the batch are admitted or refused
together; a refusal stores nothing of the batch (what other tenants of the batch were granted is given
back) and is RESOURCE_EXHAUSTED with a retry delay. A batch that can never pass (more jobs than the
burst, or than max_queued) is TOO_LARGE, without one.

Repeats are free: when a tenant is refused, the identities of its jobs are looked up (one round trip,
on that path only) and the jobs stored already are not counted; a repeat found only by submit_job
(admitted, then not created) has its token and place given back (one round trip, only then).

Unfinished jobs: the tenant's jobs zset holds job id -> deadline. The instance that finishes a job
(finish_job tells it the tenant) removes it within FLUSH_S, all removals of that moment in one
pipelined round trip, never one per state change; whatever is left behind (an instance that died before
its flush, a job admitted but never created) drops out when its deadline passes. So the count is never
below the truth while instances agree on the file, and above it only by such leftovers, each for at
most its job's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from . import keys
from .calls import AdmitJobs, RefundJobs, SubmitJob
from .errors import ScriptCode, TenantLimit, TenantQueueFull, TenantRateLimited, TooLarge
from .scripts import Scripts
from .settings import Settings
from .tenants import Tenants
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)

FLUSH_S = 0.1  # how long a finished job may still count against its tenant (on a live instance)
MAX_PENDING = 100_000  # removals kept while Redis is down; beyond, deadlines take over
QUEUE_FULL_RETRY_S = 1.0  # jobs leave the queue at the nodes' pace, which the scheduler cannot foresee


class Quotas:
    def __init__(self, redis: Any, scripts: Scripts, tenants: Tenants, settings: Settings) -> None:
        self.redis = redis
        self.scripts = scripts
        self.tenants = tenants
        self.settings = settings
        self._finished: dict[str, set[str]] = {}  # tenant -> job ids to count out
        self._count = 0  # ids in _finished
        self._pending = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._errors = ThrottledWarning(log, interval_s=10)

    # -- admission ------------------------------------------------------------------------------

    async def admit(self, jobs: list[SubmitJob]) -> dict[str, list[SubmitJob]]:
        """Admit the batch's jobs of limited tenants, or raise TenantLimit / TooLarge having changed
        nothing. Returns the admitted jobs by tenant, for settle(); {} (no Redis call) when no tenant
        of the batch has a limit."""
        groups: dict[str, list[SubmitJob]] = {}
        for job in jobs:
            if self.tenants.of(job.tenant_id).limited:
                groups.setdefault(job.tenant_id, []).append(job)
        if not groups:
            return {}
        for tenant, group in groups.items():
            limits = self.tenants.of(tenant)
            if limits.submit_rate and len(group) > limits.burst:
                raise TooLarge("jobs", f"{len(group)} jobs of tenant {tenant}: more than its submit_burst of "
                                       f"{limits.burst} at once; send smaller batches")
            if limits.max_queued and len(group) > limits.max_queued:
                raise TooLarge("jobs", f"{len(group)} jobs of tenant {tenant}: more than its max_queued of "
                                       f"{limits.max_queued}")
        refused = await self._admit(groups)
        if not refused:
            return groups
        # A retry of a batch stored already must not be refused: count only the jobs that are new.
        known = await self._existing([job for tenant in refused for job in groups[tenant]])
        retry = {tenant: [job for job in groups[tenant] if job.identity not in known] for tenant in refused}
        again = await self._admit({tenant: group for tenant, group in retry.items() if group})
        if again:  # give back what the others were granted, so the refused batch changes nothing
            granted = {tenant: group for tenant, group in groups.items() if tenant not in refused}
            granted.update({tenant: group for tenant, group in retry.items() if tenant not in again})
            await self.refund(granted)
            raise next(iter(again.values()))
        groups.update(retry)
        return groups

    async def _admit(self, groups: dict[str, list[SubmitJob]]) -> dict[str, TenantLimit]:
        """One pipelined round trip; the refusals by tenant."""
        tenants = list(groups)
        calls = []
        for tenant in tenants:
            limits = self.tenants.of(tenant)
            calls.append(AdmitJobs(tenant, limits.submit_rate, limits.burst, limits.max_queued,
                                   self.settings.default_job_ttl_ms,
                                   tuple((job.job_id, job.deadline_ms) for job in groups[tenant])).call())
        refused: dict[str, TenantLimit] = {}
        for tenant, reply in zip(tenants, await self.scripts.call_many(self.redis, calls), strict=True):
            if isinstance(reply, Exception):
                raise reply
            limits = self.tenants.of(tenant)
            if reply[0] == ScriptCode.TENANT_QUEUE_FULL:
                refused[tenant] = TenantQueueFull(
                    f"tenant {tenant} has {int(reply[1])} jobs queued or running; with these "
                    f"{len(groups[tenant])} it would pass its max_queued of {limits.max_queued}",
                    QUEUE_FULL_RETRY_S)
            elif reply[0] == ScriptCode.TENANT_RATE_LIMITED:
                delay = int(reply[1]) / 1000
                refused[tenant] = TenantRateLimited(
                    f"tenant {tenant} is over its submit_rate of {limits.submit_rate:g} jobs/s (burst "
                    f"{limits.burst}): a batch of {len(groups[tenant])} fits again in {delay:.3f} s", delay)
        return refused

    async def _existing(self, jobs: list[SubmitJob]) -> set[str]:
        """The identities (idempotency keys' names) among `jobs` that a job holds already: one round trip."""
        found = await self.scripts.call_many(self.redis, [job.find() for job in jobs])
        for reply in found:
            if isinstance(reply, Exception):
                raise reply
        return {job.identity for job, job_id in zip(jobs, found, strict=True) if job_id}

    async def settle(self, admitted: dict[str, list[SubmitJob]], created: set[str]) -> None:
        """After submit: give back what the admitted jobs that were not created (repeats) took."""
        await self.refund({tenant: [job for job in group if job.job_id not in created]
                           for tenant, group in admitted.items()})

    async def refund(self, groups: dict[str, list[SubmitJob]]) -> None:
        calls = []
        for tenant, group in groups.items():
            if group:
                limits = self.tenants.of(tenant)
                calls.append(RefundJobs(tenant, limits.submit_rate, limits.burst,
                                        tuple(job.job_id for job in group)).call())
        for reply in await self.scripts.call_many(self.redis, calls):
            if isinstance(reply, Exception):
                raise reply

    # -- finished jobs --------------------------------------------------------------------------

    def finished(self, tenant_id: str, job_id: str) -> None:
        """`job_id` reached a terminal state: count it out of its tenant's unfinished jobs (soon, batched)."""
        if not self.tenants.of(tenant_id).max_queued:
            return
        if self._count < MAX_PENDING:
            self._finished.setdefault(tenant_id, set()).add(job_id)
            self._count += 1
            self._pending.set()

    async def flush(self) -> None:
        """Send the removals gathered so far: one pipelined round trip. Kept for the next try on failure."""
        batch, self._finished, self._count = self._finished, {}, 0
        self._pending.clear()
        if not batch:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for tenant, ids in batch.items():
                    pipe.zrem(keys.TenantKeys.of(tenant).jobs, *ids)
                await pipe.execute()
        except Exception as err:
            self._errors("counting finished jobs out of their tenants' limits failed (%r); retrying", err)
            for tenant, ids in batch.items():
                for job_id in ids:
                    self.finished(tenant, job_id)
            raise

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="quotas-flush")

    async def stop(self) -> None:
        self._stopping.set()
        self._pending.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._pending.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_S):
                    await self._stopping.wait()
            try:
                await self.flush()
            except Exception:
                if self._stopping.is_set():
                    return
                await asyncio.sleep(1.0)
