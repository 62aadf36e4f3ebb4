"""The ``dmfrag`` command line: one module per subcommand, each with
``add_parser(sub)`` (its options) and ``main(args) -> int`` (its work); this
module builds the parser, dispatches, and applies the exit-code rule.

Exit codes: 0 success, 1 the work ran and found a problem (a validation
failure, a model/real difference with --strict), 2 bad input (usage,
unknown names), 3 a missing external tool or package. A subcommand returns
0 or 1; it raises :class:`UsageError` for 2 and :class:`ToolMissing` for 3,
so the message format is the same for every command. A workload that runs
out of guest memory (:class:`dmfrag.workloads.WorkloadError`) is exit 1
with a line naming the call (``run``/``compare`` also print the state
reached). No input gives a traceback: anything else unexpected is one line
too (exit 1), and ``dmfrag --debug CMD`` shows the traceback of any error.

Commands, options and JSON fields are a public contract (docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from . import (
    accesses,
    bench,
    calibrate,
    compare,
    meminfo,
    ptdump,
    realkernel,
    run,
    sweep,
    tlbcost,
    trace,
    validate,
)
from .common import EXIT_PROBLEM, EXIT_TOOL, EXIT_USAGE, ToolMissing, UsageError

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommand modules, in the order ``dmfrag --help`` lists them.
COMMANDS = (run, compare, validate, meminfo, ptdump, sweep, bench, trace, calibrate,
            realkernel, accesses, tlbcost)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dmfrag", description="Direct-map fragmentation lab.",
        epilog="Exit codes: 0 success; 1 the check failed (validation, replay error, "
               "--strict difference); 2 bad input; 3 a missing external tool.")
    ap.add_argument("--debug", action="store_true",
                    help="print the Python traceback of an error (after its one-line message)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        code, msg, caught = EXIT_USAGE, str(exc), exc
    except ToolMissing as exc:
        code, msg, caught = EXIT_TOOL, str(exc), exc
    except KeyboardInterrupt as exc:
        code, msg, caught = EXIT_PROBLEM, "interrupted", exc
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (unless --debug)
        from ..workloads import WorkloadError  # imported late: it loads the whole model
        caught = exc
        if isinstance(exc, WorkloadError):
            code, msg = EXIT_PROBLEM, f"workload {getattr(args, 'workload', '?')}: {exc}"
        else:
            code, msg = EXIT_PROBLEM, (f"internal error: {type(exc).__name__}: {exc} "
                                       f"(dmfrag --debug {args.cmd} ... shows the traceback)")
    print(f"dmfrag {args.cmd}: {msg}", file=sys.stderr)
    if args.debug:
        traceback.print_exception(caught)
    return code
