"""emu benchmark: bare load throughput through 4K pages, Machine construction.

Prints, for one process and one run: random 8-byte loads per second over
1 GiB mapped with 4K pages and no hooks installed (the physical limit of this
design), the same with the instruction counter on, and the time to construct
1 GiB and 256 GiB machines. ``--json`` prints one JSON object; ``--smoke``
runs 20,000 loads (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from emu import Machine
from emu.builder import PageTableBuilder
from emu.kernels import random_loads
from emu.pagetable import PteFlags

GiB = 1 << 30


def _construct(size: int) -> float:
    t0 = time.perf_counter()
    m = Machine(size)
    dt = time.perf_counter() - t0
    del m
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=None, help="default 4,000,000")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths: a check that the script runs (seconds)")
    args = ap.parse_args()
    if args.loads is None:
        args.loads = 20_000 if args.smoke else 4_000_000

    m = Machine(2 * GiB)
    b = PageTableBuilder(m, 1 * GiB + 0x10000000, 2 * GiB)
    base = 0xFFFF888000000000
    b.map(base, 0, GiB, 4096, PteFlags.P | PteFlags.RW | PteFlags.NX)
    base_1g = 0xFFFF890000000000  # the same RAM through one 1G page
    b.map(base_1g, 0, GiB, GiB, PteFlags.P | PteFlags.RW | PteFlags.NX)
    code_va = 0xFFFFFFFF81000000
    b.map(code_va, GiB, 1 << 21, 4096, PteFlags.P)
    m.cr3 = b.root
    prog = random_loads(base, GiB, args.loads)
    m.run(random_loads(base, GiB, 1000), at=code_va)  # warm up translation
    figures: dict[str, float | bool] = {"smoke": args.smoke}
    for label, count in (("bare", False), ("counted", True)):
        m.flush_tlb()
        t0 = time.perf_counter()
        r = m.run(prog, at=code_va, count_insns=count, max_insns=None)
        dt = time.perf_counter() - t0
        assert r.status.value == "completed", r
        figures[f"{label}_loads_per_s"] = args.loads / dt
    m.flush_tlb()
    t0 = time.perf_counter()
    m.run(random_loads(base_1g, GiB, args.loads), at=code_va, count_insns=False, max_insns=None)
    figures["bare_1g_loads_per_s"] = args.loads / (time.perf_counter() - t0)
    figures["counted_vs_bare_ratio"] = figures["counted_loads_per_s"] / figures["bare_loads_per_s"]
    figures["construct_1GiB_s"] = _construct(GiB)
    figures["construct_256GiB_s"] = _construct(256 * GiB)
    figures["max_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps(figures))
        return
    print(f"random 8-byte loads over 1 GiB, 4K pages, {args.loads:,} loads")
    print(f"  no hooks            : {figures['bare_loads_per_s'] / 1e6:6.2f} M loads/s")
    print(f"  no hooks, 1G page   : {figures['bare_1g_loads_per_s'] / 1e6:6.2f} M loads/s")
    print(f"  instruction counter : {figures['counted_loads_per_s'] / 1e6:6.2f} M loads/s "
          f"({figures['counted_vs_bare_ratio']:.2f}x)")
    print(f"Machine construction  : 1 GiB {figures['construct_1GiB_s'] * 1e3:.1f} ms, "
          f"256 GiB {figures['construct_256GiB_s'] * 1e3:.1f} ms")
    print(f"max RSS               : {figures['max_rss_MiB']:.0f} MiB")


if __name__ == "__main__":
    main()
