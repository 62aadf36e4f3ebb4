"""``dmfrag meminfo``: /proc/meminfo as the model's kernel reports it after
a workload."""

from __future__ import annotations

import argparse

from .common import EXIT_OK, add_workload_args, check_run_args, run_one

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("meminfo", help="meminfo after a workload")
    add_workload_args(p)
    p.add_argument("--policy", default="baseline")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    check_run_args(args, [args.policy])
    d = run_one(args, args.policy)
    for key, val in d.kernel.meminfo().items():
        print(f"{key + ':':<16}{val:>10} kB")
    return EXIT_OK
