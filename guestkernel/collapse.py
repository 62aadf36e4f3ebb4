"""Merging split direct-map tables back into large pages.

The rule of Linux 6.15's ``cpa_collapse_large_pages`` (and of the 2022
``cpa-merge`` RFCs): a PTE table collapses into a 2M leaf when its first
frame is 2M-aligned, all 512 entries are present with identical flags and
contiguous frames, and none is marked 4K-only (``set_memory_4k``); then the
PMD table above collapses into a 1G leaf (with gbpages) when all 512 PMD
entries are 2M leaves with identical flags and contiguous frames. The new
entry is installed, the TLB flushed, and only then the old table freed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from .layout import PMD_SIZE, PUD_SIZE
from .pgtable import KernelPageTables

__all__ = ["KERNEL_4K", "CollapseContext", "collapse_direct_map", "collapse_kernel_range"]


class _Flush(Protocol):
    def flush_tlb_all(self) -> None: ...


class CollapseContext(Protocol):
    """What a collapse needs (``guestkernel.cpa.Cpa`` is one): the tables,
    the accounting, the flush and a way to free an unlinked table page."""

    pgt: KernelPageTables
    #: the direct map's base (4- or 5-level layout)
    page_offset: int
    tlb: _Flush
    gbpages: bool
    max_pfn: int
    #: entries the collapses read (512 per table tried): what merging costs
    collapse_scanned: int

    def collapse_page_count(self, level: int) -> None: ...
    def free_pgtable_page(self, pa: int) -> None: ...

#: The marker set_memory_4k leaves on entries it split (never collapse them):
#: a software bit, as 6.15's _PAGE_KERNEL_4K is.
KERNEL_4K = int(F.SW2)
_HW = np.uint64(int(F.A | F.D))
_ADDR = np.uint64(pt.ADDR_MASK)


def _pmd_slot_of(k: CollapseContext, va: int) -> tuple[int, int] | None:
    """(slot of the PMD entry covering va, slot of the PUD entry) if the PMD
    entry points to a PTE table."""
    pgt = k.pgt
    table = pgt.root
    slots = []
    for level in range(pgt.levels, 1, -1):
        slot = pgt.slot(table, pt.table_index(va, level))
        entry = pgt.get(slot)
        if not entry & F.P or (level < 4 and entry & F.PS):
            return None
        slots.append(slot)
        table = entry & pt.ADDR_MASK
    return slots[-1], slots[-2]


def _try_pmd(k: CollapseContext, pmd_slot: int, region_pa: int, *, count: bool = True) -> bool:
    pgt = k.pgt
    k.collapse_scanned += 512
    table = pgt.get(pmd_slot) & pt.ADDR_MASK
    ptes = pgt.ram64[table >> 3: (table >> 3) + 512]
    flags = ptes & ~_ADDR & ~_HW
    first = int(ptes[0])
    if not first & F.P or int(flags[0]) & KERNEL_4K:
        return False
    if (first & pt.ADDR_MASK) != region_pa or (region_pa & (PMD_SIZE - 1)):
        return False
    if not np.all(flags == flags[0]):
        return False
    frames = ptes & _ADDR
    if not np.array_equal(frames, np.uint64(region_pa) + np.arange(512, dtype=np.uint64) * np.uint64(4096)):
        return False
    large = pt.large_flags_from_4k(int(flags[0]))
    pgt.set(pmd_slot, region_pa | large)
    if count:
        k.collapse_page_count(2)
    k.tlb.flush_tlb_all()
    k.free_pgtable_page(table)
    return True


def _try_pud(k: CollapseContext, pud_slot: int, region_pa: int) -> bool:
    pgt = k.pgt
    if not k.gbpages or region_pa & (PUD_SIZE - 1):
        return False
    k.collapse_scanned += 512
    table = pgt.get(pud_slot) & pt.ADDR_MASK
    pmds = pgt.ram64[table >> 3: (table >> 3) + 512]
    # A 2M leaf's PAT bit is bit 12, inside the address field: compare it
    # with the flags (pmd_pgprot() includes _PAGE_PAT_LARGE), not the frame.
    pat = np.uint64(int(F.PAT_LARGE))
    flags = (pmds & ~_ADDR & ~_HW) | (pmds & pat)
    if not np.all(flags == flags[0]) or not int(flags[0]) & F.PS or not int(flags[0]) & F.P:
        return False
    frames = pmds & _ADDR & ~pat
    if not np.array_equal(frames, np.uint64(region_pa) + np.arange(512, dtype=np.uint64) * np.uint64(PMD_SIZE)):
        return False
    pgt.set(pud_slot, region_pa | int(flags[0]))
    k.collapse_page_count(3)
    k.tlb.flush_tlb_all()
    k.free_pgtable_page(table)
    return True


def collapse_direct_map(k: CollapseContext, pfns) -> tuple[int, int]:
    """Try to collapse the direct-map tables covering ``pfns``; returns
    (2M collapses, 1G collapses)."""
    n2 = n1 = 0
    regions = sorted({int(p) >> 9 for p in pfns})
    for r in regions:
        pa = r << 21
        if pa >= k.max_pfn << 12:
            continue
        found = _pmd_slot_of(k, k.page_offset + pa)
        if found is None:
            continue
        pmd_slot, pud_slot = found
        if _try_pmd(k, pmd_slot, pa):
            n2 += 1
            if _try_pud(k, pud_slot, pa & ~(PUD_SIZE - 1)):
                n1 += 1
    return n2, n1


def collapse_kernel_range(k: CollapseContext, va: int, numpages: int) -> int:
    """6.15's ``cpa_collapse_large_pages`` on a request's own range outside
    the direct map (module, execmem or vmalloc memory): each PMD the range
    touches whose PTE table maps 512 contiguous 2M-aligned frames with the
    same flags becomes a 2M leaf again and the table is freed (the execmem
    ROX cache's 2M mapping, split by a text made RW, after its
    ``set_memory_rox``). Not a direct-map page: no count, no 1G try (no
    module-space PMD table is ever all 2M leaves). Returns the collapses."""
    n = 0
    addr = va & ~(PMD_SIZE - 1)
    end = va + numpages * 4096
    pgt = k.pgt
    while addr < end:
        found = _pmd_slot_of(k, addr)
        if found is not None:
            table = pgt.get(found[0]) & pt.ADDR_MASK
            first = int(pgt.ram64[table >> 3])
            if _try_pmd(k, found[0], first & pt.ADDR_MASK, count=False):
                n += 1
        addr += PMD_SIZE
    return n
