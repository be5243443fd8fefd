"""Loads server/lua/*.lua once per process and runs them by SHA (EVALSHA), checking key counts.

A script's file name says how many KEYS it takes: `claim_job-7.lua` takes 7. A NOSCRIPT reply (the
Redis script cache is empty after a restart or failover) loads the script again and retries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    numkeys: int
    source: str
    sha: str


def _load_all() -> dict[str, Script]:
    scripts: dict[str, Script] = {}
    for entry in resources.files(__package__).joinpath("lua").iterdir():
        if not entry.name.endswith(".lua"):
            continue
        stem = entry.name.removesuffix(".lua")
        name, _, numkeys = stem.rpartition("-")
        source = entry.read_text()
        scripts[name] = Script(name, int(numkeys), source, hashlib.sha1(source.encode()).hexdigest())
    return scripts


class Scripts:
    """The project's Lua scripts, callable on a client or queued on a pipeline."""

    def __init__(self) -> None:
        self._by_name = _load_all()

    def __getitem__(self, name: str) -> Script:
        return self._by_name[name]

    def __iter__(self) -> Any:
        return iter(self._by_name.values())

    def args(self, name: str, keys: list[str], argv: list[Any]) -> list[Any]:
        """EVALSHA arguments for one call, after checking the declared key count."""
        script = self._by_name[name]
        if len(keys) != script.numkeys:
            raise ValueError(f"{name} takes {script.numkeys} keys, got {len(keys)}")
        return [script.sha, script.numkeys, *keys, *argv]

    async def load(self, client: Any, name: str | None = None) -> None:
        """SCRIPT LOAD one script (or all) on `client` (on a cluster: on every primary)."""
        for script in [self._by_name[name]] if name else self._by_name.values():
            await client.script_load(script.source)

    async def call(self, client: Any, name: str, keys: list[str], argv: list[Any]) -> Any:
        """Run one script on `client`: one round trip, two only after a NOSCRIPT."""
        args = self.args(name, keys, argv)
        try:
            return await client.evalsha(*args)
        except NoScriptError:
            await self.load(client, name)
            return await client.evalsha(*args)

    async def call_many(self, client: Any, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run independent script calls pipelined in one round trip; results (or exceptions) in order.

        Calls that hit NOSCRIPT are retried after loading; a call that failed with NOSCRIPT did not run.
        """
        if not calls:
            return []
        results = await self._pipeline(client, calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.load(client)
            retried = await self._pipeline(client, [calls[i] for i in missing])
            for i, r in zip(missing, retried, strict=True):
                results[i] = r
        return results

    async def _pipeline(self, client: Any, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for name, keys, argv in calls:
                # execute_command, not evalsha(): redis-py blocks the named method on cluster pipelines.
                pipe.execute_command("EVALSHA", *self.args(name, keys, argv))
            return list(await pipe.execute(raise_on_error=False))
