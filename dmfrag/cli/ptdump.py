"""``dmfrag ptdump``: the kernel page tables after a workload, in the format
of Linux's /sys/kernel/debug/page_tables/kernel."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_OK, add_workload_args, check_run_args, run_one

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ptdump", help="the page tables after a workload")
    add_workload_args(p)
    p.add_argument("--policy", default="baseline")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    check_run_args(args, [args.policy])
    d = run_one(args, args.policy)
    sys.stdout.write(d.kernel.ptdump())
    return EXIT_OK
