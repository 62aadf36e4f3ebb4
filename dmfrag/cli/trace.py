"""``dmfrag trace record|replay``: a workload's calls as a versioned JSON
Lines trace, and the trace replayed (optionally on another policy). A bad
line stops the replay but keeps and reports the state up to it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_OK, EXIT_PROBLEM, UsageError, add_workload_args, run_one

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("trace", help="record or replay a trace")
    trs = p.add_subparsers(dest="trace_cmd", required=True)
    rec = trs.add_parser("record", help="run a workload and write its trace")
    add_workload_args(rec)
    rec.add_argument("--policy", default="baseline")
    rec.add_argument("-o", "--output", required=True)
    rec.set_defaults(func=main)
    rep = trs.add_parser("replay", help="replay a trace (optionally on another policy)")
    rep.add_argument("file")
    rep.add_argument("--policy", default=None)
    rep.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    return record(args) if args.trace_cmd == "record" else replay(args)


def record(args: argparse.Namespace) -> int:
    d = run_one(args, args.policy)
    Path(args.output).write_text("\n".join(d.lines) + "\n")
    print(f"recorded {len(d.lines) - 1} calls to {args.output}")
    return EXIT_OK


def replay(args: argparse.Namespace) -> int:
    from ..results import replay_result
    from ..workloads import TraceError
    from ..workloads import replay as replay_trace
    try:
        lines = Path(args.file).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read trace {args.file!r}: {exc.strerror}") from None
    try:
        d, err = replay_trace(lines, policy=args.policy)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(replay_result(d, err), sort_keys=True))
    if err:
        print(f"dmfrag trace replay: {err} (state up to that line kept and reported)",
              file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK
