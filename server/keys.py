"""Every Redis key and channel name. Nothing else formats a key.

Jobs are spread over `partitions` shards, shared by every pool: a session's jobs all go to one shard
(by tenant and session), whatever their pair. A job id starts with its partition, `src:tgt:{s}` (its
pool, then its shard's hash tag), so every key of a job, the queue it waits in (one per pool and
shard) and its shard's timers share one Redis Cluster slot: one Lua call never crosses slots. The
timers of all pools of a shard are one zset, so the sweep costs what is due, whatever the pool count.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

PREFIX = "lingua:v1:"


def pool_of(src_lang: str, tgt_lang: str) -> str:
    """The directed pair a job waits in: `zh:en` is not `en:zh`."""
    return f"{src_lang}:{tgt_lang}"


def shard_tag(shard: int) -> str:
    """The hash tag of a shard: `{3}`."""
    return f"{{{shard}}}"


def partition_tag(pool: str, partition: int) -> str:
    """One pool's part of a shard, the prefix of its jobs' ids: `zh:en:{3}`."""
    return f"{pool}:{shard_tag(partition)}"


def partition_for(tenant_id: str, session_id: str, partitions: int) -> int:
    """All jobs of one session land in one partition (stable across instances and restarts)."""
    return zlib.crc32(f"{tenant_id}\x00{session_id}".encode()) % partitions


def partition_tags(pool: str, partitions: int) -> list[str]:
    return [partition_tag(pool, p) for p in range(partitions)]


def tag_of(job_id: str) -> str:
    """The partition a job id starts with (`zh:en:{3}`); ValueError when the id has none."""
    start, end = job_id.find(":{"), job_id.find("}")
    if start < 1 or end < start + 3 or end == len(job_id) - 1:
        raise ValueError("job id must start with a partition such as zh:en:{0}")
    return job_id[: end + 1]


def pool_of_tag(tag: str) -> str:
    """`zh:en:{3}` -> `zh:en`."""
    return tag[: tag.index(":{")]


def shard_of_tag(tag: str) -> str:
    """`zh:en:{3}` -> `{3}`."""
    return tag[tag.index(":{") + 1:]


# The name ends of a job's record key and of its WatchJob channel (the Lua prelude derives the channel
# from the record's key: a channel is not a key, so a script may name it).
JOB_RECORD, JOB_CHANNEL = "fsm", "events"


@dataclass(frozen=True, slots=True)
class JobKeys:
    """The keys of one job (all in its partition's slot), and its channel."""

    fsm: str  # HASH: the FSM record, the spec (`spec`), the state changes (`h2`, `h3`, ...) and a short result (`r`);
    # long values in pieces
    payload: str
    result: str  # STRING: a result too long for the record (over wire.RESULT_PIECES pieces), or one an earlier version wrote
    channel: str  # pub/sub channel of the job's state changes while someone watches it (WatchJob): not a key

    @classmethod
    def of(cls, job_id: str) -> JobKeys:
        base = f"{PREFIX}job:{job_id}:"
        return cls(base + JOB_RECORD, base + "payload", base + "result", base + JOB_CHANNEL)


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys of one partition of a pool."""

    queue: str  # ZSET job id -> priority band + pass (tenants in turn within a priority: server/wire.py)
    timers: str  # ZSET lease, deadline, retry-ready and forget members (server/wire.py) -> due time (ms):
    #              the shard's, shared by all its pools (shard_timers)
    affinity: str  # HASH "<tenant>\0<session>" -> "<node_id>|<ms>": the node that served it last
    affinity_at: str  # ZSET "<tenant>\0<session>" -> ms of the binding: old ones are deleted
    fair: str  # ZSET fair share of the queue: "c<band>" -> the band's virtual clock, "t<band>:<tenant>" -> the
    #            tenant's last pass in the band (queue score units; lua/submit_job-n.lua), "e" -> minus
    #            when the key expires
    queued: str  # HASH second -> how many of the partition's queued jobs (in backoff too) entered QUEUED in
    #              that second (Redis time, ms // 1000; the job's record tells it: `updated`, written when it
    #              enters QUEUED again and not until it leaves; a job never changed since its submit has none:
    #              its creation `c`). Kept by the scripts that move a job into or out
    #              of QUEUED (the prelude's count_queued; a field that reaches 0 is deleted), so the pool's
    #              queued count is the sum and the oldest queued job entered in the lowest field's second:
    #              nothing per job (earlier versions kept a `waiting` zset of job ids: waiting_before)
    jobs: str  # ZSET of index members (the Lua prelude's index_member; each leaves when its job's forget timer
    #            fires, lua/forget_job-n.lua): the partition's jobs, ListJobs' index of a pool
    paused: str  # HASH reason, at: present while the pool is paused (PausePool); the claim script honours it
    held: str  # ZSET job id -> wire.HELD_ASSIGNED or HELD_RUNNING: the partition's jobs in those states
    #            (entered on a claim, rescored on an ack, left on a requeue or finish: idempotent counts)

    @classmethod
    def of(cls, tag: str) -> PartitionKeys:
        return cls(f"{PREFIX}queue:{tag}", shard_timers(shard_of_tag(tag)), f"{PREFIX}affinity:{tag}",
                   f"{PREFIX}affinity-at:{tag}", f"{PREFIX}fair:{tag}", f"{PREFIX}queued:{tag}",
                   f"{PREFIX}jobs:{tag}", f"{PREFIX}paused:{tag}", f"{PREFIX}held:{tag}")


def waiting_before(tag: str) -> str:
    """ZSET job id -> when it entered QUEUED (ms): what versions before the queued counts kept per partition.
    Each instance folds it into PartitionKeys.queued at start (lua/fold_waiting-2.lua), then it is gone."""
    return f"{PREFIX}waiting:{tag}"


def shard_timers(shard: str) -> str:
    """ZSET: every timer of a shard's jobs, all pools (`shard` is a hash tag such as `{3}`)."""
    return f"{PREFIX}timers:{shard}"


def idempotency(tag: str, tenant_id: str, session_id: str, identity: str) -> str:
    """Maps a submit's identity to its job id (same slot as the job). The session id and the identity
    may contain ':', so each variable part is length-prefixed: no two identities share a key."""
    return f"{PREFIX}idem:{tag}:{len(tenant_id)}:{tenant_id}:{len(session_id)}:{session_id}:{identity}"


def session_field(tenant_id: str, session_id: str) -> str:
    return f"{tenant_id}\x00{session_id}"


def session_jobs(shard: str, tenant_id: str, session_id: str) -> str:
    """ZSET job id -> utterance index: a session's jobs of every pool (they share one shard: `shard` is
    its hash tag), written by submit_job; WatchSession reads it. Length-prefixed like idempotency()
    (session ids may hold ':')."""
    return f"{PREFIX}session:{shard}:{len(tenant_id)}:{tenant_id}:{len(session_id)}:{session_id}"


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one shard that are not per pool (`shard` is its hash tag, `{3}`): what ListJobs and
    GetStats read, kept by the scripts with the jobs (server/stats.py)."""

    pools: str  # ZSET pool -> until when a job of it in the shard may live (its furthest deadline + retention, up
    #             to an eighth later): GetStats' and ListJobs' list of pools, those scored from now on (submits
    #             trim the others). Submit writes it only for a job that outlives the score its instance saw
    #             written within the last second (server/rates.py): about once per second per instance

    @classmethod
    def of(cls, shard: str) -> ShardKeys:
        return cls(f"{PREFIX}pools-until:{shard}")


def tenant_jobs(shard: str, tenant_id: str) -> str:
    """ZSET of index members (index_member): a tenant's jobs in the shard (ListJobs by tenant)."""
    return f"{PREFIX}jobs:{shard}:t:{len(tenant_id)}:{tenant_id}"


def ended_jobs(shard: str, state: str) -> str:
    """ZSET of index members (index_member): the shard's jobs that ended FAILED, EXPIRED or CANCELLED (rare
    states), within retention: ListJobs by one of those states reads this, not every job."""
    return f"{PREFIX}jobs:{shard}:s:{state}"


def rate_bucket(shard: str, bucket: int) -> str:
    """HASH "<pool>|submitted", "<pool>|finished" -> jobs in one RATE_BUCKET_MS window (GetStats' rates), added
    by each instance about once a second (server/rates.py), not by the scripts."""
    return f"{PREFIX}rate:{shard}:{bucket}"


def done_bucket(shard: str, bucket: int) -> str:
    """HASH "<pool>|<terminal state>" -> jobs that ended in one window of the retention (GetStats)."""
    return f"{PREFIX}done:{shard}:{bucket}"


def pool_channel(pool: str) -> str:
    """Pub/sub channel told when `pool` is paused or resumed (every instance's dispatcher listens)."""
    return f"{PREFIX}pool:{pool}"


# finish_job PUBLISHes "<job id> <utterance index> <state>" on SESSION_CHANNEL + the record's `sess`
# (session_field): a channel, not a key, so the script may name it (no slot: the one-slot rule is about
# keys), and finish_job's callers need not know the session.
SESSION_CHANNEL = PREFIX + "session-done:"


def session_channel(tenant_id: str, session_id: str) -> str:
    """Pub/sub channel told about every job of the session that reaches a terminal state."""
    return SESSION_CHANNEL + session_field(tenant_id, session_id)


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """The quota keys of one tenant (its own hash tag: one slot per tenant, apart from its jobs')."""

    bucket: str  # HASH tokens, ts: the submit-rate token bucket, shared by every instance
    jobs: str  # ZSET job id -> deadline (ms): the tenant's unfinished jobs, for its max_queued limit

    @classmethod
    def of(cls, tenant_id: str) -> TenantKeys:
        base = f"{PREFIX}tenant:{{{tenant_id}}}"
        return cls(base, base + ":jobs")


def node(node_id: str) -> str:
    """HASH: a registered node's capabilities, load and stream holder; expires unless renewed."""
    return f"{PREFIX}node:{{{node_id}}}"


NODES = PREFIX + "nodes"  # ZSET node id -> when its stream connected (ms): the index ListNodes reads
# ZSET instance id -> last sign of life (ms, Redis time): the live instances share the shards' sweeping.
INSTANCES = PREFIX + "instances"


def wake_channel(pool: str) -> str:
    """Pub/sub channel told about every job enqueued in `pool`."""
    return f"{PREFIX}wake:{pool}"


def node_channel(node_id: str) -> str:
    """Pub/sub channel for messages to whichever instance holds `node_id`'s stream (cancels)."""
    return f"{PREFIX}tonode:{node_id}"


# The partition (shard) count the first instance started with (SET NX); instances with another count
# refuse to start.
PARTITIONS = PREFIX + "config:partitions"
# The key layout of the data (SET NX with PARTITIONS): "shards" (timers per shard, job ids `src:tgt:{s}...`).
# A Redis with PARTITIONS but no LAYOUT holds jobs of the earlier layout ({src:tgt:p} ids): refused.
LAYOUT = PREFIX + "config:layout"
LAYOUT_VERSION = "shards"
