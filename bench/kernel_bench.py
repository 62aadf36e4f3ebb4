"""guestkernel benchmark: boot of the largest guest the CPU can address,
order-0 alloc_pages+free_pages pairs per second, CPA calls that split.

The emulated CPU has 40-bit physical addresses, so with QEMU's layout (RAM
above 4 GiB starts after the PCI hole) the largest guest is just under
1 TiB: 1020 GiB of RAM ends at 1021 GiB. ``--json`` prints one object;
``--smoke`` boots 4 GiB and runs 2,000 pairs and 20 splits (a check that the
script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from guestkernel import PAGE_OFFSET, Kernel
from guestkernel.gfp import GFP_KERNEL

_BOOT = """
import json, resource, time
from guestkernel import Kernel
t0 = time.perf_counter()
k = Kernel.boot(ram={ram!r})
dt = time.perf_counter() - t0
print(json.dumps({{"boot_s": dt, "max_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def boot_figures(ram: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _BOOT.format(ram=ram)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default=None, help="RAM of the large-guest boot (default 1020G)")
    ap.add_argument("--pairs", type=int, default=None, help="default 300,000")
    ap.add_argument("--splits", type=int, default=None, help="default 2000")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths: a check that the script runs (seconds)")
    args = ap.parse_args()
    for name, full, smoke in (("ram", "1020G", "4G"), ("pairs", 300_000, 2000),
                              ("splits", 2000, 20)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)

    fig = {"ram": args.ram, "smoke": args.smoke}
    big = boot_figures(args.ram)
    fig["boot_s"], fig["boot_max_rss_MiB"] = big["boot_s"], big["max_rss_MiB"]

    k = Kernel.boot(ram="16G")
    alloc, free = k.alloc_pages, k.free_pages
    gfp = int(GFP_KERNEL)
    for _ in range(1000):
        free(alloc(gfp, 0), 0)
    t0 = time.perf_counter()
    for _ in range(args.pairs):
        free(alloc(gfp, 0), 0)
    fig["alloc_free_pairs_per_s"] = args.pairs / (time.perf_counter() - t0)

    # CPA that splits: one page RO in each of N distinct 2M pages.
    base = PAGE_OFFSET + (4 << 30)
    t0 = time.perf_counter()
    for i in range(args.splits):
        k.set_memory_ro(base + i * (2 << 20), 1)
    fig["split_cpa_per_s"] = args.splits / (time.perf_counter() - t0)
    fig["level2_splits"] = k.vmstat()["direct_map_level2_splits"]
    fig["max_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps(fig))
        return
    print(f"boot of a {args.ram} guest      : {fig['boot_s']:.2f} s, max RSS "
          f"{fig['boot_max_rss_MiB']:.0f} MiB (goal: < 2 s, < 1 GiB)")
    print(f"order-0 alloc+free pairs  : {fig['alloc_free_pairs_per_s'] / 1e3:.0f} k/s (goal >= 300 k/s)")
    print(f"CPA calls that split a 2M : {fig['split_cpa_per_s']:.0f} /s "
          f"({fig['level2_splits']} splits)")


if __name__ == "__main__":
    main()
