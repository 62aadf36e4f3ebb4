"""The buddy core, and ``BuddyAllocator`` assembled from the package's parts.

Mirrors, from ``mm/page_alloc.c``:

- taking a block off the free lists: ``__rmqueue_smallest`` and ``expand``;
- putting one back: ``free_one_page`` (``_free_one_page_locked``) and
  ``__free_one_page`` with ``__find_buddy_pfn`` and ``buddy_merge_likely``;
- the free lists: ``add_to_free_list(_tail)``, ``move_to_free_list``,
  ``del_page_from_free_list`` (``_free_list_of``);
- the pageblock bits: ``get_pfnblock_migratetype``, ``set_pageblock_migratetype``
  (with the ``nr_isolate_pageblock`` accounting of ``set_migratetype_isolate``);
- ``build_all_zonelists``' ``page_group_by_mobility_disabled`` and
  ``memmap_init``'s pageblock types (``BuddyAllocator.__init__``).

``BuddyAllocator`` is one class whose methods come from one mixin per seam of
``mm/page_alloc.c``, each in its own module; the mixins share the allocator's
state (``self._state``, ``self.zones`` ...) and call each other's private
methods, as the static functions of ``page_alloc.c`` do:

- ``AllocMixin`` (alloc.py): ``__alloc_pages``, ``get_page_from_freelist``,
  ``rmqueue``, ``__free_pages``;
- ``PcpMixin`` (pcp.py): the per-CPU lists;
- ``FallbackMixin`` (fallback.py): fallback, stealing, ``move_freepages_block``,
  the high-atomic reserve;
- ``MemblockMixin`` (memblock.py): ``memblock_free_all`` (``free_range``);
- ``ZoneMixin`` (zone.py): zone lookups, watermarks, pcp batch and high;
- ``QueryMixin`` (query.py): read-only views;
- ``CheckMixin`` (check.py): the invariant check.

The buddy core itself is in the class body below.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from ._native import cbuddy
from .alloc import AllocMixin
from .check import CheckMixin
from .fallback import FALLBACKS, FallbackMixin
from .memblock import MemblockMixin
from .pcp import PcpMixin
from .query import QueryMixin
from .types import (
    HIGHATOMIC,
    ISOLATE,
    KIND_MASK,
    MAX_MIGRATETYPES,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_PCPTYPES,
    MOVABLE,
    ORDER_MASK,
    PAGE_ALLOC_COSTLY_ORDER,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    PG_ALLOC,
    PG_ALLOC_MOVABLE,
    PG_BUDDY,
    PG_PCP,
    UNMOVABLE,
    ZONE_NAMES,
    BadFreeError,
    BuddyInvariantError,
    FallbackScheme,
    MigrateType,
    PcpScheme,
    ZoneType,
    migratetype_is_mergeable,
)
from .zone import Zone, ZoneMixin

__all__ = ["BuddyAllocator"]

# x86-64: ZONE_DMA below MAX_DMA_PFN (16 MiB), ZONE_DMA32 below MAX_DMA32_PFN (4 GiB).
_X86_ZONE_LIMITS = {ZoneType.DMA: (0, 0x1000), ZoneType.DMA32: (0x1000, 0x100000),
                    ZoneType.NORMAL: (0x100000, None)}


class BuddyAllocator(AllocMixin, PcpMixin, FallbackMixin, MemblockMixin, ZoneMixin,
                     QueryMixin, CheckMixin):
    """The zoned buddy allocator of one node, with one CPU's pagesets.

    ``zone_bounds`` maps each ZoneType to ``(start_pfn, end_pfn)``; a zone
    with an empty range is absent. By default the x86-64 boundaries clipped
    to ``max_pfn``. Nothing is free until ``free_range`` hands memory over
    (``memblock_free_all``); pages never handed over count as reserved.
    """

    def __init__(self, max_pfn: int,
                 zone_bounds: Mapping[ZoneType, tuple[int, int]] | None = None, *,
                 page_group_by_mobility_disabled: bool | None = None,
                 pcp_scheme: PcpScheme = PcpScheme.FREE_FACTOR,
                 khugepaged_min_free: bool = False,
                 fallback_scheme: FallbackScheme = FallbackScheme.MOVE_BLOCK) -> None:
        if max_pfn <= 0:
            raise ValueError(f"max_pfn must be positive, not {max_pfn}")
        self.max_pfn = max_pfn
        if zone_bounds is None:
            zone_bounds = {zt: (lo, max_pfn if hi is None else min(hi, max_pfn))
                           for zt, (lo, hi) in _X86_ZONE_LIMITS.items()}
        self._mt_names: list[str] = [m.name for m in MigrateType]
        self._fallbacks: list[tuple[int, ...]] = list(FALLBACKS)
        self.zones: list[Zone] = []
        prev_end = 0
        for zt in ZoneType:
            lo, hi = zone_bounds.get(zt, (0, 0))
            if hi <= lo:
                continue
            if lo < prev_end or hi > max_pfn:
                raise ValueError(f"zone {ZONE_NAMES[zt]} [{lo:#x}, {hi:#x}) overlaps a lower "
                                 f"zone or ends beyond max_pfn {max_pfn:#x}")
            self.zones.append(Zone(zt, lo, hi, len(self._mt_names)))
            prev_end = hi
        unknown = set(zone_bounds) - set(ZoneType)
        if unknown:
            raise ValueError(f"unknown zone types {unknown}")
        self._zone_by_type: dict[int, Zone] = {int(z.type): z for z in self.zones}
        self._zones_desc = sorted(self.zones, key=lambda z: -z.start_pfn)
        if page_group_by_mobility_disabled is None:
            # build_all_zonelists: too few pages to group pageblocks by mobility.
            present = sum(z.spanned_pages for z in self.zones)
            page_group_by_mobility_disabled = present < PAGEBLOCK_NR_PAGES * len(MigrateType)
        self.page_group_by_mobility_disabled = page_group_by_mobility_disabled
        self._pcp_scheme = pcp_scheme = PcpScheme(pcp_scheme)
        #: before 5.13: order-0 pcp lists only, drained pcp->batch at a time
        #: round-robin over the migratetypes (the 5.10 free_pcppages_bulk)
        self._pcp_legacy = pcp_scheme == PcpScheme.LEGACY
        self._pcp_autotune = pcp_scheme == PcpScheme.AUTOTUNE
        self.khugepaged_min_free = khugepaged_min_free
        #: 6.15+: __rmqueue's claim and steal modes (FallbackScheme)
        self._claim_or_steal = FallbackScheme(fallback_scheme) == FallbackScheme.CLAIM_OR_STEAL
        #: free_range recomputes the watermarks unless set: a booted kernel
        #: computes them once, at its initcalls (init_per_zone_wmark_min,
        #: khugepaged), after memblock_free_all and before the init memory
        #: and the initrd are freed (free_reserved_area leaves them alone)
        self.watermarks_fixed = False
        self._pcp_allowed = [o == 0 or (not self._pcp_legacy and (o <= PAGE_ALLOC_COSTLY_ORDER
                                                                  or o == PAGEBLOCK_ORDER))
                             for o in range(MAX_ORDER)]

        padded = -(-max_pfn // MAX_ORDER_NR_PAGES) * MAX_ORDER_NR_PAGES
        self._state_np = np.zeros(padded, dtype=np.uint8)
        self._state = memoryview(self._state_np)
        # memmap_init: every pageblock starts MOVABLE (set_pageblock_migratetype
        # turns that into UNMOVABLE when grouping by mobility is disabled).
        boot_mt = UNMOVABLE if page_group_by_mobility_disabled else MOVABLE
        self._pageblock_np = np.full(padded >> PAGEBLOCK_ORDER, boot_mt, dtype=np.uint8)
        self._pageblock_mt = memoryview(self._pageblock_np)
        self._handed: list[list[int]] = []   # sorted disjoint [start, end) given to the buddy
        self.deferred: list[list[int]] = []  # free memory deferred struct-page init holds
        #: deferred_free_range's block: a pageblock (MAX_ORDER on 6.10+: set
        #: by the kernel record, see guestkernel.boot.mem_init)
        self.deferred_free_order = PAGEBLOCK_ORDER
        self._ac_cache: dict[int, tuple] = {}
        self._allocated_once = False
        self.min_free_kbytes = 0
        self._setup_per_zone_wmarks()

    def __deepcopy__(self, memo: dict) -> BuddyAllocator:
        """An independent copy (its arrays copied, its memoryviews made
        anew): a caller's trial of what an allocation would do, e.g. a
        replay asking where the per-CPU list resumes after an untraced
        call, without changing this allocator."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if not isinstance(value, memoryview):
                setattr(new, name, copy.deepcopy(value, memo))
        new._state = memoryview(new._state_np)
        new._pageblock_mt = memoryview(new._pageblock_np)
        return new

    # ------------------------------------------------------------------ types

    def register_migratetype(self, name: str, fallbacks: Sequence[int] = ()) -> int:
        """Add a migratetype (e.g. Rapoport's MIGRATE_UNMAPPED) and return its
        number. ``fallbacks`` are the types it may steal from, in order. Only
        before the first allocation."""
        if self._allocated_once:
            raise RuntimeError("register_migratetype after the first allocation")
        if name in self._mt_names:
            raise ValueError(f"migratetype {name!r} already registered")
        if len(self._mt_names) >= MAX_MIGRATETYPES:
            raise ValueError(f"at most {MAX_MIGRATETYPES} migratetypes")
        mt = len(self._mt_names)
        for f in fallbacks:
            if not 0 <= f < mt or f in (HIGHATOMIC, ISOLATE):
                raise ValueError(f"bad fallback migratetype {f} for {name!r}")
        self._mt_names.append(name)
        self._fallbacks.append(tuple(int(f) for f in fallbacks))
        for zone in self.zones:
            for area in zone.free_area:
                area.append(OrderedDict())
        self._ac_cache.clear()
        return mt

    @property
    def nr_migratetypes(self) -> int:
        return len(self._mt_names)

    def migratetype_name(self, mt: int) -> str:
        return self._mt_names[mt]

    def _check_migratetype(self, mt: int) -> int:
        if not 0 <= mt < len(self._mt_names):
            raise ValueError(f"unknown migratetype {mt}")
        return int(mt)

    # ------------------------------------------------------------------ buddy core

    def _rmqueue_smallest(self, zone: Zone, order: int, mt: int) -> int:
        """``__rmqueue_smallest``: the head of the smallest non-empty list of the
        type, split down to ``order`` by ``_expand``. (The same in C, when
        built: ``_cbuddy.c``.)"""
        if cbuddy is not None:
            return cbuddy.rmqueue_smallest(self, zone, order, mt)
        fa = zone.free_area
        for current_order in range(order, MAX_ORDER):
            if fa[current_order][mt]:
                return self._page_del_and_expand(zone, order, current_order, mt)
        return -1

    def _page_del_and_expand(self, zone: Zone, order: int, current_order: int, mt: int) -> int:
        """``page_del_and_expand``: the head block of the non-empty free list
        of ``mt`` at ``current_order`` off its list, split down to ``order``
        on the lists of ``mt``; returns its pfn."""
        pfn = zone.free_area[current_order][mt].popitem()[0]   # get_page_from_free_area
        self._state[pfn] = 0
        zone.free_pages -= 1 << order        # __mod_zone_freepage_state
        if current_order > order:
            self._expand(zone, pfn, order, current_order, mt)
        return pfn

    def _expand(self, zone: Zone, pfn: int, low: int, high: int, mt: int) -> None:
        """``expand``: split a 2**high block down to 2**low, putting each upper
        half at the head of the free list of ``mt``."""
        st = self._state
        fa = zone.free_area
        size = 1 << high
        while high > low:
            high -= 1
            size >>= 1
            fa[high][mt][pfn + size] = None
            st[pfn + size] = PG_BUDDY | high

    def _free_one_page_locked(self, zone: Zone, pfn: int, order: int, mt: int) -> None:
        """``free_one_page``: with isolated pageblocks about, trust the pageblock."""
        if zone.nr_isolate_pageblock or mt == ISOLATE:
            mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        self._state[pfn] = 0
        self._free_one_page(zone, pfn, order, mt)

    def _free_one_page(self, zone: Zone, pfn: int, order: int, mt: int,
                       fpi_to_tail: bool = False) -> None:
        """``__free_one_page``: merge with the buddy while it is free, of the
        same order, in the zone and (at pageblock order and above) not of an
        unmergeable, different type; then add the block to the list of ``mt``,
        at the tail when the next-higher buddy is free (``buddy_merge_likely``).
        (The same in C, when built: ``_cbuddy.c``.)"""
        if cbuddy is not None:
            cbuddy.free_one_page(self, zone, pfn, order, mt, fpi_to_tail)
            return
        st = self._state
        pbmt = self._pageblock_mt
        fa = zone.free_area
        zstart, zend = zone.start_pfn, zone.end_pfn
        zone.free_pages += 1 << order
        buddy_pfn = pfn
        while order < MAX_ORDER - 1:
            buddy_pfn = pfn ^ (1 << order)           # __find_buddy_pfn
            if st[buddy_pfn] != PG_BUDDY | order or not zstart <= buddy_pfn < zend:
                break
            if order >= PAGEBLOCK_ORDER:
                buddy_mt = pbmt[buddy_pfn >> PAGEBLOCK_ORDER]
                if mt != buddy_mt and not (migratetype_is_mergeable(mt)
                                           and migratetype_is_mergeable(buddy_mt)):
                    break
            del self._free_list_of(zone, buddy_pfn, order)[buddy_pfn]
            st[buddy_pfn] = 0
            pfn &= buddy_pfn
            order += 1
        st[pfn] = PG_BUDDY | order                   # set_buddy_order
        if fpi_to_tail:
            to_tail = True
        elif order >= MAX_ORDER - 2:
            to_tail = False
        else:
            # buddy_merge_likely: if the block's parent has a free buddy, this
            # block is likely to merge soon; keep it away from allocations.
            higher = buddy_pfn & pfn
            hb = higher ^ (1 << (order + 1))
            to_tail = st[hb] == PG_BUDDY | (order + 1) and zstart <= hb < zend
        d = fa[order][mt]
        d[pfn] = None
        if to_tail:
            d.move_to_end(pfn, last=False)

    # ------------------------------------------------------------------ free lists

    def _free_list_of(self, zone: Zone, pfn: int, order: int) -> OrderedDict[int, None]:
        """The free list holding the free head ``pfn`` (the kernel unlinks a
        list_head without knowing the list; here the pageblock's type is the
        first guess)."""
        area = zone.free_area[order]
        d = area[self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]]
        if pfn in d:
            return d
        for d in area:
            if pfn in d:
                return d
        raise BuddyInvariantError(f"free list membership: free head {pfn:#x} order {order} "
                                  f"is on no free list of zone {zone.name}")

    def _move_to_free_list(self, zone: Zone, pfn: int, order: int, mt: int) -> None:
        """``move_to_free_list``: ``list_move_tail`` to the list of ``mt``."""
        del self._free_list_of(zone, pfn, order)[pfn]
        d = zone.free_area[order][mt]
        d[pfn] = None
        d.move_to_end(pfn, last=False)

    def _find_block(self, pfn: int) -> tuple[int, int, int] | None:
        """(head pfn, order, kind) of the block containing ``pfn``, or None."""
        st = self._state
        for o in range(MAX_ORDER):
            head = pfn & ~((1 << o) - 1)
            v = st[head]
            if v and v & ORDER_MASK >= o:
                return head, v & ORDER_MASK, v & KIND_MASK
        return None

    def take_page_off_buddy(self, pfn: int, order: int = 0) -> None:
        """``take_page_off_buddy`` (mm/page_alloc.c, there for one poisoned
        page) for a block of ``2**order``: the pages ``[pfn, pfn + 2**order)``
        leave the free lists and the per-CPU lists and become one allocated
        block; what else their free blocks held stays free (halved as
        ``break_down_buddy_pages`` does). For a replay that knows where Linux
        put a page. Raises BadFreeError, changing nothing, unless every page
        is free."""
        if not 0 <= order < MAX_ORDER or not 0 <= pfn or pfn + (1 << order) > self.max_pfn \
                or pfn & ((1 << order) - 1):
            raise BadFreeError(f"take_page_off_buddy(pfn={pfn:#x}, order={order}): not an "
                               f"aligned block inside [0, {self.max_pfn:#x})")
        end = pfn + (1 << order)
        blocks = []
        p = pfn
        while p < end:
            blk = self._find_block(p)
            if blk is None or blk[2] not in (PG_BUDDY, PG_PCP):
                what = ("reserved (never given to the buddy)" if blk is None else
                        f"allocated (in the order-{blk[1]} block at {blk[0]:#x})")
                raise BadFreeError(f"take_page_off_buddy(pfn={pfn:#x}, order={order}): page "
                                   f"{p:#x} is not free: {what}")
            blocks.append(blk)
            p = blk[0] + (1 << blk[1])
        st = self._state
        mt_taken = MOVABLE
        for head, o, kind in blocks:
            zone = self.page_zone(head)
            if kind == PG_BUDDY:
                area = zone.free_area[o]
                mt = next(i for i, d in enumerate(area) if head in d)
                del area[mt][head]
                zone.free_pages -= 1 << o
            else:
                pcp = zone.pcp
                for lst in pcp.lists:
                    entry = next((e for e in lst if e >> 4 == head), None)
                    if entry is not None:
                        lst.remove(entry)
                        break
                mt = entry & 15 if entry is not None else self._pageblock_mt[head >> PAGEBLOCK_ORDER]
                pcp.count -= 1 << o
            st[head] = 0
            mt_taken = mt
            while o > 0 and (head < pfn or head + (1 << o) > end):
                o -= 1                              # break_down_buddy_pages
                lo, hi = head, head + (1 << o)
                keep, spare = (lo, hi) if pfn < hi else (hi, lo)
                if not (spare + (1 << o) <= pfn or spare >= end):
                    break                           # [pfn, end) covers both halves
                if kind == PG_BUDDY:
                    zone.free_area[o][mt][spare] = None
                    st[spare] = PG_BUDDY | o
                    zone.free_pages += 1 << o
                else:                               # a pcp block's spare half: to the buddy
                    self._free_one_page(zone, spare, o, mt)
                head = keep
        self._state_np[pfn:end] = 0
        st[pfn] = (PG_ALLOC_MOVABLE if mt_taken == MOVABLE else PG_ALLOC) | order

    # ------------------------------------------------------------------ pageblocks

    def get_pageblock_migratetype(self, pfn: int) -> int:
        """``get_pfnblock_migratetype``."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        return self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]

    def set_pageblock_migratetype(self, pfn: int, mt: int) -> None:
        """``set_pageblock_migratetype``: only the pageblock bits; free pages stay
        on their lists (use ``move_freepages_block``)."""
        self.page_zone(pfn)
        self._set_pageblock_migratetype(pfn, self._check_migratetype(mt))

    def _set_pageblock_migratetype(self, pfn: int, mt: int) -> None:
        if self.page_group_by_mobility_disabled and mt < MIGRATE_PCPTYPES:
            mt = UNMOVABLE
        i = pfn >> PAGEBLOCK_ORDER
        old = self._pageblock_mt[i]
        if old != mt:
            if old == ISOLATE or mt == ISOLATE:
                self._pageblock_zone(i).nr_isolate_pageblock += 1 if mt == ISOLATE else -1
            self._pageblock_mt[i] = mt

    def _pageblock_zone(self, pageblock: int) -> Zone:
        """The zone a pageblock's counters belong to: the zone of its first pfn,
        else the lowest zone overlapping it."""
        start = pageblock << PAGEBLOCK_ORDER
        end = start + PAGEBLOCK_NR_PAGES
        for zone in self.zones:
            if zone.zone_spans_pfn(start):
                return zone
        for zone in self.zones:
            if zone.start_pfn < end and start < zone.end_pfn:
                return zone
        raise ValueError(f"pageblock at {start:#x} overlaps no zone")


    # ------------------------------------------------------------------ a real kernel's state

    def load_free_lists(self, blocks: Sequence[tuple[str, int, int, int]],
                        pcp: Sequence[tuple[str, int, int, int]],
                        pageblock_mt: np.ndarray | None = None,
                        managed: Mapping[str, int] | None = None,
                        reserved: np.ndarray | None = None) -> dict[str, int]:
        """Make the allocator hold exactly a real kernel's free memory (as
        read from its memory: :mod:`dmfrag.truth`): ``blocks`` are the buddy
        lists' (zone name, order, migratetype, head pfn) in list order (head
        first), ``pcp`` the per-CPU lists' (zone name, order, migratetype,
        pfn) in list order, all CPUs' onto the one modelled; ``pageblock_mt``
        one migratetype per pageblock (255: none); ``managed`` each zone's
        managed pages; ``reserved`` a bool per pfn (PageReserved: what the
        buddy never had). Every page not listed and not reserved becomes an
        allocated order-0 page (without ``reserved``: the model's own hand-over
        decides, and a listed page it had kept reserved is handed over). Returns counts; raises ValueError, changing nothing, for
        a block outside its zone or overlapping another."""
        by_name = {z.name: z for z in self.zones}
        seen = np.zeros(self.max_pfn, dtype=bool)
        for what, rows in (("free block", blocks), ("pcp page", pcp)):
            for zname, order, mt, pfn in rows:
                zone = by_name.get(zname)
                end = pfn + (1 << order)
                if zone is None or not (zone.start_pfn <= pfn and end <= zone.end_pfn) \
                        or not 0 <= order < MAX_ORDER or pfn & ((1 << order) - 1):
                    raise ValueError(f"{what} pfn {pfn:#x} order {order} zone {zname!r}: not an "
                                     f"aligned block inside a zone of this machine")
                if not 0 <= mt < self.nr_migratetypes:
                    raise ValueError(f"{what} pfn {pfn:#x}: unknown migratetype {mt}")
                if seen[pfn:end].any():
                    raise ValueError(f"{what} pfn {pfn:#x} order {order} overlaps another")
                seen[pfn:end] = True
        # the pages handed over: the model's own, and every page Linux has free
        handed = np.zeros(self.max_pfn, dtype=bool)
        if reserved is not None:
            in_zone = np.zeros(self.max_pfn, dtype=bool)
            for z in self.zones:
                in_zone[z.start_pfn:z.end_pfn] = True
            n = min(len(reserved), self.max_pfn)
            handed[:n] = ~np.asarray(reserved[:n], dtype=bool) & in_zone[:n]
        else:
            for s, e in self._handed:
                handed[s:e] = True
        newly = int(np.count_nonzero(seen & ~handed))
        handed |= seen
        st = self._state_np
        st[:] = 0
        st[: self.max_pfn][handed] = PG_ALLOC
        for zone in self.zones:
            for area in zone.free_area:
                for d in area:
                    d.clear()
            zone.free_pages = 0
            for lst in zone.pcp.lists:
                lst.clear()
            zone.pcp.count = 0
        if pageblock_mt is not None:
            n = min(len(pageblock_mt), len(self._pageblock_np))
            src = np.asarray(pageblock_mt[:n], dtype=np.uint8)
            dst = self._pageblock_np[:n]
            dst[src != 255] = src[src != 255]
        for zname, order, mt, pfn in reversed(list(blocks)):   # the head is the dict's last
            zone = by_name[zname]
            st[pfn: pfn + (1 << order)] = 0
            st[pfn] = PG_BUDDY | order
            zone.free_area[order][mt][pfn] = None
            zone.free_pages += 1 << order
        from .types import order_to_pindex
        for zname, order, mt, pfn in pcp:
            zone = by_name[zname]
            st[pfn: pfn + (1 << order)] = 0
            st[pfn] = PG_PCP | order
            pmt = mt if mt < MIGRATE_PCPTYPES else MOVABLE
            zone.pcp.lists[order_to_pindex(pmt, order)].append(pfn << 4 | pmt)
            zone.pcp.count += 1 << order
        runs = np.flatnonzero(np.diff(np.concatenate(([0], handed.astype(np.int8), [0]))))
        self._handed = [[int(a), int(b)] for a, b in zip(runs[::2], runs[1::2])]
        if managed is not None:
            for name, pages in managed.items():
                if name in by_name:
                    by_name[name].managed_pages = int(pages)
        self._ac_cache.clear()
        self._allocated_once = True
        self._setup_per_zone_wmarks()
        return {"free_blocks": len(blocks), "pcp_pages": len(pcp), "handed_over": newly}
