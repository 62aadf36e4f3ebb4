"""The allocator's entry points: ``alloc_pages`` and ``free_pages``.

Mirrors, from ``mm/page_alloc.c``:

- allocation: ``__alloc_pages`` with ``prepare_alloc_pages``,
  ``alloc_flags_nofragment`` and ``gfp_to_alloc_flags`` (the slow path is one
  more pass at the min watermark), ``get_page_from_freelist`` (with
  ``zone_watermark_fast``), ``prep_new_page``, ``rmqueue``, ``rmqueue_buddy``
  and ``__rmqueue`` (``_rmqueue_inner``);
- freeing: ``__free_pages`` -> ``free_the_page`` (``free_unref_page`` for pcp
  orders, pcp.py; ``__free_pages_ok`` -> ``free_one_page`` otherwise) and
  ``bad_page`` (``_bad_free``);
- ``split_page`` (``split_allocated``).

``AllocMixin`` holds the allocator's methods of this seam (see ``buddy.py``);
it calls into the pcp lists (pcp.py), the buddy core (``__rmqueue_smallest``,
``free_one_page``), fallback (``__rmqueue_fallback``,
``reserve_highatomic_pageblock``) and ``__zone_watermark_ok`` (zone.py).
"""

from __future__ import annotations

import numpy as np

from ..gfp import GFP, gfp_migratetype_index, gfp_zone_index
from ._native import cbuddy
from .types import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NOFRAGMENT,
    ALLOC_WMARK_LOW,
    ALLOC_WMARK_MASK,
    ALLOC_WMARK_MIN,
    HIGHATOMIC,
    ISOLATE,
    KIND_MASK,
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    MOVABLE,
    ORDER_MASK,
    PAGEBLOCK_ORDER,
    PG_ALLOC,
    PG_ALLOC_MOVABLE,
    PG_BUDDY,
    PG_PCP,
    RMQUEUE_NORMAL,
    UNMOVABLE,
    WMARK_HIGH,
    AllocationError,
    BadFreeError,
    ZoneType,
)
from .zone import Zone

__all__ = ["AllocMixin"]

_ORDERS = frozenset(range(MAX_ORDER))


class AllocMixin:
    """The allocator's ``alloc_pages`` / ``free_pages`` paths."""

    max_pfn: int
    zones: list[Zone]
    page_group_by_mobility_disabled: bool
    _zones_desc: list[Zone]
    _ac_cache: dict[int, tuple]
    _allocated_once: bool
    _pcp_allowed: list[bool]
    _pcp_autotune: bool
    _mt_names: list[str]
    _state: memoryview
    _state_np: np.ndarray
    _pageblock_mt: memoryview

    # ------------------------------------------------------------------ allocation

    def _prepare_alloc_pages(self, gfp: int) -> tuple:
        """``prepare_alloc_pages`` + ``alloc_flags_nofragment`` + ``gfp_to_alloc_flags``,
        cached per gfp: (zonelist, highest_zoneidx, migratetype, fast flags, slow flags)."""
        highest_zoneidx = gfp_zone_index(gfp)       # ValueError for DMA|DMA32
        mt = gfp_migratetype_index(gfp)             # ValueError for MOVABLE|RECLAIMABLE
        if self.page_group_by_mobility_disabled:
            mt = UNMOVABLE
        zonelist = tuple(z for z in reversed(self.zones) if z.type <= highest_zoneidx)
        fast = ALLOC_WMARK_LOW
        if zonelist and zonelist[0].type == ZoneType.NORMAL:
            fast |= ALLOC_NOFRAGMENT
        slow = ALLOC_WMARK_MIN
        if gfp & GFP.HIGH:
            slow |= ALLOC_HIGH
            if not gfp & GFP.DIRECT_RECLAIM:
                slow |= ALLOC_HARDER
        ac = (zonelist, highest_zoneidx, mt, fast, slow)
        self._ac_cache[gfp] = ac
        return ac

    def alloc_pages(self, gfp: int, order: int = 0, *, migratetype: int | None = None) -> int:
        """``__alloc_pages``: the fast path at the low watermark (avoiding
        fragmentation first when the preferred zone is NORMAL), then the slow
        path at the min watermark. Returns the first pfn of a ``2**order``
        block; raises AllocationError (and changes nothing) if there is none.
        ``migratetype`` overrides the one ``gfp`` implies (for policies).
        (An order-0 page off a non-empty per-CPU list, on the first zone's
        fast path, in C when built: ``_cbuddy.c``.)"""
        if cbuddy is not None and migratetype is None:
            pfn = cbuddy.alloc_pages_fast(self, gfp, order)
            if pfn >= 0:
                return pfn
        if order not in _ORDERS:
            raise ValueError(f"order {order} out of range [0, {MAX_ORDER})")
        ac = self._ac_cache.get(gfp)
        if ac is None:
            ac = self._prepare_alloc_pages(gfp)
        zonelist, highest_zoneidx, mt, fast, slow = ac
        if migratetype is not None:
            mt = self._check_migratetype(migratetype)
            if mt == ISOLATE:
                raise ValueError("cannot allocate from MIGRATE_ISOLATE")
        self._allocated_once = True
        pfn = self._get_page_from_freelist(order, fast, zonelist, highest_zoneidx, mt)
        if pfn < 0:
            pfn = self._get_page_from_freelist(order, slow, zonelist, highest_zoneidx, mt)
            if pfn < 0:
                raise AllocationError(gfp, order, self._failure_reason(
                    order, slow, zonelist, highest_zoneidx, mt))
        return pfn

    def alloc_pages_bulk(self, gfp: int, nr_pages: int) -> list[int]:
        """``alloc_pages_bulk`` (5.13+; vmalloc's order-0 pages): up to
        ``nr_pages`` order-0 pages off one zone's per-CPU list (refilled as
        usual), in the order taken. The zone is the first of the zonelist
        with ``nr_pages`` above its low watermark (no ALLOC_NOFRAGMENT); the
        list's ``free_factor``/``free_count`` is left alone (the bulk path
        calls ``__rmqueue_pcplist``). Fewer pages when the list runs dry
        after the first. One ``alloc_pages`` instead (``failed:``) for one
        page, ``__GFP_ACCOUNT`` (memcg: Debian's kernels account kmem), a
        type without pcp lists, no zone, or no first page; raises
        AllocationError only then."""
        if nr_pages <= 0:
            return []
        ac = self._ac_cache.get(gfp)
        if ac is None:
            ac = self._prepare_alloc_pages(gfp)
        zonelist, _highest_zoneidx, mt, _fast, _slow = ac
        if nr_pages == 1 or gfp & GFP.ACCOUNT or mt >= MIGRATE_PCPTYPES or not zonelist:
            return [self.alloc_pages(gfp, 0)]
        preferred = zonelist[0].type
        for zone in zonelist:
            mark = zone.watermark[ALLOC_WMARK_LOW] + nr_pages
            if self._zone_watermark_ok(zone, 0, mark, preferred, ALLOC_WMARK_LOW,
                                       zone.free_pages):
                break
        else:
            return [self.alloc_pages(gfp, 0)]
        self._allocated_once = True
        code = (PG_ALLOC_MOVABLE if mt == MOVABLE else PG_ALLOC)
        st = self._state
        pages: list[int] = []
        take = self._rmqueue_pcplist
        while len(pages) < nr_pages:
            pfn = take(zone, 0, mt, ALLOC_WMARK_LOW, True)
            if pfn < 0:
                if not pages:
                    return [self.alloc_pages(gfp, 0)]
                break
            st[pfn] = code
            pages.append(pfn)
        return pages

    def _get_page_from_freelist(self, order: int, alloc_flags: int, zonelist: tuple,
                                highest_zoneidx: int, mt: int) -> int:
        """``get_page_from_freelist``: the first zone of the zonelist that passes
        its watermark and has a page; with ALLOC_NOFRAGMENT a second pass
        without it."""
        autotune = self._pcp_autotune
        pcp_allowed = self._pcp_allowed
        rmqueue_pcplist = self._rmqueue_pcplist
        while True:
            wmark = alloc_flags & ALLOC_WMARK_MASK
            for zone in zonelist:
                free = zone.free_pages
                # zone_watermark_fast: the order-0 shortcut, then the full check.
                reserved = 0 if alloc_flags & ALLOC_HARDER else zone.nr_reserved_highatomic
                if autotune and not zone.below_high:
                    # 6.7+: a zone under its high watermark is marked
                    # ZONE_BELOW_HIGH (its pcp frees then shrink pcp->high).
                    # Linux takes a zone above it without the lower check
                    # below, which such a zone passes anyway.
                    high = zone.watermark[WMARK_HIGH]
                    if not (order == 0 and free - reserved
                            > high + zone.lowmem_reserve[highest_zoneidx]) and \
                            not self._zone_watermark_ok(zone, order, high, highest_zoneidx,
                                                        alloc_flags, free):
                        zone.below_high = True
                mark = zone.watermark[wmark]
                if not (order == 0 and free - reserved
                        > mark + zone.lowmem_reserve[highest_zoneidx]) and \
                        not self._zone_watermark_ok(zone, order, mark, highest_zoneidx,
                                                    alloc_flags, free):
                    continue
                # rmqueue (inline: the pcp list for pcp orders and types, else the buddy)
                if pcp_allowed[order] and mt < MIGRATE_PCPTYPES:
                    pfn = rmqueue_pcplist(zone, order, mt, alloc_flags)
                    if pfn < 0:
                        pfn = self._rmqueue_buddy(zone, order, alloc_flags, mt)
                else:
                    pfn = self._rmqueue_buddy(zone, order, alloc_flags, mt)
                if pfn >= 0:
                    # prep_new_page
                    self._state[pfn] = (PG_ALLOC_MOVABLE if mt == MOVABLE else PG_ALLOC) | order
                    if order and alloc_flags & ALLOC_HARDER:
                        self._reserve_highatomic_pageblock(zone, pfn)
                    return pfn
            if alloc_flags & ALLOC_NOFRAGMENT:
                # On a UMA machine, every zone may be fragmented: try again
                # allowing fallbacks inside pageblocks.
                alloc_flags &= ~ALLOC_NOFRAGMENT
                continue
            return -1

    def _failure_reason(self, order: int, alloc_flags: int, zonelist: tuple,
                        highest_zoneidx: int, mt: int) -> str:
        if not zonelist:
            return "no zone may serve this request"
        parts = []
        for zone in zonelist:
            mark = zone.watermark[alloc_flags & ALLOC_WMARK_MASK]
            ok = self._zone_watermark_ok(zone, order, mark, highest_zoneidx, alloc_flags,
                                         zone.free_pages)
            parts.append(f"{zone.name}: free {zone.free_pages}, min {mark}, lowmem_reserve "
                         f"{zone.lowmem_reserve[highest_zoneidx]}"
                         + ("" if ok else " (below watermark)")
                         + ("" if not ok else f" (no order>={order} block for "
                            f"{self._mt_names[mt]} or its fallbacks)"))
        return "; ".join(parts)

    def _rmqueue(self, zone: Zone, order: int, alloc_flags: int, mt: int) -> int:
        """``rmqueue``: the pcp list for pcp orders and types, else the buddy."""
        if self._pcp_allowed[order] and mt < MIGRATE_PCPTYPES:
            pfn = self._rmqueue_pcplist(zone, order, mt, alloc_flags)
            if pfn >= 0:
                return pfn
        return self._rmqueue_buddy(zone, order, alloc_flags, mt)

    def _rmqueue_buddy(self, zone: Zone, order: int, alloc_flags: int, mt: int) -> int:
        """``rmqueue_buddy``: high-order atomic requests try the high-atomic
        reserve first."""
        pfn = -1
        if order > 0 and alloc_flags & ALLOC_HARDER:
            pfn = self._rmqueue_smallest(zone, order, HIGHATOMIC)
        if pfn < 0:
            pfn = self._rmqueue_inner(zone, order, mt, alloc_flags)
        return pfn

    def _rmqueue_inner(self, zone: Zone, order: int, mt: int, alloc_flags: int) -> int:
        """``__rmqueue``: the smallest block of the type, else steal from a
        fallback type and retry (6.15+: claim, then steal: ``_rmqueue_moded``)."""
        if self._claim_or_steal:
            return self._rmqueue_moded(zone, order, mt, alloc_flags, RMQUEUE_NORMAL)[0]
        while True:
            pfn = self._rmqueue_smallest(zone, order, mt)
            if pfn >= 0:
                return pfn
            if not self._rmqueue_fallback(zone, order, mt, alloc_flags):
                return -1

    # ------------------------------------------------------------------ freeing

    def free_pages(self, pfn: int, order: int = 0) -> None:
        """``__free_pages`` -> ``free_the_page``: pcp orders go through
        ``free_unref_page`` (the pcp list, drained in batches above ``high``),
        others straight to ``__free_one_page``. Raises BadFreeError, changing
        nothing, unless ``pfn`` heads an allocated block of exactly ``order``.
        (An order-0 page of a pcp type onto its list, in C when built:
        ``_cbuddy.c``; its drains are the Python methods.)"""
        if cbuddy is not None and cbuddy.free_pages_fast(self, pfn, order):
            return
        if order not in _ORDERS or not 0 <= pfn < self.max_pfn:
            raise self._bad_free(pfn, order)
        v = self._state[pfn]
        if v != PG_ALLOC | order and v != PG_ALLOC_MOVABLE | order:
            raise self._bad_free(pfn, order)
        for zone in self._zones_desc:
            if pfn >= zone.start_pfn:
                break
        mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        if self._pcp_allowed[order]:
            self._free_unref_page(zone, pfn, order, mt)
        else:
            self._free_one_page_locked(zone, pfn, order, mt)      # __free_pages_ok

    def free_pages_ok(self, pfn: int, order: int = 0, *, to_tail: bool = False) -> None:
        """``__free_pages_ok``: the block straight to ``__free_one_page``,
        whatever its order (no per-CPU list); ``to_tail`` (FPI_TO_TAIL):
        at the free list's tail. 7.x's ``make_alloc_exact`` frees the pages
        past an exact allocation's size this way. Raises BadFreeError, changing
        nothing, unless ``pfn`` heads an allocated block of exactly ``order``
        (free_pages makes the same check inline: its hot path)."""
        if not (order in _ORDERS and 0 <= pfn < self.max_pfn
                and self._state[pfn] & ORDER_MASK == order
                and self._state[pfn] & KIND_MASK in (PG_ALLOC, PG_ALLOC_MOVABLE)):
            raise self._bad_free(pfn, order)
        zone = self.page_zone(pfn)
        mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]     # get_pfnblock_migratetype
        self._state[pfn] = 0
        self._free_one_page(zone, pfn, order, mt, fpi_to_tail=to_tail)

    def _bad_free(self, pfn: int, order: int) -> BadFreeError:
        """``bad_page``: name what is wrong with ``free_pages(pfn, order)``."""
        if order not in _ORDERS:
            why = f"order {order} out of range [0, {MAX_ORDER})"
        elif not 0 <= pfn < self.max_pfn:
            why = f"pfn out of range [0, {self.max_pfn:#x})"
        elif pfn & ((1 << order) - 1):
            why = f"pfn not aligned to order {order}"
        else:
            v = self._state[pfn]
            kind, o = v & KIND_MASK, v & ORDER_MASK
            if kind in (PG_ALLOC, PG_ALLOC_MOVABLE):
                why = f"wrong order: allocated as order {o}"
            elif kind == PG_BUDDY:
                why = f"double free: pfn heads a free order-{o} block"
            elif kind == PG_PCP:
                why = "double free: pfn is on a pcp list"
            else:
                block = self._find_block(pfn)
                if block is None:
                    why = "never allocated: reserved, never given to the buddy"
                else:
                    head, o, kind = block
                    what = {PG_BUDDY: "free", PG_PCP: "pcp"}.get(kind, "allocated")
                    why = f"pfn is inside the {what} order-{o} block at {head:#x}"
        return BadFreeError(f"bad free_pages(pfn={pfn:#x}, order={order}): {why}")

    def split_allocated(self, pfn: int, order: int) -> None:
        """``split_page``: an allocated block of ``order`` becomes 2^order
        allocated order-0 pages, each freed on its own."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        v = self._state[pfn]
        kind = v & KIND_MASK
        if kind not in (PG_ALLOC, PG_ALLOC_MOVABLE) or v & ORDER_MASK != order:
            raise BadFreeError(f"split_page({pfn:#x}, {order}): not an allocated block of that order")
        self._state_np[pfn: pfn + (1 << order)] = kind

    def join_allocated(self, pfn: int, order: int) -> None:
        """The reverse of :meth:`split_allocated`: 2^order allocated order-0
        pages, aligned, become one allocated block of ``order`` (for a
        replay that learns a block's order only when the kernel frees it:
        a real kernel's state records which pages are allocated, not in
        which blocks). Raises BadFreeError, changing nothing, otherwise."""
        n = 1 << order
        if not 0 <= pfn or pfn + n > self.max_pfn or pfn & (n - 1):
            raise BadFreeError(f"join_allocated({pfn:#x}, {order}): not an aligned block "
                               f"inside [0, {self.max_pfn:#x})")
        seg = self._state_np[pfn: pfn + n]
        kinds = seg & KIND_MASK
        if not ((seg & ORDER_MASK) == 0).all() or not (
                (kinds == PG_ALLOC).all() or (kinds == PG_ALLOC_MOVABLE).all()):
            raise BadFreeError(f"join_allocated({pfn:#x}, {order}): not {n} allocated "
                               f"order-0 pages of one kind")
        kind = int(seg[0]) & KIND_MASK
        seg[:] = 0
        seg[0] = kind | order
