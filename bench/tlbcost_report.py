"""What fragmentation costs the real kernels' own memory accesses: the
figures of docs/tlb-cost.md.

1. ``linux``: each real kernel (5.10, 6.1, 7.2) at 2 GiB loads 1024 BPF
   programs, then fills 256 pipes (``age:256``), captured with the QEMU
   plugin and dumped at each snapshot (``dmfrag accesses record --truth``).
   The pipes' accesses run through the state they ran on (Linux's own,
   read from the dump after the programs were loaded) and through the same
   machine's unsplit and all-4K direct maps; also through the boot's state
   (before the programs) for what the programs' splits added.
2. ``workloads``: what a capture holds per workload on 6.1 at 2 GiB (boot,
   modules, bpf, age:256): accesses, the regions they fall in, the slowdown.
3. ``policies``: the policies' end states on a recorded 6.1 stream
   (``compare --trace --tlb``), priced with the committed 6.1 capture.

Parts 1 and 2 boot real kernels (QEMU, drgn and the debug vmlinux for 1);
part 3 is the model alone. ``--smoke`` runs part 3 with two policies (what
tests/test_bench.py checks); ``--json`` one object; ``--markdown`` the
tables of docs/tlb-cost.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T61 = ROOT / "tests" / "data" / "traces" / "linux-6.1-2G-modules_bpf-256_secretmem-512.jsonl.gz"
KERNELS = ("5.10", "6.1", "7.2")
WORKLOADS = (("boot",), ("modules",), ("bpf",), ("age:256",))
PRESET = "skylake"


def _row(res: dict) -> dict:
    s, u, a = res["state"], res["unsplit"], res["all_4k"]
    return {"accesses": s["accesses"], "faults": s["faults"],
            "walks": [s["dtlb_walks"], u["dtlb_walks"], a["dtlb_walks"]],
            "walks_4k": s["walks_4k"],
            "cycles_per_kilo_access": [round(x["est_walk_cycles_per_kilo_access"], 2)
                                       for x in (s, u, a)],
            "vs_unsplit": round(s["est_walk_cycles"] / u["est_walk_cycles"], 3)
            if u["est_walk_cycles"] else None,
            "position": round(res["position"], 4) if res["position"] is not None else None}


def part_linux() -> dict:
    from dmfrag.accesses import tlbcost
    from dmfrag.capture import record_accesses
    from guestkernel import Kernel
    out = {}
    for kern in KERNELS:
        cap = record_accesses(kern, "2G", ("bpf:1024", "age:256"), truth=True,
                              limit=1 << 21, window=16384, measure_slowdown=False)
        pipes = cap.step(1)
        st = {s.point: s for s in cap.states}
        rows = {}
        for point in ("boot", "bpf:1024"):
            k = Kernel.from_state(st[point], profile=kern)
            r = _row(tlbcost(k, pipes, PRESET))
            r["directmap_4k_kb"] = k.meminfo()["DirectMap4k"]
            rows[point] = r
        out[kern] = {"captured": len(pipes), "seen": cap.meta["seen"],
                     "sample": cap.meta["sample"], "paging_levels": cap.meta["paging_levels"],
                     "linux_directmap_4k_kb": {p: v["DirectMap4k"]
                                               for p, v in cap.meta["snapshots"].items()},
                     "states": rows}
    return out


def part_workloads() -> dict:
    from dmfrag.capture import record_accesses
    out = {}
    for wl in WORKLOADS:
        m = record_accesses("6.1", "2G", wl, limit=1 << 20, window=16384).meta
        out[wl[0]] = {k: m[k] for k in ("seen", "kept", "sample", "coalesced", "regions",
                                        "kinds", "capture_slowdown", "paging_levels")}
    return out


def part_policies(policies: list[str]) -> dict:
    from dmfrag.accesses import price
    from dmfrag.modelled import replay_modelled
    out = {}
    for pol in policies:
        res = replay_modelled(T61, policy=pol, metrics=True)
        t = price(res.model, PRESET)
        out[pol] = {"end_directmap_4k_kb": res.model.meminfo()["DirectMap4k"],
                    "splits": res.metrics["splits"], **_row(t)}
    return out


#: the figures' columns every table shares
_COLS = ("DTLB walks: state / unsplit / all 4K | walk cycles per 1000 accesses: state / unsplit "
         "/ all 4K | state vs unsplit")


def markdown(out: dict) -> str:
    lines = []
    if "linux" in out:
        lines += [f"| kernel | state | DirectMap4k (kB) | accesses | {_COLS} | position |",
                  "|---|---|---|---|---|---|---|---|"]
        for kern, f in out["linux"].items():
            for point, r in f["states"].items():
                lines.append(f"| {kern} | {point} | {r['directmap_4k_kb']:,} | {r['accesses']:,} | "
                             f"{' / '.join(f'{w:,}' for w in r['walks'])} | "
                             f"{' / '.join(str(c) for c in r['cycles_per_kilo_access'])} | "
                             f"{r['vs_unsplit']} | {r['position']} |")
        lines.append("")
    if "workloads" in out:
        lines += [("| workload | accesses seen | kept (one window in) | direct map | image | "
                   "vmalloc | vmemmap | other | loads / stores / fetches | slowdown |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for wl, m in out["workloads"].items():
            reg, n = m["regions"], max(m["kept"], 1)
            pct = {k: f"{100 * reg.get(k, 0) / n:.0f} %" for k in
                   ("direct_map", "kernel_image", "vmalloc", "vmemmap")}
            other = f"{100 * (reg.get('other', 0) + reg.get('modules', 0)) / n:.0f} %"
            kinds = m["kinds"]
            lines.append(f"| {wl} | {m['seen']:,} | {m['kept']:,} ({m['sample']}) | "
                         f"{pct['direct_map']} | {pct['kernel_image']} | {pct['vmalloc']} | "
                         f"{pct['vmemmap']} | {other} | {kinds['load']:,} / {kinds['store']:,} / "
                         f"{kinds['fetch']:,} | {m['capture_slowdown']} |")
        lines.append("")
    if "policies" in out:
        lines += [f"| policy | end DirectMap4k (kB) | splits | {_COLS} | faults |",
                  "|---|---|---|---|---|---|---|"]
        for pol, r in out["policies"].items():
            lines.append(f"| {pol} | {r['end_directmap_4k_kb']:,} | {r['splits']} | "
                         f"{' / '.join(f'{w:,}' for w in r['walks'])} | "
                         f"{' / '.join(str(c) for c in r['cycles_per_kilo_access'])} | "
                         f"{r['vs_unsplit']} | {r['faults']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="the policies part only, baseline and per-user-caches")
    ap.add_argument("--parts", default="linux,workloads,policies",
                    help="which parts to run (default all three)")
    args = ap.parse_args()
    from guestkernel.policy import policy_names
    parts = ["policies"] if args.smoke else [p.strip() for p in args.parts.split(",")]
    out: dict = {"smoke": args.smoke, "preset": PRESET}
    if "linux" in parts:
        out["linux"] = part_linux()
    if "workloads" in parts:
        out["workloads"] = part_workloads()
    if "policies" in parts:
        pols = ["baseline", "per-user-caches"] if args.smoke else \
            [p for p in policy_names() if not p.startswith("test-")]
        out["policies"] = part_policies(pols)
    if args.json:
        print(json.dumps(out))
    else:
        print(markdown(out))


if __name__ == "__main__":
    main()
