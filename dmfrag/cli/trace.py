"""``dmfrag trace record|replay``: a workload's calls as a versioned JSON
Lines trace, and the trace replayed (optionally on another policy). A bad
line, or a missing or wrong trailer (a trace cut short), stops the replay
but keeps and reports the state up to it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    EXIT_OK,
    EXIT_PROBLEM,
    UsageError,
    add_kernel_arg,
    add_workload_args,
    check_output_file,
    check_policy,
    check_run_args,
    read_text,
    run_one,
)

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
    rep.add_argument("--placement", choices=["real", "model"], default=None,
                     help="for a recorded (version 3 or 4) trace: 'real' puts every allocation at "
                          "the pfn Linux gave it (the default for such traces); 'model' lets "
                          "the model (and --policy) choose, and says how often it chose "
                          "Linux's pfn")
    rep.add_argument("--truth", default=None, metavar="NPZ",
                     help="for a recorded trace: the real kernel's states at its dump points "
                          "(realkernel record --truth); default: the .truth.npz beside the "
                          "trace, when there is one. Each snapshot then has a \"state\" "
                          "comparison (page tables entry by entry, free pages)")
    rep.add_argument("--start", default=None, metavar="POINT",
                     help="with --placement model: start from the real kernel's state at this "
                          "dump point (its stored state: realkernel record --truth) and replay "
                          "the events after it, so that every difference is the allocator's")
    rep.add_argument("--json", action="store_true",
                     help="for a recorded trace: print the JSON result (always printed)")
    add_kernel_arg(rep, "the trace header's kernel")
    rep.set_defaults(func=main)
    diff = trs.add_parser("diff", help="the first allocation the model places elsewhere than "
                                       "Linux did, in a recorded trace",
                          description="Replay a recorded (version 3 or 4) trace with the model's "
                                      "own placement up to the first allocation whose pfn is "
                                      "not the one Linux gave, and describe it: the request, "
                                      "both pfns, the model's free lists there, and where "
                                      "Linux's pfn is in the model.")
    diff.add_argument("file")
    diff.add_argument("--policy", default=None)
    diff.add_argument("--start", default=None, metavar="POINT",
                      help="start from the real kernel's state at this dump point (as for "
                           "trace replay --placement model --start)")
    diff.add_argument("--json", action="store_true", help="print the JSON result")
    add_kernel_arg(diff, "the trace header's kernel")
    diff.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.trace_cmd == "diff":
        return diff(args)
    return record(args) if args.trace_cmd == "record" else replay(args)


def diff(args: argparse.Namespace) -> int:
    """``trace diff``: exit 0 when every allocation got Linux's pfn, 1 when
    one did not (the difference printed), 2 for bad input."""
    from ..modelled import trace_diff
    from ..placed import PlacedReplayError
    if args.policy is not None:
        check_policy(args.policy)
    if not is_recorded(args.file):
        raise UsageError(f"{args.file}: not a recorded (version 3 or 4) trace of dmfrag realkernel "
                         f"record: only such a trace has Linux's placement")
    try:
        d = trace_diff(args.file, policy=args.policy, kernel=args.kernel, start=args.start)
    except PlacedReplayError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(d.to_json(), sort_keys=True))
    elif d.first is None:
        print(f"every one of {d.allocations_before} allocations got the pfn Linux gave it")
    else:
        f = d.first
        print(f"trace line {f['line']}: order-{f['order']} {f['migratetype']} allocation "
              f"({f['gfp']}, user {f['user']}) after {d.allocations_before} that agreed: Linux "
              f"gave pfn {f['linux_pfn']:#x}, the model {f['model_pfn']:#x} (zone {f['zone']})")
        print(f"  the model's free list (zone {f['zone']}, order {f['order']}, "
              f"{f['migratetype']}) now starts "
              f"{', '.join(hex(p) for p in f['model_list_head']) or '(empty)'}; its per-CPU "
              f"list {', '.join(hex(p) for p in f['model_pcp_head']) or '(empty)'}")
        print(f"  Linux's pfn {f['linux_pfn']:#x} in the model: {f['linux_pfn_in_model']}")
    if d.error:
        print(f"dmfrag trace diff: {d.error}", file=sys.stderr)
    return EXIT_OK if d.first is None and d.error is None else EXIT_PROBLEM


def record(args: argparse.Namespace) -> int:
    """A run that stops early (out of guest memory) still writes the trace
    of the calls before it, its trailer saying why; exit 1."""
    from ..workloads import WorkloadError, trace_text
    check_output_file(args.output, "-o/--output")
    check_run_args(args, [args.policy])
    try:
        d, error = run_one(args, args.policy), None
    except WorkloadError as exc:
        d, error = exc.driver, exc
    Path(args.output).write_text(trace_text(d, error))
    print(f"recorded {len(d.lines) - 1} calls to {args.output}")
    if error is not None:
        print(f"dmfrag trace record: workload {args.workload}: {error} (the calls before it are "
              f"recorded)", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


def replay(args: argparse.Namespace) -> int:
    from ..results import replay_result
    from ..workloads import TraceError
    from ..workloads import replay as replay_trace
    if args.policy is not None:
        check_policy(args.policy)
    if is_recorded(args.file):
        return _replay_placed(args)
    if args.placement is not None:
        raise UsageError(f"--placement {args.placement}: {args.file} is not a recorded (version "
                         f"3 or 4) trace; only a trace of dmfrag realkernel record has Linux's "
                         f"placement")
    lines = read_text(args.file, "trace").splitlines()
    try:
        d, err = replay_trace(lines, policy=args.policy, kernel=args.kernel)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    for w in d.warnings:
        print(f"dmfrag trace replay: warning: {w}", file=sys.stderr)
    print(json.dumps(replay_result(d, err), sort_keys=True))
    if err:
        print(f"dmfrag trace replay: {err} (state up to that line kept and reported)",
              file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


def is_recorded(path: str) -> bool:
    """Whether ``path`` is a recorded (version 3 or 4, maybe gzip'd) trace."""
    import gzip
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rt") as fh:
            first = fh.readline(1 << 26)     # the header: module areas can make it long
        from ..placed import TRACE_VERSIONS
        return json.loads(first).get("dmfrag_trace") in TRACE_VERSIONS
    except (OSError, ValueError, AttributeError, EOFError):
        return False


def _replay_placed(args: argparse.Namespace) -> int:
    from ..modelled import replay_modelled
    from ..placed import PlacedReplayError, replay_placed
    from ..truth import TruthError
    if args.truth is not None and not Path(args.truth).is_file():
        raise UsageError(f"--truth {args.truth!r}: no such file")
    if args.start is not None and args.placement != "model":
        raise UsageError("--start goes with --placement model")
    kw = {"start": args.start} if args.start is not None else {}
    replay = replay_modelled if args.placement == "model" else replay_placed
    try:
        res = replay(args.file, policy=args.policy, kernel=args.kernel, truth=args.truth, **kw)
    except (PlacedReplayError, TruthError) as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(res.to_json(), sort_keys=True))
    if res.error:
        print(f"dmfrag trace replay: {res.error} (state up to that line kept and reported)",
              file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK
