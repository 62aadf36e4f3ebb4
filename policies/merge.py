"""Merging policies: put split direct-map tables back together.

``cpa-merge``: Aaron Lu, "[RFC PATCH 0/4] x86/mm/cpa: merge small
mappings whenever possible", 8 Aug 2022,
<20220808145649.2261258-1-aaron.lu@intel.com> (and Hyeonggon Yoo's RFC
of the same year). "There is a problem due to this split: the large
mapping will remain splitted even after the affected pages' protection
are changed back to RW and NX, like when the module is unloaded or bpf
progs are freed. [...] This patchset addresses this problem in another
way: it merges splitted mappings back to a large mapping when protections
of all entries of the splitted small mapping page table become same
again [...] this patchset can not help when the page which has its
protection changed keeps in use." So: after any CPA call, every PTE table
whose entries the call rewrote is merged back into a 2M page when all 512
entries agree (same flags, contiguous frames), and the PMD table above
into a 1G page the same way. Choice where it is silent: the RFC kept a
per-table count of same-protection entries to avoid scanning; scanning
the 512 entries with numpy gives the same decisions (``collapse_scanned``
counts them, as what merging costs).

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
