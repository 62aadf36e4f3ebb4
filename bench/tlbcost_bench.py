"""What an access replay costs (issue 17): a stream of kernel memory
accesses run as the emulated CPU's own loads through a 4 GiB guest's
direct map, with the TLB model attached and bare, in the same process.

Two streams of 8-byte loads: one page repeated (the replay's own cost,
the model all hits) and pages spread over RAM (walks). ``replay_vs_bare_ratio``
is the bare run's time over the run with the model (goal >= 0.5). The capture's
slowdown of the guest (the QEMU plugin) is not measured yet: the plugin is
issue 17's next slice (``capture_slowdown`` is null, with the reason).

``--json`` prints one object; ``--smoke`` runs 20,000 accesses on 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def measure(n: int, ram: str) -> dict:
    from dmfrag.accesses import AccessStream, replay
    from guestkernel import Kernel
    k = Kernel.boot(ram=ram)
    base = k.pfn_to_virt(0)
    rng = np.random.default_rng(1)
    low = min(k.max_pfn, 0xC0000)          # RAM below QEMU's hole under 4 GiB
    streams = {"one_page": np.full(n, base + (low // 2 << 12), np.uint64),
               "spread": base + (rng.integers(0x100, low, n).astype(np.uint64)
                                 << np.uint64(12))}
    out = {}
    for name, vas in streams.items():
        s = AccessStream.loads(vas)
        replay(k, AccessStream.loads(vas[:2048]), tlb="skylake")     # warm up
        t = time.perf_counter()
        r = replay(k, s, tlb="skylake")
        with_tlb = time.perf_counter() - t
        t = time.perf_counter()
        replay(k, s, tlb=None)
        bare = time.perf_counter() - t
        out[name] = {"accesses": n, "faults": r.faults,
                     "with_tlb_accesses_per_s": round(n / with_tlb),
                     "bare_accesses_per_s": round(n / bare),
                     "replay_vs_bare_ratio": round(bare / with_tlb, 3),
                     "dtlb_walks": int(r.tlb["dtlb_load_misses.walk_completed"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="20,000 accesses on 1 GiB")
    args = ap.parse_args()
    n, ram = (20_000, "1G") if args.smoke else (500_000, "4G")
    out = {"streams": measure(n, ram), "ram": ram,
           "capture_slowdown": None,
           "capture_slowdown_reason": "the QEMU plugin capture is not built yet (issue 17)",
           "smoke": args.smoke}
    if args.json:
        print(json.dumps(out))
        return
    for name, r in out["streams"].items():
        print(f"{name:<9} {r['accesses']:>8} accesses: {r['with_tlb_accesses_per_s']:>9,}/s with "
              f"the TLB model, {r['bare_accesses_per_s']:>9,}/s bare, ratio "
              f"{r['replay_vs_bare_ratio']} ({r['dtlb_walks']} walks)")


if __name__ == "__main__":
    main()
