"""The job state machine, pure: every (state, event) pair, derived from the machine itself."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from lingua_scheduler.fsm import (
    GIVES_BACK_ATTEMPT,
    MACHINE,
    TERMINAL,
    TRANSITIONS,
    Event,
    JobState,
    TransitionRefused,
    allowed_pairs,
    decide,
    sources_of,
    unacknowledged,
)

ALLOWED = allowed_pairs()
ALL_PAIRS = list(itertools.product(JobState, Event))


def declared_dests(state: JobState, event: Event) -> set[str]:
    out = set()
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        if t["trigger"] == event and state in sources:
            out.add(str(t["dest"]))
    return out


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_every_pair_is_allowed_or_refused(state: JobState, event: Event) -> None:
    if (state, event) not in ALLOWED:
        with pytest.raises(TransitionRefused):
            decide(state, event, attempt=1, max_attempts=3, retryable=True)
        return
    # Under every condition outcome the machine picks one of the declared destinations.
    for attempt, retryable in itertools.product((1, 3), (False, True)):
        dest = decide(state, event, attempt=attempt, max_attempts=3, retryable=retryable)
        assert dest in declared_dests(state, event)


def test_terminal_states_accept_only_an_operators_retry() -> None:
    """Nothing a node or client does moves a finished job; RetryJob's `retry` puts a failed or expired
    one back in the queue (a succeeded or cancelled one stays as it is)."""
    for state in TERMINAL:
        events = {e for s, e in ALLOWED if s == state}
        assert events == ({Event.RETRY} if state in (JobState.FAILED, JobState.EXPIRED) else set()), state
    assert decide(JobState.FAILED, Event.RETRY) == JobState.QUEUED
    assert decide(JobState.EXPIRED, Event.RETRY) == JobState.QUEUED


@pytest.mark.parametrize(
    ("event", "attempt", "retryable", "expected"),
    [
        (Event.FAIL, 1, True, JobState.QUEUED),
        (Event.FAIL, 1, False, JobState.FAILED),
        (Event.FAIL, 3, True, JobState.FAILED),
        (Event.LEASE_EXPIRED, 2, False, JobState.QUEUED),
        (Event.LEASE_EXPIRED, 3, False, JobState.FAILED),
        (Event.NODE_LOST, 1, False, JobState.QUEUED),
        (Event.UNAVAILABLE, 3, False, JobState.FAILED),
    ],
)
def test_retry_conditions(event: Event, attempt: int, retryable: bool, expected: JobState) -> None:
    assert decide(JobState.RUNNING, event, attempt=attempt, max_attempts=3, retryable=retryable) == expected


def test_an_assignment_never_acknowledged_gives_its_attempt_back_whatever_max_attempts() -> None:
    """Attempts count executions a node started: the ack timeout (or a lost stream) of a job still
    `assigned` is `ack_timeout`, which requeues it even on its last attempt; once running, the same
    silence is lease_expired / node_lost and uses the attempt up."""
    for silence in (Event.LEASE_EXPIRED, Event.NODE_LOST):
        assert unacknowledged(JobState.ASSIGNED, silence) == Event.ACK_TIMEOUT
        assert unacknowledged(JobState.RUNNING, silence) == silence
        assert decide(JobState.RUNNING, silence, attempt=1, max_attempts=1) == JobState.FAILED
        with pytest.raises(TransitionRefused):
            decide(JobState.ASSIGNED, silence, attempt=1, max_attempts=3)
    assert unacknowledged(JobState.ASSIGNED, Event.FAIL) == Event.FAIL
    assert decide(JobState.ASSIGNED, Event.ACK_TIMEOUT, attempt=1, max_attempts=1) == JobState.QUEUED
    assert sources_of(Event.ACK_TIMEOUT) == [JobState.ASSIGNED]
    assert GIVES_BACK_ATTEMPT == {Event.RELEASE, Event.ACK_TIMEOUT}


def test_unknown_event_and_state_are_refused() -> None:
    with pytest.raises(TransitionRefused):
        decide(JobState.QUEUED, "teleport")
    with pytest.raises(TransitionRefused):
        decide("limbo", Event.CANCEL)


def test_sources_match_the_machine() -> None:
    assert sources_of(Event.COMPLETE) == [JobState.ASSIGNED, JobState.RUNNING]
    assert sources_of(Event.ASSIGN) == [JobState.QUEUED]
    assert set(sources_of(Event.CANCEL)) == {JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING}
    assert set(MACHINE.events) == {str(e) for e in Event}


class JobLifecycle(RuleBasedStateMachine):
    """Random event sequences against an independent reference model of the job lifecycle."""

    def __init__(self) -> None:
        super().__init__()
        self.state = JobState.NEW
        self.attempt = 0
        self.max_attempts = 3

    def expected(self, event: Event, retryable: bool) -> JobState | None:
        s, left = self.state, self.attempt < self.max_attempts
        held = s in (JobState.ASSIGNED, JobState.RUNNING)
        table = {
            Event.SUBMIT: JobState.QUEUED if s == JobState.NEW else None,
            Event.ASSIGN: JobState.ASSIGNED if s == JobState.QUEUED else None,
            Event.START: JobState.RUNNING if s == JobState.ASSIGNED else None,
            Event.RELEASE: JobState.QUEUED if s == JobState.ASSIGNED else None,
            Event.ACK_TIMEOUT: JobState.QUEUED if s == JobState.ASSIGNED else None,
            Event.COMPLETE: JobState.SUCCEEDED if held else None,
            Event.FAIL: (JobState.QUEUED if retryable and left else JobState.FAILED) if held else None,
            Event.CANCEL: JobState.CANCELLED if s in (JobState.QUEUED, *([s] if held else [])) else None,
            Event.EXPIRE: JobState.EXPIRED if s in (JobState.QUEUED, *([s] if held else [])) else None,
            Event.RETRY: JobState.QUEUED if s in (JobState.FAILED, JobState.EXPIRED) else None,
        }
        for lost in (Event.LEASE_EXPIRED, Event.NODE_LOST):  # from assigned these are ack_timeout
            table[lost] = (JobState.QUEUED if left else JobState.FAILED) if s == JobState.RUNNING else None
        table[Event.UNAVAILABLE] = (JobState.QUEUED if left else JobState.FAILED) if held else None
        return table[event]

    @rule(event=st.sampled_from(list(Event)), retryable=st.booleans())
    def fire(self, event: Event, retryable: bool) -> None:
        want = self.expected(event, retryable)
        try:
            got = decide(self.state, event, attempt=self.attempt, max_attempts=self.max_attempts,
                         retryable=retryable)
        except TransitionRefused:
            assert want is None, f"{event} from {self.state} should lead to {want}"
            return
        assert got == want
        if event == Event.ASSIGN:
            self.attempt += 1
        if event in (Event.RELEASE, Event.ACK_TIMEOUT):
            self.attempt -= 1  # the claim never reached its node, or no node started it: given back
        if event == Event.RETRY:
            self.attempt = 0  # a fresh attempt budget
        self.state = got

    @invariant()
    def attempts_bounded(self) -> None:
        assert self.attempt <= self.max_attempts


TestJobLifecycle = JobLifecycle.TestCase
