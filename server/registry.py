"""The node registry in Redis: presence with a TTL, capabilities, load, and which instance holds
the node's stream. The newest stream of a node id wins (see lua/register_node-1.lua)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import keys
from .calls import RegisterNode, ReleaseNode
from .scripts import Scripts


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


class Registry:
    def __init__(self, redis: Any, scripts: Scripts, ttl_ms: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self.ttl_ms = ttl_ms

    async def register(self, entry: NodeEntry, token: str, *, renew: bool = False) -> str | None:
        """Register (or renew) the node; returns the token it replaced (None: renew refused, another
        stream took over). Renewing an entry that expired takes it back ("" returned)."""
        fields = (
            ("pools", ",".join(entry.pools)), ("maxc", entry.max_concurrency), ("inflight", entry.in_flight),
            ("instance", entry.instance_id), ("labels", json.dumps(entry.labels, sort_keys=True)),
            ("version", entry.version), ("connected", entry.connected_ms), ("draining", int(entry.draining)),
            ("quarantined", int(entry.quarantined)),
        )
        reply = await self.scripts.call(self.redis, RegisterNode(entry.node_id, token, renew, self.ttl_ms,
                                                                 fields).call())
        if reply[0] < 0:
            return None
        await self.redis.zadd(keys.NODES, {entry.node_id: entry.connected_ms})
        return str(reply[1].decode())

    async def release(self, node_id: str, token: str) -> bool:
        reply = await self.scripts.call(self.redis, ReleaseNode(node_id, token).call())
        if reply[0] > 0:
            await self.redis.zrem(keys.NODES, node_id)
        return bool(reply[0] > 0)

    async def entries(self) -> list[NodeEntry]:
        ids = [i.decode() for i in await self.redis.zrange(keys.NODES, 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id in ids:
                pipe.hgetall(keys.node(node_id))
            found = await pipe.execute()
        out, gone = [], []
        for node_id, h in zip(ids, found, strict=True):
            if not h:
                gone.append(node_id)  # presence expired: its instance died without releasing it
                continue
            out.append(NodeEntry(
                node_id=node_id, pools=[p for p in h[b"pools"].decode().split(",") if p],
                max_concurrency=int(h[b"maxc"]), in_flight=int(h[b"inflight"]),
                instance_id=h[b"instance"].decode(), labels=json.loads(h[b"labels"]),
                version=h[b"version"].decode(), connected_ms=int(h[b"connected"]),
                draining=h[b"draining"] == b"1", quarantined=h.get(b"quarantined") == b"1",
            ))
        if gone:
            await self.redis.zrem(keys.NODES, *gone)
        return out
