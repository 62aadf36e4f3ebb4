"""The per-CPU page lists (pcp) of the one CPU modelled.

Mirrors, from ``mm/page_alloc.c``:

- allocation: ``rmqueue_pcplist`` / ``__rmqueue_pcplist`` and ``rmqueue_bulk``
  (6.7+: ``nr_pcp_alloc``, the refill scaled by ``alloc_factor`` and
  ``pcp->high`` grown toward ``high_max``);
- freeing: ``free_unref_page`` / ``free_unref_page_commit``, ``nr_pcp_free``
  (with the ``free_factor`` heuristic; 6.7+: ``free_count``, ``nr_pcp_high``
  and the PCPF_* flags) and ``free_pcppages_bulk``;
- ``drain_pages`` / ``drain_pages_zone`` (``drain_all_pages`` of one CPU).

A pcp list is a ``deque`` of ``pfn << 4 | pcppage_migratetype`` whose left end
is the kernel list's head. ``PcpMixin`` holds the allocator's methods of this
seam (see ``buddy.py``); it uses ``__rmqueue`` (``_rmqueue_inner``, alloc.py),
``__free_one_page`` / ``free_one_page`` (buddy core) and ``_resolve_zone`` (zone).
"""

from __future__ import annotations

from collections import deque

from ._native import cbuddy
from .types import (
    HIGHATOMIC,
    MIGRATE_PCPTYPES,
    MOVABLE,
    NR_LOWORDER_PCP_LISTS,
    NR_PCP_LISTS,
    PAGE_ALLOC_COSTLY_ORDER,
    PAGEBLOCK_ORDER,
    PCP_BATCH_SCALE_MAX,
    PG_PCP,
    RMQUEUE_CLAIM,
    RMQUEUE_NORMAL,
    WMARK_HIGH,
    ZoneType,
    pindex_to_order,
)
from .zone import PerCpuPages, Zone

__all__ = ["PcpMixin"]


class PcpMixin:
    """The allocator's per-CPU pagesets: refill, free, drain."""

    _state: memoryview
    _pcp_legacy: bool
    _pcp_autotune: bool
    _pageblock_mt: memoryview

    # ------------------------------------------------------------------ allocation

    def _rmqueue_pcplist(self, zone: Zone, order: int, mt: int, alloc_flags: int,
                         bulk: bool = False) -> int:
        """``rmqueue_pcplist`` / ``__rmqueue_pcplist``: take the head of the pcp
        list, refilling an empty list with ``batch`` (scaled down by order;
        6.7+: ``nr_pcp_alloc``) blocks from the buddy. ``bulk``: the bulk
        allocator calls ``__rmqueue_pcplist`` itself, leaving
        ``free_factor`` / ``free_count`` alone."""
        pcp = zone.pcp
        # order_to_pindex, inline
        lst = pcp.lists[MIGRATE_PCPTYPES * order + mt if order <= PAGE_ALLOC_COSTLY_ORDER
                        else NR_LOWORDER_PCP_LISTS]
        if not lst:
            if self._pcp_autotune:
                batch = self._nr_pcp_alloc(pcp, zone, order)
            else:
                batch = pcp.batch
                if batch > 1:
                    batch = max(batch >> order, 2)
            alloced = self._rmqueue_bulk(zone, order, batch, lst, mt, alloc_flags)
            pcp.count += alloced << order
            if not lst:
                return -1
        if not bulk:
            # on allocation, fewer pages are batch freed (nr_pcp_free)
            if self._pcp_autotune:
                pcp.free_count >>= 1
            else:
                pcp.free_factor >>= 1
        pcp.count -= 1 << order
        return lst.popleft() >> 4

    @staticmethod
    def _nr_pcp_alloc(pcp: PerCpuPages, zone: Zone, order: int) -> int:
        """6.7+ ``nr_pcp_alloc``: ``high`` clamped to [high_min, high_max] and
        grown by the refill unless the zone is below its high watermark; an
        order-0 refill doubles (``alloc_factor``, up to
        PCP_BATCH_SCALE_MAX) while allocations go on without frees, within
        what ``high`` leaves room for."""
        base_batch = pcp.batch
        high_min, high_max = pcp.high_min, pcp.high_max
        high = pcp.high = min(max(pcp.high, high_min), high_max)
        if high < base_batch:          # pcp disabled, or the boot pageset
            return 1
        batch = base_batch if order else base_batch << pcp.alloc_factor
        if high_min != high_max and not zone.below_high:
            high = pcp.high = min(high + batch, high_max)
        if not order:
            max_nr_alloc = max(high - pcp.count - base_batch, base_batch)
            if batch <= max_nr_alloc and pcp.alloc_factor < PCP_BATCH_SCALE_MAX:
                pcp.alloc_factor += 1
            batch = min(batch, max_nr_alloc)
        if batch > 1:
            batch = max(batch >> order, 2)
        return batch

    def _rmqueue_bulk(self, zone: Zone, order: int, count: int, lst: deque[int], mt: int,
                      alloc_flags: int) -> int:
        """``rmqueue_bulk``: up to ``count`` blocks from the buddy to the pcp
        list's tail, in the physical order expand() produced them. (In C,
        when built, while ``__rmqueue_smallest`` finds blocks: ``_cbuddy.c``;
        ``__rmqueue`` here when it does not.)"""
        st = self._state
        code = PG_PCP | order
        n = 0
        if self._claim_or_steal:
            # 6.15+: each call starts in the mode the last one found pages in
            mode = RMQUEUE_NORMAL
            moded = self._rmqueue_moded
            while n < count:
                if cbuddy is not None and mode == RMQUEUE_NORMAL:
                    # __rmqueue_smallest in C while it finds blocks; then on
                    # from the claim (the requested type's lists are empty)
                    n += cbuddy.rmqueue_bulk(self, zone, order, count - n, lst, mt, code)
                    if n >= count:
                        break
                    mode = RMQUEUE_CLAIM
                pfn, mode = moded(zone, order, mt, alloc_flags, mode)
                if pfn < 0:
                    break
                st[pfn] = code
                lst.append(pfn << 4 | mt)
                n += 1
            return n
        rmqueue = self._rmqueue_inner
        while n < count:
            if cbuddy is not None:
                n += cbuddy.rmqueue_bulk(self, zone, order, count - n, lst, mt, code)
                if n >= count:
                    break
            # __rmqueue: the smallest block (none, when C just stopped), else
            # a fallback type's
            pfn = rmqueue(zone, order, mt, alloc_flags)
            if pfn < 0:
                break
            st[pfn] = code
            lst.append(pfn << 4 | mt)    # set_pcppage_migratetype(page, mt)
            n += 1
        return n

    # ------------------------------------------------------------------ freeing

    def _free_unref_page(self, zone: Zone, pfn: int, order: int, mt: int) -> None:
        """``free_unref_page`` of a pcp order: HIGHATOMIC pages go on the MOVABLE
        list (so those areas come back); ISOLATE (and registered types) bypass
        the pcp. Then ``free_unref_page_commit``: onto the list's head, and a
        drain of ``nr_pcp_free`` pages once ``high`` is reached."""
        list_mt = mt
        if mt >= MIGRATE_PCPTYPES:
            if mt != HIGHATOMIC:
                self._free_one_page_locked(zone, pfn, order, mt)
                return
            list_mt = MOVABLE
        # free_unref_page_commit
        pcp = zone.pcp
        # order_to_pindex, inline
        pindex = (MIGRATE_PCPTYPES * order + list_mt if order <= PAGE_ALLOC_COSTLY_ORDER
                  else NR_LOWORDER_PCP_LISTS)
        pcp.lists[pindex].appendleft(pfn << 4 | mt)
        self._state[pfn] = PG_PCP | order
        pcp.count += 1 << order
        if self._pcp_autotune:
            self._free_unref_page_commit_autotune(zone, pcp, order, pindex)
            return
        if self._pcp_legacy:
            # before 5.13/5.14: at high, free pcp->batch pages (no free_factor)
            if pcp.count >= pcp.high:
                self._free_pcppages_bulk_legacy(zone, pcp.batch, pcp)
            return
        # High-order non-THP pages freed without allocations in between are
        # drained at once: they would fragment otherwise.
        free_high = pcp.free_factor and order and order <= PAGE_ALLOC_COSTLY_ORDER
        high = 0 if free_high else pcp.high
        if pcp.count >= high:
            self._free_pcppages_bulk(zone, self._nr_pcp_free(pcp, high, pcp.batch, free_high),
                                     pcp, pindex)

    def _free_unref_page_commit_autotune(self, zone: Zone, pcp: PerCpuPages, order: int,
                                         pindex: int) -> None:
        """6.7+ ``free_unref_page_commit`` after the page is on its list:
        fewer pages batch allocated next (``alloc_factor``); high-order
        frees in a row (PCPF_PREV_FREE_HIGH_ORDER) with ``free_count`` past
        a batch and half of ``high_min`` drain the lists (``free_high``); ``nr_pcp_high`` moves
        ``high``; past it ``nr_pcp_free`` pages go back, and a zone back
        above its high watermark leaves ZONE_BELOW_HIGH."""
        pcp.alloc_factor >>= 1
        batch = pcp.batch
        free_high = False
        if order and order <= PAGE_ALLOC_COSTLY_ORDER:
            # free_count past a batch and half of high_min (6.15, "mm: pcp:
            # increase pcp->free_count threshold to trigger free_high"; 6.7
            # had a batch): 7.2's free_frozen_page_commit adds high_min / 2
            # to pcp->batch before the compare
            free_high = (pcp.free_count >= batch + pcp.high_min // 2
                         and pcp.prev_free_high_order
                         and (not pcp.free_high_batch or pcp.count >= batch))
            pcp.prev_free_high_order = True
        elif pcp.prev_free_high_order:
            pcp.prev_free_high_order = False
        if pcp.free_count < batch << PCP_BATCH_SCALE_MAX:
            pcp.free_count += 1 << order
        high = self._nr_pcp_high(pcp, zone, batch, free_high)
        if pcp.count >= high:
            if free_high:
                count = min(pcp.count, batch << PCP_BATCH_SCALE_MAX)
            elif high < batch:
                count = 1
            else:
                # nr_pcp_free: at least a batch, up to the pages freed in a
                # row, leaving a batch on the lists
                count = min(max(pcp.free_count, batch), high - batch)
            self._free_pcppages_bulk(zone, count, pcp, pindex)
            # zone_watermark_ok(..., ZONE_MOVABLE, 0): ZONE_MOVABLE is not
            # modelled (empty), so its lowmem reserve is the highest zone's
            if zone.below_high and self._zone_watermark_ok(
                    zone, 0, zone.watermark[WMARK_HIGH], max(ZoneType), 0, zone.free_pages):
                zone.below_high = False

    def decay_pcp_high(self, zone: Zone) -> bool:
        """6.7+ ``decay_pcp_high`` (vmstat_update, about once a second: a
        recorded trace marks each call): ``high`` an eighth nearer
        ``high_min`` (not below the count less ``batch << 5``), then what
        the lists hold past it drained a batch at a time, each batch from
        the first list on (7.2's loop, read off its disassembly). Returns
        whether there was something to do. A no-op before 6.7."""
        if not self._pcp_autotune:
            return False
        pcp = zone.pcp
        high_min, batch = pcp.high_min, pcp.batch
        todo = False
        if pcp.high > high_min:
            pcp.high = max(pcp.count - (batch << PCP_BATCH_SCALE_MAX),
                           pcp.high - (pcp.high >> 3), high_min)
            todo = pcp.high > high_min
        to_drain = pcp.count - pcp.high
        while to_drain > 0:
            n = min(to_drain, batch)
            self._free_pcppages_bulk(zone, n, pcp, 0)
            to_drain -= n
            todo = True
        return todo

    @staticmethod
    def _nr_pcp_high(pcp: PerCpuPages, zone: Zone, batch: int, free_high: bool) -> int:
        """6.7+ ``nr_pcp_high``: the count that triggers a drain, moving
        ``pcp->high`` (ZONE_RECLAIM_ACTIVE is never set: no reclaim is
        modelled)."""
        high_min, high_max = pcp.high_min, pcp.high_max
        high = pcp.high = min(max(pcp.high, high_min), high_max)
        if not high:
            return 0
        if free_high:
            pcp.high = max(high - (batch << PCP_BATCH_SCALE_MAX), high_min)
            return 0
        if high_min == high_max:
            return high
        if zone.below_high:
            pcp.high = max(high - max(pcp.free_count, batch), high_min)
            high = max(pcp.count, high_min)
        elif pcp.count >= high:
            need_high = pcp.free_count + batch
            # high should hold the pages freed in a row
            if pcp.high < need_high:
                pcp.high = min(max(need_high, high_min), high_max)
        return high

    @staticmethod
    def _nr_pcp_free(pcp: PerCpuPages, high: int, batch: int, free_high: bool) -> int:
        """``nr_pcp_free``: how many pages to drain, doubling while frees go on
        without allocations."""
        if free_high:
            return pcp.count
        if high < batch:
            return 1
        min_nr_free = batch
        max_nr_free = high - batch
        batch <<= pcp.free_factor
        if batch < max_nr_free:
            pcp.free_factor += 1
        return min(max(batch, min_nr_free), max_nr_free)

    def _free_pcppages_bulk(self, zone: Zone, count: int, pcp: PerCpuPages, pindex: int
                            ) -> None:
        """``free_pcppages_bulk``: round-robin over the pcp lists, starting with
        ``pindex``, from each list's tail, to ``__free_one_page``."""
        count = min(pcp.count, count)
        min_pindex, max_pindex = 0, NR_PCP_LISTS - 1
        pindex -= 1
        # 6.10+ (the AUTOTUNE kernels here) frees each page to its
        # pageblock's type now ("close migratetype race between freeing and
        # stealing"); before, to the type it was freed with, unless isolated
        isolated_pageblocks = self._pcp_autotune or zone.nr_isolate_pageblock > 0
        lists = pcp.lists
        st = self._state
        pbmt = self._pageblock_mt
        free_one = self._free_one_page
        while count > 0:
            while True:
                pindex += 1
                if pindex > max_pindex:
                    pindex = min_pindex
                lst = lists[pindex]
                if lst:
                    break
                if pindex == max_pindex:
                    max_pindex -= 1
                if pindex == min_pindex:
                    min_pindex += 1
            order = pindex_to_order(pindex)
            nr_pages = 1 << order
            while True:
                x = lst.pop()
                pfn, mt = x >> 4, x & 0xF
                count -= nr_pages
                pcp.count -= nr_pages
                if isolated_pageblocks:
                    mt = pbmt[pfn >> PAGEBLOCK_ORDER]
                st[pfn] = 0
                free_one(zone, pfn, order, mt)
                if count <= 0 or not lst:
                    break

    def _free_pcppages_bulk_legacy(self, zone: Zone, count: int, pcp: PerCpuPages) -> None:
        """5.10's ``free_pcppages_bulk`` (order-0 lists, one per pcp
        migratetype): round-robin from MOVABLE on, ``batch_free`` pages
        from each list's tail, one more for every empty list met (all of
        the only non-empty one); the pages are collected, then freed in that
        order."""
        count = min(pcp.count, count)
        mt = 0
        batch_free = 0
        taken: list[int] = []
        lists = pcp.lists
        while count:
            while True:
                batch_free += 1
                mt += 1
                if mt == MIGRATE_PCPTYPES:
                    mt = 0
                lst = lists[mt]
                if lst:
                    break
            if batch_free == MIGRATE_PCPTYPES:
                batch_free = count
            while True:
                taken.append(lst.pop())
                pcp.count -= 1
                count -= 1
                batch_free -= 1
                if not count or not batch_free or not lst:
                    break
        isolated = zone.nr_isolate_pageblock > 0
        st = self._state
        for x in taken:
            pfn, pmt = x >> 4, x & 0xF
            if isolated:
                pmt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
            st[pfn] = 0
            if cbuddy is not None:      # __free_one_page in C, without the method's frame
                cbuddy.free_one_page(self, zone, pfn, 0, pmt, False)
            else:
                self._free_one_page(zone, pfn, 0, pmt)

    def drain_pages(self, zone: Zone | ZoneType | int | None = None) -> None:
        """``drain_all_pages`` (or ``drain_pages_zone`` of one zone): return every
        pcp page to the buddy."""
        for z in self._resolve_zone(zone):
            if z.pcp.count:
                if self._pcp_legacy:
                    self._free_pcppages_bulk_legacy(z, z.pcp.count, z.pcp)
                else:
                    self._free_pcppages_bulk(z, z.pcp.count, z.pcp, 0)
