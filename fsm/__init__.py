"""The pure job state machine (no I/O). See fsm.machine."""

from .machine import (
    ACTIVE,
    HELD,
    MACHINE,
    TERMINAL,
    TRANSITIONS,
    Event,
    JobModel,
    JobState,
    TransitionRefused,
    allowed_pairs,
    decide,
    dests_of,
    fixed_dest,
    is_repeat,
    sources_of,
)

__all__ = [
    "ACTIVE",
    "HELD",
    "MACHINE",
    "TERMINAL",
    "TRANSITIONS",
    "Event",
    "JobModel",
    "JobState",
    "TransitionRefused",
    "allowed_pairs",
    "decide",
    "dests_of",
    "fixed_dest",
    "is_repeat",
    "sources_of",
]
