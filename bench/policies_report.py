"""The two published results, run on every policy (scaled to this model).

1. "Boot plus several bpftrace runs" (Rapoport, 2022 RFC cover letter:
   module_alloc with __GFP_UNMAPPED cut direct-map splits from several tens
   to a single digit): the `boot` workload (slab-like churn that scatters
   free unmovable pages, then the ~100 modules of a real machine), then 6
   runs of 25 BPF programs of mixed sizes, each JITed into its own
   module_alloc (5.17: no bpf_prog_pack), with page cache / anonymous churn
   in between.
2. 8 GB guest, 2048 sockex1-sized BPF programs (A. Lu, Nov 2022: v5.17
   grew DirectMap4k from 87,900 kB to 1,654,620 kB and lost 3 of 5 1G
   pages; v6.1's bpf_prog_pack made no splits): without packs, with 6.1's
   packs, and with prog-pack's 2M-page packs.

Prints splits (level 2 + level 3 after boot) and DirectMap deltas per
policy; ``--json`` prints one object. ``--smoke`` runs every policy through
the same steps at a tiny size (a check that the script works: its numbers
are not the published results).
"""

from __future__ import annotations

import argparse
import json
import random

from guestkernel import Kernel
from guestkernel import gfp as G
from guestkernel.policy import policy_names


def splits(k: Kernel) -> int:
    v = k.vmstat()
    return v["direct_map_level2_splits"] + v["direct_map_level3_splits"]


#: Sizes of a full report, and of a smoke run.
FULL = {"scale": 1.0, "runs": 6, "churn": 3000, "progs": 25, "sockex1": 2048}
SMOKE = {"scale": 0.05, "runs": 1, "churn": 200, "progs": 3, "sockex1": 32}


def bpftrace_runs(policy: str, seed: int = 7, size: dict = FULL) -> dict:
    from dmfrag.registry import model_driver
    from dmfrag.workloads import Driver
    wl_boot = model_driver("boot")
    k = Kernel.boot(ram="8G", policy=policy)
    k.bpf.use_pack = False
    rng = random.Random(seed)
    held: list[tuple[int, int]] = []
    s0, m0 = splits(k), k.meminfo()
    wl_boot(Driver(k), rng, size["scale"])  # slab churn, then the machine's modules load
    for _ in range(size["runs"]):
        for _ in range(size["churn"]):
            if held and rng.random() < 0.45:
                p, o = held.pop(rng.randrange(len(held)))
                k.free_pages(p, o)
            else:
                o = rng.choice([0, 0, 0, 1, 2, 3])
                g = G.GFP_HIGHUSER_MOVABLE if rng.random() < 0.7 else G.GFP_KERNEL
                held.append((k.alloc_pages(g, o), o))
        progs = [k.bpf.load(rng.choice([200, 800, 3000, 9000])) for _ in range(size["progs"])]
        for p in progs:
            k.bpf.free(p.addr)
    m1 = k.meminfo()
    return {"splits": splits(k) - s0, "DirectMap4k_delta_kB": m1["DirectMap4k"] - m0["DirectMap4k"]}


def sockex1(policy: str, pack: bool, size: dict = FULL) -> dict:
    from dmfrag.registry import model_driver
    from dmfrag.workloads import Driver
    wl_boot = model_driver("boot")
    k = Kernel.boot(ram="8G", policy=policy)
    k.bpf.use_pack = pack or policy == "prog-pack"
    wl_boot(Driver(k), random.Random(11), size["scale"])  # a booted distribution, as in the test
    s0, m0 = splits(k), k.meminfo()
    for _ in range(size["sockex1"]):
        k.bpf.load(64)
    m1 = k.meminfo()
    return {"splits": splits(k) - s0,
            "DirectMap4k_kB": [m0["DirectMap4k"], m1["DirectMap4k"]],
            "DirectMap1G_pages": [m0["DirectMap1G"] >> 20, m1["DirectMap1G"] >> 20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths: a check that the script runs (seconds)")
    args = ap.parse_args()
    size = SMOKE if args.smoke else FULL
    pols = [p for p in policy_names() if not p.startswith("test-")] + ["migrate-unmapped+cpa-merge"]
    out = {"bpftrace_runs": {p: bpftrace_runs(p, size=size) for p in pols},
           "sockex1_no_pack": {p: sockex1(p, False, size) for p in ("baseline", "migrate-unmapped",
                                                                   "unmapped-alloc", "prog-pack")},
           "sockex1_6_1_pack": sockex1("baseline", True, size),
           "smoke": args.smoke}
    if args.json:
        print(json.dumps(out))
        return
    print(f"boot + {size['runs']} bpftrace-like runs (no bpf_prog_pack), 8G: splits after boot")
    for p, r in out["bpftrace_runs"].items():
        print(f"  {p:<28} {r['splits']:4d} splits   DirectMap4k {r['DirectMap4k_delta_kB']:+8d} kB")
    print(f"{size['sockex1']} sockex1-sized programs, 8G")
    for p, r in out["sockex1_no_pack"].items():
        print(f"  {p:<28} {r['splits']:4d} splits   DirectMap4k {r['DirectMap4k_kB'][0]} -> "
              f"{r['DirectMap4k_kB'][1]} kB, 1G pages {r['DirectMap1G_pages'][0]} -> "
              f"{r['DirectMap1G_pages'][1]}")
    r = out["sockex1_6_1_pack"]
    print(f"  {'baseline with 6.1 packs':<28} {r['splits']:4d} splits")


if __name__ == "__main__":
    main()
