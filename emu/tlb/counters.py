"""The TLB model's counters and their Linux ``perf`` names.

Both models count the same raw events (:data:`COUNTERS`, in the order
``_native.c`` keeps them); :func:`stats` derives what a run reports: perf's
Intel event names (:data:`PERF_NAMES`), the raw counters as ``model.*``, and
the documented latency model's cycle estimate.
"""

from __future__ import annotations

from .config import TlbConfig

__all__ = ["COUNTERS", "PERF_NAMES", "stats"]


COUNTERS = (
    "loads", "stores", "fetches",
    "l1_miss_load", "l1_miss_store", "l1_miss_fetch",
    "stlb_hit_load", "stlb_hit_store", "stlb_hit_fetch",
    "walk_load", "walk_store", "walk_fetch",
    "walk_4k_load", "walk_2m_load", "walk_1g_load",
    "walk_4k_store", "walk_2m_store", "walk_1g_store",
    "walk_4k_fetch", "walk_2m_fetch", "walk_1g_fetch",
    "walk_mem_refs", "walk_faults", "psc_hit_pml4e", "psc_hit_pdpte", "psc_hit_pde",
    "undecoded", "psc_hit_pml5e",
)
#: perf's names for what the counters measure (Intel event names).
PERF_NAMES = {
    "dtlb_load_misses.miss_causes_a_walk": "walk_load",
    "dtlb_load_misses.stlb_hit": "stlb_hit_load",
    "dtlb_load_misses.walk_completed": "walk_load",
    "dtlb_load_misses.walk_completed_4k": "walk_4k_load",
    "dtlb_load_misses.walk_completed_2m_4m": "walk_2m_load",
    "dtlb_load_misses.walk_completed_1g": "walk_1g_load",
    "dtlb_store_misses.miss_causes_a_walk": "walk_store",
    "dtlb_store_misses.stlb_hit": "stlb_hit_store",
    "dtlb_store_misses.walk_completed": "walk_store",
    "dtlb_store_misses.walk_completed_4k": "walk_4k_store",
    "dtlb_store_misses.walk_completed_2m_4m": "walk_2m_store",
    "dtlb_store_misses.walk_completed_1g": "walk_1g_store",
    "itlb_misses.miss_causes_a_walk": "walk_fetch",
    "itlb_misses.stlb_hit": "stlb_hit_fetch",
    "itlb_misses.walk_completed": "walk_fetch",
    "itlb_misses.walk_completed_4k": "walk_4k_fetch",
    "itlb_misses.walk_completed_2m_4m": "walk_2m_fetch",
    "itlb_misses.walk_completed_1g": "walk_1g_fetch",
}


def stats(raw: dict[str, int], cfg: TlbConfig) -> dict[str, float]:
    out: dict[str, float] = {name: raw[src] for name, src in PERF_NAMES.items()}
    out.update({f"model.{k}": v for k, v in raw.items()})
    # Walks that fault fill nothing and complete nothing.
    walks = raw["walk_load"] + raw["walk_store"] + raw["walk_fetch"]
    hits2 = raw["stlb_hit_load"] + raw["stlb_hit_store"] + raw["stlb_hit_fetch"]
    out["walk_mem_refs"] = raw["walk_mem_refs"]
    out["est_walk_cycles"] = (hits2 * cfg.stlb_hit_cycles + walks * cfg.walk_base_cycles
                              + raw["walk_mem_refs"] * cfg.walk_ref_cycles)
    data = raw["loads"] + raw["stores"]
    out["data_accesses"] = data
    out["dtlb_mpki_accesses"] = 1000.0 * (raw["walk_load"] + raw["walk_store"]) / data if data else 0.0
    return out
