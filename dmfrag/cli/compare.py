"""``dmfrag compare``: one workload on several policies, one row each (a
table, JSON, CSV, plots)."""

from __future__ import annotations

import argparse
import json
import sys

from .common import (
    EXIT_OK,
    EXIT_PROBLEM,
    add_workload_args,
    check_output_dir,
    check_output_file,
    check_run_args,
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
    """Every input is checked before the first run (output paths first). A
    policy whose run runs out of guest memory stops the compare: the rows
    of the policies before it are still printed and written, the JSON says
    ``completed: false`` and the ``error``, and the exit code is 1."""
    from ..results import compare_row, metadata, run_result
    from ..workloads import WorkloadError
    check_output_file(args.csv, "--csv")
    check_output_dir(args.plots, "--plots")
    check_tlb_preset(args.tlb)
    pols = policies(args.policies)
    check_run_args(args, pols)
    rows = []
    series = {}
    cfg = config(args)
    error = None
    for pol in progress(pols, f"compare {args.workload}"):
        try:
            d = run_one(args, pol)
        except WorkloadError as exc:
            error = f"policy {pol}: {exc}"
            break
        res = run_result(d, workload=args.workload, seed=args.seed, tlb=args.tlb, config=cfg)
        rows.append(compare_row(pol, d, res))
        series[pol] = {"samples": d.samples, "row": rows[-1]}
    if args.json:
        print(json.dumps({"rows": rows, "completed": error is None, "error": error,
                          **metadata(cfg)}, sort_keys=True))
    elif rows:
        cols = list(rows[0])
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    if args.csv and rows:
        import csv
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.plots and series:
        from ..plots import plot_compare
        for path in plot_compare(series, args.plots):
            print(f"plot: {path}", file=sys.stderr)
    if error is not None:
        print(f"dmfrag compare: workload {args.workload}: {error} ({len(rows)} policies before "
              f"it reported)", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK
