"""``dmfrag compare``: one workload on several policies, one row each (a
table, JSON, CSV, plots)."""

from __future__ import annotations

import argparse
import json
import sys

from .common import (
    EXIT_OK,
    add_workload_args,
    check_tlb_preset,
    config,
    policies,
    progress,
    run_one,
)

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="one workload on several policies, one table")
    add_workload_args(p)
    p.add_argument("--policies", default="all", help="'all' or a comma-separated list")
    p.add_argument("--tlb", metavar="PRESET")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from ..results import compare_row, metadata, run_result
    check_tlb_preset(args.tlb)
    rows = []
    series = {}
    cfg = config(args)
    for pol in progress(policies(args.policies), f"compare {args.workload}"):
        d = run_one(args, pol)
        res = run_result(d, workload=args.workload, seed=args.seed, tlb=args.tlb, config=cfg)
        rows.append(compare_row(pol, d, res))
        series[pol] = {"samples": d.samples, "row": rows[-1]}
    cols = list(rows[0])
    if args.json:
        print(json.dumps({"rows": rows, **metadata(cfg)}, sort_keys=True))
    else:
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    if args.plots:
        from ..plots import plot_compare
        for path in plot_compare(series, args.plots):
            print(f"plot: {path}", file=sys.stderr)
    return EXIT_OK
