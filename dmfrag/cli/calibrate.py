"""``dmfrag calibrate``: boot a real Linux (5.10, 6.1 or 7.2) under QEMU and
the model following that kernel's record on the same memory map, run the same guest workload on both, and compare them
(see :mod:`dmfrag.calibrate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..registry import guest_names
from .common import EXIT_OK, EXIT_PROBLEM, ToolMissing, UsageError, check_boot, check_output_file

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..realkernel import DEFAULT_KERNEL, KERNELS
    p = sub.add_parser("calibrate", help="run a real Linux and the model side by side",
                       description="Boot one of Debian's Linux kernels under QEMU with the "
                                   "given RAM, run the workload, run the same in the model "
                                   "(following that kernel's record), and compare "
                                   "DirectMap4k/2M/1G and the split counters at each point.")
    p.add_argument("--kernel", choices=sorted(KERNELS), default=DEFAULT_KERNEL,
                   help=f"the real kernel (default {DEFAULT_KERNEL})")
    p.add_argument("--ram", default="8G", help="guest RAM, e.g. 2G, 8G (default 8G)")
    p.add_argument("--workload", default="modules,bpf,secretmem",
                   help="comma-separated: modules, bpf, secretmem (default: all)")
    p.add_argument("--json", default="calibrate.json", help="where to write the JSON result")
    p.add_argument("--timeout", type=float, default=240.0, help="kill the guest after this")
    p.add_argument("--install", action="store_true",
                   help="apt-get install missing tools (needs root)")
    p.add_argument("--strict", action="store_true", help="exit 1 if real and model differ")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Inputs (--json's directory, --ram, --timeout, the workloads) are
    checked before QEMU starts: a bad --ram is bad input (2), not a QEMU
    failure (3)."""
    from ..calibrate import calibrate
    from ..realkernel import RealKernelError
    check_output_file(args.json, "--json")
    check_boot(args.ram)
    if not args.timeout > 0 or args.timeout == float("inf"):
        raise UsageError(f"--timeout must be a finite number of seconds above 0, not "
                         f"{args.timeout}")

    workload = tuple(w for w in args.workload.split(",") if w)
    known = guest_names()
    bad = [w for w in workload if w not in known]
    if bad:
        raise UsageError(f"unknown workload {bad[0]!r}; known: {', '.join(sorted(known))}")
    try:
        comp = calibrate(args.ram, workload, install=args.install, timeout=args.timeout,
                         kernel=args.kernel)
    except RealKernelError as exc:
        raise ToolMissing(str(exc)) from None
    print(f"Linux {args.kernel}, RAM {args.ram}, workload {','.join(workload) or '(boot only)'}: "
          f"real kernel "
          f"{comp.real_seconds:.1f} s, model {comp.model_seconds:.1f} s")
    print(comp.table())
    print("\nKnown differences (not yet modelled):")
    for d in comp.known_differences:
        print(f"  - {d}")
    out = Path(args.json)
    out.write_text(comp.to_json())
    print(f"\nwritten: {out}")
    if args.strict and any(r != m for _p, _k, r, m in comp.rows()):
        return EXIT_PROBLEM
    return EXIT_OK
