"""ListJobs' reads: jobs newest first from the indexes the scripts keep with the jobs, never a scan.

Indexes (one slot each, per shard; members '<ULID> <partition tag>', all at score 0, so ZREVRANGEBYLEX
walks them newest first and the member itself is the cursor; nothing else, no time to live: a job's
entries leave when its forget timer fires, as its record expires, lua/forget_job-n.lua):
- keys.PartitionKeys.jobs: a pool's jobs in one shard (a pool filter; every pool's, merged, for none);
- keys.tenant_jobs: a tenant's jobs in one shard;
- keys.ended_jobs: the jobs that ended FAILED, EXPIRED or CANCELLED (rare states: a filter on one of
  them reads only those);
- keys.session_jobs (WatchSession's): a session's jobs.
The most selective index of the filters is walked, the shards' indexes merged newest first; the other
filters are checked on each job's record. A page may come back short of page_size when many entries
in a row do not match (each call examines at most SCAN_BUDGET entries); next_page_token then goes on
from there, and is empty only at the end. An entry whose job is gone all the same (its forget timer
fired late, or an earlier version wrote it) is skipped and removed.
"""

from __future__ import annotations

import base64
import binascii
import heapq
from dataclasses import dataclass

from ..fsm import JobState
from . import buckets, keys
from .errors import InvalidArgument
from .store import JobRecord, JobView, Store, _s, parse_views, read_views, with_results

SCAN_BUDGET = 2_000  # index entries one call may examine
# Members only: below the sentinel '}' and the '~<expiry> <member>' markers that versions before forget
# timers kept in the same keys (members start with a ULID: digits and capitals).
TOP = "(}"
ENDED_INDEXED = frozenset({JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED})


def member_of(job_id: str) -> str:
    """A job's index member (the Lua prelude's index_member): '<ULID> <partition tag>'."""
    return f"{job_id[-26:]} {job_id[:-26]}"


def job_of(member: str) -> str:
    ulid, _, tag = member.partition(" ")
    return tag + ulid


def encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> str:
    try:
        member = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        keys.tag_of(job_of(member))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token", "not a next_page_token of ListJobs") from None
    return member


@dataclass(frozen=True, slots=True)
class Filter:
    pool: str = ""
    state: str = ""  # a JobState value, "" for any
    tenant_id: str = ""
    session_id: str = ""

    def matches(self, rec: JobRecord, sess: str) -> bool:
        return ((not self.pool or keys.pool_of_tag(keys.tag_of(rec.job_id)) == self.pool)
                and (not self.state or rec.state == self.state)
                and (not self.tenant_id or rec.tenant == self.tenant_id)
                and (not self.session_id or sess == keys.session_field(self.tenant_id, self.session_id)))


class Listing:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis

    async def _sources(self, f: Filter) -> list[str]:
        """The index keys to walk for `f` (the session index is read apart: see list())."""
        shards = [keys.shard_tag(s) for s in range(self.store.settings.partitions)]
        if f.state in ENDED_INDEXED:
            return [keys.ended_jobs(shard, f.state) for shard in shards]
        if f.tenant_id:
            return [keys.tenant_jobs(shard, f.tenant_id) for shard in shards]
        if f.pool:
            return [keys.PartitionKeys.of(tag).jobs for tag in self.store.tags_of_pool(f.pool)]
        now = buckets.now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(keys.ShardKeys.of(shard).pools, now, "+inf")  # pools with jobs left
            found = await pipe.execute()
        return [keys.PartitionKeys.of(keys.partition_tag(_s(p), s)).jobs
                for s, pools in enumerate(found) for p in sorted(pools)]

    async def _walk(self, f: Filter, after: str | None, count: int) -> tuple[list[str], bool]:
        """Up to `count` members older than `after`, newest first, merged over the sources; and whether
        the sources have no more."""
        if f.session_id:
            index = keys.session_jobs(keys.shard_tag(self.store.shard_of(f.tenant_id, f.session_id)),
                                      f.tenant_id, f.session_id)
            members = sorted((member_of(_s(j)) for j in await self.redis.zrange(index, 0, -1)), reverse=True)
            members = [m for m in members if after is None or m < after]
            return members[:count], len(members) <= count
        sources = await self._sources(f)
        if not sources:
            return [], True
        top = "(" + after if after is not None else TOP
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in sources:
                pipe.zrevrangebylex(key, top, "-", start=0, num=count)
            found = [[_s(m) for m in ms] for ms in await pipe.execute()]
        # A source that gave `count` may hold more below its last: only what is above every such
        # last member is surely in order.
        bound = max((ms[-1] for ms in found if len(ms) >= count), default=None)
        merged = [m for m in heapq.merge(*found, reverse=True) if bound is None or m >= bound]
        return merged[:count], bound is None and len(merged) <= count

    async def page(self, f: Filter, page_size: int, after: str | None) -> tuple[list[JobView], str | None]:
        """One page of jobs matching `f`, newest first, after the cursor member `after`; and the cursor
        of the next page (None at the end)."""
        out: list[JobView] = []
        examined = 0
        while len(out) < page_size and examined < SCAN_BUDGET:
            members, exhausted = await self._walk(f, after, min(page_size - len(out) + 16, SCAN_BUDGET - examined))
            if not members:
                return out, None
            job_ids = [job_of(m) for m in members]
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(keys.JobKeys.of(job_id).fsm)
                records = await pipe.execute()
            matching: list[tuple[str, str]] = []
            gone: list[str] = []
            for member, job_id, h in zip(members, job_ids, records, strict=True):
                examined += 1
                after = member
                if not h:
                    gone.append(member)
                elif f.matches(JobRecord.parse(job_id, h), _s(h.get(b"sess"))):
                    matching.append((member, job_id))
                    if len(out) + len(matching) >= page_size:
                        break
            if gone:
                await self._forget(f, gone)
            out += await self._views([job_id for _, job_id in matching])
            if exhausted and after == members[-1]:
                return out, None
        return out, after

    async def _forget(self, f: Filter, members: list[str]) -> None:
        """Removes entries whose job is gone from the index they were read from (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                tag = keys.tag_of(job_of(member))
                shard = keys.shard_of_tag(tag)
                if f.session_id:
                    pipe.zrem(keys.session_jobs(shard, f.tenant_id, f.session_id), job_of(member))
                elif f.state in ENDED_INDEXED:
                    pipe.zrem(keys.ended_jobs(shard, f.state), member)
                elif f.tenant_id:
                    pipe.zrem(keys.tenant_jobs(shard, f.tenant_id), member)
                else:
                    pipe.zrem(keys.PartitionKeys.of(tag).jobs, member)
            await pipe.execute()

    async def _views(self, job_ids: list[str]) -> list[JobView]:
        """The jobs' views, one round trip; those whose record expired between the two reads left out."""
        async with self.redis.pipeline(transaction=False) as pipe:
            read_views(pipe, job_ids)
            replies = await pipe.execute()
        return [view for view in await with_results(self.redis, parse_views(job_ids, replies)) if view is not None]
