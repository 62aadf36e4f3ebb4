"""Fallback to other migratetypes, pageblock stealing, the high-atomic reserve.

Mirrors, from ``mm/page_alloc.c``:

- ``fallbacks[]`` (``FALLBACKS``), ``can_steal_fallback``,
  ``find_suitable_fallback``, ``__rmqueue_fallback``,
  ``steal_suitable_fallback`` and ``change_pageblock_range`` (up to 6.9);
- 6.15+: ``__rmqueue`` with its modes, ``__rmqueue_claim``,
  ``try_to_claim_block`` and ``__rmqueue_steal`` (``FallbackScheme``);
- ``move_freepages_block`` / ``move_freepages``;
- ``reserve_highatomic_pageblock`` and ``unreserve_highatomic_pageblock``.

``FallbackMixin`` holds the allocator's methods of this seam (see
``buddy.py``); it uses the free-list and pageblock helpers of the buddy core
(``_move_to_free_list``, ``_set_pageblock_migratetype``, ``_find_block``,
``_check_migratetype``), ``page_zone`` (zone) and ``_prepare_alloc_pages``
(alloc.py).
"""

from __future__ import annotations

from .types import (
    ALLOC_NOFRAGMENT,
    HIGHATOMIC,
    KIND_MASK,
    MAX_ORDER,
    MOVABLE,
    ORDER_MASK,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    PG_ALLOC_MOVABLE,
    PG_BUDDY,
    RECLAIMABLE,
    RMQUEUE_CLAIM,
    RMQUEUE_NORMAL,
    RMQUEUE_STEAL,
    UNMOVABLE,
    migratetype_is_mergeable,
)
from .zone import Zone

__all__ = ["FALLBACKS", "FallbackMixin"]

# 6.1 ``fallbacks[]``: the types a request may steal from, in order of preference.
FALLBACKS: tuple[tuple[int, ...], ...] = (
    (RECLAIMABLE, MOVABLE),     # UNMOVABLE
    (RECLAIMABLE, UNMOVABLE),   # MOVABLE
    (UNMOVABLE, MOVABLE),       # RECLAIMABLE
    (),                         # HIGHATOMIC
    (),                         # ISOLATE
)


class FallbackMixin:
    """The allocator's fallback and stealing between migratetypes."""

    page_group_by_mobility_disabled: bool
    _fallbacks: list[tuple[int, ...]]
    _ac_cache: dict[int, tuple]
    _state: memoryview
    _pageblock_mt: memoryview

    # ------------------------------------------------------------------ fallback

    def _can_steal_fallback(self, order: int, start_mt: int) -> bool:
        """``can_steal_fallback``: whether the whole pageblock may be taken."""
        if order >= PAGEBLOCK_ORDER:
            return True
        return (order >= PAGEBLOCK_ORDER // 2 or start_mt == RECLAIMABLE
                or start_mt == UNMOVABLE or self.page_group_by_mobility_disabled)

    def _find_suitable_fallback(self, zone: Zone, order: int, start_mt: int,
                                only_stealable: bool) -> tuple[int, bool]:
        """``find_suitable_fallback``: (fallback migratetype or -1, can_steal)."""
        area = zone.free_area[order]
        can_steal = False
        for fallback_mt in self._fallbacks[start_mt]:
            if not area[fallback_mt]:
                continue
            if self._can_steal_fallback(order, start_mt):
                can_steal = True
            if not only_stealable or can_steal:
                return fallback_mt, can_steal
        return -1, can_steal

    def _rmqueue_fallback(self, zone: Zone, order: int, start_mt: int, alloc_flags: int
                          ) -> bool:
        """``__rmqueue_fallback``: take the *largest* block of a fallback type
        (approximating the pageblock with most free pages), or for a movable
        request that cannot steal the block, the smallest; move it (and
        perhaps its whole pageblock) to the requested type's lists."""
        min_order = PAGEBLOCK_ORDER if alloc_flags & ALLOC_NOFRAGMENT else order
        found = -1
        can_steal = False
        current_order = MAX_ORDER - 1
        while current_order >= min_order:
            fallback_mt, can_steal = self._find_suitable_fallback(zone, current_order,
                                                                  start_mt, False)
            if fallback_mt != -1:
                found = fallback_mt
                break
            current_order -= 1
        if found == -1:
            return False
        if not can_steal and start_mt == MOVABLE and current_order > order:
            # find_smallest: stealing a single small block does not fragment
            # for long; split the smallest available one.
            for current_order in range(order, MAX_ORDER):
                found, can_steal = self._find_suitable_fallback(zone, current_order,
                                                                start_mt, False)
                if found != -1:
                    break
        pfn = next(reversed(zone.free_area[current_order][found]))   # list head
        self._steal_suitable_fallback(zone, pfn, current_order, alloc_flags, start_mt,
                                      can_steal)
        return True

    def _steal_suitable_fallback(self, zone: Zone, pfn: int, current_order: int,
                                 alloc_flags: int, start_type: int, whole_block: bool) -> None:
        """``steal_suitable_fallback``: move the free pages of the block's
        pageblock to ``start_type`` and claim the pageblock when at least half
        of it is free or compatible; otherwise move just this block."""
        old_block_type = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        if old_block_type != HIGHATOMIC:
            if current_order >= PAGEBLOCK_ORDER:
                # Take ownership for orders >= pageblock_order.
                self._change_pageblock_range(pfn, current_order, start_type)
            elif whole_block:
                free_pages, movable_pages = self._move_freepages_block(zone, pfn, start_type)
                alike_pages = self._alike_pages(start_type, old_block_type, free_pages,
                                                movable_pages)
                if free_pages:   # moving the whole block fails at zone boundaries
                    if (free_pages + alike_pages >= 1 << (PAGEBLOCK_ORDER - 1)
                            or self.page_group_by_mobility_disabled):
                        self._set_pageblock_migratetype(pfn, start_type)
                    return
        self._move_to_free_list(zone, pfn, current_order, start_type)

    # ------------------------------------------------------------------ 6.15+: claim or steal

    def _rmqueue_moded(self, zone: Zone, order: int, mt: int, alloc_flags: int,
                       mode: int) -> tuple[int, int]:
        """6.15+ ``__rmqueue``: the requested type's lists, then a fallback
        pageblock claimed, then one block stolen (not under
        ALLOC_NOFRAGMENT), starting at ``mode``: (pfn or -1, the mode to
        start the next call of the same ``rmqueue_bulk`` at)."""
        if mode == RMQUEUE_NORMAL:
            pfn = self._rmqueue_smallest(zone, order, mt)
            if pfn >= 0:
                return pfn, mode
            mode = RMQUEUE_CLAIM
        if mode == RMQUEUE_CLAIM:
            pfn = self._rmqueue_claim(zone, order, mt, alloc_flags)
            if pfn >= 0:
                return pfn, RMQUEUE_NORMAL      # the requested type's lists refilled
        if not alloc_flags & ALLOC_NOFRAGMENT:
            pfn = self._rmqueue_steal(zone, order, mt)
            if pfn >= 0:
                return pfn, RMQUEUE_STEAL
        return -1, mode

    def _rmqueue_claim(self, zone: Zone, order: int, start_mt: int, alloc_flags: int) -> int:
        """``__rmqueue_claim``: from the largest order down, while blocks of
        that order may claim their pageblock (``should_try_claim_block``,
        the old ``can_steal_fallback``), the head block of the first
        fallback type with one, if ``try_to_claim_block`` can claim it."""
        min_order = (PAGEBLOCK_ORDER if order < PAGEBLOCK_ORDER and alloc_flags & ALLOC_NOFRAGMENT
                     else order)
        for current_order in range(MAX_ORDER - 1, min_order - 1, -1):
            if not self._can_steal_fallback(current_order, start_mt):
                break                               # orders too low to claim
            fallback_mt = self._find_suitable_fallback(zone, current_order, start_mt, False)[0]
            if fallback_mt < 0:
                continue
            head = next(reversed(zone.free_area[current_order][fallback_mt]))
            pfn = self._try_to_claim_block(zone, head, current_order, order, start_mt,
                                           fallback_mt)
            if pfn >= 0:
                return pfn
        return -1

    def _try_to_claim_block(self, zone: Zone, pfn: int, current_order: int, order: int,
                            start_type: int, block_type: int) -> int:
        """``try_to_claim_block``: a block of a pageblock or more becomes the
        requested type's and is split for the request; a smaller one's
        pageblock is claimed (its free blocks moved, its type set) when at
        least half of it is free or alike (``prep_move_freepages_block``
        counts; no watermark boost is modelled), and the request taken from
        the requested type's lists; -1 when not."""
        if current_order >= PAGEBLOCK_ORDER:
            del zone.free_area[current_order][block_type][pfn]   # del_page_from_free_list
            self._state[pfn] = 0
            zone.free_pages -= 1 << order
            self._change_pageblock_range(pfn, current_order, start_type)
            self._expand(zone, pfn, order, current_order, start_type)
            return pfn
        start = pfn & ~(PAGEBLOCK_NR_PAGES - 1)
        if not (zone.zone_spans_pfn(start) and zone.zone_spans_pfn(start + PAGEBLOCK_NR_PAGES - 1)):
            return -1                   # straddles a zone boundary
        free_pages, movable_pages = self._move_freepages(zone, start,
                                                         start + PAGEBLOCK_NR_PAGES - 1,
                                                         start_type, move=False)
        alike_pages = self._alike_pages(start_type, block_type, free_pages, movable_pages)
        if free_pages + alike_pages >= 1 << (PAGEBLOCK_ORDER - 1) \
                or self.page_group_by_mobility_disabled:
            self._move_freepages(zone, start, start + PAGEBLOCK_NR_PAGES - 1, start_type)
            self._set_pageblock_migratetype(start, start_type)
            return self._rmqueue_smallest(zone, order, start_type)
        return -1

    def _rmqueue_steal(self, zone: Zone, order: int, start_mt: int) -> int:
        """``__rmqueue_steal``: the smallest block of a fallback type, split
        on that type's lists (``page_del_and_expand``); its pageblock keeps
        its type."""
        for current_order in range(order, MAX_ORDER):
            fallback_mt = self._find_suitable_fallback(zone, current_order, start_mt, False)[0]
            if fallback_mt >= 0:
                return self._page_del_and_expand(zone, order, current_order, fallback_mt)
        return -1

    @staticmethod
    def _alike_pages(start_type: int, block_type: int, free_pages: int,
                     movable_pages: int) -> int:
        """How many of a pageblock's pages are compatible with the request:
        for a movable one the movable pages; an unmovable/reclaimable one
        taking from a MOVABLE block counts every non-movable page."""
        if start_type == MOVABLE:
            return movable_pages
        if block_type == MOVABLE:
            return PAGEBLOCK_NR_PAGES - (free_pages + movable_pages)
        return 0

    def _change_pageblock_range(self, pfn: int, order: int, mt: int) -> None:
        """``change_pageblock_range``."""
        for p in range(pfn, pfn + (1 << order), PAGEBLOCK_NR_PAGES):
            self._set_pageblock_migratetype(p, mt)

    # ------------------------------------------------------------------ high-atomic reserve

    def _reserve_highatomic_pageblock(self, zone: Zone, pfn: int) -> None:
        """``reserve_highatomic_pageblock``: after a high-order atomic
        allocation, reserve its pageblock (at most ~1% of the zone)."""
        max_managed = zone.managed_pages // 100 + PAGEBLOCK_NR_PAGES
        if zone.nr_reserved_highatomic >= max_managed:
            return
        mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        if migratetype_is_mergeable(mt):
            zone.nr_reserved_highatomic += PAGEBLOCK_NR_PAGES
            self._set_pageblock_migratetype(pfn, HIGHATOMIC)
            self._move_freepages_block(zone, pfn, HIGHATOMIC)

    def unreserve_highatomic_pageblock(self, gfp: int, force: bool = False) -> bool:
        """``unreserve_highatomic_pageblock``: give one high-atomic pageblock of
        the request's zonelist back to the request's migratetype (what the
        kernel does under memory pressure; the model leaves it to callers).
        Unless ``force``, one reserved pageblock per zone is kept."""
        zonelist, _, mt, _, _ = self._ac_cache.get(gfp) or self._prepare_alloc_pages(gfp)
        for zone in zonelist:
            if not force and zone.nr_reserved_highatomic <= PAGEBLOCK_NR_PAGES:
                continue
            for order in range(MAX_ORDER):
                d = zone.free_area[order][HIGHATOMIC]
                if not d:
                    continue
                pfn = next(reversed(d))
                if self._pageblock_mt[pfn >> PAGEBLOCK_ORDER] == HIGHATOMIC:
                    zone.nr_reserved_highatomic -= min(PAGEBLOCK_NR_PAGES,
                                                       zone.nr_reserved_highatomic)
                self._set_pageblock_migratetype(pfn, mt)
                if self._move_freepages_block(zone, pfn, mt)[0]:
                    return True
        return False

    # ------------------------------------------------------------------ move_freepages

    def move_freepages_block(self, pfn: int, new_mt: int) -> int:
        """``move_freepages_block``: move every free block of ``pfn``'s
        pageblock to the lists of ``new_mt``; returns the pages moved (0 if the
        pageblock crosses a zone boundary)."""
        zone = self.page_zone(pfn)
        return self._move_freepages_block(zone, pfn, self._check_migratetype(new_mt))[0]

    def _move_freepages_block(self, zone: Zone, pfn: int, mt: int) -> tuple[int, int]:
        """``move_freepages_block``: (pages moved, movable pages seen)."""
        start = pfn & ~(PAGEBLOCK_NR_PAGES - 1)
        end = start + PAGEBLOCK_NR_PAGES - 1
        if not zone.zone_spans_pfn(start):
            start = pfn
        if not zone.zone_spans_pfn(end):
            return 0, 0
        return self._move_freepages(zone, start, end, mt)

    def _move_freepages(self, zone: Zone, start: int, end: int, mt: int,
                        move: bool = True) -> tuple[int, int]:
        """``move_freepages`` over [start, end]: free heads move (at their list's
        tail); other pages count as movable if their block was allocated MOVABLE.
        ``move`` False: the counts alone (6.10+ ``prep_move_freepages_block``)."""
        st = self._state
        moved = movable = 0
        p = start
        if st[p] == 0:
            block = self._find_block(p)
            if block is not None and block[0] < p:
                # [start, ...) begins inside a block (the upper half of a
                # MAX_ORDER-1 block, or a zone boundary): its head is outside,
                # so nothing of it moves; skip its pages.
                head, order, kind = block
                n = min(head + (1 << order), end + 1) - p
                if kind == PG_ALLOC_MOVABLE:
                    movable += n
                p += n
        while p <= end:
            v = st[p]
            kind = v & KIND_MASK
            if kind == PG_BUDDY:
                order = v & ORDER_MASK
                if move:
                    self._move_to_free_list(zone, p, order, mt)
                p += 1 << order
                moved += 1 << order
            elif kind:
                n = min(1 << (v & ORDER_MASK), end + 1 - p)
                if kind == PG_ALLOC_MOVABLE:
                    movable += n
                p += n
            else:
                p += 1
        return moved, movable
