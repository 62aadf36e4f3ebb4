"""Policies with one planted bug each, for proving the validator catches it.

Each does a direct-map operation a merging/grouping policy does -- split a
2M page, collapse 512 PTEs back into one, unmap a page -- correctly unless
its ``bug`` says otherwise.
"""

from __future__ import annotations

from emu import pagetable as pt
from emu.pagetable import PteFlags as F
from guestkernel import PAGE_OFFSET, Kernel
from guestkernel.policy import Policy, register_policy

BUGS = ("none", "dropped-flush", "pat-not-moved", "wrong-split-attrs",
        "merge-different-perms", "leaked-table", "counter-not-updated")


@register_policy
class Planted(Policy):
    name = "test-planted-bug"
    defaults = {"bug": "none"}

    @property
    def bug(self) -> str:
        return self.tunables["bug"]

    # -- a split of a 2M direct-map page (as pte-mapped-cache refills do) --
    def split_2m(self, k: Kernel, pa2m: int) -> None:
        va = PAGE_OFFSET + pa2m
        slot, level = k.pgt.lookup_slot(va)
        assert level == 2
        old = k.pgt.get(slot)
        flags = (old & ~pt.ADDR_MASK) | (old & F.PAT_LARGE)
        if self.bug == "pat-not-moved":
            pte_flags = (flags & ~int(F.PS)) | (old & F.PAT_LARGE)   # bit 12 left in place
        else:
            pte_flags = pt.pat_large_to_4k(flags)
        if self.bug == "wrong-split-attrs":
            pte_flags &= ~int(F.RW)
        table = k.alloc_pgtable_page("test split")
        base = table >> 3
        for i in range(512):
            k.machine.ram64[base + i] = (pa2m + i * 4096) | pte_flags
        k.pgt.set(slot, table | k.pgt.prot.KERNPG_TABLE)
        k.split_page_count(2)
        k.flush_tlb_all()

    # -- a collapse of 512 PTEs into one 2M page (cpa-merge style) ---------
    def collapse_2m(self, k: Kernel, pa2m: int) -> None:
        va = PAGE_OFFSET + pa2m
        pmd_slot, level = k.pgt.lookup_slot(va)
        assert level == 1
        pte_base = pmd_slot - (pmd_slot & 511)
        ptes = [k.pgt.get(pte_base + i) for i in range(512)]
        hw = int(F.A | F.D)
        first = ptes[0] & ~pt.ADDR_MASK & ~hw
        same = all((p & ~pt.ADDR_MASK & ~hw) == first for p in ptes)
        if not same and self.bug != "merge-different-perms":
            return
        table_pa = pte_base << 3
        # the PMD entry that points at this PTE table
        pmd_table = k.pgt.lookup_slot(va & ~((1 << 30) - 1))
        pud_entry = k.pgt.get(pmd_table[0]) if pmd_table and pmd_table[1] == 3 else None
        pmd_table_pa = None
        table = k.pgt.root
        for lvl in (4, 3):
            entry = k.pgt.get(k.pgt.slot(table, pt.table_index(va, lvl)))
            table = entry & pt.ADDR_MASK
        pmd_table_pa = table
        slot = k.pgt.slot(pmd_table_pa, pt.table_index(va, 2))
        del pud_entry
        k.pgt.set(slot, pa2m | pt.large_flags_from_4k(ptes[0] & ~pt.ADDR_MASK))
        if self.bug != "counter-not-updated":
            k.collapse_page_count(2)
        k.flush_tlb_all()
        if self.bug != "leaked-table":
            k.pgt.free_table(table_pa)

    # -- unmap one page from the direct map (secretmem-like) ---------------
    def unmap(self, k: Kernel, pfn: int) -> None:
        k.set_direct_map_invalid_noflush(pfn)
        if self.bug != "dropped-flush":
            va = k.pfn_to_virt(pfn)
            k.flush_tlb_kernel_range(va, va + 4096)
