"""Safe by default: without authentication the server listens on loopback only, unless --insecure."""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import pytest
from lingua_scheduler.server.app import create_server
from lingua_scheduler.server.main import _redacted, main
from lingua_scheduler.server.settings import Settings, is_local


@pytest.mark.parametrize(("listen", "local"), [
    ("127.0.0.1:50051", True), ("127.8.0.1:0", True), ("localhost:50051", True), ("[::1]:50051", True),
    ("unix:/run/lingua.sock", True), ("0.0.0.0:50051", False), ("[::]:50051", False), ("10.0.0.5:50051", False),
    ("scheduler.internal:50051", False), (":50051", False),
])
def test_what_counts_as_loopback(listen: str, local: bool) -> None:
    assert is_local(listen) is local


def test_a_non_loopback_address_without_auth_is_refused_naming_the_flags() -> None:
    with pytest.raises(ValueError, match="without authentication") as refused:
        Settings.load(["--listen", "0.0.0.0:0"], env={})
    assert "--auth-jwt-key" in str(refused.value) and "--insecure" in str(refused.value)
    with pytest.raises(ValueError, match="--insecure"):  # the environment is read the same way
        Settings.load([], env={"LINGUA_LISTEN": "[::]:0"})
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        assert main(["--listen", "0.0.0.0:0"]) == 2  # refused before anything starts or binds
    assert "refusing to listen on 0.0.0.0:0 without authentication" in stderr.getvalue()


def test_create_server_refuses_too() -> None:
    """The library entry point checks as well (tests and embedders build Settings directly)."""
    with pytest.raises(ValueError, match="--auth-jwt-key"):
        create_server(Settings(listen="0.0.0.0:0", redis_url="redis://127.0.0.1:1/0"))


def test_insecure_or_a_jwt_key_lifts_the_refusal() -> None:
    assert Settings.load(["--listen", "0.0.0.0:0", "--insecure"], env={}).insecure is True
    assert Settings.load(["--listen", "0.0.0.0:0"], env={"LINGUA_INSECURE": "1"}).insecure is True
    assert Settings.load([], env={"LINGUA_INSECURE": "0"}).insecure is False
    keys = Settings.load(["--listen", "0.0.0.0:0", "--auth-jwt-key", "a.pem", "--auth-jwt-key", "b.pem"], env={})
    assert keys.auth_jwt_key == ("a.pem", "b.pem")
    assert Settings.load([], env={"LINGUA_AUTH_JWT_KEY": "a.pem,b.pem"}).auth_jwt_key == ("a.pem", "b.pem")


def test_the_log_never_shows_a_redis_password() -> None:
    assert _redacted("rediss://lingua:s3cret@redis:6380/0") == "rediss://lingua:***@redis:6380/0"
    assert _redacted("redis://:s3cret@redis/0") == "redis://:***@redis/0"
    assert _redacted("redis://redis:6379/0") == "redis://redis:6379/0"
    assert _redacted("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
