"""Time buckets of the figures GetStats reads (server/stats.py): submits and finishes per RATE_BUCKET_MS
(rates over the last minute) and ended jobs per done_bucket_ms(retention) (jobs by terminal state within
the retention). Each bucket is one hash per shard that expires once it no longer counts, so reading
the figures costs a few dozen small reads per shard, whatever the traffic. Ended jobs are counted by
finish_job into the bucket of the instance's clock (the key is named before the call), submits and
finishes by the instance itself (server/rates.py, flushed each second): skew shifts a count by a bucket."""

from __future__ import annotations

import math
import time

from . import keys

RATE_BUCKET_MS = 5_000
RATE_WINDOW_MS = 60_000
DONE_BUCKETS = 30  # the retention is covered by this many buckets (a count is off by at most one's share)


def done_bucket_ms(retention_ms: int) -> int:
    return max(1_000, math.ceil(retention_ms / DONE_BUCKETS))


def now_ms() -> int:
    return int(time.time() * 1000)


def rate(shard: str, at_ms: int) -> tuple[str, int]:
    """The rate bucket key of `at_ms` and when it expires (once out of every window read)."""
    b = at_ms // RATE_BUCKET_MS
    return keys.rate_bucket(shard, b), (b + 1) * RATE_BUCKET_MS + RATE_WINDOW_MS + RATE_BUCKET_MS


def done(shard: str, at_ms: int, retention_ms: int) -> tuple[str, int]:
    """The done bucket key of `at_ms` and when it expires (once its jobs are past the retention)."""
    width = done_bucket_ms(retention_ms)
    b = at_ms // width
    return keys.done_bucket(shard, b), (b + 2) * width + retention_ms


def rate_keys(shard: str, now: int) -> list[str]:
    """The rate buckets of the last RATE_WINDOW_MS (the current one partly)."""
    last = now // RATE_BUCKET_MS
    return [keys.rate_bucket(shard, b) for b in range(last - RATE_WINDOW_MS // RATE_BUCKET_MS, last + 1)]


def done_keys(shard: str, now: int, retention_ms: int) -> list[str]:
    """The done buckets that may hold jobs still within the retention."""
    width = done_bucket_ms(retention_ms)
    last = now // width
    return [keys.done_bucket(shard, b) for b in range(last - retention_ms // width - 1, last + 1)]
