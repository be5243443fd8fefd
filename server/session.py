"""WatchSession: a session's finished jobs, in utterance order, over one stream.

The truth is in Redis: the session's shard holds an index of its jobs of every pool (job id ->
utterance index, written by submit_job), and finish_job announces every terminal job on the session's
channel. A watcher hears those announcements over the instance's one shared subscription, and before
it delivers anything it re-reads the index up to the highest utterance it is about to deliver (in the
same round trip as the finished jobs' records), so the order never depends on a pub/sub message
arriving: a job it has not heard of yet is found there and holds later ones back. A backstop re-read
covers lost announcements. The ordering rules are the contract's (WatchSessionRequest).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..fsm import TERMINAL
from . import keys, wire
from .dispatch import Dispatcher
from .store import JobView, Store

BACKSTOP_S = 5.0  # re-read everything after this long without an announcement (as WatchJob)
FETCH_CHUNK = 256  # job records per round trip when a stream starts on a long session


@dataclass(slots=True)
class _Known:
    utterance: int
    tgt_lang: str
    view: JobView | None = None  # set once the job is terminal
    delivered: bool = False


@dataclass(slots=True)
class SessionOrder:
    """Which finished jobs of a session may go out now: no I/O, so the rules are tested alone.

    `cursor` is the resume index: every job below it was delivered, and indices below it are passed
    (a job appearing there later is not this stream's). A terminal job goes out once no job of the
    session with a lower utterance index (at or above the cursor) is still unfinished."""

    cursor: int
    jobs: dict[str, _Known] = field(default_factory=dict)

    def learn(self, job_id: str, utterance: int, view: JobView | None) -> None:
        """A job of the index; `view` (its record) when read now, None when it was not read."""
        if utterance < self.cursor:
            return  # passed: not this stream's (the contract's rule for holes)
        known = self.jobs.get(job_id)
        if known is None:
            known = self.jobs[job_id] = _Known(utterance, keys.pool_of_tag(keys.tag_of(job_id)).split(":")[1])
        if view is not None and view.record.state in TERMINAL:
            known.view = view

    def forget(self, job_id: str) -> None:
        """The job's record is gone (retention over): it is neither delivered nor waited for."""
        self.jobs.pop(job_id, None)

    def unknown(self, members: list[tuple[str, int]]) -> list[str]:
        return [j for j, utt in members if utt >= self.cursor and j not in self.jobs]

    def pending(self) -> list[str]:
        return [j for j, k in self.jobs.items() if k.view is None]

    def take(self) -> list[JobView]:
        """The jobs that may be delivered now, in order; moves the cursor past them."""
        waiting = [k.utterance for k in self.jobs.values() if k.view is None]
        limit = min(waiting) if waiting else math.inf
        ready = sorted((k for k in self.jobs.values() if k.view is not None and not k.delivered
                        and k.utterance <= limit), key=lambda k: (k.utterance, k.tgt_lang))
        for k in ready:
            k.delivered = True
        if waiting:
            self.cursor = max(self.cursor, min(waiting))
        elif self.jobs:
            self.cursor = max(self.cursor, max(k.utterance for k in self.jobs.values()) + 1)
        for job_id in [j for j, k in self.jobs.items() if k.delivered and k.utterance < self.cursor]:
            del self.jobs[job_id]  # below the cursor nothing is read again: keep the model small
        return [k.view for k in ready if k.view is not None]


class SessionWatch:
    """One WatchSession stream: yields (views, resume index) batches."""

    def __init__(self, store: Store, dispatcher: Dispatcher, tenant_id: str, session_id: str, from_index: int,
                 tgt_lang: str) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.tgt_lang = tgt_lang
        self.order = SessionOrder(from_index)

    def _wanted(self, job_id: str) -> bool:
        return not self.tgt_lang or keys.pool_of_tag(keys.tag_of(job_id)).split(":")[1] == self.tgt_lang

    async def _read(self, high: int | None, job_ids: list[str]) -> None:
        """Re-read the index from the cursor up to `high`, with the records of `job_ids`; then the
        records of any job the index shows that this watcher has not seen yet."""
        members, views = await self.store.session_read(self.tenant_id, self.session_id, (self.order.cursor, high),
                                                       job_ids)
        members = [(j, utt) for j, utt in members if self._wanted(j)]
        utterance = dict(members)
        fetched = dict(zip(job_ids, views, strict=True))
        unknown = [j for j in self.order.unknown(members) if j not in fetched]
        for start in range(0, len(unknown), FETCH_CHUNK):
            chunk = unknown[start:start + FETCH_CHUNK]
            _, more = await self.store.session_read(self.tenant_id, self.session_id, None, chunk)
            fetched.update(zip(chunk, more, strict=True))
        for job_id, view in fetched.items():
            if view is None:
                self.order.forget(job_id)
                continue
            utt = utterance.get(job_id, view.spec.utterance_index)
            if job_id in utterance or job_id in self.order.jobs:
                self.order.learn(job_id, utt, view)

    async def events(self) -> AsyncIterator[tuple[list[JobView], int]]:
        channel = keys.session_channel(self.tenant_id, self.session_id)
        async with self.dispatcher.watching(channel) as inbox:
            await self._read(None, [])
            while True:
                ready = self.order.take()
                if ready:
                    yield ready, self.order.cursor
                try:
                    async with asyncio.timeout(BACKSTOP_S):
                        first = await inbox.get()
                except TimeoutError:  # lost announcements: re-read everything from the cursor
                    await self._read(None, self.order.pending())
                    continue
                done = [first]
                while not inbox.empty():  # everything already heard goes in this round: one read, one event
                    done.append(inbox.get_nowait())
                await self._heard(done)

    async def _heard(self, messages: list[bytes]) -> None:
        finished: list[str] = []
        high: int | None = -1
        for raw in messages:
            try:
                jobs = wire.parse_session_done(raw.decode())
            except ValueError:
                continue
            for msg in jobs:
                if not self._wanted(msg.job_id):
                    continue
                if msg.utterance_index is not None and msg.utterance_index < self.order.cursor:
                    continue  # passed
                finished.append(msg.job_id)
                if high is not None:
                    high = None if msg.utterance_index is None else max(high, msg.utterance_index)
        if finished:
            await self._read(high, finished)
