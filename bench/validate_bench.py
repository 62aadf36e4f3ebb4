"""Validator benchmark: full validation of a 64 GiB direct map split to 4K
everywhere (16 M pages: each translated for read, write and fetch by the
CPU, compared with numpy). Goal: under 10 s. ``--json`` prints one object;
``--smoke`` does it on a 2 GiB guest (a check that the script works, not a
measurement)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from guestkernel import PAGE_OFFSET, Kernel
from guestkernel.validate import ValidationError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default=None, help="default 64G")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths: a check that the script runs (seconds)")
    args = ap.parse_args()
    if args.ram is None:
        args.ram = "2G" if args.smoke else "64G"
    t0 = time.perf_counter()
    k = Kernel.boot(ram=args.ram)
    boot = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lo, hi in k.e820.ram_ranges():
        start = -(-lo // (2 << 20)) * (2 << 20)
        for pa in range(start, hi, 2 << 20):
            _entry, level = k.lookup_address(PAGE_OFFSET + pa)
            if level > 1:
                k.set_memory_4k(PAGE_OFFSET + pa, 1)
    split = time.perf_counter() - t0
    mi = k.meminfo()
    t0 = time.perf_counter()
    try:
        stats = k.validate("full")
    except ValidationError as exc:  # the model disagrees with the CPU: the bench has no figure
        sys.exit(f"validate_bench: the {args.ram} guest split to 4K fails validation: {exc}")
    full = time.perf_counter() - t0
    fig = {"ram": args.ram, "boot_s": boot, "split_s": split, "validate_full_s": full,
           "pages_translated": stats["translated"], "DirectMap4k_kB": mi["DirectMap4k"],
           "DirectMap2M_kB": mi["DirectMap2M"], "DirectMap1G_kB": mi["DirectMap1G"],
           "smoke": args.smoke}
    if args.json:
        print(json.dumps(fig))
        return
    print(f"{args.ram} guest: boot {boot:.2f} s; split to 4K in {split:.1f} s "
          f"(DirectMap4k {mi['DirectMap4k']} kB, 2M {mi['DirectMap2M']} kB, 1G {mi['DirectMap1G']} kB)")
    print(f"full validation: {full:.2f} s for {stats['translated']:,} pages x 3 accesses "
          f"(goal < 10 s)")


if __name__ == "__main__":
    main()
