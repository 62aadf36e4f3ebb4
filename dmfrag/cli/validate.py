"""``dmfrag validate``: run a workload, then check the kernel's page tables
and bookkeeping against what the emulated CPU translates."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_OK, EXIT_PROBLEM, add_workload_args, check_run_args, run_one

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="run a workload and validate against the CPU")
    add_workload_args(p)
    p.add_argument("--policy", default="baseline")
    p.add_argument("--mode", choices=("full", "sample"), default="full")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from guestkernel.validate import ValidationError
    check_run_args(args, [args.policy])
    d = run_one(args, args.policy)
    try:
        stats = d.kernel.validate(args.mode)
    except ValidationError as exc:
        print(f"dmfrag validate: FAILED: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"valid: {stats['translated']} pages translated, {stats['table_pages']} table pages, "
          f"{stats.get('executed', 0)} pages loaded by guest code")
    return EXIT_OK
