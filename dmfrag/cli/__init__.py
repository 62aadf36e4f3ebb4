"""The ``dmfrag`` command line: one module per subcommand, each with
``add_parser(sub)`` (its options) and ``main(args) -> int`` (its work); this
module builds the parser, dispatches, and applies the exit-code rule.

Exit codes: 0 success, 1 the work ran and found a problem (a validation
failure, a model/real difference with --strict), 2 bad input (usage,
unknown names), 3 a missing external tool or package. A subcommand returns
0 or 1; it raises :class:`UsageError` for 2 and :class:`ToolMissing` for 3,
so the message format is the same for every command.

Commands, options and JSON fields are a public contract (docs/results.md).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, calibrate, compare, meminfo, ptdump, run, sweep, trace, validate
from .common import EXIT_TOOL, EXIT_USAGE, ToolMissing, UsageError

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommand modules, in the order ``dmfrag --help`` lists them.
COMMANDS = (run, compare, validate, meminfo, ptdump, sweep, bench, trace, calibrate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dmfrag", description="Direct-map fragmentation lab.",
        epilog="Exit codes: 0 success; 1 the check failed (validation, replay error, "
               "--strict difference); 2 bad input; 3 a missing external tool.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"dmfrag {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ToolMissing as exc:
        print(f"dmfrag {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_TOOL
