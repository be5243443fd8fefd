"""The node registry in Redis: presence with a TTL, capabilities, load, and which instance holds
the node's stream. The newest stream of a node id wins (see lua/register_node-1.lua).

An instance renews the entries of its streams in pipelined round trips (`renew_many`), and only
those of nodes that proved alive since the last renewal; each renewal records the time (`seen`, by
the Redis server's clock). `entries` shows only entries renewed recently (against the clock of the same
Redis), so a node whose stream went silent, or whose instance died, leaves ListNodes before its entry
expires.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import keys
from .calls import ReadClock, RegisterNode, ReleaseNode
from .scripts import Scripts

# Renewals per pipelined round trip. Building and reading a pipeline holds the event loop (about
# 50 us per renewal): 500 keep each hold to tens of ms, so dispatch is not stalled by 5,000 streams.
RENEW_BATCH = 500


@dataclass(frozen=True, slots=True)
class NodeEntry:
    node_id: str
    pools: list[str]
    max_concurrency: int
    in_flight: int
    instance_id: str
    labels: dict[str, str]
    version: str
    connected_ms: int
    draining: bool
    quarantined: bool = False  # no new work: it let an assignment pass its ack timeout (server/node.py)
    seen_ms: int = 0  # its last renewal (by the entry's Redis clock): when it last proved alive, as read


def _fields(entry: NodeEntry) -> tuple[tuple[str, str | int], ...]:
    return (
        ("pools", ",".join(entry.pools)), ("maxc", entry.max_concurrency), ("inflight", entry.in_flight),
        ("instance", entry.instance_id), ("labels", json.dumps(entry.labels, sort_keys=True)),
        ("version", entry.version), ("connected", entry.connected_ms), ("draining", int(entry.draining)),
        ("quarantined", int(entry.quarantined)),
    )


def _parse(node_id: str, h: dict[bytes, bytes]) -> NodeEntry:
    return NodeEntry(
        node_id=node_id, pools=[p for p in h[b"pools"].decode().split(",") if p],
        max_concurrency=int(h[b"maxc"]), in_flight=int(h[b"inflight"]),
        instance_id=h[b"instance"].decode(), labels=json.loads(h[b"labels"]),
        version=h[b"version"].decode(), connected_ms=int(h[b"connected"]),
        draining=h[b"draining"] == b"1", quarantined=h.get(b"quarantined") == b"1",
        seen_ms=int(h.get(b"seen", 0)),
    )


class Registry:
    def __init__(self, redis: Any, scripts: Scripts, ttl_ms: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self.ttl_ms = ttl_ms
        # Told (node id, session token) when a registration or renewal finds a drain request (DrainNode)
        # for an entry not yet draining: the instance holding that stream drains it.
        self.on_drain_requested: Callable[[str, str], None] | None = None

    def _drain_asked(self, entry: NodeEntry, token: str, reply: Any) -> None:
        if len(reply) > 2 and int(reply[2]) == 1 and not entry.draining and self.on_drain_requested is not None:
            self.on_drain_requested(entry.node_id, token)

    async def register(self, entry: NodeEntry, token: str, *, renew: bool = False) -> str | None:
        """Register (or renew) the node; returns the token it replaced (None: renew refused, another
        stream took over). Renewing an entry that expired takes it back ("" returned)."""
        reply = await self.scripts.call(self.redis, RegisterNode(entry.node_id, token, renew, self.ttl_ms,
                                                                 _fields(entry)).call())
        if reply[0] < 0:
            return None
        await self.redis.zadd(keys.NODES, {entry.node_id: entry.connected_ms})
        self._drain_asked(entry, token, reply)
        return str(reply[1].decode())

    async def renew_many(self, items: list[tuple[NodeEntry, str]]) -> list[str | Exception | None]:
        """Renew the entries of many streams ((entry, session token) each): one pipelined round trip
        per RENEW_BATCH of them. Per item as register(renew=True): the token replaced, None when
        another stream took the node over, or the exception of that call. Only entries that had
        expired (taken back) are added to the ListNodes index again, in one more round trip."""
        replies: list[Any] = []
        for start in range(0, len(items), RENEW_BATCH):
            replies += await self.scripts.call_many(self.redis, [
                RegisterNode(entry.node_id, token, True, self.ttl_ms, _fields(entry)).call()
                for entry, token in items[start:start + RENEW_BATCH]])
        out: list[str | Exception | None] = []
        back: dict[str, int] = {}
        for (entry, token), reply in zip(items, replies, strict=True):
            if isinstance(reply, Exception):
                out.append(reply)
            elif reply[0] < 0:
                out.append(None)
            else:
                out.append(reply[1].decode())
                self._drain_asked(entry, token, reply)
                if not reply[1]:  # the entry had expired: entries() may have dropped it from the index
                    back[entry.node_id] = entry.connected_ms
        if back:
            await self.redis.zadd(keys.NODES, back)
        return out

    async def release(self, node_id: str, token: str) -> bool:
        reply = await self.scripts.call(self.redis, ReleaseNode(node_id, token).call())
        if reply[0] > 0:
            await self.redis.zrem(keys.NODES, node_id)
        return bool(reply[0] > 0)

    async def entry(self, node_id: str) -> NodeEntry | None:
        """One node's entry, however old (None when it has none)."""
        h = await self.redis.hgetall(keys.node(node_id))
        return _parse(node_id, h) if h else None

    async def entries(self, max_age_ms: int) -> list[NodeEntry]:
        """The entries renewed within `max_age_ms`: the index and the Redis clock (of the index's
        server) at once, then every entry in one pipelined read. Ids whose entry is gone are dropped
        from the index; stale entries are only hidden (their TTL removes them, or a renewal brings
        them back). On a cluster, `seen` is by the entry's server's clock: their skew shifts the window."""
        found_ids, now = await asyncio.gather(self.redis.zrange(keys.NODES, 0, -1),
                                              self.scripts.call(self.redis, ReadClock().call()))
        ids = [i.decode() for i in found_ids]
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id in ids:
                pipe.hgetall(keys.node(node_id))
            found = await pipe.execute()
        out, gone = [], []
        for node_id, h in zip(ids, found, strict=True):
            if not h:
                gone.append(node_id)  # presence expired: its instance died without releasing it
                continue
            if int(now) - int(h.get(b"seen", 0)) > max_age_ms:
                continue  # not renewed lately: its node stopped answering, or its instance stopped
            out.append(_parse(node_id, h))
        if gone:
            await self.redis.zrem(keys.NODES, *gone)
        return out
