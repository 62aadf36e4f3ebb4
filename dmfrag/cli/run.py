"""``dmfrag run``: one workload on one policy; the counters after it, as a
line or as the versioned JSON result (docs/results.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import EXIT_OK, add_workload_args, check_tlb_preset, config, run_one

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run one workload on one policy")
    add_workload_args(p)
    p.add_argument("--policy", default="baseline")
    p.add_argument("--tlb", metavar="PRESET", help="also price the run in TLB misses")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--record", metavar="FILE", help="write the trace (JSON Lines)")
    p.add_argument("--validate", action="store_true", help="full validation at the end")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from ..results import run_result
    check_tlb_preset(args.tlb)
    d = run_one(args, args.policy)
    res = run_result(d, workload=args.workload, seed=args.seed, tlb=args.tlb, config=config(args))
    if args.record:
        Path(args.record).write_text("\n".join(d.lines) + "\n")
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        mi, vm = res["meminfo"], res["vmstat"]
        print(f"{args.workload} on {res['policy']} ({res['calls']} calls): DirectMap4k "
              f"{mi['DirectMap4k']} kB, 2M {mi['DirectMap2M']} kB, 1G {mi['DirectMap1G']} kB; "
              f"splits {vm['direct_map_level2_splits']}/{vm['direct_map_level3_splits']} "
              f"(2M/1G), collapses {vm['direct_map_level2_collapses']}/"
              f"{vm['direct_map_level3_collapses']}")
        print(res["kernel_reason"])
    if args.validate:
        d.kernel.validate("full")
    return EXIT_OK
