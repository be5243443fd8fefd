"""One frozen settings object, read from flags and LINGUA_* environment variables.

Flags win over the environment, which wins over the defaults. Durations are in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import ipaddress
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields


@dataclass(frozen=True, slots=True)
class Settings:
    # Where to listen ("host:port"; port 0 picks a free one). Without authentication only a loopback
    # address (or a unix: socket) is accepted, unless `insecure` is set: see check_exposure().
    listen: str = "127.0.0.1:50051"
    # Serve without authentication on a non-loopback address (for a network you trust).
    insecure: bool = False
    # Authentication (docs/security.md): key files (or folders of them) that verify bearer JWTs
    # (repeat the flag, or LINGUA_AUTH_JWT_KEY=a,b); none: no authentication. Optional required
    # audience and issuer.
    auth_jwt_key: tuple[str, ...] = ()
    auth_jwt_audience: str = ""
    auth_jwt_issuer: str = ""
    # Server TLS: PEM certificate chain and private key files (both or neither); with tls_client_ca,
    # clients must present a certificate signed by one of its CAs (mutual TLS). All three are re-read
    # when the files change, and on SIGHUP (server/tls.py).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Redis to use; empty starts an embedded redis-server with its data in `data_dir`.
    redis_url: str = ""
    # Redis Cluster seed nodes, "host:port,host:port"; when set, redis_url is not used.
    redis_cluster: str = ""
    # Redis Sentinel addresses, "host:port,host:port", and the monitored master's name; when set,
    # the scheduler follows the master the sentinels name (and redis_url is not used).
    redis_sentinel: str = ""
    redis_sentinel_master: str = "lingua"
    # Redis ACL user and password, and TLS, for every mode (a redis_url's own user:password@ and
    # rediss:// also work and win over these). redis_tls_ca is the PEM CA file that signed the Redis
    # server's certificate (else the system's roots); redis_tls_cert/key a client certificate, for a
    # Redis with tls-auth-clients yes (its default).
    redis_username: str = ""
    redis_password: str = ""
    redis_tls: bool = False
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    # Scheduler processes on this host (server/workers.py, docs/deployment.md "Several processes per
    # host"): with more than one, a supervisor process starts that many workers, each an instance of
    # its own (instance id `<instance_id>-<n>`, own event loop) on the one --listen port (SO_REUSEPORT),
    # worker n's operations HTTP port on the --http-listen port + n - 1; they share only Redis.
    workers: int = 1
    # Where the embedded Redis keeps its AOF and dump.
    data_dir: str = ".lingua/redis"
    # This instance's id, as shown in ListNodes and RegisterAck.
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Shards ("partitions") the jobs of every pool are spread over, by session. Every instance must use
    # the same number (it decides job ids' hash tags; the first instance stores it in Redis); on a Redis
    # Cluster, several per master. 0 (auto): the count stored in Redis, else 1 on one Redis (standalone
    # or Sentinel) and 4 per primary on a Redis Cluster (docs/deployment.md, "How many partitions").
    partitions: int = 0
    # How long a finished job's record and result stay readable.
    retention_ms: int = 3_600_000
    # Deadline of a job submitted without one, and the furthest deadline accepted.
    default_job_ttl_ms: int = 600_000
    max_job_ttl_ms: int = 86_400_000
    # Attempts of a job submitted with max_attempts 0, and the most accepted.
    default_max_attempts: int = 3
    max_attempts_cap: int = 20
    # Execution timeout of a job submitted without one.
    default_execution_timeout_ms: int = 300_000
    # Largest inline payload / TTS audio accepted (RESOURCE_EXHAUSTED above), and largest Submit batch.
    max_payload_bytes: int = 1_048_576
    max_batch: int = 500
    # A node must ack an assignment within ack_timeout, then heartbeat at least every heartbeat
    # interval; a lease lasts lease_ms after the last ack or heartbeat.
    ack_timeout_ms: int = 5_000
    heartbeat_interval_ms: int = 1_000
    lease_ms: int = 5_000
    # Back-pressure: a node stream holds at most this many assignments it has not acknowledged (never
    # more than its max_concurrency); more are sent as it acks. A stream that lets an assignment pass
    # its ack timeout unacknowledged is quarantined (no new work) until it acknowledges one or
    # reconnects; the job goes back to the queue with its attempt given back (ack_timeout).
    ack_window: int = 16
    # After a node's stream closes, its jobs are requeued once this grace has passed without it back.
    # At least twice the heartbeat interval: a closing stream shortens its leases to this grace
    # without knowing whether the node is already back on another stream; the node's next heartbeat
    # (within one interval, plus its trip to Redis) lengthens them again.
    stream_grace_ms: int = 2_000
    # Retry backoff: base * 2^(attempt-1), capped.
    backoff_base_ms: int = 200
    backoff_max_ms: int = 10_000
    # A job of a session waits this long for the node that served the session last.
    affinity_wait_ms: int = 50
    # A requeued job keeps away this long from the node that lost it (or lacked its model); after
    # that any node may take it, so a pool with a single node still makes progress.
    avoid_ms: int = 2_000
    # A session's binding to its node is forgotten after this long without a job.
    affinity_ttl_ms: int = 600_000
    # Slow poll behind the pub/sub wake-ups, and the period of the timer sweep.
    poll_interval_ms: int = 250
    sweep_interval_ms: int = 200
    # Live instances share the shards' sweeping: each renews its sign of life this often, and one
    # silent for 3 periods is taken for gone (its shards go to the others). See docs/design.md.
    instance_heartbeat_ms: int = 1_000
    # Registry presence of a node. Each instance renews the entries of its streams every node_ttl / 3,
    # pipelined (500 per round trip), and only those of nodes that proved alive since the last renewal
    # (a message, or an answered ping); the entry of a node that stops answering is left to expire.
    # ListNodes hides an entry older than node_listed_ms() at once. At least node_listed_ms(), so
    # the entry of a live node never expires between two renewals.
    node_ttl_ms: int = 30_000
    # Liveness of node streams: a stream that carried no message from its node for ping_interval_ms is
    # sent a ping (SchedulerMessage.ping); a ping left unanswered (by a pong or any other message) for
    # ping_timeout_ms ends the stream UNAVAILABLE (NODE_UNRESPONSIVE), and its jobs go as those of any
    # lost stream (stream_grace_ms, then requeued as node_lost). One task per instance checks every
    # stream each liveness_tick_ms(). Both must be above 0; the node learns both in RegisterAck.
    ping_interval_ms: int = 5_000
    ping_timeout_ms: int = 10_000
    # Grace period for streams to drain on SIGTERM.
    shutdown_grace_s: float = 5.0
    # Run the event loop on uvloop (faster); --uvloop 0 for the standard asyncio loop.
    uvloop: int = 1
    # Redis connections this instance holds at most (per node on a cluster), whatever the number of
    # streams and calls: dispatch is one task per instance, so streams do not each need one. A call
    # that finds them all busy waits for one, up to redis_pool_timeout_ms, then fails (UNAVAILABLE).
    redis_max_connections: int = 256
    redis_pool_timeout_ms: int = 5_000
    # Messages one stream may have waiting: a node stream's outbox (the node does not read), a watch's
    # inbox (WatchJob, WatchSession). A stream over it is ended with RESOURCE_EXHAUSTED, so one client
    # that stops reading cannot grow the server's memory; a watcher resumes, a node reconnects.
    stream_outbox_max: int = 1024
    # Calls gRPC has taken off the wire that this instance has not yet started (grpc.aio starts them
    # one at a time on its loop, so a burst of streams opened at once queues here). Over it, gRPC
    # refuses new calls with a bare CANCELLED before any handler, log line or metric sees them. gRPC's
    # own default (refusing some from 1000, all from 3000) cut ~1,500 WatchJobs opened at once; the
    # bound still keeps a flood of calls from holding memory without end (docs/operations.md).
    grpc_max_pending_calls: int = 10_000
    # The pools (directed pairs "src:tgt", comma-separated: "zh:en,en:zh") this deployment serves;
    # empty: any pair. Submit, Assign and Register of another pair are refused with INVALID_ARGUMENT,
    # so made-up pairs create no pool to sweep.
    pools: str = ""
    # Per-tenant fair-share weights and Submit limits (max_queued, submit_rate, submit_burst): a TOML
    # file (server/tenants.py, docs/deployment.md), read at start and again on SIGHUP. Empty: every
    # tenant weighs 1 and has no limit (and Submit costs no extra round trip).
    tenants: str = ""
    # The operations HTTP port (server/http.py): Prometheus metrics at /metrics, the live dashboard at
    # /. "host:port" (port 0 picks a free one); empty turns it off. Loopback by default: see
    # docs/operations.md before exposing it.
    http_listen: str = "127.0.0.1:8081"
    # Log lines as "text" (human-readable) or "json" (one object per line, for log shippers).
    log_format: str = "text"
    # The least severe lines written: debug (adds a line per job submitted, assigned and finished),
    # info, warning or error.
    log_level: str = "info"

    def allowed_pools(self) -> frozenset[str] | None:
        """The --pools allow-list, or None when every pair is allowed."""
        return _pool_set(self.pools)

    def liveness_tick_ms(self) -> int:
        """How often the liveness task checks every stream (pings, timeouts, registry renewals): a
        quarter of the shorter of ping_interval_ms and ping_timeout_ms, so each fires at most that late."""
        return max(10, min(self.ping_interval_ms, self.ping_timeout_ms) // 4)

    def node_listed_ms(self) -> int:
        """How recent a node's last registry renewal must be for ListNodes to show it. A live node is
        renewed at least this often: it proves alive within ping_interval + ping_timeout (plus a tick to
        send the ping), its instance renews it at the first tick after both that and a renewal period
        (node_ttl / 3) since the last renewal; one more tick is spare for Redis and event-loop delays."""
        return max(self.node_ttl_ms // 3, self.ping_interval_ms + self.ping_timeout_ms) + 3 * self.liveness_tick_ms()

    @classmethod
    @functools.cache  # ~15 ms to read: once per process
    def help_texts(cls) -> dict[str, str]:
        """Each field's --help text: the comment above it in this class, so the flags are documented where
        the fields are. A comment above several fields is the first one's; the others point to it."""
        texts: dict[str, str] = {}
        block: list[str] = []
        first = ""  # the first field under the current comment
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # no source shipped (a frozen build): flags without their texts
            return {}
        for line in source.splitlines():
            if line.startswith("    #"):
                if first:  # a comment after a field starts the next block
                    block, first = [], ""
                block.append(line[5:].strip())
            elif found := re.match(r"    (\w+): ", line):
                texts[found[1]] = f"see --{first.replace('_', '-')}" if first else " ".join(block)
                first = first or found[1]
        return texts

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> Settings:
        """Settings from `argv` flags (--redis-url ...) over LINGUA_* variables over defaults."""
        env = dict(os.environ) if env is None else env
        parser = argparse.ArgumentParser(
            prog="lingua-scheduler", description="Lingua Scheduler server. Each flag can also be given as the "
            "environment variable LINGUA_<NAME> (--redis-url: LINGUA_REDIS_URL); a flag wins over the variable. "
            "Durations are in milliseconds (-s: seconds). Also: `lingua-scheduler token --help` mints tokens.")
        texts, defaults = cls.help_texts(), cls()
        values: dict[str, object] = {}
        for f in fields(cls):
            flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
            kind = type(default)
            raw = env.get("LINGUA_" + f.name.upper())
            shown = "random" if f.name == "instance_id" else default if default not in ("", ()) else "none"
            text = f"{texts.get(f.name, '')} (default: {shown})"
            text = text.replace("%", "%%")  # argparse formats help with %
            if kind is bool:  # a switch: --insecure; LINGUA_INSECURE=1/true/yes
                parser.add_argument(flag, action="store_true", default=None, help=text)
                if raw is not None:
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind is tuple:  # repeatable: --auth-jwt-key A --auth-jwt-key B; LINGUA_AUTH_JWT_KEY=A,B
                parser.add_argument(flag, action="append", default=None, help=text)
                if raw is not None:
                    values[f.name] = tuple(item for item in raw.split(",") if item)
            else:
                parser.add_argument(flag, type=kind, default=None, help=text)
                if raw is not None:
                    values[f.name] = kind(raw)
        for name, value in vars(parser.parse_args(argv)).items():
            if value is not None:
                values[name] = tuple(value) if isinstance(value, list) else value
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.partitions > 1024:
            raise ValueError("partitions must be 1 to 1024, or 0 (auto)")
        if self.heartbeat_interval_ms * 2 > self.lease_ms:
            raise ValueError("lease_ms must be at least twice heartbeat_interval_ms")
        if self.stream_grace_ms < 2 * self.heartbeat_interval_ms:
            raise ValueError("stream_grace_ms must be at least twice heartbeat_interval_ms (a node back on another "
                             "stream must heartbeat within the grace a closing stream leaves its leases)")
        from .validate import LANG  # here: validate imports this module

        for pool in self.allowed_pools() or ():
            src, _, tgt = pool.partition(":")
            if not (LANG.fullmatch(src) and LANG.fullmatch(tgt)) or src == tgt:
                raise ValueError(f"--pools: {pool!r} is not a pair such as 'zh:en' (two different language tags)")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.workers > 1:
            self._check_workers()
        if self.stream_outbox_max < 1:
            raise ValueError("stream_outbox_max must be at least 1")
        if self.grpc_max_pending_calls < 1:
            raise ValueError("grpc_max_pending_calls must be at least 1")
        if self.ack_window < 1:
            raise ValueError("ack_window must be at least 1")
        if self.instance_heartbeat_ms < 1 or self.redis_pool_timeout_ms < 1:
            raise ValueError("instance_heartbeat_ms and redis_pool_timeout_ms must be at least 1")
        if self.ping_interval_ms < 1 or self.ping_timeout_ms < 1:
            raise ValueError("ping_interval_ms and ping_timeout_ms must be above 0")
        if self.node_ttl_ms < self.node_listed_ms():
            raise ValueError(f"node_ttl_ms must be at least {self.node_listed_ms()} with these ping settings "
                             "(max(node_ttl_ms / 3, ping_interval_ms + ping_timeout_ms) + 3 liveness ticks): a live "
                             "node's registry entry must not expire between two renewals")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"{f.name} must not be negative")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        if self.http_listen:
            from .http import split_listen

            split_listen(self.http_listen)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ValueError("--redis-tls-cert and --redis-tls-key go together")
        self.check_exposure()

    def _check_workers(self) -> None:
        """Several workers share a TCP port: not a unix socket, and room for their HTTP ports."""
        if self.listen.startswith(("unix:", "unix-abstract:")):
            raise ValueError(f"--workers {self.workers} needs a TCP --listen address (HOST:PORT): workers share "
                             f"a port through SO_REUSEPORT, which a unix socket ({self.listen}) does not have")
        if self.http_listen:
            from .http import split_listen

            _, port = split_listen(self.http_listen)
            if port and port + self.workers - 1 > 65535:
                raise ValueError(f"--http-listen {self.http_listen} with --workers {self.workers}: worker n listens on "
                                 "the port + n - 1, past 65535; give a lower port")

    def check_exposure(self) -> None:
        """Refuse to serve without authentication beyond loopback (Redis's protected mode is the model)."""
        if self.auth_jwt_key or self.insecure or is_local(self.listen):
            return
        raise ValueError(
            f"refusing to listen on {self.listen} without authentication: anyone who can reach it could read, "
            "cancel and take every tenant's jobs. Give --auth-jwt-key FILE (see docs/security.md), listen on "
            "a loopback address (127.0.0.1:PORT), or, on a network you trust, add --insecure")


@functools.cache
def _pool_set(text: str) -> frozenset[str] | None:
    pools = frozenset(item.strip() for item in text.split(",") if item.strip())
    return pools or None


def is_local(listen: str) -> bool:
    """Whether a gRPC listen address is reachable from this machine only: a loopback IP, localhost, or a
    unix socket. Any other name or address (0.0.0.0, [::], a hostname) counts as exposed."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return is_loopback_name(host.removeprefix("[").removesuffix("]"))


def is_loopback_name(host: str) -> bool:
    """localhost, or a loopback IP address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
