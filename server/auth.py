"""Authentication (bearer JWTs, verified in a server interceptor) and the one authorization table.

Keys come from `--auth-jwt-key FILE` (repeatable; a folder stands for the files in it). A file's
name says what it holds, never its content: `*.pem` a PEM public key (RS256 for RSA, ES256 for EC
P-256), `*.secret` or `*.hs256` an HS256 secret (at least 32 bytes; surrounding whitespace is
ignored); any other name is refused. A key's id (`kid`) is its file name without the last suffix
(`keys/2024-06.pem` -> `2024-06`): a token whose header names a kid is verified by that key only, a
token without one by every key of its algorithm. SIGHUP re-reads the files (rotation: add the new key
to a listed folder, then delete the old one); verified tokens are cached until they expire, and the
cache is emptied on every reload, and every open stream a removed key authenticated is closed, so a
removed key stops working at once.

Health and reflection are open. Every other call needs a valid token (UNAUTHENTICATED otherwise) whose
role may call the method (PERMISSION_DENIED otherwise, see RULES); the servicers then check what the
call touches (the job's tenant, the node id) with `tenant_visible`, `check_tenant` and `check_node`.
A stream is authenticated once, when it opens, and is closed with UNAUTHENTICATED when its token
expires or its key is removed (a NodeSession then reconnects with a fresh token; its leases outlive
the stream's grace).
Token text and key material are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    load_der_private_key,
    load_der_public_key,
    load_pem_public_key,
)

from .errors import PermissionDenied, Unauthenticated
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)

SCHEDULER = "lingua.scheduler.v1.Scheduler"
# Services anyone may call: load balancers probe health, and `grpcurl list` needs reflection.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
# How far ahead of this host a token's issuer's clock may be: a token whose `nbf` is up to this far in the
# future is valid already (`iat` is not checked: it says when a token was made, not when it is valid).
# `exp` gets no such grace, so a token never lives longer than it says.
CLOCK_SKEW_S = 60.0
MIN_SECRET_BYTES = 32  # HS256 secrets shorter than its hash are guessable (RFC 7518 section 3.2)
# A key file's name says its type: a public key can never be taken for a secret, or the reverse.
SECRET_SUFFIXES = (".secret", ".hs256")
PUBLIC_SUFFIX = ".pem"


class Role(StrEnum):
    CLIENT = "client"
    NODE = "node"
    ADMIN = "admin"


class Grant(StrEnum):
    """What a role may touch through a method."""

    TENANTS = "its tenants"  # the request's tenant_id(s), or the tenant of the job it names
    NODE_IDS = "its node ids"  # the request's node_id (leases stay fenced by their lease tokens)


# THE authorization table (docs/security.md shows it): Scheduler method -> role -> grant. The admin
# role may call every method, those listed here and any added later; a method missing from this
# table is admin-only.
RULES: dict[str, dict[Role, Grant]] = {
    "Submit": {Role.CLIENT: Grant.TENANTS},
    "GetJob": {Role.CLIENT: Grant.TENANTS},
    "WatchJob": {Role.CLIENT: Grant.TENANTS},
    "WatchSession": {Role.CLIENT: Grant.TENANTS},
    "CancelJob": {Role.CLIENT: Grant.TENANTS},
    "Assign": {Role.NODE: Grant.NODE_IDS},
    "Heartbeat": {Role.NODE: Grant.NODE_IDS},
    "Complete": {Role.NODE: Grant.NODE_IDS},
    "NodeSession": {Role.NODE: Grant.NODE_IDS},
    "ListNodes": {},
    # Administration (docs/operations.md "Admin calls"): the admin role only.
    "ListJobs": {},
    "GetStats": {},
    "RetryJob": {},
    "CancelSession": {},
    "PausePool": {},
    "ResumePool": {},
    "DrainNode": {},
}


def may_call(role: Role, method: str) -> bool:
    return role is Role.ADMIN or role in RULES.get(method, {})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a verified token says the caller is."""

    role: Role
    tenants: frozenset[str]  # client role; "*" holds every tenant
    node_ids: tuple[str, ...]  # node role; ids or shell-style patterns ("gpu-*")
    expires: float  # the token's exp, seconds since the epoch
    key_id: str = ""  # the kid of the key that verified the token: its streams close when it is removed
    subject: str = ""  # the token's sub claim, when it has one: who, for the audit log

    @classmethod
    def of(cls, claims: dict[str, Any], key_id: str = "") -> Caller:
        try:
            role = Role(str(claims.get("role")))
        except ValueError:
            raise Unauthenticated("token: claim role must be client, node or admin") from None
        tenants = claims.get("tenants", [])
        node_ids = claims.get("node_ids", [])
        for name, value in (("tenants", tenants), ("node_ids", node_ids)):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise Unauthenticated(f"token: claim {name} must be a list of strings")
        if role is Role.CLIENT and not tenants:
            raise Unauthenticated("token: a client token needs claim tenants (a list, or [\"*\"])")
        if role is Role.NODE and not node_ids:
            raise Unauthenticated("token: a node token needs claim node_ids (ids or patterns such as \"gpu-*\")")
        return cls(role, frozenset(tenants), tuple(node_ids), float(claims["exp"]), key_id, str(claims.get("sub", "")))

    def holds_tenant(self, tenant: str) -> bool:
        return self.role is Role.ADMIN or "*" in self.tenants or tenant in self.tenants

    def may_be_node(self, node_id: str) -> bool:
        return self.role is Role.ADMIN or any(fnmatchcase(node_id, p) for p in self.node_ids)


# -- what the servicers ask ---------------------------------------------------------------------

# The caller a server without authentication serves: it may do everything, and never expires.
AUTH_OFF = Caller(Role.ADMIN, frozenset({"*"}), ("*",), math.inf)

# The caller of the RPC being served: set by the interceptor, or AUTH_OFF for every RPC of a server
# without authentication (open_context()). Unset (None) is no one: every check fails closed, so a
# code path that escapes the interceptor on a server with authentication is refused, not let through.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("lingua_caller", default=None)


def who() -> str:
    """The caller of the RPC being served, for the audit log: its token's sub, role and key."""
    caller = _CALLER.get()
    if caller is None:
        return "no one"
    if caller is AUTH_OFF:
        return "a caller of a server without authentication"
    return f"{caller.subject or 'a token without sub'} (role {caller.role.value}, key {caller.key_id or '-'})"


def open_context() -> contextvars.Context:
    """A context whose caller is AUTH_OFF: a server without authentication is started in it, and
    grpc.aio's RPC tasks (created by the server's own tasks) inherit it."""
    context = contextvars.copy_context()
    context.run(_CALLER.set, AUTH_OFF)
    return context


def current() -> Caller | None:
    """The caller of the RPC (or dashboard request) being served; None for no one."""
    return _CALLER.get()


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """Run a block as `caller`: what the dashboard's HTTP API does for the admin it verified (its
    requests do not pass the gRPC interceptor)."""
    held = _CALLER.set(caller)
    try:
        yield
    finally:
        _CALLER.reset(held)


def tenant_visible(tenant: str) -> bool:
    """May the caller see a job of `tenant`? A job it may not see is answered NOT_FOUND, like an unknown id."""
    caller = _CALLER.get()
    return caller is not None and caller.holds_tenant(tenant)


def expires_in() -> float:
    """Seconds until the caller's token expires (inf without authentication; 0 for no caller): a
    long poll must not outlive the token that opened it."""
    caller = _CALLER.get()
    return 0.0 if caller is None else max(0.0, caller.expires - time.time())


def check_tenant(tenant: str, field: str) -> None:
    """PERMISSION_DENIED unless the caller holds `tenant` (named by the request's `field`)."""
    if not tenant_visible(tenant):
        raise PermissionDenied(f"{field}: this token does not hold tenant {tenant!r}")


def check_node(node_id: str, field: str) -> None:
    """PERMISSION_DENIED unless the caller's token allows acting as `node_id` (the request's `field`)."""
    caller = _CALLER.get()
    if caller is None or not caller.may_be_node(node_id):
        raise PermissionDenied(f"{field}: this token does not allow node id {node_id!r}")


# -- keys and verification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    algorithm: str  # HS256, RS256 or ES256
    material: Any  # secret bytes, or a cryptography public key
    fingerprint: bytes  # a hash of the file's key: a kid whose file changed is a removed key


class AuthKeyError(ValueError):
    """A key file that cannot be used (missing, unreadable, misnamed, too short, an unsupported key type)."""


def _what_key(data: bytes) -> str | None:
    """What `data` is when it is a key or certificate (so not a secret), else None. An HS256 secret
    file holding a public key would let anyone who has that public key sign tokens."""
    text = data.strip()
    if text.startswith((b"ssh-", b"ecdsa-sha2-")):
        return "an OpenSSH key"
    if b"-----BEGIN" in text:
        return "a PEM key or certificate"
    if text.startswith(b"{"):
        return "JSON (a JWK?)"
    for load in (load_der_public_key, lambda d: load_der_private_key(d, None), x509.load_der_x509_certificate):
        try:
            load(data)
        except TypeError:  # an encrypted private key: still a key
            return "a DER key or certificate"
        except ValueError:
            continue
        return "a DER key or certificate"
    return None


def read_secret(path: str, data: bytes, flag: str) -> bytes:
    """The HS256 secret in the file `path` (content `data`), refused when it is short or is a key."""
    what = _what_key(data)
    if what is not None:
        raise AuthKeyError(f"{flag} {path}: an HS256 secret file (*.secret, *.hs256) holds {what}; "
                           f"a public key goes in a *{PUBLIC_SUFFIX} file")
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthKeyError(f"{flag} {path}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes "
                           "(e.g. openssl rand -hex 32)")
    return secret


def load_key(path: str) -> Key:
    """The key in `path`, of the type its name says; its kid is the file name without its last suffix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix != PUBLIC_SUFFIX and suffix not in SECRET_SUFFIXES:
        raise AuthKeyError(f"--auth-jwt-key {path}: a key file is named *.secret or *.hs256 (an HS256 secret) "
                           f"or *{PUBLIC_SUFFIX} (an RSA or EC P-256 public key)")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise AuthKeyError(f"--auth-jwt-key {path}: cannot read it ({err.strerror})") from None
    kid = p.stem
    fingerprint = hashlib.blake2b(data.strip(), digest_size=16).digest()
    if suffix in SECRET_SUFFIXES:
        return Key(kid, "HS256", read_secret(path, data, "--auth-jwt-key"), fingerprint)
    try:
        public = load_pem_public_key(data)
    except ValueError:
        raise AuthKeyError(f"--auth-jwt-key {path}: a *{PUBLIC_SUFFIX} key file must hold a PEM public key "
                           "(RSA, or EC P-256); the private key stays with the token issuer") from None
    if isinstance(public, rsa.RSAPublicKey):
        return Key(kid, "RS256", public, fingerprint)
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return Key(kid, "ES256", public, fingerprint)
    raise AuthKeyError(f"--auth-jwt-key {path}: only RSA (RS256) and EC P-256 (ES256) public keys are supported")


def key_files(paths: Sequence[str], *, gone_ok: bool = False) -> list[str]:
    """The files named, a folder standing for the files in it (not hidden ones: a Kubernetes secret
    mount keeps its `..data` links there), so keys rotate by adding and removing files + SIGHUP.
    `gone_ok` (a reload): a named file or folder that no longer exists is a removed key, with a warning."""
    out: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            out += sorted(str(f) for f in p.iterdir() if not f.name.startswith(".") and f.is_file())
        elif gone_ok and not p.exists():
            log.warning("--auth-jwt-key %s is gone: its key(s) are removed", path)
        else:
            out.append(path)
    return out


def load_keys(paths: Sequence[str], *, gone_ok: bool = False) -> list[Key]:
    keys = [load_key(p) for p in key_files(paths, gone_ok=gone_ok)]
    if not keys:
        raise AuthKeyError(f"--auth-jwt-key {', '.join(paths)}: no key files")
    kids = [k.kid for k in keys]
    if len(set(kids)) != len(kids):
        raise AuthKeyError(f"--auth-jwt-key: two files give the same key id (file name without suffix): {sorted(kids)}")
    return keys


class OpenStream:
    """An open stream's caller. Its waits end at the token's expiry, or at once when revoke()d (the
    key that verified the token was removed): one timer per stream, not one per message (asyncio.timeout
    per message cost ~8 us each, a fifth of auth's cost per lifecycle), and no task of its own. At the
    expiry the timer cancels the tasks waiting in next(), which turn that cancellation into TimeoutError
    (as asyncio.timeout does); close() ends the timer."""

    __slots__ = ("_cancelled", "_timer", "_waiting", "caller", "expired", "revoked")

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.expired = self.revoked = False
        self._waiting: dict[asyncio.Task[Any], int] = {}  # tasks in next(), with how many waits each
        self._cancelled: set[asyncio.Task[Any]] = set()  # those the expiry cancelled
        loop = asyncio.get_running_loop()
        self._timer: asyncio.Handle | None = (  # the token's expiry on the event loop's clock
            loop.call_at(loop.time() + caller.expires - time.time(), self._expire)
            if math.isfinite(caller.expires) else None)

    async def next(self, items: AsyncIterator[Any]) -> Any:
        """items' next item; TimeoutError at the token's expiry or the key's removal."""
        if self.expired:
            raise TimeoutError
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = self._waiting.get(task, 0) + 1
        cancelling = task.cancelling()  # cancellations of others already pending (as asyncio.timeout counts)
        try:
            return await items.__anext__()
        except asyncio.CancelledError:
            if task in self._cancelled:
                self._cancelled.discard(task)
                if task.uncancel() <= cancelling:  # the expiry's cancellation alone: a timeout, not a cancel
                    raise TimeoutError from None
            raise
        finally:
            if (left := self._waiting.pop(task) - 1) > 0:
                self._waiting[task] = left

    def _expire(self) -> None:
        self.expired, self._timer = True, None
        for task in self._waiting.keys() - self._cancelled:
            self._cancelled.add(task)
            task.cancel()

    def revoke(self) -> None:
        self.revoked = True
        self.close()
        self._expire()

    def close(self) -> None:
        self.expired = True  # a next() after the stream closed ends at once
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def refusal(self) -> str:
        return REVOKED if self.revoked else EXPIRED


class Verifier:
    """Verifies bearer tokens against the key files; caches verified tokens until they expire."""

    def __init__(self, paths: Sequence[str], audience: str = "", issuer: str = "", cache_size: int = 10_000) -> None:
        self.paths = tuple(paths)
        self.audience = audience or None
        self.issuer = issuer or None
        self.cache_size = cache_size
        self.keys = load_keys(self.paths)
        self._cache: dict[bytes, Caller] = {}  # blake2b(token) -> caller; oldest first
        self._streams: set[OpenStream] = set()  # open streams, closed when their key is removed

    def reload(self) -> bool:
        """Re-read the key files (SIGHUP). A named file that is gone is a removed key; any other error
        (or no key left) keeps the keys in use, and is logged. Open streams whose token a removed (or
        changed) key verified are closed with UNAUTHENTICATED."""
        try:
            keys = load_keys(self.paths, gone_ok=True)
        except AuthKeyError as err:
            log.error("auth keys not reloaded, the previous ones stay in use: %s", err)
            return False
        kept = {(k.kid, k.fingerprint) for k in keys}
        removed = {k.kid for k in self.keys if (k.kid, k.fingerprint) not in kept}
        self.keys = keys
        self._cache.clear()  # a token of a key just removed must not live on in the cache
        closing = [s for s in self._streams if s.caller.key_id in removed]
        for stream in closing:
            stream.revoke()
        log.info("auth keys reloaded: %s", ", ".join(f"{k.kid} ({k.algorithm})" for k in keys))
        if removed:
            log.info("auth keys removed: %s; %d open stream(s) they authenticated closed",
                     ", ".join(sorted(removed)), len(closing))
        return True

    def opened(self, caller: Caller) -> OpenStream:
        stream = OpenStream(caller)
        self._streams.add(stream)
        return stream

    def closed(self, stream: OpenStream) -> None:
        stream.close()
        self._streams.discard(stream)

    def verify(self, authorization: str | None, now: float | None = None) -> Caller:
        """The caller named by an `authorization` metadata value; Unauthenticated when it is not valid."""
        now = time.time() if now is None else now
        if not authorization:
            raise Unauthenticated("authorization: a bearer token is required (authorization: Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization: expected \"Bearer <token>\"")
        token = token.strip()
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        caller = self._cache.get(digest)
        if caller is None:
            caller = self._decode(token)
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[digest] = caller
        if caller.expires <= now:
            self._cache.pop(digest, None)
            raise Unauthenticated("authorization: the token has expired")
        return caller

    def _decode(self, token: str) -> Caller:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("authorization: the token is not a JWT") from None
        kid, alg = header.get("kid"), header.get("alg")
        keys = [k for k in self.keys if k.algorithm == alg and (kid is None or k.kid == kid)]
        if not keys:
            raise Unauthenticated("authorization: no configured key verifies this token (kid or alg unknown)")
        for key in keys:
            # The leeway is for nbf; exp gets none (verify() refuses a token at its exp); iat says when a token
            # was made, not when it is valid.
            try:
                claims = jwt.decode(token, key.material, algorithms=[key.algorithm], audience=self.audience,
                                    issuer=self.issuer, leeway=CLOCK_SKEW_S,
                                    options={"require": ["exp"], "verify_iat": False})
            except jwt.InvalidSignatureError:
                continue  # another key of the same algorithm may have signed it
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("authorization: the token has expired") from None
            except jwt.ImmatureSignatureError:
                raise Unauthenticated("authorization: the token is not valid yet (nbf)") from None
            except jwt.InvalidTokenError as err:  # missing exp, wrong aud/iss, bad encoding, ...
                raise Unauthenticated(f"authorization: invalid token ({err})") from None
            return Caller.of(claims, key.kid)
        raise Unauthenticated("authorization: the token's signature does not verify")


# -- the interceptor ----------------------------------------------------------------------------

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


def _kind(handler: Handler) -> str:
    return ("stream_" if handler.request_streaming else "unary_") + ("stream" if handler.response_streaming else "unary")


def _refusal(handler: Handler, code: grpc.StatusCode, text: str) -> Handler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.abort(code, text)

    return handler._replace(**{_kind(handler): refuse})  # type: ignore[attr-defined, no-any-return]


EXPIRED = "authorization: the token has expired (this stream was authenticated with it)"
REVOKED = "authorization: the key that verified this stream's token was removed"


async def _guarded(requests: AsyncIterator[Any], stream: OpenStream,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
    """The request stream, ended with UNAUTHENTICATED when the token expires or its key is removed
    (also while idle: a node must not go on receiving work on such a token)."""
    it = requests.__aiter__()
    while True:
        try:
            message = await stream.next(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(stream.refusal)
            return  # the handler sees the stream end, as when the peer half-closes
        yield message


def _as_caller(handler: Handler, caller: Caller, verifier: Verifier) -> Handler:
    """The handler run with `caller` as the current caller; streams end when the token expires or
    its key is removed."""
    kind = _kind(handler)
    behaviour = getattr(handler, kind)

    if inspect.isasyncgenfunction(behaviour):
        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
            _CALLER.set(caller)  # this RPC's own task (grpc.aio runs each RPC in a task of its own)
            stream = verifier.opened(caller)
            try:
                requests = _guarded(request, stream, context) if handler.request_streaming else request
                responses = behaviour(requests, context).__aiter__()
                while True:
                    try:
                        response = await stream.next(responses)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        await context.abort(grpc.StatusCode.UNAUTHENTICATED, stream.refusal)
                    yield response
            finally:
                verifier.closed(stream)
        return handler._replace(**{kind: stream_out})  # type: ignore[attr-defined, no-any-return]

    if handler.request_streaming:
        async def stream_in(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
            _CALLER.set(caller)
            stream = verifier.opened(caller)
            try:
                return await behaviour(_guarded(request, stream, context), context)
            finally:
                verifier.closed(stream)
        return handler._replace(**{kind: stream_in})  # type: ignore[attr-defined, no-any-return]

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        _CALLER.set(caller)
        return await behaviour(request, context)
    return handler._replace(**{kind: call})  # type: ignore[attr-defined, no-any-return]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates every call but health and reflection, and applies RULES' role x method check."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._warnings: dict[str, ThrottledWarning] = {}  # one throttle per distinct refusal (bounded)

    def _warn(self, method: str, reason: str) -> None:
        """Log a refusal by its reason only (never the token), throttled per reason."""
        key = reason if len(self._warnings) < 64 or reason in self._warnings else "(other)"
        self._warnings.setdefault(key, ThrottledWarning(log))("%s refused: %s", method, reason)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler is None or service in OPEN_SERVICES:
            return handler
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            caller = self.verifier.verify(authorization if isinstance(authorization, str) else None)
        except Unauthenticated as err:
            self._warn(method, str(err))
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(err))
        allowed = may_call(caller.role, method) if service == SCHEDULER else caller.role is Role.ADMIN
        if not allowed:
            reason = f"role {caller.role} may not call {method}"
            self._warn(method, reason)
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, reason)
        return _as_caller(handler, caller, self.verifier)
