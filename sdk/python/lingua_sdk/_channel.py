"""Channels: target, TLS (optionally mutual), bearer token, and the retry policy of the client calls."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVICE = "lingua.scheduler.v1.Scheduler"

# Every client call is idempotent (Submit per job, a repeated cancel answers the job): gRPC itself
# retries them when no instance answered (UNAVAILABLE), with backoff, before the caller sees an error.
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": SERVICE, "method": m} for m in ("Submit", "GetJob", "WatchJob", "CancelJob", "ListNodes")],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


@dataclass(frozen=True)
class TLS:
    """TLS settings. All PEM bytes; `root_certificates` None means the system's roots. Give
    `certificate_chain` and `private_key` for mutual TLS. `server_name` overrides the name checked
    against the server's certificate (when the target is an IP address, say)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
                   server_name: str | None = None) -> TLS:
        def read(p: str | Path | None) -> bytes | None:
            return Path(p).read_bytes() if p else None
        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


TLSOption = TLS | bool


@dataclass(frozen=True)
class Connection:
    """What both clients and the node share: where, how, and who."""

    target: str
    tls: TLS | None
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, target: str, token: str | None, tls: TLSOption,
           options: Sequence[tuple[str, Any]] = ()) -> Connection:
        settings = TLS() if tls is True else tls or None
        opts: list[tuple[str, Any]] = [("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
        if settings is not None and settings.server_name:
            opts.append(("grpc.ssl_target_name_override", settings.server_name))
        opts += list(options)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(target, settings, metadata, tuple(opts))

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target, options=self.options)
        return grpc.secure_channel(self.target, self.tls.credentials(), options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=self.options)
        return grpc.aio.secure_channel(self.target, self.tls.credentials(), options=self.options)
