"""The job state machine, declared once as data with `transitions`.

Pure: no I/O, no Redis, no gRPC. The store asks `decide()` what an event does to a job, and derives
the allow-lists it hands to the Lua scripts from `sources_of()`; docs/fsm.md and the diagram are
rendered from the same `TRANSITIONS` by scripts/render_fsm.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from transitions import EventData, Machine, MachineError


class JobState(StrEnum):
    """Every state a job can be in. NEW is the pseudo-state before submit; it is never stored."""

    NEW = "new"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Event(StrEnum):
    """Every event (trigger) of the machine."""

    SUBMIT = "submit"
    ASSIGN = "assign"
    START = "start"
    COMPLETE = "complete"
    FAIL = "fail"
    LEASE_EXPIRED = "lease_expired"
    ACK_TIMEOUT = "ack_timeout"
    NODE_LOST = "node_lost"
    UNAVAILABLE = "unavailable"
    RELEASE = "release"
    CANCEL = "cancel"
    EXPIRE = "expire"
    RETRY = "retry"


TERMINAL: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}
)
ACTIVE = [JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING]
HELD = [JobState.ASSIGNED, JobState.RUNNING]
# Requeues that do not count as an execution: the claim never reached its node (release), or its
# node never acknowledged it (ack_timeout). The store gives their attempt back.
GIVES_BACK_ATTEMPT: frozenset[Event] = frozenset({Event.RELEASE, Event.ACK_TIMEOUT})

# Order matters: for one (trigger, source), the first transition whose conditions hold wins.
TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": Event.SUBMIT, "source": JobState.NEW, "dest": JobState.QUEUED},
    {"trigger": Event.ASSIGN, "source": JobState.QUEUED, "dest": JobState.ASSIGNED},
    {"trigger": Event.START, "source": JobState.ASSIGNED, "dest": JobState.RUNNING},
    # A claim whose assignment never reached its node (the reply was lost, the stream or the long-poll
    # ended first): back in the queue, and the attempt it took is given back.
    {"trigger": Event.RELEASE, "source": JobState.ASSIGNED, "dest": JobState.QUEUED},
    # The node never acknowledged the assignment (its ack timeout, or its stream's grace, ran out):
    # attempts count executions a node started, so the attempt is given back and the job is queued
    # again whatever its max_attempts; its deadline bounds how long this can go on.
    {"trigger": Event.ACK_TIMEOUT, "source": JobState.ASSIGNED, "dest": JobState.QUEUED},
    {"trigger": Event.COMPLETE, "source": HELD, "dest": JobState.SUCCEEDED},
    {
        "trigger": Event.FAIL,
        "source": HELD,
        "dest": JobState.QUEUED,
        "conditions": ["is_retryable", "has_attempts_left"],
    },
    {"trigger": Event.FAIL, "source": HELD, "dest": JobState.FAILED},
    # The node went away, went silent, or lacks the model: retry elsewhere while attempts remain.
    # A job still `assigned` when its lease runs out (or its node's stream is lost) was never
    # acknowledged: that is `ack_timeout` (above), so these two fire from `running` only.
    *(
        t
        for event, source in ((Event.LEASE_EXPIRED, JobState.RUNNING), (Event.NODE_LOST, JobState.RUNNING),
                              (Event.UNAVAILABLE, HELD))
        for t in (
            {"trigger": event, "source": source, "dest": JobState.QUEUED, "conditions": ["has_attempts_left"]},
            {"trigger": event, "source": source, "dest": JobState.FAILED},
        )
    ),
    {"trigger": Event.CANCEL, "source": ACTIVE, "dest": JobState.CANCELLED},
    {"trigger": Event.EXPIRE, "source": ACTIVE, "dest": JobState.EXPIRED},
    # An operator puts a job that failed or expired back (RetryJob): a fresh attempt budget and deadline.
    {"trigger": Event.RETRY, "source": [JobState.FAILED, JobState.EXPIRED], "dest": JobState.QUEUED},
]


@dataclass(slots=True)
class JobModel:
    """The light model bound to the shared machine for one decision."""

    state: str
    attempt: int = 0
    max_attempts: int = 1

    def is_retryable(self, event: EventData) -> bool:
        return bool(event.kwargs.get("retryable", False))

    def has_attempts_left(self, event: EventData) -> bool:
        return self.attempt < self.max_attempts


# Built once per process (a Machine costs ~0.3 ms to build); models are bound per call.
def _plain(value: Any) -> Any:
    """transitions names Enum states by member name; the store speaks the lowercase values."""
    return [str(v) for v in value] if isinstance(value, list) else str(value)


MACHINE = Machine(
    model=None,
    states=[str(s) for s in JobState],
    transitions=[{k: (v if k == "conditions" else _plain(v)) for k, v in t.items()} for t in TRANSITIONS],
    initial=None,
    auto_transitions=False,
    send_event=True,
)


class TransitionRefused(Exception):
    """The event is not allowed from the job's current state."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}")
        self.state = state
        self.event = event


def decide(
    state: str, event: str, *, attempt: int = 0, max_attempts: int = 1, retryable: bool = False
) -> JobState:
    """Return the state `event` leads to from `state`, or raise TransitionRefused."""
    model = JobModel(str(state), attempt, max_attempts)
    trigger = MACHINE.events.get(str(event))
    if trigger is None:
        raise TransitionRefused(state, event)
    try:
        if not trigger.trigger(model, retryable=retryable):
            raise TransitionRefused(state, event)
    except (MachineError, ValueError) as err:
        raise TransitionRefused(state, event) from err
    return JobState(model.state)


def sources_of(event: str, dest: str | None = None) -> list[JobState]:
    """The states from which `event` can fire (leading to `dest`, when given), in declaration order."""
    found: list[JobState] = []
    for source, transitions in MACHINE.events[event].transitions.items():
        if any(dest is None or t.dest == dest for t in transitions) and source not in found:
            found.append(JobState(source))
    return found


def dests_of(event: str) -> list[JobState]:
    """Every state `event` can lead to, in declaration order."""
    found: list[JobState] = []
    for transitions in MACHINE.events[event].transitions.values():
        for t in transitions:
            if t.dest is not None and JobState(t.dest) not in found:
                found.append(JobState(t.dest))
    return found


def fixed_dest(event: str) -> JobState:
    """The one state `event` leads to from every source, for events without conditions; ValueError
    otherwise (those need the job's record: see decide())."""
    dests = dests_of(event)
    conditional = any(t.conditions for ts in MACHINE.events[event].transitions.values() for t in ts)
    if conditional or len(dests) != 1:
        raise ValueError(f"event {event!r} has no fixed destination")
    return dests[0]


def is_repeat(state: str, last_event: str, event: str) -> bool:
    """A repeat of an event already applied: the job's last event is `event` and it is still in a
    state `event` leads to. Answered with the current state (idempotent), not an error."""
    return last_event == event and state in dests_of(event)


def unacknowledged(state: str, event: Event) -> Event:
    """The event a node's silence amounts to: `lease_expired` or `node_lost` of a job still
    `assigned` (its node never acknowledged it) is `ack_timeout`; any other event is itself."""
    if state == JobState.ASSIGNED and event in (Event.LEASE_EXPIRED, Event.NODE_LOST):
        return Event.ACK_TIMEOUT
    return event


def allowed_pairs() -> set[tuple[JobState, Event]]:
    """Every (state, event) pair the machine accepts under some condition."""
    return {
        (JobState(source), Event(name))
        for name, event in MACHINE.events.items()
        for source in event.transitions
    }
