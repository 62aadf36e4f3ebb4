"""Handing boot memory to the buddy: ``memblock_free_all``.

Mirrors ``__free_pages_memory`` (``mm/memblock.c``) and, from
``mm/page_alloc.c``, ``memblock_free_pages`` -> ``__free_pages_core``, which
frees each block with ``FPI_TO_TAIL`` and adds it to ``zone->managed_pages``;
then ``init_per_zone_wmark_min`` recomputes the watermarks (``zone.py``).

``MemblockMixin`` holds the allocator's methods of this seam (see ``buddy.py``);
it uses ``_free_one_page`` (buddy core) and ``_setup_per_zone_wmarks`` (zone).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

import numpy as np

from .types import (
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MOVABLE,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    PG_ALLOC,
    PG_BUDDY,
    largest_aligned_order,
)
from .zone import Zone

__all__ = ["MemblockMixin"]


class MemblockMixin:
    """``memblock_free_all`` for the allocator: ``free_range``; later
    hand-overs of memblock-reserved pages: ``free_reserved_area``."""

    max_pfn: int
    watermarks_fixed: bool
    zones: list[Zone]
    _handed: list[list[int]]
    #: free memory whose struct pages are initialised late
    #: (CONFIG_DEFERRED_STRUCT_PAGE_INIT): [start, end) not given yet
    deferred: list[list[int]]
    #: the order deferred_free_range frees whole blocks in
    deferred_free_order: int
    _state: memoryview
    _state_np: np.ndarray
    _pageblock_np: np.ndarray
    _pageblock_mt: memoryview

    def free_range(self, start_pfn: int, end_pfn: int) -> None:
        """``memblock_free_all`` for [start_pfn, end_pfn): hand the pages to the
        buddy as the largest aligned blocks (``__free_pages_memory`` ->
        ``memblock_free_pages`` -> ``__free_pages_core``), placed at the tail of
        the free lists (FPI_TO_TAIL) and merged with free neighbours. Then the
        watermarks, lowmem reserves and pcp sizes are recomputed."""
        if not 0 <= start_pfn <= end_pfn <= self.max_pfn:
            raise ValueError(f"range [{start_pfn:#x}, {end_pfn:#x}) not within "
                             f"[0, {self.max_pfn:#x})")
        if start_pfn == end_pfn:
            return
        i = bisect.bisect_right(self._handed, [start_pfn, float("inf")])
        for s, e in self._handed[max(i - 1, 0):i + 1]:
            if s < end_pfn and start_pfn < e:
                raise ValueError(f"[{start_pfn:#x}, {end_pfn:#x}) overlaps pages already "
                                 f"given to the buddy [{s:#x}, {e:#x})")
        covered = sum(max(0, min(end_pfn, z.end_pfn) - max(start_pfn, z.start_pfn))
                      for z in self.zones)
        if covered != end_pfn - start_pfn:
            raise ValueError(f"[{start_pfn:#x}, {end_pfn:#x}) is not entirely inside zones")
        for zone in self.zones:
            s, e = max(start_pfn, zone.start_pfn), min(end_pfn, zone.end_pfn)
            if s < e:
                self._free_pages_memory(zone, s, e)
        self._insert_handed(start_pfn, end_pfn)
        if not self.watermarks_fixed:
            self._setup_per_zone_wmarks()

    def defer_range(self, start_pfn: int, end_pfn: int) -> None:
        """``memblock_free_all`` of a range whose struct pages are deferred
        (the node's highest zone past its first section): nothing is freed
        now; :meth:`page_alloc_init_late` or :meth:`deferred_free_range`
        frees it later. The watermarks wait for it."""
        if start_pfn < end_pfn:
            self.deferred.append([start_pfn, end_pfn])
            self.deferred.sort()

    def is_deferred(self, pfn: int) -> bool:
        """Whether ``pfn`` is free memory deferred struct-page init has not
        freed yet."""
        return any(s <= pfn < e for s, e in self.deferred)

    def deferred_free_range(self, start_pfn: int, end_pfn: int) -> None:
        """``deferred_free_range`` over [start_pfn, end_pfn) (all deferred):
        a whole aligned block of ``deferred_free_order`` (a pageblock; a
        MAX_ORDER block on 6.10+) is made MOVABLE and freed as one block,
        anything else a page at a time (a pageblock's first page making it
        MOVABLE), each with FPI_TO_TAIL (``__free_pages_core``). Once nothing
        is deferred, the watermarks are computed (the initcalls run after
        ``page_alloc_init_late``). Raises ValueError, changing nothing, if a
        page is not deferred."""
        if start_pfn >= end_pfn:
            return
        self._undefer(start_pfn, end_pfn)
        self._deferred_free(start_pfn, end_pfn)
        if not self.deferred and not self.watermarks_fixed:
            self._setup_per_zone_wmarks()

    def page_alloc_init_late(self) -> None:
        """``page_alloc_init_late`` -> ``deferred_init_memmap``: every
        deferred range freed as :meth:`deferred_free_range` frees it, in
        ascending order; whole MAX_ORDER blocks are freed at once (two
        pageblock frees that merge, at the list's tail, are the same
        block); then the watermarks."""
        ranges, self.deferred = self.deferred, []
        for s, e in ranges:
            head = min(e, -(-s // MAX_ORDER_NR_PAGES) * MAX_ORDER_NR_PAGES)
            mid = max(head, e // MAX_ORDER_NR_PAGES * MAX_ORDER_NR_PAGES)
            self._deferred_free(s, head)
            if mid > head:
                self._pageblock_np[head >> PAGEBLOCK_ORDER: mid >> PAGEBLOCK_ORDER] = MOVABLE
                self._free_max_order_blocks(self.page_zone(head), head, mid)
                self._insert_handed(head, mid)
            self._deferred_free(mid, e)
        if not self.watermarks_fixed:
            self._setup_per_zone_wmarks()

    def _undefer(self, start_pfn: int, end_pfn: int) -> None:
        """Take [start_pfn, end_pfn) out of the deferred ranges (ValueError,
        changing nothing, unless one range holds it all)."""
        for i, (s, e) in enumerate(self.deferred):
            if s <= start_pfn and end_pfn <= e:
                rest = [[s, start_pfn]] if s < start_pfn else []
                rest += [[end_pfn, e]] if end_pfn < e else []
                self.deferred[i: i + 1] = rest
                return
        raise ValueError(f"deferred_free_range [{start_pfn:#x}, {end_pfn:#x}): not "
                         "deferred memory")

    def _deferred_free(self, start_pfn: int, end_pfn: int) -> None:
        """The frees of deferred_free_range over [start_pfn, end_pfn), no
        longer in ``deferred``."""
        if start_pfn >= end_pfn:
            return
        zone = self.page_zone(start_pfn)
        order = self.deferred_free_order
        block = 1 << order
        pfn = start_pfn
        while pfn < end_pfn:
            if pfn % block == 0 and pfn + block <= end_pfn:
                for pb in range(pfn, pfn + block, PAGEBLOCK_NR_PAGES):
                    self._pageblock_mt[pb >> PAGEBLOCK_ORDER] = MOVABLE
                zone.managed_pages += block
                self._free_one_page(zone, pfn, order, MOVABLE, fpi_to_tail=True)
                pfn += block
                continue
            if pfn % PAGEBLOCK_NR_PAGES == 0:
                self._pageblock_mt[pfn >> PAGEBLOCK_ORDER] = MOVABLE
            zone.managed_pages += 1
            self._free_one_page(zone, pfn, 0, self._pageblock_mt[pfn >> PAGEBLOCK_ORDER],
                                fpi_to_tail=True)
            pfn += 1
        self._insert_handed(start_pfn, end_pfn)

    def _insert_handed(self, start_pfn: int, end_pfn: int) -> None:
        bisect.insort(self._handed, [start_pfn, end_pfn])
        merged: list[list[int]] = []
        for s, e in self._handed:
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        self._handed = merged

    def is_handed_over(self, pfn: int) -> bool:
        """Whether ``pfn`` was given to the buddy allocator (memblock_free_all
        or a later free of reserved memory); False: still reserved."""
        i = bisect.bisect_right(self._handed, [pfn, float("inf")])
        return i > 0 and self._handed[i - 1][0] <= pfn < self._handed[i - 1][1]

    def free_reserved_area(self, start_pfn: int, end_pfn: int) -> None:
        """``free_reserved_area``: pages memblock kept (the initrd, the init
        sections) given to the buddy allocator one at a time in ascending
        order, each as ``free_reserved_page`` does: its zone's managed pages
        one more (``adjust_managed_page_count``; the watermarks are not
        recomputed) and an order-0 ``__free_page``, through the per-CPU list.
        Raises ValueError, changing nothing, if a page was handed over
        already or lies outside the zones."""
        if not 0 <= start_pfn <= end_pfn <= self.max_pfn:
            raise ValueError(f"range [{start_pfn:#x}, {end_pfn:#x}) not within "
                             f"[0, {self.max_pfn:#x})")
        i = bisect.bisect_right(self._handed, [start_pfn, float("inf")])
        for s, e in self._handed[max(i - 1, 0):]:
            if s >= end_pfn:
                break
            if start_pfn < e:
                raise ValueError(f"free_reserved_area [{start_pfn:#x}, {end_pfn:#x}): pages "
                                 f"[{max(s, start_pfn):#x}, {min(e, end_pfn):#x}) were "
                                 "given to the buddy already")
        zones = [self.page_zone(pfn) for pfn in range(start_pfn, end_pfn)]
        if start_pfn == end_pfn:
            return
        self._insert_handed(start_pfn, end_pfn)
        st = self._state
        for pfn, zone in zip(range(start_pfn, end_pfn), zones):
            zone.managed_pages += 1
            st[pfn] = PG_ALLOC                  # init_page_count: an order-0 page in use
            self.free_pages(pfn, 0)

    def _free_pages_memory(self, zone: Zone, start: int, end: int) -> None:
        """``__free_pages_memory``: largest aligned blocks, in increasing pfn order;
        the run of whole MAX_ORDER blocks is filled with slice assignments."""
        mask = MAX_ORDER_NR_PAGES - 1
        while start < end and start & mask:
            start += self._free_pages_core(zone, start, end)
        mid_end = max(start, end & ~mask)
        if mid_end > start:
            self._free_max_order_blocks(zone, start, mid_end)
            start = mid_end
        while start < end:
            start += self._free_pages_core(zone, start, end)

    def _free_pages_core(self, zone: Zone, start: int, end: int) -> int:
        """``__free_pages_core`` of the largest aligned block at ``start``; returns its size."""
        order = largest_aligned_order(start, end)
        zone.managed_pages += 1 << order
        self._free_one_page(zone, start, order, self._pageblock_mt[start >> PAGEBLOCK_ORDER],
                            fpi_to_tail=True)
        return 1 << order

    def _free_max_order_blocks(self, zone: Zone, start: int, end: int) -> None:
        """``__free_one_page`` of each MAX_ORDER-1 block in [start, end) with
        FPI_TO_TAIL, vectorised: such blocks have no buddy to merge with."""
        top = MAX_ORDER - 1
        n = (end - start) >> top
        self._state_np[start:end:MAX_ORDER_NR_PAGES] = PG_BUDDY | top
        heads = np.arange(start, end, MAX_ORDER_NR_PAGES, dtype=np.int64)
        mts = self._pageblock_np[start >> PAGEBLOCK_ORDER:end >> PAGEBLOCK_ORDER:
                                 1 << (top - PAGEBLOCK_ORDER)]
        area = zone.free_area[top]
        groups = ([(int(mts[0]), heads)] if mts.min() == mts.max()
                  else [(int(mt), heads[mts == mt]) for mt in np.unique(mts)])
        for mt, sel in groups:
            # The kernel list gets sel[0], sel[1], ... appended at its tail; the
            # OrderedDict keeps the list's tail first, so the new blocks go in
            # front of the old entries, highest pfn first.
            new = OrderedDict.fromkeys(sel[::-1].tolist())
            if area[mt]:
                new.update(area[mt])
            area[mt] = new
        zone.managed_pages += n << top
        zone.free_pages += n << top
