"""page_alloc benchmark: buddy allocator throughput and boot cost.

Prints, for one process and one run: order-0 ``alloc_pages``+``free_pages``
pairs per second with GFP_KERNEL on a 16 GiB layout (each page freed at once,
the pcp fast path; and in bursts of 1000, which exercise the pcp refill and
drain), order-3 pairs per second, and the time and resident memory to build
the allocator of a 1 TiB guest (construction plus ``free_range`` of all its
RAM, ``memblock_free_all``). ``--json`` prints one JSON object; ``--smoke``
runs 2,000 pairs (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from guestkernel.gfp import GFP_KERNEL
from guestkernel.page_alloc import BuddyAllocator

GiB = 1 << 30
PAGE_SHIFT = 12


def _layout(ram: int) -> BuddyAllocator:
    """A PC layout of ``ram`` bytes: page 0 and the ISA hole reserved, a 1 GiB
    PCI hole below 4 GiB, the rest above 4 GiB (as an e820 gives it)."""
    low_end = 0xC0000                          # 3 GiB of RAM below the hole
    max_pfn = 0x100000 + ((ram >> PAGE_SHIFT) - low_end)
    b = BuddyAllocator(max_pfn)
    b.free_range(1, 0x9F)
    b.free_range(0x100, low_end)
    b.free_range(0x100000, max_pfn)
    return b


def _rss_bytes() -> int:
    """Current resident set size (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pairs(b: BuddyAllocator, order: int, n: int) -> float:
    alloc, free = b.alloc_pages, b.free_pages
    t0 = time.perf_counter()
    for _ in range(n):
        free(alloc(GFP_KERNEL, order), order)
    return n / (time.perf_counter() - t0)


def _burst_pairs(b: BuddyAllocator, order: int, n: int, burst: int = 1000) -> float:
    alloc, free = b.alloc_pages, b.free_pages
    rounds = max(1, n // burst)
    t0 = time.perf_counter()
    for _ in range(rounds):
        pfns = [alloc(GFP_KERNEL, order) for _ in range(burst)]
        for p in pfns:
            free(p, order)
    return rounds * burst / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=None, help="default 500,000")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths: a check that the script runs (seconds)")
    args = ap.parse_args()
    if args.pairs is None:
        args.pairs = 2000 if args.smoke else 500_000

    figures: dict[str, float | bool] = {"smoke": args.smoke}
    b = _layout(16 * GiB)
    _pairs(b, 0, 10_000)                       # warm the pcp lists and the gfp cache
    figures["order0_pairs_per_s"] = _pairs(b, 0, args.pairs)
    figures["order0_burst1000_pairs_per_s"] = _burst_pairs(b, 0, args.pairs)
    figures["order3_pairs_per_s"] = _pairs(b, 3, args.pairs // 2)
    figures["order3_burst1000_pairs_per_s"] = _burst_pairs(b, 3, args.pairs // 2)
    b.check()
    del b

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    big = _layout(1024 * GiB - 2 * (1 << 20))  # emu's guest RAM ends below 1 TiB - 2 MiB
    figures["build_1TiB_s"] = time.perf_counter() - t0
    figures["build_1TiB_rss_MiB"] = (_rss_bytes() - rss0) / (1 << 20)
    figures["managed_1TiB_pages"] = sum(z.managed_pages for z in big.zones)
    t0 = time.perf_counter()
    big.check()
    figures["check_1TiB_s"] = time.perf_counter() - t0
    figures["max_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if args.json:
        print(json.dumps(figures))
        return
    print(f"16 GiB layout, GFP_KERNEL alloc_pages + free_pages, {args.pairs:,} pairs")
    print(f"  order 0, freed at once   : {figures['order0_pairs_per_s'] / 1e3:7.0f} k pairs/s")
    print(f"  order 0, bursts of 1000  : {figures['order0_burst1000_pairs_per_s'] / 1e3:7.0f} "
          "k pairs/s")
    print(f"  order 3, freed at once   : {figures['order3_pairs_per_s'] / 1e3:7.0f} k pairs/s")
    print(f"  order 3, bursts of 1000  : {figures['order3_burst1000_pairs_per_s'] / 1e3:7.0f} "
          "k pairs/s")
    print(f"1 TiB layout ({figures['managed_1TiB_pages']:,} pages handed to the buddy)")
    print(f"  build (free_range)       : {figures['build_1TiB_s'] * 1e3:7.0f} ms, "
          f"+{figures['build_1TiB_rss_MiB']:.0f} MiB RSS")
    print(f"  check()                  : {figures['check_1TiB_s'] * 1e3:7.0f} ms")
    print(f"max RSS                    : {figures['max_rss_MiB']:7.0f} MiB")


if __name__ == "__main__":
    main()
