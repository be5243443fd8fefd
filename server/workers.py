"""`lingua-scheduler --workers N`: N scheduler processes on one gRPC port, under a supervisor.

Each worker is an ordinary scheduler process (`python -m lingua_scheduler.server`, the same flags),
an instance of its own: its own event loop, Redis connections, dispatcher and instance id
(`<--instance-id>-<n>`, n = 1..N, kept across its restarts), sharing nothing with the others but Redis,
as any instances on one Redis do (docs/design.md). They listen on one port: gRPC sets SO_REUSEPORT on
Linux (`grpc.so_reuseport`, on by default), and the kernel spreads new connections over them; a
connection, and every stream on it, stays with the worker that accepted it.

The supervisor (this module, the process that was started):
- holds the port: it binds it with SO_REUSEPORT (never listening: the kernel hands connections to
  listening sockets only) before any worker starts, so port 0 becomes one free port every worker is
  given, and the port stays this host's while a worker restarts;
- starts the embedded Redis, when there is one, once (server/main.py) and gives every worker its URL;
- gives worker n the operations HTTP port `--http-listen` port + n - 1 (each its own /metrics and
  dashboard: Prometheus scrapes every worker as its own target), or a free one each with port 0;
- prints `lingua-scheduler listening on HOST:PORT` (first line of stdout) once every worker listens,
  then one `lingua-scheduler http on HOST:PORT (worker n, instance ID)` line per worker;
- SIGTERM/SIGINT: passes SIGTERM to every worker (each drains as one scheduler does) and exits when
  all have; SIGHUP: passes it to every worker;
- restarts a worker that exits on its own (crash, SIGKILL, OOM) after a backoff (1 s, doubling to
  30 s, back to 1 s once a worker has served for a minute), and logs why.

Exit status: 0 when stopped by a signal and every worker drained (exited 0); 1 when a worker did not
(it exited with an error, or was killed after the drain's time limit); a worker's own status (1 or 2)
when one fails before all listen: the supervisor then stops the others at once, since a worker that
cannot start (a port taken, --partitions refused by Redis, a bad key file) will not start either on
a retry.

A worker learns it is one from WORKER_ENV ("n/N") in its environment: its log lines name its
instance, and it stops (draining) when its stdin, a pipe from the supervisor, reaches end of file,
which happens when the supervisor is gone, even by SIGKILL: no orphan keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from .http import split_listen
from .settings import Settings

log = logging.getLogger("lingua_scheduler.workers")

WORKER_ENV = "LINGUA_WORKER_SLOT"  # "n/N" in a worker's environment; never set by hand
RESTART_FIRST_S = 1.0  # first restart delay, doubled at each quick exit up to RESTART_MAX_S
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # a worker that served this long before it exited restarts after RESTART_FIRST_S again
STOP_SLACK_S = 30.0  # beyond --shutdown-grace-s, what a worker's drain may take before SIGKILL


def slot() -> str:
    """This process's "n/N" when it is a worker of a supervisor, else ""."""
    return os.environ.get(WORKER_ENV, "")


def hold_port(listen: str) -> socket.socket:
    """A socket bound (never listening) with SO_REUSEPORT to the --listen address: port 0 gets a
    free port, and no process without SO_REUSEPORT can take the port while workers come and go.
    OSError when it cannot be bound (another process holds it without SO_REUSEPORT)."""
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    family, kind, proto, _, address = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def describe(status: int) -> str:
    """A returncode in words."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class Worker:
    """One worker slot: its process (restarted in place), instance id and ports."""

    def __init__(self, n: int, count: int, settings: Settings, argv: Sequence[str], listen: str) -> None:
        self.n, self.count = n, count
        self.instance_id = f"{settings.instance_id}-{n}"
        http_listen = ""
        if settings.http_listen:
            _, port = split_listen(settings.http_listen)
            http_listen = f"{settings.http_listen.rpartition(':')[0]}:{port + n - 1 if port else 0}"
        self.http_listen = http_listen
        self.http = ""  # where its HTTP port listens, once it does
        # Flags win in the order given, so these override the operator's (the rest are passed as given).
        redis = ["--redis-url", settings.redis_url] if settings.redis_url else []
        self.command = [sys.executable, "-m", "lingua_scheduler.server", *argv, *redis, "--workers", "1",
                        "--listen", listen, "--instance-id", self.instance_id, "--http-listen", http_listen]
        self.proc: asyncio.subprocess.Process | None = None
        self.listening = False  # its current process listens
        self.started_at = 0.0
        self._relay: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        pid = self.proc.pid if self.proc is not None else "-"
        return f"worker {self.n} (pid {pid}, instance {self.instance_id})"

    async def start(self, stopping: asyncio.Event) -> bool:
        """Start its process; True once it listens (and its HTTP port too), False if it exited first
        (told to stop at once when `stopping` is set by then)."""
        self.listening, self.http = False, ""
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, WORKER_ENV: f"{self.n}/{self.count}"})
        if stopping.is_set():  # the supervisor stopped while this one was being started
            self.signal(signal.SIGTERM)
        assert self.proc.stdout is not None
        while not (self.listening and (self.http or not self.http_listen)):
            line = (await self.proc.stdout.readline()).decode(errors="replace").strip()
            if not line:  # its stdout closed: it is exiting
                await self.proc.wait()
                return False
            if line.startswith("lingua-scheduler listening on "):
                self.listening = True
            elif line.startswith("lingua-scheduler http on "):
                self.http = line.rsplit(" ", 1)[-1]
        self._relay = asyncio.create_task(self._pass_on(self.proc.stdout))
        return True

    @staticmethod
    async def _pass_on(stdout: asyncio.StreamReader) -> None:
        """Whatever else it prints goes to our stdout (and its pipe never fills)."""
        while line := await stdout.readline():
            with contextlib.suppress(OSError):  # our stdout closed by whoever read the startup lines
                sys.stdout.buffer.write(line)
                sys.stdout.flush()

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None
        status = await self.proc.wait()
        if self._relay is not None:
            await self._relay  # its stdout ends with it
            self._relay = None
        return status


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.port_holder = hold_port(settings.listen)
        self.host = settings.listen.rpartition(":")[0]
        self.port = self.port_holder.getsockname()[1]
        listen = f"{self.host}:{self.port}"
        self.workers = [Worker(n, settings.workers, settings, argv, listen) for n in range(1, settings.workers + 1)]
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hup)
        try:
            return await self._run()
        finally:
            self.port_holder.close()

    async def _run(self) -> int:
        log.info("starting %d workers on %s:%d (instances %s-1 to -%d)", len(self.workers), self.host, self.port,
                 self.settings.instance_id, len(self.workers))
        ready = {w: asyncio.get_running_loop().create_future() for w in self.workers}
        lives = [asyncio.create_task(self._life(w, ready[w])) for w in self.workers]
        stop = asyncio.create_task(self.stopping.wait())
        waiting: set[asyncio.Future[Any]] = {*ready.values(), stop}
        failed = None
        while len(waiting) > 1 and not stop.done() and failed is None:  # until all listen, one fails, or a signal
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            failed = next((w for w in self.workers if ready[w] in done and not ready[w].result()), None)
        if failed is None and not stop.done():
            print(f"lingua-scheduler listening on {self.host}:{self.port}", flush=True)
            for w in self.workers:
                if w.http:
                    print(f"lingua-scheduler http on {w.http} (worker {w.n}, instance {w.instance_id})", flush=True)
            await stop
        stop.cancel()
        statuses = await self._stop_all(lives)
        if failed is not None:
            status = statuses[failed.n - 1] or 1
            log.error("%s %s before it listened: stopped the others", failed, describe(status))
            return status if status > 0 else 1
        return 0 if all(s in (None, 0, -signal.SIGTERM) for s in statuses) else 1

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping the %d workers (each drains for up to %.1f s)", sig.name, len(self.workers),
                     self.settings.shutdown_grace_s)
        self.stopping.set()

    def _hup(self) -> None:
        log.info("SIGHUP: passed to the %d workers", len(self.workers))
        for w in self.workers:
            w.signal(signal.SIGHUP)

    async def _life(self, w: Worker, ready: asyncio.Future[bool]) -> int | None:
        """Run `w`, restarting it whenever it exits on its own, until the supervisor stops; its last
        process's exit status (None: it was down, waiting to restart). `ready` says whether its first
        process listened (one that does not ends it: see the module's docstring)."""
        delay = RESTART_FIRST_S
        while True:
            listening = await w.start(self.stopping)
            if listening:
                log.info("%s listening on %s:%d%s", w, self.host, self.port,
                         f", operations HTTP port http://{w.http}/" if w.http else "")
            if not ready.done():
                ready.set_result(listening)
                if not listening:
                    return await w.wait()
            status = await w.wait()
            if self.stopping.is_set():
                return status
            if w.listening and time.monotonic() - w.started_at >= STABLE_S:
                delay = RESTART_FIRST_S
            log.error("%s %s; restarting it in %.0f s", w, describe(status), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return None
            delay = min(delay * 2, RESTART_MAX_S)

    async def _stop_all(self, lives: list[asyncio.Task[int | None]]) -> list[int | None]:
        """SIGTERM every worker and wait for all (SIGKILL past the limit); their exit statuses."""
        self.stopping.set()
        for w in self.workers:
            w.signal(signal.SIGTERM)
        limit = self.settings.shutdown_grace_s + STOP_SLACK_S
        _, late = await asyncio.wait(lives, timeout=limit)
        for w, life in zip(self.workers, lives, strict=True):
            if life in late:
                log.error("%s still running %.0f s after SIGTERM: killing it", w, limit)
                w.signal(signal.SIGKILL)
        statuses = list(await asyncio.gather(*lives))
        for w, status in zip(self.workers, statuses, strict=True):
            if status in (0, -signal.SIGTERM):
                log.info("%s stopped", w)
            elif status is not None:
                log.error("%s %s while stopping", w, describe(status))
        return statuses


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run settings.workers workers (see the module's docstring); the exit status."""
    async def run() -> int:
        try:
            supervisor = Supervisor(settings, argv)
        except OSError as err:
            print(f"lingua-scheduler: --listen {settings.listen}: {err.strerror or err}", file=sys.stderr)
            return 1
        return await supervisor.run()

    return asyncio.run(run())
