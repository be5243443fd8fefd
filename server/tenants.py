"""Per-tenant settings from the --tenants file (TOML): fair-share weight and Submit limits.

    [default]                 # every tenant not listed below (each key optional)
    weight = 1                # share of dispatch within a priority, against the other tenants' weights
    max_queued = 0            # most jobs queued or running at once (0: no limit)
    submit_rate = 0           # jobs per second, a token bucket shared by every instance (0: no limit)
    submit_burst = 0          # bucket size: jobs accepted at once (0: one second's worth, at least 1)

    [tenant."acme"]           # a listed tenant: its keys override [default]'s
    weight = 3

The file is read at start (an error names the file, table and key, and the server does not start) and
again on SIGHUP (an error is logged and the current settings are kept). Nothing here talks to Redis.
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from .validate import TENANT
from .wire import fair_step

log = logging.getLogger(__name__)

MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000.0


class TenantConfigError(ValueError):
    """The --tenants file cannot be used; the message names the file, table and key."""


@dataclass(frozen=True, slots=True)
class TenantLimits:
    weight: float = 1.0
    max_queued: int = 0
    submit_rate: float = 0.0
    submit_burst: int = 0

    @property
    def step(self) -> int:
        """How far apart this tenant's jobs go in a priority band (server/wire.py)."""
        return fair_step(self.weight)

    @property
    def burst(self) -> int:
        """The token bucket's size: submit_burst, else one second's worth (at least one job)."""
        return self.submit_burst or max(1, math.ceil(self.submit_rate))

    @property
    def limited(self) -> bool:
        """Whether a Submit of this tenant goes through admission (one more round trip)."""
        return self.max_queued > 0 or self.submit_rate > 0


def _number(value: Any, where: str, *, integer: bool, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise TenantConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not low <= value <= high or math.isnan(value):
        bound = f"from {low:g} to {high:g}" if high != math.inf else f"at least {low:g}"
        raise TenantConfigError(f"{where}: must be {bound}, not {value!r}")
    return value


def _limits(table: Any, base: TenantLimits, where: str) -> TenantLimits:
    if not isinstance(table, dict):
        raise TenantConfigError(f"{where}: must be a table")
    known = {f.name for f in fields(TenantLimits)}
    for key in table:
        if key not in known:
            raise TenantConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    if "weight" in table:
        values["weight"] = float(_number(table["weight"], f"{where} weight", integer=False, low=MIN_WEIGHT,
                                         high=MAX_WEIGHT))
    if "max_queued" in table:
        values["max_queued"] = int(_number(table["max_queued"], f"{where} max_queued", integer=True, low=0))
    if "submit_rate" in table:
        values["submit_rate"] = float(_number(table["submit_rate"], f"{where} submit_rate", integer=False, low=0,
                                              high=1e6))
    if "submit_burst" in table:
        values["submit_burst"] = int(_number(table["submit_burst"], f"{where} submit_burst", integer=True, low=0,
                                             high=1e9))
    return replace(base, **values)


@dataclass(frozen=True, slots=True)
class TenantConfig:
    default: TenantLimits = TenantLimits()
    tenants: tuple[tuple[str, TenantLimits], ...] = ()


def parse(text: str, path: str = "<tenants>") -> TenantConfig:
    """The settings a --tenants file says; TenantConfigError naming the file, table and key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise TenantConfigError(f"{path}: not valid TOML: {err}") from err
    for name in doc:
        if name not in ("default", "tenant"):
            raise TenantConfigError(f"{path}: unknown table [{name}] (expected [default] and [tenant.\"<id>\"])")
    default = _limits(doc.get("default", {}), TenantLimits(), f"{path}: [default]")
    listed = doc.get("tenant", {})
    if not isinstance(listed, dict):
        raise TenantConfigError(f"{path}: tenant must be tables [tenant.\"<id>\"]")
    tenants = []
    for tenant_id, table in listed.items():
        where = f"{path}: [tenant.\"{tenant_id}\"]"
        if not TENANT.fullmatch(tenant_id):
            raise TenantConfigError(f"{where}: not a tenant id (1 to 64 of A-Z a-z 0-9 . _ -)")
        tenants.append((tenant_id, _limits(table, default, where)))
    return TenantConfig(default, tuple(tenants))


def load(path: str) -> TenantConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise TenantConfigError(f"{path}: cannot read the tenants file: {err}") from err
    return parse(text, path)


class Tenants:
    """The tenant settings in force: from the --tenants file ("" for none: equal weights, no limits),
    swapped whole on reload(), so a request sees one version."""

    def __init__(self, path: str = "", config: TenantConfig | None = None) -> None:
        self.path = path
        self.config = config if config is not None else (load(path) if path else TenantConfig())
        self._by_id = dict(self.config.tenants)

    def of(self, tenant_id: str) -> TenantLimits:
        return self._by_id.get(tenant_id, self.config.default)

    def reload(self) -> None:
        """SIGHUP: read the file again; a file that does not load is logged and the current settings kept."""
        if not self.path:
            return
        try:
            config = load(self.path)
        except TenantConfigError as err:
            log.error("tenants: keeping the current settings: %s", err)
            return
        self.config, self._by_id = config, dict(config.tenants)
        log.info("tenants: reloaded %s (%d tenant(s) listed)", self.path, len(config.tenants))
