"""`lingua`: the scheduler from a shell. Readable tables by default, `--json` for scripts.

    lingua [--target HOST:PORT] [--token T] [--tls] [--ca F] [--cert F --key F] [--json] COMMAND
    lingua submit --tenant T --session S --from zh --to en [--index N] (--payload-ref URI | --payload-file F) [--wait]
    lingua get JOB_ID | watch JOB_ID | cancel JOB_ID [--reason R] | nodes
    lingua session TENANT SESSION [--from N] [--lang L] [--count N] [--timeout SECONDS]

Environment: LINGUA_TARGET (default 127.0.0.1:50051), LINGUA_TOKEN. Exit status: 0 done, 1 the
scheduler refused (the status is printed), 2 usage, 3 `submit --wait` ended in a state other than
succeeded.
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
from .errors import LinguaError
from .models import Job, JobEvent, JobState, NodeInfo, SubmitResult, as_dict

DEFAULT_TARGET = "127.0.0.1:50051"


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


def parser() -> argparse.ArgumentParser:
    common = _common()
    top = argparse.ArgumentParser(prog="lingua", parents=[common], description="Lingua Scheduler command line.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    submit = sub.add_parser("submit", parents=[common], help="submit one job")
    submit.add_argument("--tenant", required=True)
    submit.add_argument("--session", required=True)
    submit.add_argument("--from", dest="src_lang", required=True, metavar="LANG")
    submit.add_argument("--to", dest="tgt_lang", required=True, metavar="LANG")
    submit.add_argument("--index", type=int, default=0, help="utterance index within the session")
    submit.add_argument("--payload-ref", default="", metavar="URI")
    submit.add_argument("--payload-file", type=Path, metavar="FILE", help="send the file's bytes as the payload")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--max-attempts", type=int, default=0)
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--trace-id", default="")
    submit.add_argument("--wait", type=float, nargs="?", const=0.0, metavar="SECONDS",
                        help="wait for the terminal state (optionally at most SECONDS) and print the job")
    submit.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    get = sub.add_parser("get", parents=[common], help="show one job")
    get.add_argument("job_id")
    watch = sub.add_parser("watch", parents=[common], help="print a job's state changes until it ends")
    watch.add_argument("job_id")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="")
    sub.add_parser("nodes", parents=[common], help="list registered nodes")
    session = sub.add_parser("session", parents=[common],
                             help="print a session's finished jobs in utterance order as they finish (WatchSession)")
    session.add_argument("tenant")
    session.add_argument("session")
    session.add_argument("--from", dest="from_index", type=int, default=0, metavar="N",
                         help="start at utterance index N (a resume_index to resume)")
    session.add_argument("--lang", default="", metavar="LANG", help="only jobs into this target language")
    session.add_argument("--count", type=int, default=0, metavar="N", help="stop after N jobs")
    session.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop after SECONDS")
    return top


def _client(args: argparse.Namespace) -> Client:
    target = getattr(args, "target", None) or os.environ.get("LINGUA_TARGET") or DEFAULT_TARGET
    token = getattr(args, "token", None) or os.environ.get("LINGUA_TOKEN") or None
    ca, cert, key, name = (getattr(args, k, None) for k in ("ca", "cert", "key", "server_name"))
    tls: TLS | bool = False
    if ca or cert or key or name:
        tls = TLS.from_files(ca, cert, key, server_name=name)
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
              "draining" if n.draining else "serving", n.version or "-", _when(n.connected_at)] for n in nodes]
    _table(rows, out)


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
            payload = args.payload_file.read_bytes() if args.payload_file else b""
            sub: SubmitResult = client.submit(
                tenant_id=args.tenant, session_id=args.session, src_lang=args.src_lang, tgt_lang=args.tgt_lang,
                utterance_index=args.index, payload=payload, payload_ref=args.payload_ref, priority=args.priority,
                max_attempts=args.max_attempts, idempotency_key=args.idempotency_key, trace_id=args.trace_id)
            if args.quiet:
                out.write(sub.job_id + "\n")
            elif as_json and args.wait is None:
                _dump(sub, out)
            elif args.wait is None:
                _table([["JOB", "CREATED", "STATE"], [sub.job_id, "yes" if sub.created else "no (repeat)", str(sub.state)]],
                       out)
            if args.wait is None:
                return 0
            job = client.wait(sub.job_id, timeout=args.wait or None)
            if not args.quiet:
                _show(job, as_json, out)
            return 0 if job.state is JobState.SUCCEEDED else 3
        if args.command in ("get", "cancel"):
            job = client.get(args.job_id) if args.command == "get" else client.cancel(args.job_id, reason=args.reason)
            _show(job, as_json, out)
        elif args.command == "watch":
            if not as_json:
                out.write("  ".join(["AT", "STATE", "EVENT", "ATTEMPT", "NODE", "ERROR"]) + "\n")
            for event in client.watch(args.job_id):
                if as_json:
                    _dump(event, out)
                else:
                    out.write("  ".join(_event_row(event)).rstrip() + "\n")
                out.flush()
        elif args.command == "session":
            if not as_json:
                out.write("  ".join(["INDEX", "LANG", "STATE", "JOB", "TEXT / ERROR"]) + "\n")
            shown = 0
            with closing(client.watch_session(args.tenant, args.session, args.from_index, tgt_lang=args.lang,
                                              timeout=args.timeout)) as batches:
                for batch in batches:
                    for job in batch.jobs:
                        if as_json:
                            _dump({**as_dict(job), "resume_index": batch.resume_index}, out)
                        else:
                            out.write("  ".join(_session_row(job)).rstrip() + "\n")
                        shown += 1
                        if shown == args.count:
                            return 0
                    out.flush()
        elif args.command == "nodes":
            nodes = client.list_nodes()
            if as_json:
                _dump([as_dict(n) for n in nodes], out)
            else:
                _nodes(nodes, out)
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args, out or sys.stdout)
    except LinguaError as err:
        sys.stderr.write(f"lingua: {err}\n")
        for field, why in err.field_violations:
            sys.stderr.write(f"  {field}: {why}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
