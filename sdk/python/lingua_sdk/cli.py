"""`lingua`: the scheduler from a shell. Readable tables by default, `--json` for scripts.

    lingua [--target HOST:PORT] [--token T] [--tls] [--ca F] [--cert F --key F] [--json] COMMAND
    lingua submit --tenant T --session S --from zh --to en [--index N] (--payload-ref URI | --payload-file F) [--wait [SECONDS]]
    lingua get JOB_ID | watch JOB_ID | cancel JOB_ID [--reason R] | nodes
    lingua session TENANT SESSION [--from-index N] [--lang L] [--count N] [--timeout SECONDS]
  administration (admin role):
    lingua jobs [--pool P] [--state S] [--tenant T] [--session S] [--limit N] [--page-token T]
    lingua stats [--pool P] | retry JOB_ID [--reason R] [--max-attempts N] | drain NODE_ID
    lingua cancel-session TENANT SESSION [--reason R] | pause POOL [--reason R] | resume POOL

Environment: LINGUA_TARGET (default 127.0.0.1:50051), LINGUA_TOKEN. Exit status: 0 done, 1 the
scheduler refused (the status is printed), 2 usage, 3 `submit --wait` ended in a state other than
succeeded, 4 `submit --wait SECONDS` timed out (the job exists and is printed as it is now).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ._channel import TLS
from .client import Client
from .errors import DeadlineExceeded, LinguaError
from .models import Job, JobEvent, JobState, NodeInfo, PoolState, PoolStats, SubmitResult, as_dict

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT = """exit status: 0 done, 1 the scheduler refused (the status is printed, and when to retry if it said), 2 usage,
3 submit --wait: the job ended other than succeeded, 4 submit --wait SECONDS: not finished in time"""


def _common() -> argparse.ArgumentParser:
    """Connection and output flags, accepted before or after the command."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--target", default=s, help=f"scheduler address (env LINGUA_TARGET, default {DEFAULT_TARGET})")
    p.add_argument("--token", default=s, help="bearer token (env LINGUA_TOKEN)")
    p.add_argument("--tls", action="store_true", default=s, help="use TLS (system roots unless --ca)")
    p.add_argument("--ca", default=s, metavar="FILE", help="PEM root certificates (implies --tls)")
    p.add_argument("--cert", default=s, metavar="FILE", help="PEM client certificate, for mutual TLS")
    p.add_argument("--key", default=s, metavar="FILE", help="PEM client key, for mutual TLS")
    p.add_argument("--server-name", default=s, help="name to check in the server's certificate")
    p.add_argument("--json", action="store_true", default=s, help="JSON output (watch: one object per line)")
    return p


def _seconds(text: str) -> float:
    """A --wait/--timeout value: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more seconds")
    return value


def _file_bytes(path: str) -> bytes:
    """A --payload-file: its bytes, read while parsing so a missing file is a usage error (exit 2)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {err.strerror or err}") from None


def parser() -> argparse.ArgumentParser:
    common = _common()
    top = argparse.ArgumentParser(prog="lingua", parents=[common], description="Lingua Scheduler command line.",
                                  epilog=EXIT)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    submit = sub.add_parser("submit", parents=[common], help="submit one job", epilog=EXIT,
                            description="Submit one job: one utterance of a session, translated from one "
                                        "language to another. Prints the job id, whether it was created (a "
                                        "repeat returns the existing job) and its state.")
    submit.add_argument("--tenant", required=True, help="tenant the job belongs to (1 to 64 of A-Z a-z 0-9 . _ -)")
    submit.add_argument("--session", required=True, metavar="SESSION",
                        help="session (conversation) the utterance belongs to")
    submit.add_argument("--from", dest="src_lang", required=True, metavar="LANG",
                        help="source language, a tag such as zh, en or pt-br")
    submit.add_argument("--to", dest="tgt_lang", required=True, metavar="LANG",
                        help="target language, same format, not equal to --from")
    submit.add_argument("--index", type=int, default=0, metavar="N",
                        help="utterance index within the session, 0 or more (default 0)")
    submit.add_argument("--payload-ref", default="", metavar="URI",
                        help="where the node finds the audio: s3://..., https://... or session://SESSION/N")
    submit.add_argument("--payload-file", type=_file_bytes, metavar="FILE",
                        help="send the file's bytes inline as the payload instead (up to the server's cap)")
    submit.add_argument("--priority", type=int, default=0, metavar="0-9",
                        help="0 (lowest, default) to 9 (highest): nodes get higher priorities first")
    submit.add_argument("--max-attempts", type=int, default=0, metavar="N",
                        help="assignments the job may use before it fails (default 0: the server's default)")
    submit.add_argument("--idempotency-key", default="", metavar="KEY",
                        help="repeats with this key return the same job (default: tenant + session + index + "
                             "target language identify it)")
    submit.add_argument("--trace-id", default="", metavar="ID",
                        help="your trace id, passed to the node unchanged (at most 128 characters)")
    submit.add_argument("--wait", type=_seconds, nargs="?", const=0.0, metavar="SECONDS",
                        help="wait until the job ends and print it; at most SECONDS when given (0: no limit). "
                             "On timeout the job, still there, is printed as it is now (exit status 4)")
    submit.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    get = sub.add_parser("get", parents=[common], help="show one job")
    get.add_argument("job_id", help="a job id, as submit printed it")
    watch = sub.add_parser("watch", parents=[common], help="print a job's state changes until it ends")
    watch.add_argument("job_id", help="a job id, as submit printed it")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id", help="a job id, as submit printed it")
    cancel.add_argument("--reason", default="", help="why, recorded with the cancellation")
    sub.add_parser("nodes", parents=[common], help="list registered nodes (admin)")
    session = sub.add_parser("session", parents=[common],
                             help="print a session's finished jobs in utterance order as they finish (WatchSession)")
    session.add_argument("tenant", help="the session's tenant")
    session.add_argument("session", help="the session id")
    session.add_argument("--from-index", dest="from_index", type=int, default=0, metavar="N",
                         help="start at utterance index N (a resume_index to resume; default 0)")
    # The old spelling, kept for scripts; hidden because in `submit` --from is a language.
    session.add_argument("--from", dest="from_index", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    session.add_argument("--lang", default="", metavar="LANG", help="only jobs into this target language")
    session.add_argument("--count", type=int, default=0, metavar="N", help="stop after N jobs")
    session.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                         help="stop after SECONDS (default: run until --count jobs or Ctrl-C)")
    _admin_commands(sub, common)
    return top


def _admin_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    states = [str(s) for s in JobState if s is not JobState.UNSPECIFIED]
    jobs = sub.add_parser("jobs", parents=[common], help="list jobs, newest first (admin)",
                          description="List jobs, newest first, filtered; prints the next page's token when "
                                      "there are more than --limit.")
    jobs.add_argument("--pool", default="", metavar="SRC:TGT", help="only this pool, e.g. zh:en")
    jobs.add_argument("--state", default=None, choices=states, help="only jobs in this state")
    jobs.add_argument("--tenant", default="", help="only this tenant's jobs")
    jobs.add_argument("--session", default="", help="only this session's jobs (with --tenant)")
    jobs.add_argument("--limit", type=int, default=20, metavar="N", help="show at most N jobs (default 20)")
    jobs.add_argument("--page-token", default="", metavar="TOKEN", help="continue where a previous listing stopped")
    stats = sub.add_parser("stats", parents=[common], help="per-pool figures: jobs by state, nodes, rates (admin)")
    stats.add_argument("--pool", default="", metavar="SRC:TGT", help="only this pool")
    retry = sub.add_parser("retry", parents=[common], help="put a failed or expired job back in its queue (admin)")
    retry.add_argument("job_id", help="a failed or expired job's id")
    retry.add_argument("--reason", default="", help="why, recorded with the retry")
    retry.add_argument("--max-attempts", type=int, default=0, metavar="N",
                       help="a fresh attempt budget of N (default: the job's own)")
    cancel_session = sub.add_parser("cancel-session", parents=[common],
                                    help="cancel every unfinished job of a session (admin)")
    cancel_session.add_argument("tenant", help="the session's tenant")
    cancel_session.add_argument("session", help="the session id")
    cancel_session.add_argument("--reason", default="", help="why, recorded with each cancellation")
    pause = sub.add_parser("pause", parents=[common], help="stop dispatching a pool; submits still queue (admin)")
    pause.add_argument("pool", metavar="SRC:TGT", help="the pool, e.g. zh:en")
    pause.add_argument("--reason", default="", help="why, shown by stats and the dashboard")
    resume = sub.add_parser("resume", parents=[common], help="dispatch a paused pool again (admin)")
    resume.add_argument("pool", metavar="SRC:TGT", help="the pool, e.g. zh:en")
    drain = sub.add_parser("drain", parents=[common],
                           help="drain a node: it finishes what it holds and gets nothing new (admin)")
    drain.add_argument("node_id", help="the node")


def _client(args: argparse.Namespace) -> Client:
    target = getattr(args, "target", None) or os.environ.get("LINGUA_TARGET") or DEFAULT_TARGET
    token = getattr(args, "token", None) or os.environ.get("LINGUA_TOKEN") or None
    ca, cert, key, name = (getattr(args, k, None) for k in ("ca", "cert", "key", "server_name"))
    tls: TLS | bool = False
    if ca or cert or key or name:
        try:
            tls = TLS.from_files(ca, cert, key, server_name=name)
        except ValueError as err:  # an unreadable file, a certificate without its key: usage errors
            print(f"lingua: {err}", file=sys.stderr)
            raise SystemExit(2) from err
    elif getattr(args, "tls", False):
        tls = True
    return Client(target, token=token, tls=tls)


# -- output ----------------------------------------------------------------------------------------


def _when(t: datetime | None) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z") if t else "-"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


class _Rows:
    """A table printed row by row as a stream delivers them (watch, session): columns start at the
    widths given (wide enough for the usual values) and widen for a longer value. The header waits for
    the first row, so an error is not preceded by a header."""

    def __init__(self, header: list[str], widths: list[int], out: TextIO) -> None:
        self.header: list[str] | None = header
        self.widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
        self.out = out

    def _line(self, cells: list[str]) -> None:
        self.widths = [max(w, len(c)) for w, c in zip(self.widths, cells, strict=True)]
        self.out.write("  ".join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip() + "\n")

    def row(self, cells: list[str]) -> None:
        self.end()
        self._line(cells)
        self.out.flush()

    def end(self) -> None:
        """Print the header if no row did (the stream ended without any)."""
        if self.header is not None:
            self._line(self.header)
            self.header = None


_STATE_WIDTH = max(len(str(s)) for s in JobState)
_AT_WIDTH = len("2025-01-01T00:00:00.000Z")


def _job(job: Job, out: TextIO) -> None:
    s = job.spec
    rows = [
        ["job", job.job_id], ["state", str(job.state)], ["attempt", f"{job.attempt} of {job.max_attempts}"],
        ["node", job.node_id or "-"], ["tenant/session", f"{s.tenant_id}/{s.session_id} #{s.utterance_index}"],
        ["pair", f"{s.src_lang} -> {s.tgt_lang}"], ["created", _when(job.created_at)], ["updated", _when(job.updated_at)],
    ]
    if job.lease_deadline:
        rows.append(["lease until", _when(job.lease_deadline)])
    if job.last_error:
        e = job.last_error
        rows.append(["last error", f"{e.code}{' (retryable)' if e.retryable else ''}: {e.message}"])
    if job.result:
        r = job.result
        rows += [["asr", r.text_asr], ["translated", r.text_translated]]
        if r.tts_audio_ref or r.tts_audio:
            rows.append(["tts", r.tts_audio_ref or f"{len(r.tts_audio)} bytes inline ({r.tts_format})"])
        rows += [[f"extra.{k}", v] for k, v in sorted(r.extra.items())]
    _table(rows, out)


def _event_row(e: JobEvent) -> list[str]:
    error = f"{e.error.code}: {e.error.message}" if e.error else ""
    return [_when(e.at), str(e.state), e.event, str(e.attempt), e.node_id or "-", error]


def _session_row(job: Job) -> list[str]:
    if job.result:
        text = job.result.text_translated or job.result.text_asr
    else:
        text = f"{job.last_error.code}: {job.last_error.message}" if job.last_error else ""
    return [str(job.spec.utterance_index), job.spec.tgt_lang, str(job.state), job.job_id, text]


def _nodes(nodes: list[NodeInfo], out: TextIO) -> None:
    if not nodes:
        out.write("no nodes registered\n")
        return
    rows = [["NODE", "POOLS", "LOAD", "INSTANCE", "STATE", "VERSION", "CONNECTED"]]
    rows += [[n.node_id, ",".join(n.pools), f"{n.in_flight}/{n.max_concurrency}", n.instance_id,
              "draining" if n.draining else "quarantined" if n.quarantined else "serving", n.version or "-",
              _when(n.connected_at)] for n in nodes]
    _table(rows, out)


def _job_rows(jobs: list[Job], out: TextIO) -> None:
    rows = [["JOB", "STATE", "ATTEMPT", "TENANT/SESSION", "CREATED", "LAST ERROR"]]
    rows += [[j.job_id, str(j.state), f"{j.attempt}/{j.max_attempts}",
              f"{j.spec.tenant_id}/{j.spec.session_id} #{j.spec.utterance_index}", _when(j.created_at),
              f"{j.last_error.code}: {j.last_error.message}" if j.last_error else ""] for j in jobs]
    _table(rows, out)


def _stats(pools: list[PoolStats], out: TextIO) -> None:
    if not pools:
        out.write("no pools with jobs or nodes\n")
        return
    states = [str(s) for s in JobState if s is not JobState.UNSPECIFIED]
    rows = [["POOL", *(s.upper() for s in states), "NODES", "LOAD", "IN/S", "OUT/S", "OLDEST", "DISPATCH"]]
    rows += [[p.pool, *(str(p.jobs[s]) for s in states), str(p.nodes), f"{p.in_flight}/{p.capacity}",
              f"{p.submitted_per_second:.1f}", f"{p.finished_per_second:.1f}",
              f"{p.oldest_queued_age.total_seconds():.1f}s", "paused" if p.paused else "on"] for p in pools]
    _table(rows, out)
    for p in pools:
        if p.paused:
            why = f": {p.paused_reason}" if p.paused_reason else ""
            out.write(f"pool {p.pool} paused since {_when(p.paused_at)}{why}\n")


def _pool_state(state: PoolState, out: TextIO) -> None:
    if state.paused:
        why = f": {state.reason}" if state.reason else ""
        out.write(f"pool {state.pool} paused since {_when(state.paused_at)}{why}\n")
    else:
        out.write(f"pool {state.pool} dispatching\n")


def _dump(value: Any, out: TextIO) -> None:
    out.write(json.dumps(as_dict(value) if hasattr(value, "__dataclass_fields__") else value) + "\n")


def _show(job: Job, as_json: bool, out: TextIO) -> None:
    if as_json:
        _dump(job, out)
    else:
        _job(job, out)


# -- commands --------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, out: TextIO) -> int:
    as_json = getattr(args, "json", False)
    with _client(args) as client:
        if args.command == "submit":
            sub: SubmitResult = client.submit(
                tenant_id=args.tenant, session_id=args.session, src_lang=args.src_lang, tgt_lang=args.tgt_lang,
                utterance_index=args.index, payload=args.payload_file or b"", payload_ref=args.payload_ref,
                priority=args.priority, max_attempts=args.max_attempts, idempotency_key=args.idempotency_key,
                trace_id=args.trace_id)
            if args.quiet:
                out.write(sub.job_id + "\n")
            elif as_json and args.wait is None:
                _dump(sub, out)
            elif args.wait is None:
                _table([["JOB", "CREATED", "STATE"], [sub.job_id, "yes" if sub.created else "no (repeat)", str(sub.state)]],
                       out)
            if args.wait is None:
                return 0
            try:
                job = client.wait(sub.job_id, timeout=args.wait or None)
            except DeadlineExceeded:
                job = client.get(sub.job_id)
                sys.stderr.write(f"lingua: job {job.job_id} did not finish within {args.wait:g} s; it is {job.state} "
                                 f"(it stays: lingua watch {job.job_id}, lingua cancel {job.job_id})\n")
                if not args.quiet:
                    _show(job, as_json, out)
                return 4
            if not args.quiet:
                _show(job, as_json, out)
            return 0 if job.state is JobState.SUCCEEDED else 3
        if args.command in ("get", "cancel"):
            job = client.get(args.job_id) if args.command == "get" else client.cancel(args.job_id, reason=args.reason)
            _show(job, as_json, out)
        elif args.command == "watch":
            # The longest event name is "lease_expired"; node ids are usually short.
            events = _Rows(["AT", "STATE", "EVENT", "ATTEMPT", "NODE", "ERROR"],
                           [_AT_WIDTH, _STATE_WIDTH, len("lease_expired"), 0, 8, 0], out)
            for event in client.watch(args.job_id):
                if as_json:
                    _dump(event, out)
                    out.flush()
                else:
                    events.row(_event_row(event))
            if not as_json:
                events.end()
        elif args.command == "session":
            # Wide enough for tags up to "pt-br" and a job id "{src:tgt:partition}" + 26-character ULID
            # of such tags; only longer tags or 10+ partitions widen the columns.
            jobs = _Rows(["INDEX", "LANG", "STATE", "JOB", "TEXT / ERROR"],
                         [0, len("pt-br"), _STATE_WIDTH, len("{pt-br:pt-br:0}") + 26, 0], out)
            shown = 0
            with closing(client.watch_session(args.tenant, args.session, args.from_index, tgt_lang=args.lang,
                                              timeout=args.timeout)) as batches:
                for batch in batches:
                    for job in batch.jobs:
                        if as_json:
                            _dump({**as_dict(job), "resume_index": batch.resume_index}, out)
                        else:
                            jobs.row(_session_row(job))
                        shown += 1
                        if shown == args.count:
                            return 0
                    out.flush()
            if not as_json:
                jobs.end()
        elif args.command == "nodes":
            nodes = client.list_nodes()
            if as_json:
                _dump([as_dict(n) for n in nodes], out)
            else:
                _nodes(nodes, out)
        else:
            return _run_admin(client, args, as_json, out)
    return 0


def _run_admin(client: Client, args: argparse.Namespace, as_json: bool, out: TextIO) -> int:
    if args.command == "jobs":
        listed: list[Job] = []
        token = args.page_token
        while len(listed) < args.limit:
            page = client.list_jobs(pool=args.pool, state=args.state, tenant_id=args.tenant, session_id=args.session,
                                    page_size=min(500, args.limit - len(listed)), page_token=token)
            listed += page.jobs
            token = page.next_page_token
            if not token:
                break
        if as_json:
            _dump({"jobs": [as_dict(j) for j in listed], "next_page_token": token}, out)
        elif listed:
            _job_rows(listed, out)
        else:
            out.write("no jobs\n")
        if token and not as_json:
            sys.stderr.write(f"lingua: more jobs: --page-token {token}\n")
    elif args.command == "stats":
        stats = client.get_stats(args.pool)
        if as_json:
            _dump({"pools": [as_dict(p) for p in stats.pools], "as_of": _when(stats.as_of)}, out)
        else:
            _stats(stats.pools, out)
    elif args.command == "retry":
        _show(client.retry(args.job_id, reason=args.reason, max_attempts=args.max_attempts), as_json, out)
    elif args.command == "cancel-session":
        done = client.cancel_session(args.tenant, args.session, reason=args.reason)
        if as_json:
            _dump(done, out)
        else:
            out.write(f"cancelled {len(done.cancelled_job_ids)} job(s); {done.already_finished} already finished\n")
            out.writelines(f"  {job_id}\n" for job_id in done.cancelled_job_ids)
    elif args.command in ("pause", "resume"):
        state = client.pause_pool(args.pool, reason=args.reason) if args.command == "pause" else \
            client.resume_pool(args.pool)
        if as_json:
            _dump(state, out)
        else:
            _pool_state(state, out)
    elif args.command == "drain":
        node = client.drain_node(args.node_id)
        if as_json:
            _dump(node, out)
        else:
            _nodes([node], out)
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args, out or sys.stdout)
    except LinguaError as err:
        if getattr(args, "json", False):  # a program reads the error as it reads the output: one JSON object
            sys.stderr.write(json.dumps({"error": {
                "code": err.code.name, "reason": err.reason, "message": err.message, "metadata": err.metadata,
                "field_violations": [{"field": f, "description": d} for f, d in err.field_violations],
                "retry_delay": err.retry_delay}}) + "\n")
            return 1
        sys.stderr.write(f"lingua: {err}\n")
        for field, why in err.field_violations:  # those the message does not already say
            if f"{field}: {why}" not in err.message:
                sys.stderr.write(f"  {field}: {why}\n")
        if err.retry_delay is not None:  # google.rpc.RetryInfo: when the same command may pass
            sys.stderr.write(f"  retry in {err.retry_delay:g} s ({err.reason or err.code.name})\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
