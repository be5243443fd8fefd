"""Strings that travel through Redis between instances: timer members, wake-ups, node messages and
session announcements.

One module formats and parses them; the Lua prelude (server/scripts.py) is built from the same
constants, so a script and the Python side cannot disagree (tests/test_lua_scripts.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

# Queue scores: priority band * QUEUE_BAND + the job's pass (fair share: lua/submit_job-n.lua). Band 0 is
# priority 9; within a band a tenant's jobs are FAIR_STEP / weight apart in passes, and a tenant that
# joins starts at the band's virtual clock, so tenants take turns. Scores stay exact integers in a
# double (< 10 * 2^49 < 2^53); a band's clock restarts from 0 when it passed FAIR_RESET and the band is empty.
QUEUE_BAND = 2**49
FAIR_STEP = 2**16
FAIR_RESET = 2**48


def queue_band(score: float) -> int:
    """The priority band of a queue score: 0 for priority 9 ... 9 for priority 0."""
    return int(score // QUEUE_BAND)


def fair_step(weight: float) -> int:
    """How far apart a tenant of this weight puts its jobs in a band (passes; at least 1)."""
    return max(1, round(FAIR_STEP / weight))


# A record keeps a value longer than PIECE bytes (its spec, usually; a state change with a long error) in
# pieces, fields <name>, <name>+2, ... (the Lua prelude's pieces()): one hash value over Redis's
# hash-max-listpack-value (64 by default) turns the whole hash from a listpack into a hashtable, several
# times its memory. Scripts read the spec's first SPEC_READ pieces in the HMGET of the record, the rest
# (a spec over 256 bytes) piece by piece.
PIECE, SPEC_READ = 64, 4

# A finished job's result of at most RESULT_PIECES pieces (PIECE * RESULT_PIECES bytes) is kept in its record,
# field `r` (+ `r+2`, ...): it expires with the record, with no key and no expiry entry of its own. A longer
# one is the job's result key (keys.JobKeys.result), which a record of an earlier version may also point to.
RESULT_PIECES = 4


def joined(h: dict[bytes, bytes], name: bytes) -> bytes | None:
    """A value of a record read whole (HGETALL), from its pieces; None when it has none."""
    first = h.get(name)
    if first is None:
        return None
    out, i = [first], 2
    while (piece := h.get(b"%s+%d" % (name, i))) is not None:
        out.append(piece)
        i += 1
    return b"".join(out)


# A held job's score in its partition's held zset (keys.PartitionKeys.held): ZCOUNT by score counts each state.
HELD_ASSIGNED, HELD_RUNNING = 0, 1

LEASE, DEADLINE, RETRY, FORGET = "l", "d", "r", "x"  # timer kinds
TOKEN_SEP = "#"  # never in a job id (a partition tag and a ULID) nor in a lease token (hex)
FORGET_SEP = " "  # never in a job id nor a tenant id ([A-Za-z0-9._-]) nor a state
NOT_ENDED_INDEXED = "-"  # a forget timer's state of a job in no ended index (it succeeded)


def lease_timer(job_id: str, token: str) -> str:
    """The timer member of one claim's lease: a newer claim of the job has another member, so
    dropping a stale one can never remove the current lease's timer."""
    return f"{LEASE}:{job_id}{TOKEN_SEP}{token}"


def deadline_timer(job_id: str) -> str:
    return f"{DEADLINE}:{job_id}"


def retry_timer(job_id: str) -> str:
    return f"{RETRY}:{job_id}"


def forget_timer(job_id: str, tenant_id: str, ended: str = NOT_ENDED_INDEXED) -> str:
    """The timer that takes a finished job out of ListJobs' indexes when its record expires (set by
    finish_job): it names what the forget needs, the record being gone by then. `ended`: the state
    whose ended index holds the job, NOT_ENDED_INDEXED for none; `tenant_id` "" for a record without one."""
    return f"{FORGET}:{job_id}{FORGET_SEP}{tenant_id}{FORGET_SEP}{ended}"


@dataclass(frozen=True, slots=True)
class Timer:
    kind: str
    job_id: str
    token: str = ""  # lease timers only
    tenant: str = ""  # forget timers only (as ended)
    ended: str = ""


def parse_timer(member: str) -> Timer:
    """ValueError for a member no version of the scheduler wrote."""
    kind, sep, rest = member.partition(":")
    if not sep or kind not in (LEASE, DEADLINE, RETRY, FORGET) or not rest:
        raise ValueError(f"not a timer member: {member!r}")
    if kind == LEASE:
        job_id, _, token = rest.partition(TOKEN_SEP)
        return Timer(kind, job_id, token)
    if kind == FORGET:
        parts = rest.split(FORGET_SEP)
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise ValueError(f"not a timer member: {member!r}")
        return Timer(kind, parts[0], tenant=parts[1], ended=parts[2])
    return Timer(kind, rest)


WAKE_SEP = " "


def wake(job_id: str, preferred_node: str = "", score: float | None = None) -> str:
    """A wake-up: `job_id` was queued (and prefers `preferred_node`, when set), at queue `score`, so a
    dispatcher pairs what it heard of in queue order (priority, then tenants in turn), not as heard."""
    return f"{job_id}{WAKE_SEP}{preferred_node}" + ("" if score is None else f"{WAKE_SEP}{score:.0f}")


# One message carries the wake-ups of one submit call (a Submit's jobs of a partition: lua/submit_job-n.lua),
# one per line. Node ids hold no space or newline (server/validate.py), job ids neither.
WAKES_SEP, WAKES_SEP_LUA = "\n", "\\n"


def parse_wakes(data: str) -> list[tuple[str, str, float | None]]:
    """[(job id, preferred node, queue score or None)] of a message; ValueError for a score that is not a number."""
    out = []
    for line in data.split(WAKES_SEP):
        job_id, _, rest = line.partition(WAKE_SEP)
        preferred, _, score = rest.partition(WAKE_SEP)
        out.append((job_id, preferred, float(score) if score else None))
    return out


# Messages to the instance holding a node's stream (on keys.node_channel(node_id)); DRAIN: DrainNode.
CANCEL, REPLACED, DRAIN = "cancel", "replaced", "drain"
# Messages on keys.pool_channel(pool): PausePool and ResumePool.
PAUSE, RESUME = "pause", "resume"


def cancel(job_id: str, token: str) -> str:
    """Stop working on `job_id` under the lease `token` (cancelled, expired, taken back)."""
    return f"{CANCEL} {job_id} {token}"


def replaced(session_token: str) -> str:
    """The stream `session_token` was replaced by a newer stream of the same node id."""
    return f"{REPLACED} {session_token}"


def parse_node_message(data: str) -> tuple[str, list[str]]:
    verb, *args = data.split(" ")
    return verb, args


# A job of a session reached a terminal state (on keys.session_channel; published by finish_job): a line
# "<job id> <utterance index> <state>". finish_job sends one message per job; a reader takes several lines
# too, so that a later release may announce a call's jobs of a session in one message (a reader before this
# one hears the first line's job only: not while it may run beside the sender).
SESSION_SEP, SESSION_LINES = " ", "\n"


def session_done(job_id: str, utterance_index: int, state: str) -> str:
    return f"{job_id}{SESSION_SEP}{utterance_index}{SESSION_SEP}{state}"


@dataclass(frozen=True, slots=True)
class SessionDone:
    job_id: str
    utterance_index: int | None  # None from a record written before the field existed
    state: str


def parse_session_done(data: str) -> list[SessionDone]:
    """The jobs of one announcement; ValueError for a message no version of the scheduler wrote."""
    out = []
    for line in data.split(SESSION_LINES):
        job_id, _, rest = line.partition(SESSION_SEP)
        utt, _, state = rest.partition(SESSION_SEP)
        if not job_id or not state:
            raise ValueError(f"not a session announcement: {data!r}")
        out.append(SessionDone(job_id, int(utt) if utt else None, state))
    return out
