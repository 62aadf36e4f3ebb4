"""The proposals' published claims, checked on real kernels' recorded streams.

Each claim is run on committed recordings (tests/data/traces, made with
``dmfrag realkernel record``). Each recording is replayed with the model's
placement under each policy (what ``dmfrag compare --trace`` does) and set
beside what the real kernel did with the same requests (the trace's own
snapshots of meminfo and vmstat).

1. ``rfc2022``: Rapoport's MIGRATE_UNMAPPED RFC (2022) said that grouping
   cut direct-map splits "from several tens to a single digit" for boot
   plus several bpftrace runs. Here: Linux 5.10 at 8G (no bpf_prog_pack, as
   5.17), loading modules then running bpftrace six times. It is run fresh,
   and after 8000 pipes (a system that has run a while).
2. ``sockex1``: Aaron Lu (Nov 2022) reported that 2048 sockex1 programs
   grew DirectMap4k by 1.5 GB on 5.17. Here: the recorded 2048 programs on
   5.10 aged at 8G (no packs), the model's baseline and the grouping
   policies on that stream. Beside them, Linux's own packs: 6.1's and 7.2's
   recordings of the same 2048 programs. (``prog-pack`` changes what BPF
   asks the allocator for, not where pages go, so it does not act on a
   recorded stream.)
3. ``merge``: Yoo's merge RFC (2022) said that once the modules are
   unloaded, DirectMap is back at its boot value. Here: 7.2's recorded
   module loads and removals at 2G, under baseline, cpa-merge and
   cpa-collapse.
4. ``collapse``: 7.2's own collapse (6.15's ``cpa_collapse_large_pages``).
   Here: Linux's collapse counters on its recordings against the model's
   on the same streams (the model's 7.2 baseline collapses as 7.2 does).

``--json`` prints one object; ``--markdown`` prints the tables
docs/policies-report.md embeds. ``--smoke`` runs every claim on the
small recordings (the 2G ones): the same code paths, in seconds. Claims
3 and 4 use the same recordings in both modes, so their tables are the
published ones; tests/test_bench.py compares them with the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRACES = Path(__file__).resolve().parent.parent / "tests" / "data" / "traces"

GROUPING = ["baseline", "migrate-unmapped", "unmapped-alloc", "per-user-caches",
            "pte-mapped-cache", "cpa-merge"]
MERGING = ["baseline", "cpa-merge", "cpa-collapse"]

#: claim -> (recordings of a full run, of a smoke run, policies)
CLAIMS = {
    "rfc2022": (["linux-5.10-8G-modules_bpftrace-6", "linux-5.10-8G-age-8000_modules_bpftrace-6"],
                ["linux-5.10-2G-modules_bpf-256"], GROUPING),
    "sockex1": (["linux-5.10-8G-age-8000_bpf-2048"], ["linux-5.10-2G-modules_bpf-256"],
                ["baseline", "migrate-unmapped", "unmapped-alloc", "per-user-caches"]),
    "merge": (["linux-7.2-2G-modules_bpf-256_secretmem-512"],
              ["linux-7.2-2G-modules_bpf-256_secretmem-512"], MERGING),
    "collapse": (["linux-7.2-2G-modules_bpf-256_secretmem-512", "linux-7.2-2G-vfree-reset-256"],
                 ["linux-7.2-2G-modules_bpf-256_secretmem-512", "linux-7.2-2G-vfree-reset-256"],
                 ["baseline", "cpa-collapse"]),
}
#: Linux's own bpf_prog_pack on the same 2048 programs (claim 2)
PACKED = ["linux-6.1-8G-bpf-2048_secretmem-4096", "linux-7.2-8G-bpf-2048_secretmem-4096"]


def _splits(vm: dict) -> int | None:
    """None on a kernel without the counters (5.10: they came in 5.13)."""
    if "direct_map_level2_splits" not in vm:
        return None
    return vm["direct_map_level2_splits"] + vm["direct_map_level3_splits"]


def _collapses(vm: dict) -> int | None:
    if "direct_map_level2_collapses" not in vm:
        return None
    return vm["direct_map_level2_collapses"] + vm["direct_map_level3_collapses"]


def _n(x: int | None) -> str:
    return "-" if x is None else str(x)


def linux(name: str) -> dict:
    """What the real kernel did: DirectMap4k at each snapshot, its splits
    and collapses at the last (vmstat counts from SYSTEM_RUNNING on)."""
    from dmfrag.placed import read_trace
    _header, events = read_trace(TRACES / f"{name}.jsonl.gz")
    snaps = [(e[1], e[2]) for e in events if e[0] == "S"]
    last = snaps[-1][1]["vmstat"]
    return {"points": [p for p, _ in snaps],
            "directmap_4k_kb": [s["meminfo"]["DirectMap4k"] for _, s in snaps],
            "splits": _splits(last), "collapses": _collapses(last)}


def model(name: str, policy: str) -> dict:
    """The model's placement of the same stream under ``policy``."""
    from dmfrag.modelled import replay_modelled
    r = replay_modelled(TRACES / f"{name}.jsonl.gz", policy=policy, metrics=True)
    if r.error:
        raise SystemExit(f"{name} under {policy}: {r.error}")
    m = r.metrics
    vm = r.model.vmstat()
    return {"directmap_4k_kb": [s["model"]["DirectMap4k"] for s in r.snapshots],
            "splits": _splits(vm), "collapses": _collapses(vm),
            "peak_split_2m_regions": m["peak_split_2m_regions"],
            "oracle_peak_split_2m_regions": m["oracle_peak_split_2m_regions"],
            "oracle_no_merge_peak_split_2m_regions": m["oracle_no_merge_peak_split_2m_regions"],
            "integrated_4k_gib_steps": m["integrated_4k_gib_steps"],
            "cached_pages_end": m["cached_pages_end"]}


def run(smoke: bool) -> dict:
    out: dict = {}
    for claim, (full, small, pols) in CLAIMS.items():
        out[claim] = {name: {"linux": linux(name), "model": {p: model(name, p) for p in pols}}
                      for name in (small if smoke else full)}
    out["packed"] = {name: linux(name) for name in ([] if smoke else PACKED)}
    return out


def _kb(x: int) -> str:
    return f"{x:+,} kB" if x else "0"


def markdown(out: dict) -> str:
    """The report's tables: per recording, Linux's row then the model's
    per policy. Growth is DirectMap4k at the end against the boot
    snapshot (the first); splits and collapses are vmstat's ("-": 5.10
    has no such counters)."""
    lines = []
    for claim, runs in out.items():
        if claim == "packed":
            if runs:
                lines.append("<!-- table packed -->")
                lines.append("| recording (Linux's own bpf_prog_pack) | DirectMap4k growth "
                             "at bpf:2048 |")
                lines.append("|---|---|")
                for name, li in runs.items():
                    at = li["points"].index("bpf:2048")
                    g = li["directmap_4k_kb"][at] - li["directmap_4k_kb"][0]
                    lines.append(f"| {name} | {_kb(g)} |")
                lines.append("<!-- end -->")
                lines.append("")
            continue
        for name, r in runs.items():
            li = r["linux"]
            lines.append(f"<!-- table {claim} {name} -->")
            lines.append(f"`{name}` (snapshots: {', '.join(li['points'])})")
            lines.append("")
            lines.append("| | DirectMap4k at each snapshot (kB) | growth | splits | collapses | "
                         "peak split 2M | oracle (no merge) |")
            lines.append("|---|---|---|---|---|---|---|")
            g = li["directmap_4k_kb"][-1] - li["directmap_4k_kb"][0]
            lines.append(f"| **Linux** | {' / '.join(f'{x:,}' for x in li['directmap_4k_kb'])} "
                         f"| {_kb(g)} | {_n(li['splits'])} | {_n(li['collapses'])} | | |")
            for p, m in r["model"].items():
                g = m["directmap_4k_kb"][-1] - m["directmap_4k_kb"][0]
                lines.append(f"| {p} | {' / '.join(f'{x:,}' for x in m['directmap_4k_kb'])} | "
                             f"{_kb(g)} | {m['splits']} | {m['collapses']} | "
                             f"{m['peak_split_2m_regions']} | "
                             f"{m['oracle_peak_split_2m_regions']} "
                             f"({m['oracle_no_merge_peak_split_2m_regions']}) |")
            lines.append("<!-- end -->")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="the tables of the report")
    ap.add_argument("--smoke", action="store_true",
                    help="the small recordings only: same code paths, in seconds")
    args = ap.parse_args()
    out = run(args.smoke)
    if args.json:
        print(json.dumps({**out, "smoke": args.smoke}))
    else:
        print(markdown(out))


if __name__ == "__main__":
    main()
