"""vmalloc (mm/vmalloc.c model): virtually contiguous kernel memory built
from order-0 pages (or 2M pages with ``VM_ALLOW_HUGE_VMAP``), mapped by the
kernel page tables in the vmalloc or module area.

``vfree`` of a ``VM_FLUSH_RESET_PERMS`` area does what ``vm_reset_perms``
does: the direct-map alias of every page is made invalid, one flush covers
the area and the aliases, and the aliases are set back to default -- two
CPA passes that split large direct-map pages under each page. Choice: the
kernel defers the TLB flush of unmapped vmalloc ranges (lazy purge); this
model flushes at ``vfree`` so that no stale translation of a freed area
survives (an over-flush, never an under-flush).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Protocol

from emu import pagetable as pt

from . import gfp as G
from .cpa import Cpa
from .layout import PAGE_SIZE, PMD_SIZE
from .owner import PageOwner

_POLICY_GFP = int(G.GFP_UNMAPPED | G.GFP_PTE_MAPPED)

__all__ = ["PageAllocator", "VmFlags", "VmStruct", "Vmalloc", "VmallocBadRequest", "VmallocError",
           "VmallocNoSpace", "vm_area_alloc_pages_bulk"]


class PageAllocator(Protocol):
    """The kernel's page allocator as its users call it (``Kernel`` is one:
    the policy's routing and GFP_UNMAPPED handling included)."""

    def alloc_pages(self, gfp: int, order: int = 0, *, owner: PageOwner = PageOwner.NONE
                    ) -> int: ...
    def free_pages(self, pfn: int, order: int = 0, *, owner: PageOwner = PageOwner.NONE
                   ) -> None: ...
    def split_pages(self, pfn: int, order: int) -> None: ...
    def alloc_pages_bulk(self, gfp: int, nr_pages: int, *, owner: PageOwner = PageOwner.NONE
                         ) -> list[int]: ...
    def free_pages_bulk(self, pfns: list[int], *, owner: PageOwner = PageOwner.NONE
                        ) -> None: ...


def vm_area_alloc_pages_bulk(page_alloc: PageAllocator, pages: list[int], nr_pages: int,
                             gfp: int, *, per_call: int = 100,
                             owner: PageOwner = PageOwner.NONE) -> None:
    """``vm_area_alloc_pages`` for order 0 (5.13+): the bulk allocator, at
    most ``per_call`` pages a call (vmalloc's 100), until a call gives fewer
    than asked; then one ``alloc_pages`` a page for the rest. Appends to
    ``pages`` as it goes (a caller's rollback frees what was taken)."""
    while len(pages) < nr_pages:
        request = min(per_call, nr_pages - len(pages))
        got = page_alloc.alloc_pages_bulk(gfp, request, owner=owner)
        pages.extend(got)
        if len(got) != request:
            break
    while len(pages) < nr_pages:
        pages.append(page_alloc.alloc_pages(gfp, 0, owner=owner))


class VmallocError(Exception):
    """A vmalloc or vfree that could not be done; nothing changed."""


class VmallocNoSpace(VmallocError, MemoryError):
    """No room for the area in the address range (a MemoryError, as the
    kernel's NULL from vmalloc is an out-of-memory condition)."""


class VmallocBadRequest(VmallocError, ValueError):
    """A bad size, a vfree of an address that starts no area, or a range
    under a large mapping."""


class VmFlags(enum.IntFlag):
    ALLOC = 0x2
    FLUSH_RESET_PERMS = 0x100     # VM_FLUSH_RESET_PERMS
    ALLOW_HUGE_VMAP = 0x400       # VM_ALLOW_HUGE_VMAP


@dataclass
class VmStruct:
    """``struct vm_struct``: one area (the guard page is not in ``size``)."""

    addr: int
    size: int
    flags: VmFlags
    pages: list[int] = field(default_factory=list)   # first PFN of each chunk
    page_order: int = 0
    caller: str = ""

    @property
    def nr_pages(self) -> int:
        return len(self.pages) << self.page_order

    def pfns(self) -> list[int]:
        step = 1 << self.page_order
        return [p + i for p in self.pages for i in range(step)]


class Vmalloc:
    """The vmalloc space: areas, their page tables (through CPA's
    ``pgt``), their pages (from ``pages``) and the shadow record."""

    def __init__(self, pages: PageAllocator, cpa: Cpa) -> None:
        self.page_alloc = pages
        self.cpa = cpa
        self.pgt = cpa.pgt
        self.shadow = cpa.shadow
        #: vm_area_alloc_pages takes high orders (the kernel record says)
        self.high_order = cpa.version.vmalloc_high_order
        #: ... or order-0 pages from the bulk allocator (5.13+)
        self.bulk = cpa.version.vmalloc_bulk
        self._busy: list[tuple[int, int]] = []      # sorted (start, end incl. guard)
        self.areas: dict[int, VmStruct] = {}

    # -- address space ----------------------------------------------------

    def _find_range(self, size: int, align: int, start: int, end: int) -> int:
        """Lowest aligned gap of ``size`` (+ a guard page) in [start, end)."""
        need = size + PAGE_SIZE
        cur = -(-start // align) * align
        i = bisect.bisect_left(self._busy, (start, start))
        if i > 0 and self._busy[i - 1][1] > cur:
            cur = -(-self._busy[i - 1][1] // align) * align
        while True:
            nxt = self._busy[i][0] if i < len(self._busy) else end
            if cur + need <= min(nxt, end):
                return cur
            if i >= len(self._busy) or nxt >= end:
                raise VmallocNoSpace(f"vmalloc: no {size:#x} bytes free in [{start:#x}, {end:#x})")
            cur = -(-self._busy[i][1] // align) * align
            i += 1

    # -- allocation -------------------------------------------------------

    def vmalloc_node_range(self, size: int, align: int = PAGE_SIZE, start: int | None = None,
                           end: int | None = None, gfp: int = int(G.GFP_KERNEL),
                           prot: int | None = None, flags: VmFlags = VmFlags(0),
                           caller: str = "") -> VmStruct:
        """``__vmalloc_node_range``: returns the new area (``start``/``end``:
        VMALLOC_START/VMALLOC_END of the kernel's layout unless given)."""
        start = self.pgt.layout.vmalloc_start if start is None else start
        end = self.pgt.layout.vmalloc_end if end is None else end
        if not isinstance(size, int) or size <= 0:
            raise VmallocBadRequest(f"vmalloc: bad size {size!r}")
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        huge = bool(flags & VmFlags.ALLOW_HUGE_VMAP) and size >= PMD_SIZE
        order = 9 if huge else 0
        if huge:
            size = -(-size // PMD_SIZE) * PMD_SIZE
            align = max(align, PMD_SIZE)
        addr = self._find_range(size, align, start, end)
        prot = self.pgt.prot.PAGE_KERNEL if prot is None else prot
        pages: list[int] = []
        try:
            # A policy routes GFP_UNMAPPED/GFP_PTE_MAPPED requests and hands
            # out blocks it tracks by their order: those stay order-0.
            if self.high_order and not huge and not gfp & _POLICY_GFP:
                self._alloc_high_order(pages, size >> 12, gfp)
            elif self.bulk and not huge:
                vm_area_alloc_pages_bulk(self.page_alloc, pages, size >> 12, gfp,
                                         owner=PageOwner.VMALLOC)
            else:
                for _ in range(size >> (12 + order)):
                    pages.append(self.page_alloc.alloc_pages(gfp, order, owner=PageOwner.VMALLOC))
        except MemoryError:
            for p in pages:
                self.page_alloc.free_pages(p, order, owner=PageOwner.VMALLOC)
            raise
        area = VmStruct(addr, size, VmFlags.ALLOC | flags, pages, order, caller)
        bisect.insort(self._busy, (addr, addr + size + PAGE_SIZE))
        self.areas[addr] = area
        self._map(area, prot)
        self.shadow.map_vmalloc(addr, area.pfns(), prot)
        return area

    def _alloc_high_order(self, pages: list[int], nr_pages: int, gfp: int) -> None:
        """``vm_area_alloc_pages`` of kernels that take high orders: the
        largest order (up to a PMD's worth) that fits what is left, one
        order lower when that fails, each block split into order-0 pages
        (the area still maps and frees 4K pages). Appends to ``pages`` as
        it goes, so the caller's rollback frees what was taken."""
        alloc, split = self.page_alloc.alloc_pages, self.page_alloc.split_pages
        left = nr_pages
        order = min(9, left.bit_length() - 1)
        while left:
            order = min(order, left.bit_length() - 1)
            try:
                pfn = alloc(gfp, order, owner=PageOwner.VMALLOC)
            except MemoryError:
                if order == 0:
                    raise
                order -= 1
                continue
            if order:
                split(pfn, order)
            pages.extend(range(pfn, pfn + (1 << order)))
            left -= 1 << order

    def _map(self, area: VmStruct, prot: int) -> None:
        """``vmap_pages_range``: PTEs (or PMD leaves) in the kernel tables."""
        pgt = self.pgt
        level = 2 if area.page_order == 9 else 1
        step = pt.level_size(level)
        for i, pfn in enumerate(area.pages):
            va = area.addr + i * step
            slot = self._walk_alloc(va, level)
            leaf = (pfn << 12) | prot | (int(pt.PteFlags.PS) if level == 2 else 0)
            pgt.set(slot, leaf)

    def _walk_alloc(self, va: int, level: int) -> int:
        """Slot of the entry at ``level`` for ``va``, allocating tables
        (``pte_alloc_kernel`` & co) on the way."""
        pgt = self.pgt
        table = pgt.root
        for lvl in range(pgt.levels, level, -1):
            slot = pgt.slot(table, pt.table_index(va, lvl))
            entry = pgt.get(slot)
            if entry == 0:
                table = pgt.populate(slot, "vmalloc")
            elif entry & pt.PteFlags.PS:
                raise VmallocBadRequest(f"vmalloc: {va:#x} lies under a large mapping")
            else:
                table = entry & pt.ADDR_MASK
        return pgt.slot(table, pt.table_index(va, level))

    def preallocate_vmalloc_pages(self, paging_levels: int | None = None) -> list[int]:
        """``preallocate_vmalloc_pages`` (arch/x86/mm/init_64.c, the end of
        ``mem_init``): a table page under every top-level entry that covers
        [VMALLOC_START, VMALLOC_END], so that no vmalloc mapping ever has to
        be synced into other page tables. With 5-level paging that is a P4D
        page per PGD entry (50: 12.5 PB / 256 TB); with 4-level the P4D is
        folded and it is a PUD page per PGD entry (64: 32 TB / 512 GB). Each
        is an order-0 GFP_PGTABLE_KERNEL page, linked now, never freed.

        ``paging_levels``: the mode whose count to make (default: the
        tables' own). The default kernel has 4-level tables and the boot
        allocations of its record's machine, which for 6.1 and 7.2 ran
        5-level: it then makes that machine's 50 pages, under the first 50
        of its 64 entries (the rest stay lazy; vmalloc fills its space from
        the bottom). Returns the tables' physical addresses, in order."""
        pgt = self.pgt
        shift = 12 + 9 * ((paging_levels or pgt.levels) - 1)     # PGDIR_SHIFT
        if paging_levels is None or paging_levels == pgt.levels:
            lay = pgt.layout
        else:
            from .layout import layout_for
            lay = layout_for(paging_levels)
        count = (lay.vmalloc_end >> shift) - (lay.vmalloc_start >> shift) + 1
        top = 12 + 9 * (pgt.levels - 1)
        made: list[int] = []
        addr = pgt.layout.vmalloc_start
        # for (addr = VMALLOC_START; addr <= VMEMORY_END; addr = ALIGN(addr + 1, PGDIR_SIZE))
        for _ in range(count):
            if addr > pgt.layout.vmalloc_end:
                break
            slot = pgt.slot(pgt.root, pt.table_index(addr, pgt.levels))
            if pgt.get(slot) == 0:
                made.append(pgt.populate(slot, "vmalloc"))
            addr = ((addr >> top) + 1) << top
        return made

    def find_area(self, addr: int) -> VmStruct:
        try:
            return self.areas[addr]
        except KeyError:
            raise VmallocBadRequest(f"vfree({addr:#x}): not the start of a vmalloc area") from None

    def reserve_range(self, start: int, size: int) -> None:
        """Keep [start, start + size) out of the address space (an area of a
        real kernel's state the model does not own: new areas go around it,
        as they would in that kernel). ``size`` includes the guard page, as
        ``vm_struct.size`` does."""
        if not isinstance(size, int) or size <= 0 or start % PAGE_SIZE:
            raise VmallocBadRequest(f"vmalloc: bad range {start:#x}+{size!r}")
        i = bisect.bisect_left(self._busy, (start, start))
        if (i > 0 and self._busy[i - 1][1] > start) or \
                (i < len(self._busy) and self._busy[i][0] < start + size):
            raise VmallocBadRequest(f"vmalloc: {start:#x}+{size:#x} overlaps an area")
        self._busy.insert(i, (start, start + size))

    def set_vm_flush_reset_perms(self, addr: int) -> None:
        self.find_area(addr).flags |= VmFlags.FLUSH_RESET_PERMS

    # -- free ---------------------------------------------------------------

    def vfree(self, addr: int) -> None:
        area = self.find_area(addr)     # a bad address raises before anything changes
        cpa = self.cpa
        # Pages out of the direct map with a whole 2M taken out (an
        # unmapped-alloc chunk's: never in it) are left to their allocator:
        # invalidating one would split the 2M, and resetting it would map
        # it back (the 2023 design: the cache, not vfree, owns their mapping)
        pfns = [p for p in area.pfns() if not cpa.unmapped_whole(p)] \
            if area.flags & VmFlags.FLUSH_RESET_PERMS else []
        if pfns:
            for pfn in pfns:
                try:
                    cpa.set_direct_map_invalid_noflush(pfn)
                except MemoryError:
                    # vm_reset_perms ignores what set_direct_map_* return: a
                    # page whose invalidation needs a split it cannot get is
                    # still under a large page, whose attributes it has
                    # never left (the default): nothing to reset.
                    pass
            lo = min(cpa.pfn_to_virt(min(pfns)), area.addr)
            hi = max(cpa.pfn_to_virt(max(pfns) + 1), area.addr + area.size)
            # _vm_unmap_aliases: one flush over the union of both ranges.
            cpa.tlb.flush_tlb_kernel_range(lo, hi)
            for pfn in pfns:
                cpa.set_direct_map_default_noflush(pfn)
        self._unmap(area)
        self.shadow.unmap_vmalloc(area.addr, area.size // PAGE_SIZE)
        cpa.tlb.flush_tlb_kernel_range(area.addr, area.addr + area.size)
        if area.page_order == 0:
            # vm_area_free_pages: free_pages_bulk (contiguous runs as blocks on 7.x)
            self.page_alloc.free_pages_bulk(area.pages, owner=PageOwner.VMALLOC)
        else:
            for p in area.pages:
                self.page_alloc.free_pages(p, area.page_order, owner=PageOwner.VMALLOC)
        del self.areas[addr]
        self._busy.remove((area.addr, area.addr + area.size + PAGE_SIZE))

    def _unmap(self, area: VmStruct) -> None:
        pgt = self.pgt
        level = 2 if area.page_order == 9 else 1
        step = pt.level_size(level)
        for i in range(len(area.pages)):
            found = pgt.lookup_slot(area.addr + i * step)
            if found is not None:
                pgt.set(found[0], 0)
