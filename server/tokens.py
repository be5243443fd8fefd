"""`lingua-scheduler token`: mint a bearer token for development and tests.

    lingua-scheduler token --role client --tenant acme --key FILE [--ttl 1h]
    lingua-scheduler token --role node --node-id 'gpu-*' --key FILE
    lingua-scheduler token --role admin --key FILE [--kid ID] [--audience A] [--issuer I]

FILE is either the HS256 secret the server also reads (--auth-jwt-key), named `*.secret` or
`*.hs256`, or a PEM private key (RSA: RS256; EC P-256: ES256; any other name, e.g. `k1.key`) whose
public key the server reads from a `*.pem` file. The token's kid is FILE's name without its last
suffix unless --kid says otherwise, so `k1.key` signs what the server's `k1.pem` verifies.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from .auth import SECRET_SUFFIXES, Role, read_secret

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """"90s", "15m", "1h", "7d" or plain seconds -> seconds."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m or int(m[1]) == 0:
        raise ValueError(f"--ttl {text!r}: expected a positive number of seconds, or one like 90s, 15m, 1h, 7d")
    return int(m[1]) * _UNITS[m[2] or "s"]


def signing_key(path: str) -> tuple[Any, str]:
    """(key, algorithm) of a secret file (by its name: *.secret, *.hs256) or a PEM private key file."""
    data = Path(path).read_bytes()
    if Path(path).suffix.lower() in SECRET_SUFFIXES:
        return read_secret(path, data, "--key"), "HS256"  # AuthKeyError is a ValueError
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"--key {path}: not an unencrypted PEM private key; an HS256 secret file is named "
                         f"*.secret or *.hs256") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError(f"--key {path}: only RSA and EC P-256 private keys are supported")


def mint(key_file: str, role: str, *, tenants: Sequence[str] = (), node_ids: Sequence[str] = (), ttl_s: int = 3600,
         kid: str | None = None, audience: str = "", issuer: str = "", subject: str = "",
         now: float | None = None) -> str:
    """A signed token with the claims the scheduler reads (see server/auth.py)."""
    Role(role)
    if role == Role.CLIENT and not tenants:
        raise ValueError("--role client needs --tenant (repeatable; '*' for every tenant)")
    if role == Role.NODE and not node_ids:
        raise ValueError("--role node needs --node-id (repeatable; shell-style patterns such as 'gpu-*')")
    key, algorithm = signing_key(key_file)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"role": role, "iat": issued, "exp": issued + ttl_s}
    if tenants:
        claims["tenants"] = list(tenants)
    if node_ids:
        claims["node_ids"] = list(node_ids)
    for name, value in (("aud", audience), ("iss", issuer), ("sub", subject)):
        if value:
            claims[name] = value
    kid = Path(key_file).stem if kid is None else kid
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lingua-scheduler token", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--tenant", action="append", default=[], help="client role: a tenant it holds (repeatable; '*': all)")
    p.add_argument("--node-id", action="append", default=[], help="node role: an id or pattern it may use (repeatable)")
    p.add_argument("--key", required=True, help="HS256 secret file (*.secret, *.hs256), or PEM private key (RS256/ES256)")
    p.add_argument("--ttl", default="1h", help="lifetime: seconds, or 90s, 15m, 1h, 7d (default 1h)")
    p.add_argument("--kid", default=None, help="key id in the header (default: the key file's name without suffix; '' for none)")
    p.add_argument("--audience", default="", help="aud claim (the server's --auth-jwt-audience)")
    p.add_argument("--issuer", default="", help="iss claim (the server's --auth-jwt-issuer)")
    p.add_argument("--subject", default="", help="sub claim (who the token is for; informational)")
    args = p.parse_args(argv)
    try:
        token = mint(args.key, args.role, tenants=args.tenant, node_ids=args.node_id, ttl_s=parse_ttl(args.ttl),
                     kid=args.kid, audience=args.audience, issuer=args.issuer, subject=args.subject)
    except (ValueError, OSError) as err:
        print(f"lingua-scheduler token: {err}", file=sys.stderr)
        return 2
    print(token)
    return 0
