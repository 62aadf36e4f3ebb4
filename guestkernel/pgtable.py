"""The kernel's page tables in guest RAM: lookup, the boot-time direct map
(arch/x86/mm/init_64.c ``phys_pud_init``/``phys_pmd_init``/``phys_pte_init``)
and ``direct_pages_count``.

Entries live in ``machine.ram64``; a "slot" below is an index into it (the
entry's physical address / 8). The tables are walked by the emulated CPU
once CR3 points at :attr:`KernelPageTables.root`: a PML4, or with 5-level
paging (``layout.paging_levels == 5``) a PML5 whose entries link P4D tables
(``pgd_populate``/``p4d_populate``, as ``__kernel_physical_mapping_init``
with ``pgtable_l5_enabled()``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from .e820 import E820Table, E820Type
from .layout import LAYOUT_4LEVEL, PAGE_SIZE, PMD_SIZE, PUD_SIZE, KernelLayout

# plain ints: a lookup per CPA page tests these (IntFlag arithmetic is slow)
_P, _PS = int(F.P), int(F.PS)
_ADDR_MASK = pt.ADDR_MASK

__all__ = ["PG_LEVEL_1G", "PG_LEVEL_2M", "PG_LEVEL_4K", "KernelPageTables", "PgProt"]

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3

#: The CPU may set these behind the kernel's back; entries compare without them.
HW_BITS = int(F.A | F.D)


class PgProt:
    """The kernel's pgprot constants (arch/x86/include/asm/pgtable_types.h),
    with _PAGE_GLOBAL dropped when PTI is on (__default_kernel_pte_mask)."""

    def __init__(self, pti: bool):
        glb = 0 if pti else int(F.G)
        base = int(F.P | F.RW | F.A | F.D)
        self.KERNPG_TABLE = base                                # _KERNPG_TABLE
        # _PAGE_TABLE: what pXd_populate links tables with (init_memory_mapping's
        # pud_populate_init / pmd_populate_kernel_init, pte_alloc_kernel); only
        # CPA's split_large_page and the static head_64.S tables use _KERNPG_TABLE.
        # USER on a table entry grants nothing while the leaves lack it.
        self.PAGE_TABLE = base | int(F.US)
        self.PAGE_KERNEL = base | int(F.NX) | glb                 # __PAGE_KERNEL
        self.PAGE_KERNEL_EXEC = base | glb                        # __PAGE_KERNEL_EXEC
        self.PAGE_KERNEL_RO = int(F.P | F.A | F.D | F.NX) | glb
        self.PAGE_KERNEL_ROX = int(F.P | F.A | F.D) | glb
        self.PAGE_KERNEL_LARGE = self.PAGE_KERNEL | int(F.PS)
        self.PAGE_KERNEL_LARGE_EXEC = self.PAGE_KERNEL_EXEC | int(F.PS)


def _prot_of(entry: int) -> int:
    """pte_pgprot: the flag bits of an entry (PAT bit 12 included for a large leaf
    is handled by the caller)."""
    return entry & ~pt.ADDR_MASK & ((1 << 64) - 1)


class KernelPageTables:
    """The kernel's own (init_mm) page tables.

    ``alloc_table`` returns the physical address of a zeroed page for a new
    table; ``free_table`` takes one back. Every table page linked in is in
    :attr:`table_pages` (for the validator)."""

    def __init__(self, machine, root: int, alloc_table: Callable[[str], int],
                 free_table: Callable[[int], None], pti: bool = True,
                 layout: KernelLayout = LAYOUT_4LEVEL):
        self.m = machine
        self.layout = layout
        #: paging levels (4, or 5: the root is a PML5)
        self.levels = layout.paging_levels
        #: the direct map's base (PAGE_OFFSET of this layout)
        self.page_offset = layout.page_offset
        self.ram64: np.ndarray = machine.ram64
        #: the same memory read entry by entry: a memoryview's item is a
        #: Python int already (numpy's is a scalar to convert)
        self._ram64_items = memoryview(self.ram64)
        self.root = root
        self.alloc_table = alloc_table
        self.free_table = free_table
        self.prot = PgProt(pti)
        #: pages per level mapping the direct map (index 1..4 as PG_LEVEL_*)
        self.direct_pages_count = [0, 0, 0, 0, 0]
        #: physical addresses of every linked table page (the root included)
        self.table_pages: set[int] = {root}
        self.after_bootmem = False
        #: while not None, every set() records (slot, old value) here, so a
        #: request that fails half-way can be undone (Cpa.apply)
        self.journal: list[tuple[int, int]] | None = None

    # -- entries --------------------------------------------------------

    @staticmethod
    def slot(table: int, index: int) -> int:
        return (table >> 3) + index

    def get(self, slot: int) -> int:
        return self._ram64_items[slot]

    def set(self, slot: int, value: int) -> None:
        if self.journal is not None:
            self.journal.append((slot, int(self.ram64[slot])))
        self.ram64[slot] = value & ((1 << 64) - 1)

    def undo(self, journal: list[tuple[int, int]]) -> None:
        """Put back every entry ``journal`` recorded, newest first."""
        for slot, old in reversed(journal):
            self.ram64[slot] = old

    def _new_table(self, why: str) -> int:
        pa = self.alloc_table(why)
        self.m.ram[pa: pa + PAGE_SIZE] = 0
        self.table_pages.add(pa)
        return pa

    def populate(self, slot: int, why: str) -> int:
        """Link a new zeroed table at ``slot`` (``pXd_populate``: _PAGE_TABLE)
        and return it."""
        table = self._new_table(why)
        self.set(slot, table | self.prot.PAGE_TABLE)
        return table

    # -- lookup ---------------------------------------------------------

    def lookup_slot(self, va: int) -> tuple[int, int] | None:
        """``lookup_address``: (slot, level) of the entry that maps ``va``:
        a large or non-present upper entry, else the PTE (even if none).
        None when an upper level has no entry at all."""
        table = self.root
        ram64 = self._ram64_items
        for level in range(self.levels, 1, -1):
            # slot(table, table_index(va, level)) and get(slot), inline (hot):
            # level_shift(level) is PAGE_SHIFT + 9 * (level - 1)
            slot = (table >> 3) + ((va >> (9 * level + 3)) & 511)
            entry = ram64[slot]
            if entry == 0:
                return None
            if level < 4 and (entry & _PS or not entry & _P):
                return slot, level
            if level >= 4 and not entry & _P:
                return slot, level
            table = entry & _ADDR_MASK
        return (table >> 3) + ((va >> 12) & 511), 1

    def p4d_table(self, va: int, why: str = "p4d") -> int:
        """The table that holds ``va``'s PML4-level entry: the root with
        4-level paging; with 5-level, the P4D table the root's entry links
        (made and linked, ``pgd_populate``, when there is none yet)."""
        if self.levels == 4:
            return self.root
        slot = self.slot(self.root, pt.table_index(va, 5))
        entry = self.get(slot)
        if entry & _P:
            return entry & pt.ADDR_MASK
        return self.populate(slot, why)

    def lookup_address(self, va: int) -> tuple[int, int] | None:
        found = self.lookup_slot(va)
        if found is None:
            return None
        slot, level = found
        return self.get(slot), level

    # -- the boot-time direct map (init_64.c) ---------------------------

    def kernel_physical_mapping_init(self, paddr_start: int, paddr_end: int,
                                     page_size_mask: int, e820: E820Table) -> int:
        """Map [paddr_start, paddr_end) at PAGE_OFFSET; returns paddr_last.
        With 5-level paging the P4D table is made first (one covers 256 TB)."""
        prot = self.prot.PAGE_KERNEL
        po = self.page_offset
        vaddr, vaddr_end = po + paddr_start, po + paddr_end
        paddr_last = paddr_end
        while vaddr < vaddr_end:
            vaddr_next = (vaddr & ~((1 << 39) - 1)) + (1 << 39)
            pgd = self.slot(self.p4d_table(vaddr, "p4d (direct map)"), pt.table_index(vaddr, 4))
            entry = self.get(pgd)
            if entry:
                pud_table = entry & pt.ADDR_MASK
                paddr_last = self._phys_pud_init(pud_table, vaddr - po,
                                                 paddr_end, page_size_mask, prot, e820)
            else:
                pud_table = self._new_table("pud (direct map)")
                paddr_last = self._phys_pud_init(pud_table, vaddr - po,
                                                 paddr_end, page_size_mask, prot, e820)
                self.set(pgd, pud_table | self.prot.PAGE_TABLE)   # pgd/p4d_populate_init
            vaddr = vaddr_next
        return paddr_last

    def _ram_or_kern(self, e820: E820Table, lo: int, hi: int) -> bool:
        """``e820__mapped_any(lo, hi, RAM) || ...(RESERVED_KERN)``."""
        return any(e.start < hi and lo < e.end and e.type in (E820Type.RAM, E820Type.RESERVED_KERN)
                   for e in e820.entries)

    def _phys_pud_init(self, table: int, paddr: int, paddr_end: int, mask: int, prot: int,
                       e820: E820Table) -> int:
        pages = 0
        paddr_last = paddr_end
        i = pt.table_index(self.page_offset + paddr, 3)
        while i < 512:
            slot = self.slot(table, pt.table_index(self.page_offset + paddr, 3))
            paddr_next = (paddr & ~(PUD_SIZE - 1)) + PUD_SIZE
            cur_prot = prot
            entry = self.get(slot)
            if paddr >= paddr_end:
                if (not self.after_bootmem
                        and not self._ram_or_kern(e820, paddr & ~(PUD_SIZE - 1), paddr_next)):
                    self.set(slot, 0)
                i, paddr = i + 1, paddr_next
                continue
            if entry:
                if not entry & F.PS:
                    paddr_last = self._phys_pmd_init(entry & pt.ADDR_MASK, paddr, paddr_end,
                                                     mask, prot, e820)
                    i, paddr = i + 1, paddr_next
                    continue
                if mask & (1 << PG_LEVEL_1G):
                    # An existing 1G mapping is reused -- and counted again
                    # (init_64.c: "if (!after_bootmem) pages++").
                    if not self.after_bootmem:
                        pages += 1
                    paddr_last = paddr_next
                    i, paddr = i + 1, paddr_next
                    continue
                cur_prot = pt.pat_large_to_4k(_prot_of(entry))
            if mask & (1 << PG_LEVEL_1G):
                pages += 1
                self.set(slot, (paddr & ~(PUD_SIZE - 1)) | cur_prot | int(F.PS))
                paddr_last = paddr_next
                i, paddr = i + 1, paddr_next
                continue
            pmd_table = self._new_table("pmd (direct map)")
            paddr_last = self._phys_pmd_init(pmd_table, paddr, paddr_end, mask, cur_prot, e820)
            self.set(slot, pmd_table | self.prot.PAGE_TABLE)     # pud_populate_init
            i, paddr = i + 1, paddr_next
        self.direct_pages_count[PG_LEVEL_1G] += pages
        return paddr_last

    def _phys_pmd_init(self, table: int, paddr: int, paddr_end: int, mask: int, prot: int,
                       e820: E820Table) -> int:
        pages = 0
        paddr_last = paddr_end
        i = pt.table_index(paddr, 2)
        while i < 512:
            slot = self.slot(table, pt.table_index(paddr, 2))
            paddr_next = (paddr & ~(PMD_SIZE - 1)) + PMD_SIZE
            new_prot = prot
            if paddr >= paddr_end:
                if (not self.after_bootmem
                        and not self._ram_or_kern(e820, paddr & ~(PMD_SIZE - 1), paddr_next)):
                    self.set(slot, 0)
                i, paddr = i + 1, paddr_next
                continue
            entry = self.get(slot)
            if entry:
                if not entry & F.PS:
                    paddr_last = self._phys_pte_init(entry & pt.ADDR_MASK, paddr, paddr_end,
                                                     prot, e820)
                    i, paddr = i + 1, paddr_next
                    continue
                if mask & (1 << PG_LEVEL_2M):
                    if not self.after_bootmem:
                        pages += 1
                    paddr_last = paddr_next
                    i, paddr = i + 1, paddr_next
                    continue
                new_prot = pt.pat_large_to_4k(_prot_of(entry))
            if mask & (1 << PG_LEVEL_2M):
                pages += 1
                self.set(slot, (paddr & ~(PMD_SIZE - 1)) | (prot & ~int(F.PAT)) | int(F.PS))
                paddr_last = paddr_next
                i, paddr = i + 1, paddr_next
                continue
            pte_table = self._new_table("pte (direct map)")
            paddr_last = self._phys_pte_init(pte_table, paddr, paddr_end, new_prot, e820)
            self.set(slot, pte_table | self.prot.PAGE_TABLE)     # pmd_populate_kernel_init
            i, paddr = i + 1, paddr_next
        self.direct_pages_count[PG_LEVEL_2M] += pages
        return paddr_last

    def _phys_pte_init(self, table: int, paddr: int, paddr_end: int, prot: int,
                       e820: E820Table) -> int:
        pages = 0
        paddr_last = paddr_end
        i = pt.table_index(paddr, 1)
        while i < 512:
            slot = self.slot(table, i)
            paddr_next = (paddr & ~(PAGE_SIZE - 1)) + PAGE_SIZE
            if paddr >= paddr_end:
                if (not self.after_bootmem
                        and not self._ram_or_kern(e820, paddr & ~(PAGE_SIZE - 1), paddr_next)):
                    self.set(slot, 0)
                i, paddr = i + 1, paddr_next
                continue
            if self.get(slot):
                if not self.after_bootmem:
                    pages += 1
                i, paddr = i + 1, paddr_next
                continue
            pages += 1
            self.set(slot, (paddr & ~(PAGE_SIZE - 1)) | prot)
            paddr_last = paddr_next
            i, paddr = i + 1, paddr_next
        self.direct_pages_count[PG_LEVEL_4K] += pages
        return paddr_last

    # -- walking ------------------------------------------------------

    def leaves(self, start: int, end: int):
        """Yield (va, level, entry) for every non-zero leaf entry mapping
        [start, end), in address order (4K PTEs one by one)."""
        mask = self.layout.va_mask  # walk in 48/57-bit linear addresses, report canonical ones
        yield from self._leaves(self.root, self.levels, start & mask, ((end - 1) & mask) + 1, 0)

    def _leaves(self, table: int, level: int, start: int, end: int, base: int):
        size = pt.level_size(level)
        first = max(0, (start - base) // size) if start > base else 0
        last = min(511, (end - 1 - base) // size)
        entries = self.ram64[(table >> 3): (table >> 3) + 512]
        for i in range(first, last + 1):
            entry = int(entries[i])
            if entry == 0:
                continue
            va = base + i * size
            if level == 1 or (level < 4 and (entry & F.PS or not entry & F.P)):
                yield pt.canonical(va, self.levels), level, entry
            elif level > 1:
                yield from self._leaves(entry & pt.ADDR_MASK, level - 1, max(start, va),
                                        min(end, va + size), va)

    def recount_direct_map(self, max_pfn: int) -> list[int]:
        """Leaf entries (present or not, but not empty) mapping the direct map
        [PAGE_OFFSET, PAGE_OFFSET + max_pfn pages) in the live tables, by
        level: what ``direct_pages_count`` would hold without its boot-time
        re-counting."""
        counts = [0, 0, 0, 0, 0]
        start = self.page_offset & self.layout.va_mask
        self._count(self.root, self.levels, start, start + max_pfn * PAGE_SIZE, 0, counts)
        return counts

    def split_2m_regions(self, max_pfn: int) -> int:
        """2M regions of the direct map [PAGE_OFFSET, PAGE_OFFSET + max_pfn
        pages) whose PMD entry links a PTE table (present, not PS): the
        regions mapped with 4K pages now. Holes and 2M pages taken out
        whole (a non-present PMD) are not split. From the live tables: a
        few hundred numpy reads, cheap enough after every CPA request."""
        return sum(len(idx) for _base, idx in self._split_pmds(max_pfn))

    def split_2m_region_list(self, max_pfn: int) -> np.ndarray:
        """The split regions' numbers (pfn >> 9), ascending."""
        parts = [base + idx for base, idx in self._split_pmds(max_pfn)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _split_pmds(self, max_pfn: int):
        """(first region of the slice, indices in it) per PMD table slice."""
        start = self.page_offset & self.layout.va_mask
        end = start + max_pfn * PAGE_SIZE
        ram64 = self.ram64
        want = np.uint64(_P)
        both = np.uint64(_P | _PS)
        top = self.root
        if self.levels == 5:           # the direct map's 32 PB sit under one PML5 entry's P4D
            e5 = int(ram64[(self.root >> 3) + pt.table_index(start, 5)])
            if not e5 & _P:
                return
            top = e5 & pt.ADDR_MASK
        for va4 in range(start & ~((1 << 39) - 1), end, 1 << 39):
            e4 = int(ram64[(top >> 3) + pt.table_index(va4, 4)])
            if not e4 & _P:
                continue
            pud = (e4 & pt.ADDR_MASK) >> 3
            lo = max(start, va4)
            hi = min(end, va4 + (1 << 39))
            for i in range((lo - va4) >> 30, ((hi - 1 - va4) >> 30) + 1):
                e3 = int(ram64[pud + i])
                if not e3 & _P or e3 & _PS:
                    continue
                va3 = va4 + (i << 30)
                first = max(0, (lo - va3) >> 21)
                last = min(511, (hi - 1 - va3) >> 21)
                pmd = (e3 & pt.ADDR_MASK) >> 3
                ents = ram64[pmd + first: pmd + last + 1]
                idx = np.flatnonzero((ents & both) == want)
                if len(idx):
                    yield ((va3 - start) >> 21) + first, idx

    def _count(self, table: int, level: int, start: int, end: int, base: int,
               counts: list[int]) -> None:
        size = pt.level_size(level)
        first = max(0, (start - base) // size)
        last = min(511, (end - 1 - base) // size)
        entries = self.ram64[(table >> 3) + first: (table >> 3) + last + 1]
        if level == 1:  # PTEs: count with numpy, they are most of the work
            counts[1] += int(np.count_nonzero(entries))
            return
        for i in np.flatnonzero(entries):
            entry = int(entries[i])
            va = base + (first + int(i)) * size
            if level < 4 and (entry & F.PS or not entry & F.P):
                counts[level] += 1
            else:
                self._count(entry & pt.ADDR_MASK, level - 1, max(start, va),
                            min(end, va + size), va, counts)
