"""What a run did to the direct map, as ``compare`` reports it per policy.

:class:`RunMetrics` observes a kernel from the moment it is created (a
workload's start, or a replay's) and keeps, besides the end state that
meminfo shows:

* ``peak_split_2m_regions``: the most 2M regions of the direct map mapped
  with 4K pages at any moment (after every CPA request, from the live
  tables; the regions boot split included);
* ``integrated_4k_gib_steps``: DirectMap4k integrated over the run's kernel
  calls, in GiB x calls (a state that is fragmented for longer costs more,
  and a policy that merges at the end is credited for the time it did);
* splits and collapses (Linux's vmstat counters, since the start), the
  CPA requests made and the table entries collapse attempts read (what a
  policy costs), allocations that failed, and the pages the policy holds in
  its caches at the end and at the peak.

``clock`` is the caller's count of kernel calls so far (a workload's lines,
a replay's events): the integral needs no per-call work, only a sample at
each CPA request (DirectMap4k changes nowhere else).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guestkernel import Kernel

__all__ = ["RunMetrics"]

_GIB_IN_KB = 1 << 20


class RunMetrics:
    def __init__(self, kernel: Kernel, clock: Callable[[], int]):
        self.k = kernel
        self.clock = clock
        self.split_2m_regions_start = self._split_now()
        self.peak_split_2m_regions = self.split_2m_regions_start
        self._t = clock()
        self._4k = kernel.pgt.direct_pages_count[1] * 4
        self._integral_kb = 0
        vm = kernel.vmstat_counters
        self._vm0 = {name: vm.get(name, 0) for name in _VMSTAT}
        self._requests0 = kernel.cpa.requests
        self._scanned0 = kernel.cpa.collapse_scanned
        self._failures0 = kernel.alloc_failures
        self.cached_pages_peak = kernel.policy_cached_count()
        #: (step, DirectMap4k, 2M, 1G kB, level-2 splits, level-2 collapses)
        #: at the start and whenever DirectMap4k changed: the time series
        #: compare's plots draw (a Driver's ``samples`` shape)
        self.samples: list[tuple[int, int, int, int, int, int]] = []
        self._sample(self._t)
        kernel.cpa.add_observer(after=self._after)

    def _split_now(self) -> int:
        return self.k.pgt.split_2m_regions(self.k.max_pfn)

    def _sample(self, t: int) -> None:
        mi = self.k.meminfo()
        vm = self.k.vmstat_counters
        self.samples.append((t, mi["DirectMap4k"], mi["DirectMap2M"], mi["DirectMap1G"],
                             vm.get("direct_map_level2_splits", 0),
                             vm.get("direct_map_level2_collapses", 0)))

    def _advance(self) -> None:
        t = self.clock()
        self._integral_kb += self._4k * (t - self._t)
        self._t = t
        now = self.k.pgt.direct_pages_count[1] * 4
        if now != self._4k:
            self._4k = now
            self._sample(t)

    def _after(self, _cpa) -> None:
        self._advance()
        n = self._split_now()
        self.peak_split_2m_regions = max(self.peak_split_2m_regions, n)

    def tick(self) -> None:
        """After a kernel call: the policy's cache may have grown without a
        CPA request (a refill from an unmapped chunk), and a merge outside
        one (migrate-unmapped collapses a pageblock freed whole) changed
        DirectMap4k."""
        self._advance()
        n = self.k.policy_cached_count()
        self.cached_pages_peak = max(self.cached_pages_peak, n)

    def detach(self) -> None:
        self.k.cpa.remove_observer(self._after)

    def row(self) -> dict:
        """The metrics now (the run's end): the ``compare`` fields."""
        self._advance()
        self.tick()
        k = self.k
        mi = k.meminfo()
        vm = k.vmstat_counters
        d = {name: vm.get(name, 0) - self._vm0[name] for name in _VMSTAT}
        return {
            "end_directmap_4k_kb": mi["DirectMap4k"],
            "end_directmap_2m_kb": mi["DirectMap2M"],
            "end_directmap_1g_kb": mi["DirectMap1G"],
            "end_split_2m_regions": self._split_now(),
            "peak_split_2m_regions": self.peak_split_2m_regions,
            "integrated_4k_gib_steps": round(self._integral_kb / _GIB_IN_KB, 4),
            "splits": d["direct_map_level2_splits"] + d["direct_map_level3_splits"],
            "collapses": d["direct_map_level2_collapses"] + d["direct_map_level3_collapses"],
            "level2_splits": d["direct_map_level2_splits"],
            "level3_splits": d["direct_map_level3_splits"],
            "level2_collapses": d["direct_map_level2_collapses"],
            "level3_collapses": d["direct_map_level3_collapses"],
            "alloc_failures": k.alloc_failures - self._failures0,
            "cached_pages_end": k.policy_cached_count(),
            "cached_pages_peak": self.cached_pages_peak,
            "cpa_requests": k.cpa.requests - self._requests0,
            "collapse_entries_scanned": k.cpa.collapse_scanned - self._scanned0,
            "steps": self.clock(),
        }


_VMSTAT = ("direct_map_level2_splits", "direct_map_level3_splits",
           "direct_map_level2_collapses", "direct_map_level3_collapses")
