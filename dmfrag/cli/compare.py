"""``dmfrag compare``: one workload on several policies, one row each (a
table, JSON, CSV, plots)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    EXIT_OK,
    EXIT_PROBLEM,
    UsageError,
    add_workload_args,
    check_accesses,
    check_output_dir,
    check_output_file,
    check_policy,
    check_run_args,
    check_tlb_preset,
    config,
    policies,
    progress,
    run_one,
)

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", help="one workload, or one recorded real kernel's trace, on "
                                       "several policies, one table")
    add_workload_args(p, required=False)
    p.add_argument("--trace", metavar="T",
                   help="instead of --workload: a recorded trace (dmfrag realkernel record), "
                        "replayed with the model's placement under each policy (trace replay "
                        "--placement model --policy P); its header gives the machine, so "
                        "--ram/--e820/--seed/--scale do not apply")
    p.add_argument("--policies", default="all", help="'all' or a comma-separated list")
    p.add_argument("--tlb", metavar="PRESET",
                   help="also price each policy's end state in TLB walks: a real kernel's "
                        "captured accesses run through it (adds walk_cycles_vs_reference and "
                        "tlb_position)")
    p.add_argument("--accesses", metavar="A",
                   help="with --tlb: the access stream (default: the committed capture of the "
                        "kernel record's own Linux, dmfrag/data/accesses)")
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
    from ..results import TABLE_FIELDS, compare_row, metadata, run_result, sort_rows
    from ..workloads import WorkloadError
    if (args.trace is None) == (args.workload is None):
        raise UsageError("give one of --workload W (a model workload) or --trace T (a recorded "
                         "trace)")
    check_output_file(args.csv, "--csv")
    check_output_dir(args.plots, "--plots")
    check_tlb_preset(args.tlb)
    pols = policies(args.policies)
    cfg = config(args)
    check_accesses(args)
    if args.trace is not None:
        if args.paging_levels is not None:
            raise UsageError("--paging-levels with --trace: a recorded trace replays in the "
                             "paging mode of the kernel that recorded it")
        for p in pols:
            check_policy(p)
        rows, series, error, what = _compare_trace(args, pols)
    else:
        check_run_args(args, pols)
        rows, series, error = [], {}, None
        for pol in progress(pols, f"compare {args.workload}"):
            try:
                d = run_one(args, pol)
            except WorkloadError as exc:
                error = f"policy {pol}: {exc}"
                break
            res = run_result(d, workload=args.workload, seed=args.seed, tlb=args.tlb, config=cfg,
                             accesses=args.accesses)
            rows.append(compare_row(pol, d, res))
            series[pol] = {"samples": d.samples, "row": rows[-1]}
        what = f"workload {args.workload}"
    rows = sort_rows(rows)
    if args.json:
        print(json.dumps({"rows": rows, "completed": error is None, "error": error,
                          **metadata(cfg)}, sort_keys=True))
    elif rows:
        extra = ("linux_end_directmap_4k_kb", "walk_cycles_vs_reference", "tlb_position")
        cols = [c for c in TABLE_FIELDS if c in rows[0]] + [c for c in extra if c in rows[0]]
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    if rows and not args.json:
        print()
        print(reading(rows, what))
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
        print(f"dmfrag compare: {what}: {error} ({len(rows)} policies before it reported)",
              file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


def reading(rows: list[dict], what: str) -> str:
    """A paragraph that reads the table: computed from the rows (no number
    in it is typed in), for the demo and for anyone reading the output."""
    import textwrap
    best, worst = rows[0], rows[-1]
    base = next((r for r in rows if r["policy"] == "baseline"), None)
    same = [r["policy"] for r in rows if r["end_directmap_4k_kb"] == best["end_directmap_4k_kb"]]
    parts = [(f"On {what}, the direct map ends with the least 4K-mapped memory under "
              f"{', '.join(same)} ({best['end_directmap_4k_kb']:,} kB of DirectMap4k, "
              f"{best['splits']} splits, {best['collapses']} collapses)")]
    if base is not None and base is not best:
        d = base["end_directmap_4k_kb"] - best["end_directmap_4k_kb"]
        parts[-1] += (f", {d:,} kB less than baseline ({base['end_directmap_4k_kb']:,} kB, "
                      f"{base['splits']} splits)")
    parts[-1] += "."
    if "linux_end_directmap_4k_kb" in best:
        linux = best["linux_end_directmap_4k_kb"]
        parts.append(f"The real kernel ended this stream at {linux:,} kB"
                     + (f"; the model's baseline at {base['end_directmap_4k_kb']:,} kB "
                        f"(its placement is its own: docs/results.md, trace replay)"
                        if base is not None else "") + ".")
    key = ("end_directmap_4k_kb", "integrated_4k_gib_steps")
    if [worst[k] for k in key] != [best[k] for k in key]:
        tied = [r["policy"] for r in rows if [r[k] for k in key] == [worst[k] for k in key]]
        parts.append(f"Last {'is' if len(tied) == 1 else 'are'} {', '.join(tied)} "
                     f"({worst['end_directmap_4k_kb']:,} kB at the end, "
                     f"{worst['integrated_4k_gib_steps']} GiB x steps of 4K mappings over the "
                     f"run against {best['integrated_4k_gib_steps']}).")
    parts.append(f"No placement of these requests could have kept fewer than "
                 f"{best['oracle_no_merge_peak_split_2m_regions']} 2M regions split at the peak "
                 f"without merging, or {best['oracle_peak_split_2m_regions']} with it (the "
                 f"oracle, docs/oracle.md); the best peak was "
                 f"{min(r['peak_split_2m_regions'] for r in rows)} and baseline's "
                 + (f"{base['peak_split_2m_regions']}" if base is not None else "not run") + ".")
    cached = [r for r in rows if r["cached_pages_end"]]
    if cached:
        parts.append("Caches still held " + ", ".join(
            f"{r['cached_pages_end']} pages ({r['policy']})" for r in cached)
            + " at the end: memory the policy keeps ready, not lost (its shrinker gives it "
              "back under pressure).")
    failed = [r for r in rows if r["alloc_failures"]]
    if failed:
        parts.append("Allocations failed under " + ", ".join(
            f"{r['policy']} ({r['alloc_failures']})" for r in failed) + ".")
    return textwrap.fill(" ".join(parts), width=100)


def _compare_trace(args: argparse.Namespace, pols: list[str]
                   ) -> tuple[list, dict, str | None, str]:
    """Each policy's modelled replay of the trace, with compare's metrics;
    a row also carries Linux's own end state from the trace's last
    snapshot (``linux_end_directmap_*``: what the real kernel did with the
    same requests). A replay that stops (out of memory, a bookkeeping
    error) stops the compare, the rows before it kept."""
    from ..accesses import price
    from ..modelled import replay_modelled
    from ..placed import PlacedReplayError
    from .trace import is_recorded
    if not Path(args.trace).is_file():
        raise UsageError(f"--trace {args.trace}: no such file")
    if not is_recorded(args.trace):
        raise UsageError(f"--trace {args.trace}: not a recorded (version 3 or 4) trace; record "
                         f"one with dmfrag realkernel record")
    rows, series = [], {}
    what = f"the trace {Path(args.trace).name}"
    for pol in progress(pols, f"compare {args.trace}"):
        try:
            res = replay_modelled(args.trace, policy=pol, kernel=args.kernel, metrics=True)
        except PlacedReplayError as exc:
            raise UsageError(str(exc)) from None
        what = (f"Linux {res.kernel}'s recorded {', '.join(res.workload) or 'boot'} at "
                f"{res.ram} ({Path(args.trace).name})")
        if res.error:
            return rows, series, f"policy {pol}: {res.error}", what
        mi = res.model.meminfo()
        row = {"policy": pol, **res.metrics, "DirectMap4k": mi["DirectMap4k"],
               "DirectMap2M": mi["DirectMap2M"], "DirectMap1G": mi["DirectMap1G"]}
        last = res.snapshots[-1]["real"] if res.snapshots else None
        if last is not None:
            row["linux_end_directmap_4k_kb"] = last["DirectMap4k"]
            row["linux_end_directmap_2m_kb"] = last["DirectMap2M"]
            row["linux_end_directmap_1g_kb"] = last["DirectMap1G"]
        if args.tlb:
            from ..results import tlb_fields
            row.update(tlb_fields(price(res.model, args.tlb, args.accesses)))
        rows.append(row)
        series[pol] = {"samples": res.model_metrics_samples, "row": row}
    return rows, series, None, what
