"""The buddy page allocator: a model of Linux 6.1 ``mm/page_alloc.c``.

One node, one CPU, the x86-64 zones DMA (< 16 MiB), DMA32 (< 4 GiB) and
NORMAL. Free memory is kept as naturally aligned blocks of ``2**order`` pages
(order 0..10: ``MAX_ORDER`` is exclusive, as in 6.1) on free lists indexed
``zone.free_area[order][migratetype]``; order-0..3 and pageblock-order pages
pass through a per-CPU pageset (pcp) first. The verbs keep the kernel's names
(``_expand``, ``_rmqueue_smallest``, ``_rmqueue_fallback``,
``_steal_suitable_fallback``, ``_free_one_page``, ``free_pcppages_bulk`` ...)
so that a kernel developer can read one beside the other.

Representation (no Python object per page):

- ``_state``: one byte per pfn. ``0`` for a page that is not the head of a
  block (a tail, a reserved page never freed to the buddy, a hole); else
  ``kind | order`` with kind ``_PG_BUDDY`` (head of a free block: PageBuddy),
  ``_PG_ALLOC`` / ``_PG_ALLOC_MOVABLE`` (head of an allocated block, the latter
  standing in for PageLRU/__PageMovable), ``_PG_PCP`` (head of a block on a
  pcp list). A numpy array read through a memoryview, which indexes as fast
  as a bytearray; it is calloc'ed, so holes cost no memory and RAM one byte a
  page (268 MB for 1 TiB).
- ``_pageblock_mt``: one byte per 2 MiB pageblock (``get_pfnblock_migratetype``).
- free lists: one ``OrderedDict {pfn: None}`` per (zone, order, migratetype):
  its *last* entry is the kernel list's head, so ``add_to_free_list`` is an
  append, ``get_page_from_free_area`` a ``popitem()``, and
  ``add_to_free_list_tail`` / ``move_to_free_list`` an append moved to the
  front, all O(1).
- pcp lists: one ``deque`` per pcp index of ``pfn << 4 | pcppage_migratetype``
  (left end is the kernel list's head).

Where Linux 6.1 is more detailed than the model (choices made):

- No reclaim, compaction, kswapd or OOM killer. The slow path is one more
  zonelist pass at the min watermark (``gfp_to_alloc_flags``: ``__GFP_HIGH``
  halves min, an atomic request takes a further quarter off). A failed
  allocation changes nothing: unlike ``__alloc_pages_direct_reclaim`` it does
  not drain the pcp lists nor unreserve high-atomic pageblocks; callers that
  model reclaim call ``drain_pages()`` / ``unreserve_highatomic_pageblock()``.
- 6.1's ``__GFP_ATOMIC`` is gone from ``guestkernel.gfp``; a request is
  "atomic" (``ALLOC_HARDER``) when it has ``GFP_HIGH`` and no
  ``GFP_DIRECT_RECLAIM``, which is the rule 6.3 adopted.
- No watermark boosting (``boost_watermark`` is undone by kswapd, which is
  not modelled), no CMA, no ZONE_MOVABLE/HIGHMEM, no free page reporting or
  shuffling, no debug_pagealloc guard pages, no ``check_new_pages`` poisoning.
- pcp ``batch`` is 6.1 ``zone_batchsize`` (63 for zones of 1 GiB or more);
  ``high`` is 6.1 ``zone_highsize`` for one CPU: ``max(low_wmark, 4 * batch)``,
  recomputed whenever the watermarks are (``setup_per_zone_wmarks`` calls
  ``zone_pcp_update``). pcp lists hold orders 0..3 and ``PAGEBLOCK_ORDER``
  (``pcp_allowed_order``; one list for the THP order, shared by all
  migratetypes, ``NR_PCP_THP == 1``); ``pcp_high_orders=False`` restricts them
  to order 0 (the pre-5.13 allocator). The ``free_factor`` heuristic of
  ``nr_pcp_free`` is modelled; ``pcp->free_factor >>= 1`` happens only when a
  pcp allocation succeeds.
- ``move_freepages``'s count of movable pages (PageLRU or __PageMovable) is
  the number of pages in blocks allocated with migratetype MOVABLE.
- ``NR_FREE_PAGES`` (``zone.free_pages``) counts every buddy free page,
  including those on ISOLATE lists (Linux subtracts them in
  ``set_migratetype_isolate``, which is not modelled: ``set_pageblock_migratetype``
  is the raw setter).
- ``min_free_kbytes`` and the watermarks are recomputed from scratch after
  every ``free_range`` (as ``init_per_zone_wmark_min`` does once at boot,
  ``nr_free_buffer_pages`` = managed pages; khugepaged's raise of
  ``min_free_kbytes`` is not modelled); ``page_group_by_mobility_disabled``
  is decided at construction from the zones' spans (``build_all_zonelists``).
- Migratetypes registered by policies (``register_migratetype``) are not
  mergeable across pageblocks and have no pcp lists: their pages are freed
  straight to the buddy (as MIGRATE_ISOLATE pages are), so that a page of such
  a type never reaches another type's pcp list.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence

import numpy as np

from ..gfp import GFP, gfp_migratetype_index, gfp_zone_index

__all__ = [
    "MAX_ORDER",
    "MAX_ORDER_NR_PAGES",
    "MIGRATE_PCPTYPES",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "PAGE_ALLOC_COSTLY_ORDER",
    "AllocationError",
    "BadFreeError",
    "BuddyAllocator",
    "BuddyInvariantError",
    "MigrateType",
    "PerCpuPages",
    "Zone",
    "ZoneType",
]

PAGE_SHIFT = 12
MAX_ORDER = 11                      # orders 0..10; MAX_ORDER itself is never an order (6.1)
MAX_ORDER_NR_PAGES = 1 << (MAX_ORDER - 1)
PAGEBLOCK_ORDER = 9                 # HUGETLB_PAGE_ORDER on x86-64: 2 MiB
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER
PAGE_ALLOC_COSTLY_ORDER = 3
MIGRATE_PCPTYPES = 3                # UNMOVABLE, MOVABLE, RECLAIMABLE have pcp lists
NR_LOWORDER_PCP_LISTS = MIGRATE_PCPTYPES * (PAGE_ALLOC_COSTLY_ORDER + 1)
NR_PCP_LISTS = NR_LOWORDER_PCP_LISTS + 1     # + one THP list (NR_PCP_THP)
_MAX_MIGRATETYPES = 16              # a migratetype fits the 4 low bits of a pcp entry

WMARK_MIN, WMARK_LOW, WMARK_HIGH = 0, 1, 2

# alloc_flags (mm/internal.h), only those the model acts on.
ALLOC_WMARK_MIN = WMARK_MIN
ALLOC_WMARK_LOW = WMARK_LOW
ALLOC_WMARK_MASK = 0x03
ALLOC_HARDER = 0x10        # atomic: dip a further quarter below min, use high-atomic reserves
ALLOC_HIGH = 0x20          # __GFP_HIGH: dip to half of min
ALLOC_NOFRAGMENT = 0x100   # try the lower zones before fragmenting a pageblock (6.1 fast path)

# sysctl defaults of 6.1.
_LOWMEM_RESERVE_RATIO = (256, 256, 32)
_WATERMARK_SCALE_FACTOR = 10
_MIN_FREE_KBYTES_CLAMP = (128, 262144)

# _state byte: kind in the high nibble, order in the low nibble.
_PG_BUDDY = 0x10
_PG_ALLOC = 0x20
_PG_ALLOC_MOVABLE = 0x30
_PG_PCP = 0x40
_KIND_MASK = 0xF0
_ORDER_MASK = 0x0F

_ORDERS = frozenset(range(MAX_ORDER))


class MigrateType(enum.IntEnum):
    """``enum migratetype`` of 6.1 without CMA (MIGRATE_HIGHATOMIC == MIGRATE_PCPTYPES)."""

    UNMOVABLE = 0
    MOVABLE = 1
    RECLAIMABLE = 2
    HIGHATOMIC = 3
    ISOLATE = 4


class ZoneType(enum.IntEnum):
    """``enum zone_type`` of x86-64 (no HIGHMEM; ZONE_MOVABLE not modelled)."""

    DMA = 0
    DMA32 = 1
    NORMAL = 2


UNMOVABLE, MOVABLE, RECLAIMABLE, HIGHATOMIC, ISOLATE = (int(m) for m in MigrateType)
_ZONE_NAMES = {ZoneType.DMA: "DMA", ZoneType.DMA32: "DMA32", ZoneType.NORMAL: "Normal"}
# x86-64: ZONE_DMA below MAX_DMA_PFN (16 MiB), ZONE_DMA32 below MAX_DMA32_PFN (4 GiB).
_X86_ZONE_LIMITS = {ZoneType.DMA: (0, 0x1000), ZoneType.DMA32: (0x1000, 0x100000),
                    ZoneType.NORMAL: (0x100000, None)}

# 6.1 ``fallbacks[]``: the types a request may steal from, in order of preference.
_FALLBACKS: tuple[tuple[int, ...], ...] = (
    (RECLAIMABLE, MOVABLE),     # UNMOVABLE
    (RECLAIMABLE, UNMOVABLE),   # MOVABLE
    (UNMOVABLE, MOVABLE),       # RECLAIMABLE
    (),                         # HIGHATOMIC
    (),                         # ISOLATE
)


class AllocationError(Exception):
    """``alloc_pages`` found no page (the kernel returns NULL). Nothing changed.

    Raised as ``AllocationError(gfp, order, reason)``; callers above the buddy
    may also raise it with a message alone (``gfp`` and ``order`` are then None)."""

    def __init__(self, gfp: int | str, order: int | None = None, reason: str = "") -> None:
        if isinstance(gfp, str) and order is None:
            self.gfp, self.order, self.reason = None, None, gfp
            super().__init__(gfp)
            return
        self.gfp = gfp
        self.order = order
        self.reason = reason
        super().__init__(f"page allocation failure: order:{order}, mode:{int(gfp):#x}: {reason}")


class BadFreeError(ValueError):
    """``free_pages`` of something that is not an allocated block of that order
    (the kernel's ``bad_page()``/VM_BUG_ON). Nothing changed."""


class BuddyInvariantError(AssertionError):
    """``BuddyAllocator.check`` found a broken invariant (named in the message)."""


def _pcp_order_to_pindex(migratetype: int, order: int) -> int:
    """``order_to_pindex``: low orders have a list per pcp type, THP one shared list."""
    if order > PAGE_ALLOC_COSTLY_ORDER:
        return NR_LOWORDER_PCP_LISTS
    return MIGRATE_PCPTYPES * order + migratetype


def _pindex_to_order(pindex: int) -> int:
    """``pindex_to_order``."""
    if pindex == NR_LOWORDER_PCP_LISTS:
        return PAGEBLOCK_ORDER
    return pindex // MIGRATE_PCPTYPES


def _migratetype_is_mergeable(mt: int) -> bool:
    """``migratetype_is_mergeable``: only the pcp types merge across pageblocks."""
    return mt < MIGRATE_PCPTYPES


class PerCpuPages:
    """``struct per_cpu_pages`` of the one CPU modelled."""

    __slots__ = ("batch", "count", "free_factor", "high", "lists")

    def __init__(self) -> None:
        self.count = 0          # pages (not blocks) on all lists
        self.high = 0
        self.batch = 1
        self.free_factor = 0
        self.lists: list[deque[int]] = [deque() for _ in range(NR_PCP_LISTS)]

    def __repr__(self) -> str:
        return f"PerCpuPages(count={self.count}, high={self.high}, batch={self.batch})"


class Zone:
    """``struct zone``: a span of pfns, its free lists, counters and watermarks."""

    __slots__ = (
        "end_pfn",
        "free_area",
        "free_pages",
        "lowmem_reserve",
        "managed_pages",
        "name",
        "nr_isolate_pageblock",
        "nr_reserved_highatomic",
        "pcp",
        "start_pfn",
        "type",
        "watermark",
    )

    def __init__(self, ztype: ZoneType, start_pfn: int, end_pfn: int, nr_migratetypes: int
                 ) -> None:
        self.type = ztype
        self.name = _ZONE_NAMES[ztype]
        self.start_pfn = start_pfn
        self.end_pfn = end_pfn
        self.managed_pages = 0      # pages handed to the buddy (zone->managed_pages)
        self.free_pages = 0         # NR_FREE_PAGES: buddy free pages, pcp pages excluded
        self.watermark = [0, 0, 0]  # _watermark[WMARK_MIN/LOW/HIGH]
        self.lowmem_reserve = [0] * len(ZoneType)
        self.nr_reserved_highatomic = 0
        self.nr_isolate_pageblock = 0
        self.free_area: list[list[OrderedDict[int, None]]] = [
            [OrderedDict() for _ in range(nr_migratetypes)] for _ in range(MAX_ORDER)]
        self.pcp = PerCpuPages()

    @property
    def spanned_pages(self) -> int:
        return self.end_pfn - self.start_pfn

    @property
    def wmark_min(self) -> int:
        return self.watermark[WMARK_MIN]

    @property
    def wmark_low(self) -> int:
        return self.watermark[WMARK_LOW]

    @property
    def wmark_high(self) -> int:
        return self.watermark[WMARK_HIGH]

    def zone_spans_pfn(self, pfn: int) -> bool:
        return self.start_pfn <= pfn < self.end_pfn

    def __repr__(self) -> str:
        return (f"Zone({self.name}, [{self.start_pfn:#x}, {self.end_pfn:#x}), managed "
                f"{self.managed_pages}, free {self.free_pages}, min/low/high "
                f"{self.watermark[0]}/{self.watermark[1]}/{self.watermark[2]})")


class BuddyAllocator:
    """The zoned buddy allocator of one node, with one CPU's pagesets.

    ``zone_bounds`` maps each ZoneType to ``(start_pfn, end_pfn)``; a zone
    with an empty range is absent. By default the x86-64 boundaries clipped
    to ``max_pfn``. Nothing is free until ``free_range`` hands memory over
    (``memblock_free_all``); pages never handed over count as reserved.
    """

    def __init__(self, max_pfn: int,
                 zone_bounds: Mapping[ZoneType, tuple[int, int]] | None = None, *,
                 page_group_by_mobility_disabled: bool | None = None,
                 pcp_high_orders: bool = True) -> None:
        if max_pfn <= 0:
            raise ValueError(f"max_pfn must be positive, not {max_pfn}")
        self.max_pfn = max_pfn
        if zone_bounds is None:
            zone_bounds = {zt: (lo, max_pfn if hi is None else min(hi, max_pfn))
                           for zt, (lo, hi) in _X86_ZONE_LIMITS.items()}
        self._mt_names: list[str] = [m.name for m in MigrateType]
        self._fallbacks: list[tuple[int, ...]] = list(_FALLBACKS)
        self.zones: list[Zone] = []
        prev_end = 0
        for zt in ZoneType:
            lo, hi = zone_bounds.get(zt, (0, 0))
            if hi <= lo:
                continue
            if lo < prev_end or hi > max_pfn:
                raise ValueError(f"zone {_ZONE_NAMES[zt]} [{lo:#x}, {hi:#x}) overlaps a lower "
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
        self._pcp_allowed = [o == 0 or (pcp_high_orders and (o <= PAGE_ALLOC_COSTLY_ORDER
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
        self._ac_cache: dict[int, tuple] = {}
        self._allocated_once = False
        self.min_free_kbytes = 0
        self._setup_per_zone_wmarks()

    # ------------------------------------------------------------------ types

    def register_migratetype(self, name: str, fallbacks: Sequence[int] = ()) -> int:
        """Add a migratetype (e.g. Rapoport's MIGRATE_UNMAPPED) and return its
        number. ``fallbacks`` are the types it may steal from, in order. Only
        before the first allocation."""
        if self._allocated_once:
            raise RuntimeError("register_migratetype after the first allocation")
        if name in self._mt_names:
            raise ValueError(f"migratetype {name!r} already registered")
        if len(self._mt_names) >= _MAX_MIGRATETYPES:
            raise ValueError(f"at most {_MAX_MIGRATETYPES} migratetypes")
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

    # ------------------------------------------------------------------ zones

    def get_zone(self, ztype: ZoneType | int) -> Zone | None:
        return self._zone_by_type.get(int(ztype))

    def page_zone(self, pfn: int) -> Zone:
        """``page_zone``: the zone spanning ``pfn`` (ValueError if none)."""
        for zone in self._zones_desc:
            if pfn >= zone.start_pfn:
                if pfn < zone.end_pfn:
                    return zone
                break
        raise ValueError(f"pfn {pfn:#x} is in no zone")

    def _resolve_zone(self, zone: Zone | ZoneType | int | None) -> list[Zone]:
        if zone is None:
            return self.zones
        if isinstance(zone, Zone):
            return [zone]
        z = self._zone_by_type.get(int(zone))
        return [z] if z is not None else []

    # ------------------------------------------------------------------ boot

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
        self._handed.insert(i, [start_pfn, end_pfn])
        merged: list[list[int]] = []
        for s, e in self._handed:
            if merged and merged[-1][1] == s:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        self._handed = merged
        self._setup_per_zone_wmarks()

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
        order = min(MAX_ORDER - 1, (start & -start).bit_length() - 1 if start else MAX_ORDER - 1)
        while start + (1 << order) > end:
            order -= 1
        zone.managed_pages += 1 << order
        self._free_one_page(zone, start, order, self._pageblock_mt[start >> PAGEBLOCK_ORDER],
                            fpi_to_tail=True)
        return 1 << order

    def _free_max_order_blocks(self, zone: Zone, start: int, end: int) -> None:
        """``__free_one_page`` of each MAX_ORDER-1 block in [start, end) with
        FPI_TO_TAIL, vectorised: such blocks have no buddy to merge with."""
        top = MAX_ORDER - 1
        n = (end - start) >> top
        self._state_np[start:end:MAX_ORDER_NR_PAGES] = _PG_BUDDY | top
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

    # ------------------------------------------------------------------ watermarks

    def _setup_per_zone_wmarks(self) -> None:
        """``init_per_zone_wmark_min``: ``calculate_min_free_kbytes``,
        ``__setup_per_zone_wmarks``, ``setup_per_zone_lowmem_reserve`` and the
        ``zone_pcp_update`` that ``setup_per_zone_wmarks`` ends with."""
        lowmem_pages = sum(z.managed_pages for z in self.zones)
        lowmem_kbytes = lowmem_pages << (PAGE_SHIFT - 10)
        lo, hi = _MIN_FREE_KBYTES_CLAMP
        self.min_free_kbytes = min(max(math.isqrt(lowmem_kbytes * 16), lo), hi)
        pages_min = self.min_free_kbytes >> (PAGE_SHIFT - 10)
        for zone in self.zones:
            tmp = pages_min * zone.managed_pages // lowmem_pages if lowmem_pages else 0
            zone.watermark[WMARK_MIN] = tmp
            # kswapd distance: a quarter of min, or watermark_scale_factor/10000
            # of the zone (mult_frac), whichever is larger.
            tmp = max(tmp >> 2, zone.managed_pages * _WATERMARK_SCALE_FACTOR // 10000)
            zone.watermark[WMARK_LOW] = zone.watermark[WMARK_MIN] + tmp
            zone.watermark[WMARK_HIGH] = zone.watermark[WMARK_LOW] + tmp
        managed = [0] * len(ZoneType)
        for zone in self.zones:
            managed[zone.type] = zone.managed_pages
        for zone in self.zones:
            i = int(zone.type)
            ratio = _LOWMEM_RESERVE_RATIO[i]
            clear = not ratio or not zone.managed_pages
            upper = 0
            zone.lowmem_reserve = [0] * len(ZoneType)
            for j in range(i + 1, len(ZoneType)):
                upper += managed[j]
                zone.lowmem_reserve[j] = 0 if clear else upper // ratio
            self._zone_pcp_update(zone)

    @staticmethod
    def _zone_batchsize(zone: Zone) -> int:
        """``zone_batchsize``: ~0.1% of the zone or 1 MiB, /4, clamped to 2^n - 1."""
        batch = min(zone.managed_pages >> 10, (1 << 20) >> PAGE_SHIFT)
        batch //= 4
        batch = max(batch, 1)
        n = batch + batch // 2
        return (1 << (n.bit_length() - 1)) - 1

    def _zone_pcp_update(self, zone: Zone) -> None:
        """``zone_set_high_and_batch`` for one CPU: ``zone_highsize`` splits the
        low watermark across the node's CPUs (one here), at least 4 * batch."""
        batch = max(1, self._zone_batchsize(zone))
        zone.pcp.batch = batch
        zone.pcp.high = max(zone.watermark[WMARK_LOW], batch << 2)

    def _zone_watermark_ok(self, zone: Zone, order: int, mark: int, highest_zoneidx: int,
                           alloc_flags: int, free_pages: int) -> bool:
        """``__zone_watermark_ok``."""
        alloc_harder = alloc_flags & ALLOC_HARDER
        # __zone_watermark_unusable_free: the request's own tail pages, and the
        # high-atomic reserve unless the caller may use it.
        free_pages -= (1 << order) - 1
        if not alloc_harder:
            free_pages -= zone.nr_reserved_highatomic
        min_ = mark
        if alloc_flags & ALLOC_HIGH:
            min_ -= min_ // 2
        if alloc_harder:
            min_ -= min_ // 4
        if free_pages <= min_ + zone.lowmem_reserve[highest_zoneidx]:
            return False
        if not order:
            return True
        # A high-order request also needs one suitable block to be free.
        for area in zone.free_area[order:]:
            for mt in range(MIGRATE_PCPTYPES):
                if area[mt]:
                    return True
            if alloc_harder and area[HIGHATOMIC]:
                return True
        return False

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
        ``migratetype`` overrides the one ``gfp`` implies (for policies)."""
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

    def _get_page_from_freelist(self, order: int, alloc_flags: int, zonelist: tuple,
                                highest_zoneidx: int, mt: int) -> int:
        """``get_page_from_freelist``: the first zone of the zonelist that passes
        its watermark and has a page; with ALLOC_NOFRAGMENT a second pass
        without it."""
        while True:
            wmark = alloc_flags & ALLOC_WMARK_MASK
            for zone in zonelist:
                mark = zone.watermark[wmark]
                free = zone.free_pages
                # zone_watermark_fast: the order-0 shortcut, then the full check.
                reserved = 0 if alloc_flags & ALLOC_HARDER else zone.nr_reserved_highatomic
                if not (order == 0 and free - reserved
                        > mark + zone.lowmem_reserve[highest_zoneidx]) and \
                        not self._zone_watermark_ok(zone, order, mark, highest_zoneidx,
                                                    alloc_flags, free):
                    continue
                pfn = self._rmqueue(zone, order, alloc_flags, mt)
                if pfn >= 0:
                    # prep_new_page
                    self._state[pfn] = (_PG_ALLOC_MOVABLE if mt == MOVABLE else _PG_ALLOC) | order
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

    def _rmqueue_pcplist(self, zone: Zone, order: int, mt: int, alloc_flags: int) -> int:
        """``rmqueue_pcplist`` / ``__rmqueue_pcplist``: take the head of the pcp
        list, refilling an empty list with ``batch`` (scaled down by order)
        blocks from the buddy."""
        pcp = zone.pcp
        lst = pcp.lists[_pcp_order_to_pindex(mt, order)]
        if not lst:
            batch = pcp.batch
            if batch > 1:
                batch = max(batch >> order, 2)
            alloced = self._rmqueue_bulk(zone, order, batch, lst, mt, alloc_flags)
            pcp.count += alloced << order
            if not lst:
                return -1
        pcp.free_factor >>= 1
        pcp.count -= 1 << order
        return lst.popleft() >> 4

    def _rmqueue_bulk(self, zone: Zone, order: int, count: int, lst: deque[int], mt: int,
                      alloc_flags: int) -> int:
        """``rmqueue_bulk``: up to ``count`` blocks from the buddy to the pcp
        list's tail, in the physical order expand() produced them."""
        st = self._state
        code = _PG_PCP | order
        rmqueue = self._rmqueue_inner
        n = 0
        while n < count:
            pfn = rmqueue(zone, order, mt, alloc_flags)
            if pfn < 0:
                break
            st[pfn] = code
            lst.append(pfn << 4 | mt)    # set_pcppage_migratetype(page, mt)
            n += 1
        return n

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
        fallback type and retry."""
        while True:
            pfn = self._rmqueue_smallest(zone, order, mt)
            if pfn >= 0:
                return pfn
            if not self._rmqueue_fallback(zone, order, mt, alloc_flags):
                return -1

    def _rmqueue_smallest(self, zone: Zone, order: int, mt: int) -> int:
        """``__rmqueue_smallest``: the head of the smallest non-empty list of the
        type, split down to ``order`` by ``_expand``."""
        fa = zone.free_area
        for current_order in range(order, MAX_ORDER):
            d = fa[current_order][mt]
            if d:
                pfn = d.popitem()[0]             # get_page_from_free_area + del_page_from_free_list
                self._state[pfn] = 0
                zone.free_pages -= 1 << order    # __mod_zone_freepage_state
                if current_order > order:
                    self._expand(zone, pfn, order, current_order, mt)
                return pfn
        return -1

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
            st[pfn + size] = _PG_BUDDY | high

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
                # How many pages are compatible with the allocation: for a
                # movable one the movable pages; an unmovable/reclaimable one
                # stealing from a MOVABLE block counts every non-movable page.
                if start_type == MOVABLE:
                    alike_pages = movable_pages
                elif old_block_type == MOVABLE:
                    alike_pages = PAGEBLOCK_NR_PAGES - (free_pages + movable_pages)
                else:
                    alike_pages = 0
                if free_pages:   # moving the whole block fails at zone boundaries
                    if (free_pages + alike_pages >= 1 << (PAGEBLOCK_ORDER - 1)
                            or self.page_group_by_mobility_disabled):
                        self._set_pageblock_migratetype(pfn, start_type)
                    return
        self._move_to_free_list(zone, pfn, current_order, start_type)

    def _change_pageblock_range(self, pfn: int, order: int, mt: int) -> None:
        """``change_pageblock_range``."""
        for p in range(pfn, pfn + (1 << order), PAGEBLOCK_NR_PAGES):
            self._set_pageblock_migratetype(p, mt)

    def _reserve_highatomic_pageblock(self, zone: Zone, pfn: int) -> None:
        """``reserve_highatomic_pageblock``: after a high-order atomic
        allocation, reserve its pageblock (at most ~1% of the zone)."""
        max_managed = zone.managed_pages // 100 + PAGEBLOCK_NR_PAGES
        if zone.nr_reserved_highatomic >= max_managed:
            return
        mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        if _migratetype_is_mergeable(mt):
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

    def _move_freepages(self, zone: Zone, start: int, end: int, mt: int) -> tuple[int, int]:
        """``move_freepages`` over [start, end]: free heads move (at their list's
        tail); other pages count as movable if their block was allocated MOVABLE."""
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
                if kind == _PG_ALLOC_MOVABLE:
                    movable += n
                p += n
        while p <= end:
            v = st[p]
            kind = v & _KIND_MASK
            if kind == _PG_BUDDY:
                order = v & _ORDER_MASK
                self._move_to_free_list(zone, p, order, mt)
                p += 1 << order
                moved += 1 << order
            elif kind:
                n = min(1 << (v & _ORDER_MASK), end + 1 - p)
                if kind == _PG_ALLOC_MOVABLE:
                    movable += n
                p += n
            else:
                p += 1
        return moved, movable

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

    # ------------------------------------------------------------------ freeing

    def free_pages(self, pfn: int, order: int = 0) -> None:
        """``__free_pages`` -> ``free_the_page``: pcp orders go through
        ``free_unref_page`` (the pcp list, drained in batches above ``high``),
        others straight to ``__free_one_page``. Raises BadFreeError, changing
        nothing, unless ``pfn`` heads an allocated block of exactly ``order``."""
        if order not in _ORDERS or not 0 <= pfn < self.max_pfn:
            raise self._bad_free(pfn, order)
        st = self._state
        v = st[pfn]
        if v != _PG_ALLOC | order and v != _PG_ALLOC_MOVABLE | order:
            raise self._bad_free(pfn, order)
        for zone in self._zones_desc:
            if pfn >= zone.start_pfn:
                break
        mt = self._pageblock_mt[pfn >> PAGEBLOCK_ORDER]
        if not self._pcp_allowed[order]:
            self._free_one_page_locked(zone, pfn, order, mt)      # __free_pages_ok
            return
        # free_unref_page: HIGHATOMIC pages go on the MOVABLE list (so those
        # areas come back); ISOLATE (and registered types) bypass the pcp.
        list_mt = mt
        if mt >= MIGRATE_PCPTYPES:
            if mt != HIGHATOMIC:
                self._free_one_page_locked(zone, pfn, order, mt)
                return
            list_mt = MOVABLE
        # free_unref_page_commit
        pcp = zone.pcp
        pindex = _pcp_order_to_pindex(list_mt, order)
        pcp.lists[pindex].appendleft(pfn << 4 | mt)
        st[pfn] = _PG_PCP | order
        pcp.count += 1 << order
        # High-order non-THP pages freed without allocations in between are
        # drained at once: they would fragment otherwise.
        free_high = pcp.free_factor and order and order <= PAGE_ALLOC_COSTLY_ORDER
        high = 0 if free_high else pcp.high
        if pcp.count >= high:
            self._free_pcppages_bulk(zone, self._nr_pcp_free(pcp, high, pcp.batch, free_high),
                                     pcp, pindex)

    def _bad_free(self, pfn: int, order: int) -> BadFreeError:
        """Name what is wrong with ``free_pages(pfn, order)``."""
        if order not in _ORDERS:
            why = f"order {order} out of range [0, {MAX_ORDER})"
        elif not 0 <= pfn < self.max_pfn:
            why = f"pfn out of range [0, {self.max_pfn:#x})"
        elif pfn & ((1 << order) - 1):
            why = f"pfn not aligned to order {order}"
        else:
            v = self._state[pfn]
            kind, o = v & _KIND_MASK, v & _ORDER_MASK
            if kind in (_PG_ALLOC, _PG_ALLOC_MOVABLE):
                why = f"wrong order: allocated as order {o}"
            elif kind == _PG_BUDDY:
                why = f"double free: pfn heads a free order-{o} block"
            elif kind == _PG_PCP:
                why = "double free: pfn is on a pcp list"
            else:
                block = self._find_block(pfn)
                if block is None:
                    why = "never allocated: reserved, never given to the buddy"
                else:
                    head, o, kind = block
                    what = {_PG_BUDDY: "free", _PG_PCP: "pcp"}.get(kind, "allocated")
                    why = f"pfn is inside the {what} order-{o} block at {head:#x}"
        return BadFreeError(f"bad free_pages(pfn={pfn:#x}, order={order}): {why}")

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
        at the tail when the next-higher buddy is free (``buddy_merge_likely``)."""
        st = self._state
        pbmt = self._pageblock_mt
        fa = zone.free_area
        zstart, zend = zone.start_pfn, zone.end_pfn
        zone.free_pages += 1 << order
        buddy_pfn = pfn
        while order < MAX_ORDER - 1:
            buddy_pfn = pfn ^ (1 << order)           # __find_buddy_pfn
            if st[buddy_pfn] != _PG_BUDDY | order or not zstart <= buddy_pfn < zend:
                break
            if order >= PAGEBLOCK_ORDER:
                buddy_mt = pbmt[buddy_pfn >> PAGEBLOCK_ORDER]
                if mt != buddy_mt and not (_migratetype_is_mergeable(mt)
                                           and _migratetype_is_mergeable(buddy_mt)):
                    break
            del self._free_list_of(zone, buddy_pfn, order)[buddy_pfn]
            st[buddy_pfn] = 0
            pfn &= buddy_pfn
            order += 1
        st[pfn] = _PG_BUDDY | order                   # set_buddy_order
        if fpi_to_tail:
            to_tail = True
        elif order >= MAX_ORDER - 2:
            to_tail = False
        else:
            # buddy_merge_likely: if the block's parent has a free buddy, this
            # block is likely to merge soon; keep it away from allocations.
            higher = buddy_pfn & pfn
            hb = higher ^ (1 << (order + 1))
            to_tail = st[hb] == _PG_BUDDY | (order + 1) and zstart <= hb < zend
        d = fa[order][mt]
        d[pfn] = None
        if to_tail:
            d.move_to_end(pfn, last=False)

    # ------------------------------------------------------------------ pcp

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
        isolated_pageblocks = zone.nr_isolate_pageblock > 0
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
            order = _pindex_to_order(pindex)
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

    def drain_pages(self, zone: Zone | ZoneType | int | None = None) -> None:
        """``drain_all_pages`` (or ``drain_pages_zone`` of one zone): return every
        pcp page to the buddy."""
        for z in self._resolve_zone(zone):
            if z.pcp.count:
                self._free_pcppages_bulk(z, z.pcp.count, z.pcp, 0)

    # ------------------------------------------------------------------ queries

    def _find_block(self, pfn: int) -> tuple[int, int, int] | None:
        """(head pfn, order, kind) of the block containing ``pfn``, or None."""
        st = self._state
        for o in range(MAX_ORDER):
            head = pfn & ~((1 << o) - 1)
            v = st[head]
            if v and v & _ORDER_MASK >= o:
                return head, v & _ORDER_MASK, v & _KIND_MASK
        return None

    def is_free(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in a buddy free block (pcp pages are not free:
        the buddy sees them as allocated, as PageBuddy does)."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        block = self._find_block(pfn)
        return block is not None and block[2] == _PG_BUDDY

    def split_allocated(self, pfn: int, order: int) -> None:
        """``split_page``: an allocated block of ``order`` becomes 2^order
        allocated order-0 pages, each freed on its own."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        v = self._state[pfn]
        kind = v & _KIND_MASK
        if kind not in (_PG_ALLOC, _PG_ALLOC_MOVABLE) or v & _ORDER_MASK != order:
            raise BadFreeError(f"split_page({pfn:#x}, {order}): not an allocated block of that order")
        self._state_np[pfn: pfn + (1 << order)] = kind

    def in_pcp(self, pfn: int) -> bool:
        """Whether ``pfn`` heads a block sitting on a per-cpu list (freed by
        its user, not yet back in the buddy)."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        return self._state[pfn] & _KIND_MASK == _PG_PCP

    def allocated_order(self, pfn: int) -> int | None:
        """The order of the allocated block headed by ``pfn``, else None."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        v = self._state[pfn]
        if v & _KIND_MASK in (_PG_ALLOC, _PG_ALLOC_MOVABLE):
            return v & _ORDER_MASK
        return None

    def nr_free(self, zone: Zone | ZoneType | int | None = None, order: int | None = None,
                mt: int | None = None) -> int:
        """Buddy free pages (not blocks), optionally of one zone, order, migratetype
        list. pcp pages are not included (as NR_FREE_PAGES)."""
        orders = range(MAX_ORDER) if order is None else [order]
        total = 0
        for z in self._resolve_zone(zone):
            for o in orders:
                area = z.free_area[o]
                lists = area if mt is None else [area[mt]]
                total += sum(len(d) for d in lists) << o
        return total

    def nr_pcp_pages(self, zone: Zone | ZoneType | int | None = None) -> int:
        """Pages on the pcp lists."""
        return sum(z.pcp.count for z in self._resolve_zone(zone))

    def nr_allocated(self, zone: Zone | ZoneType | int | None = None) -> int:
        """Pages in allocated blocks (neither buddy-free, nor pcp, nor reserved)."""
        total = 0
        for z in self._resolve_zone(zone):
            seg = self._state_np[z.start_pfn:z.end_pfn]
            idx = np.flatnonzero((seg & 0xE0) == _PG_ALLOC)   # both ALLOC kinds
            total += int((np.int64(1) << (seg[idx] & _ORDER_MASK).astype(np.int64)).sum())
        return total

    def free_list(self, zone: Zone | ZoneType | int, order: int, mt: int) -> list[int]:
        """The pfns on one free list, from the kernel list's head to its tail."""
        (z,) = self._resolve_zone(zone)
        return list(reversed(z.free_area[order][mt]))

    def pcp_list(self, zone: Zone | ZoneType | int, mt: int, order: int = 0) -> list[int]:
        """The pfns on one pcp list, head first."""
        (z,) = self._resolve_zone(zone)
        return [x >> 4 for x in z.pcp.lists[_pcp_order_to_pindex(mt, order)]]

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        """Verify the allocator's invariants (vectorised over the per-page
        arrays); raise BuddyInvariantError naming the first broken one."""

        def fail(what: str, detail: str) -> None:
            raise BuddyInvariantError(f"{what}: {detail}")

        st = self._state_np
        if st[self.max_pfn:].any():
            fail("page metadata", "a pfn beyond max_pfn has state")
        idx = np.flatnonzero(st).astype(np.int64)
        vals = st[idx]
        kinds = vals & _KIND_MASK
        orders = (vals & _ORDER_MASK).astype(np.int64)
        bad = ~np.isin(kinds, (_PG_BUDDY, _PG_ALLOC, _PG_ALLOC_MOVABLE, _PG_PCP)) | (
            orders >= MAX_ORDER)
        if bad.any():
            i = int(np.argmax(bad))
            fail("page metadata", f"pfn {int(idx[i]):#x} has state byte {int(vals[i]):#x}")
        sizes = np.int64(1) << orders
        mis = (idx & (sizes - 1)) != 0
        if mis.any():
            i = int(np.argmax(mis))
            fail("blocks aligned to their order",
                 f"block at {int(idx[i]):#x} of order {int(orders[i])}")
        ends = idx + sizes
        over = ends[:-1] > idx[1:]
        if over.any():
            i = int(np.argmax(over))
            fail("blocks disjoint", f"block at {int(idx[i]):#x} order {int(orders[i])} overlaps "
                 f"block at {int(idx[i + 1]):#x}")
        # Each block inside one zone and inside memory given to the buddy.
        hs = np.array([s for s, _ in self._handed] or [0], dtype=np.int64)
        he = np.array([e for _, e in self._handed] or [0], dtype=np.int64)
        r = np.searchsorted(hs, idx, side="right") - 1
        outside = (r < 0) | (ends > he[np.maximum(r, 0)])
        if outside.any():
            i = int(np.argmax(outside))
            fail("reserved pages never in a block",
                 f"block at {int(idx[i]):#x} order {int(orders[i])} covers pages never freed "
                 f"to the buddy")
        for zone in self.zones:
            inz = (idx >= zone.start_pfn) & (idx < zone.end_pfn)
            if (ends[inz] > zone.end_pfn).any():
                fail("blocks inside one zone", f"a block crosses the end of zone {zone.name}")
            covered = int(sizes[inz].sum())
            if covered != zone.managed_pages:
                fail("free + pcp + allocated + reserved cover every pfn once",
                     f"zone {zone.name}: blocks cover {covered} pages, managed_pages is "
                     f"{zone.managed_pages}")
        handed = sum(e - s for s, e in self._handed)
        if int(sizes.sum()) != handed:
            fail("free + pcp + allocated + reserved cover every pfn once",
                 f"blocks cover {int(sizes.sum())} pages, {handed} were freed to the buddy")
        # Free lists against the page metadata.
        n_lists = 0
        for zone in self.zones:
            free = 0
            for order, area in enumerate(zone.free_area):
                for mt, d in enumerate(area):
                    if not d:
                        continue
                    keys = np.fromiter(d, dtype=np.int64, count=len(d))
                    wrong = ((keys < zone.start_pfn) | (keys >= zone.end_pfn))
                    if not wrong.any():
                        wrong = st[keys] != (_PG_BUDDY | order)
                    if wrong.any():
                        k = int(keys[int(np.argmax(wrong))])
                        fail("free list membership",
                             f"{zone.name} order-{order} {self._mt_names[mt]} list holds {k:#x} "
                             f"whose state byte is {int(st[k]) if k < st.size else -1:#x}")
                    n_lists += len(d)
                    free += len(d) << order
            if free != zone.free_pages:
                fail("NR_FREE_PAGES", f"zone {zone.name} counts {zone.free_pages}, lists hold "
                     f"{free}")
        n_buddy = int((kinds == _PG_BUDDY).sum())
        if n_lists != n_buddy:
            fail("free list membership", f"{n_buddy} free heads, {n_lists} list entries "
                 "(a head on no list or on two)")
        # Free buddies below pageblock order always merge.
        fb = (kinds == _PG_BUDDY) & (orders < PAGEBLOCK_ORDER)
        fidx, ford = idx[fb], orders[fb]
        bud = fidx ^ (np.int64(1) << ford)
        unmerged = st[bud] == (_PG_BUDDY | ford)
        for zone in self.zones:   # buddies in different zones may not merge
            unmerged &= ~(((fidx >= zone.start_pfn) & (fidx < zone.end_pfn))
                          ^ ((bud >= zone.start_pfn) & (bud < zone.end_pfn)))
        if unmerged.any():
            i = int(np.argmax(unmerged))
            fail("free buddies merged", f"{int(fidx[i]):#x} and its buddy {int(bud[i]):#x} are "
                 f"both free at order {int(ford[i])}")
        # pcp lists.
        n_pcp = 0
        for zone in self.zones:
            pages = 0
            for pindex, lst in enumerate(zone.pcp.lists):
                order = _pindex_to_order(pindex)
                for x in lst:
                    pfn, mt = x >> 4, x & 0xF
                    if not zone.zone_spans_pfn(pfn) or st[pfn] != _PG_PCP | order:
                        fail("pcp list membership", f"{zone.name} pcp list {pindex} holds "
                             f"{pfn:#x} whose state byte is {int(st[pfn]):#x}")
                    if pindex < NR_LOWORDER_PCP_LISTS and mt != pindex % MIGRATE_PCPTYPES and not (
                            mt == HIGHATOMIC and pindex % MIGRATE_PCPTYPES == MOVABLE):
                        fail("pcp list membership", f"{pfn:#x} with migratetype "
                             f"{self._mt_names[mt]} on pcp list {pindex}")
                    pages += 1 << order
                    n_pcp += 1
            if pages != zone.pcp.count:
                fail("pcp count", f"zone {zone.name} pcp count {zone.pcp.count}, lists hold "
                     f"{pages}")
        if n_pcp != int((kinds == _PG_PCP).sum()):
            fail("pcp list membership", "pcp heads and pcp list entries differ")
        # Pageblocks.
        pb = self._pageblock_np
        if (pb >= len(self._mt_names)).any():
            i = int(np.argmax(pb >= len(self._mt_names)))
            fail("pageblock migratetypes", f"pageblock at {i << PAGEBLOCK_ORDER:#x} has "
                 f"unknown migratetype {int(pb[i])}")
        if self.page_group_by_mobility_disabled and np.isin(pb, (MOVABLE, RECLAIMABLE)).any():
            fail("pageblock migratetypes", "MOVABLE/RECLAIMABLE pageblock with grouping by "
                 "mobility disabled")
        n_iso = dict.fromkeys((z.type for z in self.zones), 0)
        for i in np.flatnonzero(pb == ISOLATE).tolist():
            n_iso[self._pageblock_zone(i).type] += 1
        for zone in self.zones:
            if n_iso[zone.type] != zone.nr_isolate_pageblock:
                n_iso = n_iso[zone.type]
                fail("pageblock migratetypes", f"zone {zone.name} counts "
                     f"{zone.nr_isolate_pageblock} isolated pageblocks, has {n_iso}")
