"""Merging policies: put split direct-map tables back together.

``cpa-merge`` (Hyeonggon Yoo / Aaron Lu RFCs, 2022): after any CPA call,
every PTE table whose entries the call rewrote is merged back into a 2M
page when all 512 entries agree (same flags, contiguous frames), and the
PMD table above into a 1G page the same way. The RFCs kept a per-table
count of same-protection entries to avoid scanning; scanning 512 entries
with numpy gives the same decisions.

``cpa-collapse`` (mainline 6.15, ``cpa_collapse_large_pages``): the same
rule, but only after ``set_memory_rox``, and never for entries
``set_memory_4k`` marked.

Both use ``Cpa.collapse_large_pages`` (:mod:`guestkernel.collapse`).
"""

from __future__ import annotations

from emu.pagetable import PteFlags as F
from guestkernel.policy import Policy, register_policy


@register_policy
class CpaMerge(Policy):
    name = "cpa-merge"

    def cpa_after(self, kernel, cpa) -> None:
        if cpa.changed:
            kernel.cpa.collapse_large_pages(cpa.changed)


@register_policy
class CpaCollapse(Policy):
    name = "cpa-collapse"
    _ROX = int(F.RW | F.NX)

    def cpa_after(self, kernel, cpa) -> None:
        if cpa.changed and cpa.mask_set == 0 and cpa.mask_clr == self._ROX:
            kernel.cpa.collapse_large_pages(cpa.changed)
