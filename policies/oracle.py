"""The ``oracle`` yardstick (not a policy): a lower bound on the large pages
that had to be split, from the peak number of pages that needed PTE-level
direct-map entries at the same time.

A page needs a PTE-level entry while its direct-map attributes differ from
the default (present, writable, not executable): no large page can map it
and its default neighbours. If at most ``N`` such pages ever existed at
once, the best any grouping could do is pack them into ``ceil(N / 512)``
2M pages, inside ``ceil(N / 512**2)`` 1G pages. :class:`OracleTracker`
records ``N`` over a run from the kernel's shadow (what CPA requests asked
for), after each CPA call.
"""

from __future__ import annotations

import numpy as np

from guestkernel.shadow import S_MAPPED, S_NX, S_P, S_RW

__all__ = ["OracleTracker", "lower_bound"]

_DEFAULT = S_MAPPED | S_P | S_RW | S_NX


def lower_bound(peak_pages: int) -> dict[str, int]:
    return {"peak_pte_pages": peak_pages,
            "min_2m_splits": -(-peak_pages // 512),
            "min_1g_splits": -(-peak_pages // (512 * 512))}


def pte_level_pages(kernel) -> int:
    """Direct-map pages whose requested attributes are not the default now."""
    d = kernel.shadow.direct
    return int(np.count_nonzero(((d & S_MAPPED) != 0) & (d != _DEFAULT)))


class OracleTracker:
    """Samples :func:`pte_level_pages` after every CPA call of ``kernel``,
    from the moment it is created: an observer of the kernel's CPA (not a
    policy; it changes nothing). :meth:`detach` stops it."""

    def __init__(self, kernel):
        self.k = kernel
        self.baseline = pte_level_pages(kernel)   # what boot left (ISA range, image)
        self.peak = 0
        kernel.cpa.add_observer(after=self._after)

    def _after(self, _cpa) -> None:
        self.sample()

    def detach(self) -> None:
        self.k.cpa.remove_observer(self._after)

    def sample(self) -> None:
        self.peak = max(self.peak, pte_level_pages(self.k) - self.baseline)

    def bound(self) -> dict[str, int]:
        self.sample()
        return lower_bound(self.peak)
