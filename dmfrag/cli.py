"""The ``dmfrag`` command line.

Exit codes: 0 success, 1 the work ran and found a problem (a validation
failure, a model/real difference with --strict), 2 bad input (usage,
unknown names), 3 a missing external tool or package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .realkernel import WORKLOAD_STEPS, RealKernelError

    workload = tuple(w for w in args.workload.split(",") if w)
    bad = [w for w in workload if w not in WORKLOAD_STEPS]
    if bad:
        print(f"dmfrag calibrate: unknown workload {bad[0]!r}; known: "
              f"{', '.join(sorted(WORKLOAD_STEPS))}", file=sys.stderr)
        return 2
    try:
        comp = calibrate(args.ram, workload, install=args.install, timeout=args.timeout)
    except RealKernelError as exc:
        print(f"dmfrag calibrate: {exc}", file=sys.stderr)
        return 3
    print(f"RAM {args.ram}, workload {','.join(workload) or '(boot only)'}: real kernel "
          f"{comp.real_seconds:.1f} s, model {comp.model_seconds:.1f} s")
    print(comp.table())
    print("\nKnown differences (not yet modelled):")
    for d in comp.known_differences:
        print(f"  - {d}")
    out = Path(args.json)
    out.write_text(comp.to_json())
    print(f"\nwritten: {out}")
    if args.strict and any(r != m for _p, _k, r, m in comp.rows()):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dmfrag", description="Direct-map fragmentation lab.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cal = sub.add_parser("calibrate", help="run a real Linux 6.1 and the model side by side",
                         description="Boot Debian's Linux 6.1 under QEMU with the given RAM, run "
                                     "the workload, run the same in the model, and compare "
                                     "DirectMap4k/2M/1G and the split counters at each point.")
    cal.add_argument("--ram", default="8G", help="guest RAM, e.g. 2G, 8G (default 8G)")
    cal.add_argument("--workload", default="modules,bpf,secretmem",
                     help="comma-separated: modules, bpf, secretmem (default: all)")
    cal.add_argument("--json", default="calibrate.json", help="where to write the JSON result")
    cal.add_argument("--timeout", type=float, default=240.0, help="kill the guest after this")
    cal.add_argument("--install", action="store_true",
                     help="apt-get install missing tools (needs root)")
    cal.add_argument("--strict", action="store_true", help="exit 1 if real and model differ")
    cal.set_defaults(func=_calibrate)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
