"""The result records ``dmfrag`` writes: one place for their fields, so the
CLI commands and the sweep workers produce the same rows, and for the
metadata every versioned result carries.

These records are a public contract (outside tools read them); their fields
are described in docs/results.md. A field's name, type or meaning changes
only with :data:`RESULT_VERSION`.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guestkernel import Kernel

    from .workloads import Driver, TraceError

__all__ = ["RESULT_VERSION", "TABLE_FIELDS", "compare_row", "metadata", "metric_fields",
           "replay_result", "run_result", "sort_rows", "sweep_row", "tlb_fields"]

#: The version of every JSON result carrying :func:`metadata`
#: (``run --json``, ``compare --json``, ``sweep.json``).
RESULT_VERSION = 3

#: Packages whose versions a result records (they decide its numbers).
_VERSIONED = ("dmfrag", "unicorn", "capstone", "numpy")


def metadata(config: Mapping[str, Any]) -> dict:
    """What makes a result reproducible: the result version, the versions of
    the packages that computed it, Python's, and the configuration (the
    command's arguments) that asked for it."""
    vers = {}
    for pkg in _VERSIONED:
        try:
            vers[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - metadata is informative only
            vers[pkg] = None
    return {"result_version": RESULT_VERSION, "versions": vers,
            "python": platform.python_version(), "config": dict(config)}


def _tlb(k: Kernel, preset: str, accesses: str | None = None) -> dict:
    """The TLB cost of the state: a real kernel's captured accesses run
    through it and through its two references (:func:`dmfrag.accesses.price`)."""
    from .accesses import price
    return price(k, preset, accesses)


def run_result(d: Driver, *, workload: str, seed: int, tlb: str | None,
               config: Mapping[str, Any], accesses: str | None = None) -> dict:
    """The result of ``dmfrag run`` (and the per-policy record ``compare``
    builds its row from): the kernel's meminfo and vmstat after the
    workload, what ran, the TLB cost when asked, and :func:`metadata`."""
    k = d.kernel
    out = {"meminfo": k.meminfo(), "vmstat": k.vmstat(), "policy": k.policy_name,
           "kernel": k.profile.name, "kernel_reason": k.profile_reason,
           "paging_levels": k.paging_levels, "workload": workload, "seed": seed, "calls": len(d.lines) - 1}
    if d.points:
        out["snapshots"] = list(d.points)
    if tlb:
        out["tlb"] = _tlb(k, tlb, accesses)
    out.update(metadata(config))
    return out


#: The fields ``compare`` prints in its table (the JSON and CSV carry all).
TABLE_FIELDS = ("policy", "end_directmap_4k_kb", "end_directmap_2m_kb", "end_directmap_1g_kb",
                "integrated_4k_gib_steps", "peak_split_2m_regions",
                "oracle_peak_split_2m_regions", "oracle_no_merge_peak_split_2m_regions",
                "above_oracle", "splits", "collapses",
                "alloc_failures", "cached_pages_end")


def sort_rows(rows: list[dict]) -> list[dict]:
    """The default order of compare's rows: the end state (DirectMap4k at
    the end, least first), then the time-integrated 4K bytes."""
    return sorted(rows, key=lambda r: (r["end_directmap_4k_kb"], r["integrated_4k_gib_steps"]))


def metric_fields(d: Driver) -> dict:
    """The metrics of a finished run (``dmfrag.metrics.RunMetrics.row``)
    with the oracle's bound and the distance from it."""
    out = d.metrics.row()
    bound = d.oracle.bound()
    out["oracle_peak_split_2m_regions"] = bound["peak_split_2m_regions"]
    out["oracle_fixed_split_2m_regions"] = bound["fixed_split_2m_regions"]
    # the bound for a run that merges nothing (the regions split at its
    # start stay split): what a kernel without merging is held to
    out["oracle_no_merge_peak_split_2m_regions"] = bound["no_merge_peak_split_2m_regions"]
    out["above_oracle"] = out["peak_split_2m_regions"] - bound["peak_split_2m_regions"]
    return out


def compare_row(policy: str, d: Driver, res: dict) -> dict:
    """One row of ``dmfrag compare``: ``res`` is the policy's
    :func:`run_result`. The key order is the CSV's column order: the
    policy, its metrics (:func:`metric_fields`), then the meminfo and
    vmstat names of the end state."""
    mi = res["meminfo"]
    row = {"policy": policy, **metric_fields(d),
           "DirectMap4k": mi["DirectMap4k"], "DirectMap2M": mi["DirectMap2M"],
           "DirectMap1G": mi["DirectMap1G"]}
    if res.get("tlb"):
        row.update(tlb_fields(res["tlb"]))
    return row


def tlb_fields(t: dict) -> dict:
    """A compare row's TLB columns from a ``tlb`` object: the state's walk
    cycles over the unsplit reference's (3 decimals) and its position
    between the references (4 decimals)."""
    w, p = t["walk_cycles_vs_reference"], t["position"]
    return {"walk_cycles_vs_reference": round(w, 3) if w is not None else None,
            "tlb_position": round(p, 4) if p is not None else None}


def sweep_row(cell: Mapping[str, Any], d: Driver) -> dict:
    """One row of ``sweep.json``/``sweep.csv``: the grid cell, then the
    metrics after its run (as compare's). The key order is the CSV's
    column order."""
    k = d.kernel
    mi = k.meminfo()
    out = {**cell, **metric_fields(d), "DirectMap4k": mi["DirectMap4k"],
           "DirectMap2M": mi["DirectMap2M"], "DirectMap1G": mi["DirectMap1G"]}
    if cell.get("tlb"):
        cost = _tlb(k, cell["tlb"], cell.get("accesses"))
        out["walk_cycles_vs_reference"] = cost["walk_cycles_vs_reference"]
        out["tlb_position"] = cost["position"]
    return out


def replay_result(d: Driver, err: TraceError | None) -> dict:
    """The JSON line of ``dmfrag trace replay``: the state after the replay
    (up to the first bad line, if any), the error that stopped it and what
    the replay warned about (e.g. a version-1 trace has no trailer)."""
    return {"meminfo": d.kernel.meminfo(), "vmstat": d.kernel.vmstat(),
            "kernel": d.kernel.profile.name,
            "replayed_calls": len(d.lines) - 1, "error": str(err) if err else None,
            "warnings": list(d.warnings)}
