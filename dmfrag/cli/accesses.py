"""``dmfrag accesses record``: boot a real kernel under QEMU with the
project's capture plugin and write the kernel's own memory accesses while a
workload runs (dmfrag.capture), for ``dmfrag tlbcost --accesses``.

``dmfrag accesses info A``: what a stream file holds (its capture's
metadata, its accesses per kind and per region of Linux's layout)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .calibrate import parse_guest_workload
from .common import (
    EXIT_OK,
    ToolMissing,
    UsageError,
    check_boot,
    check_output_file,
    check_timeout,
    check_truth,
)

__all__ = ["add_parser", "main", "main_info"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..capture import DEFAULT_LIMIT, DEFAULT_WINDOW
    from ..realkernel import DEFAULT_KERNEL, KERNELS
    p = sub.add_parser("accesses", help="capture a real kernel's memory accesses")
    rs = p.add_subparsers(dest="accesses_cmd", required=True)
    rec = rs.add_parser(
        "record", help="boot a real kernel with the capture plugin, write its accesses",
        description="Boot one of Debian's kernels under QEMU with the project's TCG plugin "
                    "and record the kernel's data accesses and instruction fetches to kernel "
                    "addresses while the workload runs: --workload boot captures the boot, "
                    "anything else the steps after it. At most --limit accesses are kept, in "
                    "windows of --window consecutive ones spread evenly over the capture. "
                    "The guest is booted a second time without the plugin to measure the "
                    "capture's slowdown.")
    rec.add_argument("--kernel", choices=sorted(KERNELS), default=DEFAULT_KERNEL,
                     help=f"the real kernel (default {DEFAULT_KERNEL})")
    rec.add_argument("--ram", default="2G", help="guest RAM (default 2G)")
    rec.add_argument("--workload", default="boot",
                     help="boot, or comma-separated guest steps as for realkernel record "
                          "(modules, bpf, age:N, ...); default boot")
    rec.add_argument("-o", "--output", required=True, help="the stream file (.npz)")
    rec.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                     help=f"accesses kept at most (default {DEFAULT_LIMIT:,}; 9 bytes each in "
                          f"QEMU's memory while it runs)")
    rec.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                     help=f"consecutive accesses per kept window (default {DEFAULT_WINDOW:,})")
    rec.add_argument("--no-coalesce", action="store_true",
                     help="keep every element of a string instruction (TCG runs rep movs/stos "
                          "one element at a time; by default a run within one cache line is "
                          "one access)")
    rec.add_argument("--truth", action="store_true",
                     help="also dump the guest at each snapshot and store its state beside the "
                          "stream (A.truth.npz: the state the stream ran on, for tlbcost "
                          "--from-dump; needs drgn and the kernel's debug vmlinux, fetched "
                          "once, about 1 GB)")
    rec.add_argument("--timeout", type=float, default=900.0, help="kill the guest after this")
    rec.add_argument("--install", action="store_true",
                     help="apt-get install missing tools (needs root)")
    rec.add_argument("--json", action="store_true", help="print the capture's metadata")
    rec.set_defaults(func=main)
    info = rs.add_parser("info", help="what a stream file holds")
    info.add_argument("file", help="a stream (.npz or .npy)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=main_info)
    return p


def main(args: argparse.Namespace) -> int:
    from ..capture import CaptureError, record_accesses, save_capture
    from ..truth import TruthError
    if not args.output.endswith(".npz"):
        raise UsageError(f"-o/--output {args.output!r} must end in .npz")
    check_output_file(args.output, "-o/--output")
    check_boot(args.ram)
    if args.window < 1:
        raise UsageError(f"--window must be at least 1, not {args.window}")
    if args.limit < 2 * args.window:
        raise UsageError(f"--limit ({args.limit}) must hold at least two windows of "
                         f"{args.window}")
    if args.limit > 1 << 30:
        raise UsageError(f"--limit {args.limit}: at most {1 << 30:,} accesses (9 GiB in "
                         f"QEMU's memory)")
    check_timeout(args.timeout)
    workload = parse_guest_workload(args.workload, args.kernel)
    if args.truth:
        check_truth()
    try:
        cap = record_accesses(args.kernel, args.ram, workload, limit=args.limit,
                              window=args.window, coalesce=not args.no_coalesce,
                              truth=args.truth, timeout=args.timeout, install=args.install)
    except (CaptureError, TruthError) as exc:
        raise ToolMissing(str(exc)) from None
    states = save_capture(args.output, cap)
    m = cap.meta
    if args.json:
        print(json.dumps({**m, "output": args.output,
                          "truth": str(states) if states else None}, sort_keys=True))
        return EXIT_OK
    print(f"Linux {args.kernel}, RAM {args.ram}, {','.join(m['workload'])}: "
          f"{m['seen']:,} kernel accesses seen, {m['kept']:,} kept in {m['windows']} windows of "
          f"{m['window']:,} (one in {m['sample']}); {m['paging_levels']}-level layout; "
          f"guest {m['guest_seconds_captured']:.1f} s captured vs {m['guest_seconds_plain']:.1f} s "
          f"plain ({m['capture_slowdown']}x); {Path(args.output).stat().st_size:,} bytes: "
          f"{args.output}")
    if states:
        print(f"  states at {', '.join(s.point for s in cap.states)}: {states}")
    return EXIT_OK


def main_info(args: argparse.Namespace) -> int:
    from ..accesses import AccessFormatError, layout_of, region_counts
    from ..capture import load_capture
    try:
        cap = load_capture(args.file)
    except AccessFormatError as exc:
        raise UsageError(str(exc)) from None
    s = cap.stream
    levels = layout_of(s.va)
    out = {"file": args.file, "accesses": len(s),
           "kinds": {"load": int((s.kind == 0).sum()), "store": int((s.kind == 1).sum()),
                     "fetch": int((s.kind == 2).sum())},
           "paging_levels": levels,
           "regions": region_counts(s.va, levels) if levels else {},
           "windows": len(cap.window_index), "meta": cap.meta}
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return EXIT_OK
    print(f"{args.file}: {len(s):,} accesses ({', '.join(f'{v:,} {k}' for k, v in out['kinds'].items())})"
          f"; layout: {f'{levels}-level' if levels else 'no Linux region'}")
    for name, n in out["regions"].items():
        print(f"  {name:<13} {n:>12,}")
    if cap.meta:
        m = cap.meta
        print(f"captured: Linux {m.get('kernel')}, RAM {m.get('ram')}, "
              f"{','.join(m.get('workload', []))}; {m.get('seen', 0):,} seen, one window in "
              f"{m.get('sample')} kept")
    return EXIT_OK
