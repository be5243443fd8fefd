"""Channels: target, TLS (optionally mutual), bearer token, and the retry policy of the client calls."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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

    def __post_init__(self) -> None:
        # gRPC's C core aborts the process on one without the other: refuse it here, readably.
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS: give the client certificate and its private key together (mutual TLS), or neither")

    @classmethod
    def from_files(cls, ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
                   server_name: str | None = None) -> TLS:
        def read(p: str | Path | None) -> bytes | None:
            try:
                return Path(p).read_bytes() if p else None
            except OSError as err:
                raise ValueError(f"TLS: cannot read {str(p)!r}: {err.strerror}") from err
        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


TLSOption = TLS | bool
# A bearer token, or a callable returning the current one: called for every call and every new stream,
# so a long-running process can renew a token that expires. None: the LINGUA_TOKEN environment variable
# when set, else no token.
TokenOption = str | Callable[[], str] | None


class _Details(NamedTuple):
    """grpc.ClientCallDetails of the blocking channel, with the metadata replaced."""

    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def _with_token(metadata: Any, token: Callable[[], str]) -> list[tuple[str, str]]:
    return [*(m for m in metadata or () if m[0] != "authorization"), ("authorization", f"Bearer {token()}")]


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds `authorization: Bearer <token()>` to every call of a blocking channel."""

    def __init__(self, token: Callable[[], str]) -> None:
        self.token = token

    def _details(self, d: Any) -> _Details:
        return _Details(d.method, d.timeout, _with_token(d.metadata, self.token), d.credentials,
                        d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioToken:
    """Adds `authorization: Bearer <token()>` to every call (and stream) of an asyncio channel. One
    interceptor per call kind: grpc.aio files each interceptor under the first kind it matches."""

    def __init__(self, token: Callable[[], str]) -> None:
        self.token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(d.method, d.timeout, grpc.aio.Metadata(*_with_token(d.metadata, self.token)),
                                          d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


@dataclass(frozen=True)
class Connection:
    """What both clients and the node share: where, how, and who. A fixed token goes in `metadata`; a
    callable one (`token_source`) is asked by the channel's interceptor for every call."""

    target: str
    tls: TLS | None
    metadata: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]
    token_source: Callable[[], str] | None = None

    @classmethod
    def of(cls, target: str, token: TokenOption, tls: TLSOption,
           options: Sequence[tuple[str, Any]] = ()) -> Connection:
        settings = TLS() if tls is True else tls or None
        opts: list[tuple[str, Any]] = [("grpc.enable_retries", 1), ("grpc.service_config", _SERVICE_CONFIG)]
        if settings is not None and settings.server_name:
            opts.append(("grpc.ssl_target_name_override", settings.server_name))
        opts += list(options)
        if token is None:
            token = os.environ.get("LINGUA_TOKEN") or None  # the CLI's convention, for clients and nodes alike
        if callable(token):
            return cls(target, settings, (), tuple(opts), token)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return cls(target, settings, metadata, tuple(opts))

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            channel = grpc.insecure_channel(self.target, options=self.options)
        else:
            channel = grpc.secure_channel(self.target, self.tls.credentials(), options=self.options)
        return channel if self.token_source is None else grpc.intercept_channel(channel, _SyncToken(self.token_source))

    def aio_channel(self) -> grpc.aio.Channel:
        interceptors: list[Any] = [] if self.token_source is None else [
            kind(self.token_source) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=self.options, interceptors=interceptors)
        return grpc.aio.secure_channel(self.target, self.tls.credentials(), options=self.options,
                                       interceptors=interceptors)
