"""TLB model benchmark: the same random-load program over 1 GiB (4K pages),
in one process and one run, with no hooks and with the full TLB model
attached. Goal: the modelled run at least 0.5x the bare one. ``--json``
prints bare_loads_per_s, tlb_loads_per_s and tlb_vs_bare_ratio; ``--smoke``
runs 20,000 loads (a check that the script works, not a measurement)."""

from __future__ import annotations

import argparse
import json
import time

from emu import Machine
from emu.builder import PageTableBuilder
from emu.kernels import random_loads
from emu.pagetable import PteFlags
from emu.tlb import TlbModel

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=None, help="default 3,000,000")
    ap.add_argument("--preset", default="skylake")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths: a check that the script runs (seconds)")
    args = ap.parse_args()
    if args.loads is None:
        args.loads = 20_000 if args.smoke else 3_000_000
    m = Machine(2 * GiB)
    b = PageTableBuilder(m, GiB + 0x10000000, 2 * GiB)
    base, code = 0xFFFF888000000000, 0xFFFFFFFF81000000
    b.map(base, 0, GiB, 4096, PteFlags.P | PteFlags.RW | PteFlags.NX)
    b.map(code, GiB, 1 << 21, 4096, PteFlags.P)
    m.cr3 = b.root
    prog = random_loads(base, GiB, args.loads)
    m.run(random_loads(base, GiB, 1000), at=code, count_insns=False)   # warm up
    m.flush_tlb()
    t0 = time.perf_counter()
    m.run(prog, at=code, count_insns=False, max_insns=None)
    bare = args.loads / (time.perf_counter() - t0)
    m.tlb = TlbModel(args.preset)
    m.flush_tlb()
    t0 = time.perf_counter()
    r = m.run(prog, at=code, count_insns=False, max_insns=None)
    modelled = args.loads / (time.perf_counter() - t0)
    st = r.tlb
    fig = {"bare_loads_per_s": bare, "tlb_loads_per_s": modelled,
           "tlb_vs_bare_ratio": modelled / bare, "preset": args.preset,
           "dtlb_load_walks": st["dtlb_load_misses.walk_completed"],
           "stlb_hits": st["dtlb_load_misses.stlb_hit"], "walk_mem_refs": st["walk_mem_refs"], "smoke": args.smoke}
    if args.json:
        print(json.dumps(fig))
        return
    print(f"random 8-byte loads over 1 GiB through 4K pages, {args.loads:,} loads ({args.preset})")
    print(f"  no hooks        : {bare / 1e6:6.2f} M loads/s")
    print(f"  TLB model       : {modelled / 1e6:6.2f} M loads/s   ratio {modelled / bare:.2f} "
          "(goal >= 0.5)")
    print(f"  walks {fig['dtlb_load_walks']:,}, STLB hits {fig['stlb_hits']:,}, "
          f"walk memory refs {fig['walk_mem_refs']:,}")


if __name__ == "__main__":
    main()
