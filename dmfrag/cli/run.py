"""``dmfrag run``: one workload on one policy; the counters after it, as a
line or as the versioned JSON result (docs/results.md)."""

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
    check_output_file,
    check_run_args,
    check_tlb_preset,
    config,
    kernel_from_dump,
    run_one,
)

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run one workload on one policy")
    add_workload_args(p)
    p.add_argument("--policy", default="baseline")
    p.add_argument("--tlb", metavar="PRESET",
                   help="also price the end state in TLB walks: a real kernel's captured "
                        "accesses run through it and two references (adds tlb)")
    p.add_argument("--accesses", metavar="A",
                   help="with --tlb: the access stream (default: the committed capture of the "
                        "kernel record's own Linux, dmfrag/data/accesses)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--record", metavar="FILE", help="write the trace (JSON Lines)")
    p.add_argument("--validate", action="store_true", help="full validation at the end")
    p.add_argument("--from-dump", metavar="CORE", default=None,
                   help="start from a real kernel's state instead of a boot: a core drgn reads "
                        "(QEMU dump, kdump vmcore, /proc/kcore; with --vmlinux) or a stored "
                        "state (X.truth.npz of realkernel record --truth or realkernel dump; "
                        "--point picks one). "
                        "--ram/--e820 are then the dump's own")
    p.add_argument("--vmlinux", metavar="VMLINUX", default=None,
                   help="with --from-dump CORE: the dumped kernel's vmlinux with debug symbols")
    p.add_argument("--point", default=None,
                   help="with --from-dump X.truth.npz: the state's point (default: the last)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Every input is checked before the run (the output file first); a
    workload that runs out of guest memory still reports the state it
    reached (``completed: false`` and ``error`` in the JSON) and exits 1."""
    from ..results import run_result
    from ..workloads import WorkloadError, trace_text
    check_output_file(args.record, "--record")
    check_tlb_preset(args.tlb)
    check_accesses(args)
    check_run_args(args, [args.policy])
    if args.from_dump is None and (args.vmlinux is not None or args.point is not None):
        raise UsageError("--vmlinux and --point go with --from-dump")
    error = None
    try:
        if args.from_dump is not None:
            from ..workloads import run_workload
            k = kernel_from_dump(args)
            d = run_workload(args.workload, policy=args.policy, seed=args.seed,
                             scale=args.scale, kernel=k)
        else:
            d = run_one(args, args.policy)
    except WorkloadError as exc:
        d, error = exc.driver, exc
    res = run_result(d, workload=args.workload, seed=args.seed, tlb=args.tlb, config=config(args),
                     accesses=args.accesses)
    res["completed"], res["error"] = error is None, str(error) if error else None
    if args.record:
        Path(args.record).write_text(trace_text(d, error))
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        mi, vm = res["meminfo"], res["vmstat"]
        print(f"{args.workload} on {res['policy']} ({res['calls']} calls"
              f"{'' if error is None else ', stopped'}): DirectMap4k "
              f"{mi['DirectMap4k']} kB, 2M {mi['DirectMap2M']} kB, 1G {mi['DirectMap1G']} kB; "
              f"splits {vm['direct_map_level2_splits']}/{vm['direct_map_level3_splits']} "
              f"(2M/1G), collapses {vm['direct_map_level2_collapses']}/"
              f"{vm['direct_map_level3_collapses']}")
        print(res["kernel_reason"])
    if error is not None:
        kept = f"; the trace of the calls before it is in {args.record}" if args.record else ""
        print(f"dmfrag run: workload {args.workload}: {error} (state up to it reported{kept})",
              file=sys.stderr)
        return EXIT_PROBLEM
    if args.validate:
        from guestkernel.validate import ValidationError
        try:
            d.kernel.validate("full")
        except ValidationError as exc:
            print(f"dmfrag run: validation FAILED: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
    return EXIT_OK
