"""Authentication (bearer JWTs, verified in a server interceptor) and the one authorization table.

Keys come from `--auth-jwt-key FILE` (repeatable; a folder stands for the files in it). A file
holding a PEM public key verifies RS256 (RSA) or ES256 (EC P-256) tokens; any other file is an HS256
secret (at least 32 bytes; surrounding whitespace is ignored). A key's id (`kid`) is its file name without the last suffix
(`keys/2024-06.pem` -> `2024-06`): a token whose header names a kid is verified by that key only, a
token without one by every key of its algorithm. SIGHUP re-reads the files (rotation: list the old and
the new key, then drop the old one); verified tokens are cached until they expire, and the cache is
emptied on every reload so a removed key stops working at once.

Health and reflection are open. Every other call needs a valid token (UNAUTHENTICATED otherwise) whose
role may call the method (PERMISSION_DENIED otherwise, see RULES); the servicers then check what the
call touches (the job's tenant, the node id) with `tenant_visible`, `check_tenant` and `check_node`.
A stream is authenticated once, when it opens, and is closed with UNAUTHENTICATED when its token
expires (a NodeSession then reconnects with a fresh token; its leases outlive the stream's grace).
Token text and key material are never logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import PermissionDenied, Unauthenticated
from .throttle import ThrottledWarning

log = logging.getLogger(__name__)

SCHEDULER = "lingua.scheduler.v1.Scheduler"
# Services anyone may call: load balancers probe health, and `grpcurl list` needs reflection.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
MIN_SECRET_BYTES = 32  # HS256 secrets shorter than its hash are guessable (RFC 7518 section 3.2)


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

    @classmethod
    def of(cls, claims: dict[str, Any]) -> Caller:
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
        return cls(role, frozenset(tenants), tuple(node_ids), float(claims["exp"]))

    def holds_tenant(self, tenant: str) -> bool:
        return self.role is Role.ADMIN or "*" in self.tenants or tenant in self.tenants

    def may_be_node(self, node_id: str) -> bool:
        return self.role is Role.ADMIN or any(fnmatchcase(node_id, p) for p in self.node_ids)


# -- what the servicers ask ---------------------------------------------------------------------

# The caller of the RPC being served; None when authentication is off (everything is allowed).
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("lingua_caller", default=None)


def tenant_visible(tenant: str) -> bool:
    """May the caller see a job of `tenant`? A job it may not see is answered NOT_FOUND, like an unknown id."""
    caller = _CALLER.get()
    return caller is None or caller.holds_tenant(tenant)


def check_tenant(tenant: str, field: str) -> None:
    """PERMISSION_DENIED unless the caller holds `tenant` (named by the request's `field`)."""
    if not tenant_visible(tenant):
        raise PermissionDenied(f"{field}: this token does not hold tenant {tenant!r}")


def check_node(node_id: str, field: str) -> None:
    """PERMISSION_DENIED unless the caller's token allows acting as `node_id` (the request's `field`)."""
    caller = _CALLER.get()
    if caller is not None and not caller.may_be_node(node_id):
        raise PermissionDenied(f"{field}: this token does not allow node id {node_id!r}")


# -- keys and verification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    kid: str
    algorithm: str  # HS256, RS256 or ES256
    material: Any  # secret bytes, or a cryptography public key


class AuthKeyError(ValueError):
    """A key file that cannot be used (missing, unreadable, too short, an unsupported key type)."""


def load_key(path: str) -> Key:
    """The key in `path`; its kid is the file name without its last suffix."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise AuthKeyError(f"--auth-jwt-key {path}: cannot read it ({err.strerror})") from None
    kid = p.stem
    if b"-----BEGIN" in data:
        try:
            public = load_pem_public_key(data)
        except ValueError:
            raise AuthKeyError(f"--auth-jwt-key {path}: a PEM file must hold a public key (RSA, or EC P-256)") from None
        if isinstance(public, rsa.RSAPublicKey):
            return Key(kid, "RS256", public)
        if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
            return Key(kid, "ES256", public)
        raise AuthKeyError(f"--auth-jwt-key {path}: only RSA (RS256) and EC P-256 (ES256) public keys are supported")
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthKeyError(f"--auth-jwt-key {path}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes "
                        "(e.g. openssl rand -hex 32)")
    return Key(kid, "HS256", secret)


def key_files(paths: Sequence[str]) -> list[str]:
    """The files named, a folder standing for the files in it (not hidden ones: a Kubernetes secret
    mount keeps its `..data` links there), so keys rotate by adding and removing files + SIGHUP."""
    out: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            out += sorted(str(f) for f in p.iterdir() if not f.name.startswith(".") and f.is_file())
        else:
            out.append(path)
    return out


def load_keys(paths: Sequence[str]) -> list[Key]:
    keys = [load_key(p) for p in key_files(paths)]
    if not keys:
        raise AuthKeyError(f"--auth-jwt-key {', '.join(paths)}: no key files")
    kids = [k.kid for k in keys]
    if len(set(kids)) != len(kids):
        raise AuthKeyError(f"--auth-jwt-key: two files give the same key id (file name without suffix): {sorted(kids)}")
    return keys


class Verifier:
    """Verifies bearer tokens against the key files; caches verified tokens until they expire."""

    def __init__(self, paths: Sequence[str], audience: str = "", issuer: str = "", cache_size: int = 10_000) -> None:
        self.paths = tuple(paths)
        self.audience = audience or None
        self.issuer = issuer or None
        self.cache_size = cache_size
        self.keys = load_keys(self.paths)
        self._cache: dict[bytes, Caller] = {}  # blake2b(token) -> caller; oldest first

    def reload(self) -> bool:
        """Re-read the key files (SIGHUP). On any error the keys in use stay, and it is logged."""
        try:
            keys = load_keys(self.paths)
        except AuthKeyError as err:
            log.error("auth keys not reloaded, the previous ones stay in use: %s", err)
            return False
        self.keys = keys
        self._cache.clear()  # a token of a key just removed must not live on in the cache
        log.info("auth keys reloaded: %s", ", ".join(f"{k.kid} ({k.algorithm})" for k in keys))
        return True

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
            try:
                claims = jwt.decode(token, key.material, algorithms=[key.algorithm], audience=self.audience,
                                    issuer=self.issuer, options={"require": ["exp"]})
            except jwt.InvalidSignatureError:
                continue  # another key of the same algorithm may have signed it
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("authorization: the token has expired") from None
            except jwt.InvalidTokenError as err:  # missing exp, wrong aud/iss, bad encoding, ...
                raise Unauthenticated(f"authorization: invalid token ({err})") from None
            return Caller.of(claims)
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


def _deadline(caller: Caller) -> float:
    """The token's expiry on the event loop's clock (asyncio.timeout_at's)."""
    return asyncio.get_running_loop().time() + caller.expires - time.time()


async def _until_expiry(requests: AsyncIterator[Any], caller: Caller,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
    """The request stream, ended with UNAUTHENTICATED when the token expires (also while idle: a node
    must not go on receiving work on an expired token)."""
    it = requests.__aiter__()
    deadline = _deadline(caller)
    while True:
        try:
            async with asyncio.timeout_at(deadline):  # in the reading task itself: no task per message
                message = await it.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(EXPIRED)
            return  # the handler sees the stream end, as when the peer half-closes
        yield message


def _as_caller(handler: Handler, caller: Caller) -> Handler:
    """The handler run with `caller` as the current caller; streams end when the token expires."""
    kind = _kind(handler)
    behaviour = getattr(handler, kind)

    def requests_of(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        return _until_expiry(request, caller, context) if handler.request_streaming else request

    if inspect.isasyncgenfunction(behaviour):
        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
            _CALLER.set(caller)  # this RPC's own task (grpc.aio runs each RPC in a task of its own)
            responses = behaviour(requests_of(request, context), context).__aiter__()
            deadline = _deadline(caller)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        response = await responses.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, EXPIRED)
                yield response
        return handler._replace(**{kind: stream_out})  # type: ignore[attr-defined, no-any-return]

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        _CALLER.set(caller)
        return await behaviour(requests_of(request, context), context)
    return handler._replace(**{kind: call})  # type: ignore[attr-defined, no-any-return]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates every call but health and reflection, and applies RULES' role x method check."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._warn = ThrottledWarning(log)

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
            self._warn("%s refused: %s", method, err)  # the reason only: never the token
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(err))
        allowed = may_call(caller.role, method) if service == SCHEDULER else caller.role is Role.ADMIN
        if not allowed:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, f"role {caller.role} may not call {method}")
        return _as_caller(handler, caller)
