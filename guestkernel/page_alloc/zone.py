"""Zones, their per-CPU pagesets and watermarks.

Mirrors ``struct zone`` and ``struct per_cpu_pages`` (``include/linux/mmzone.h``)
and, from ``mm/page_alloc.c``:

- ``init_per_zone_wmark_min``: ``calculate_min_free_kbytes``,
  ``__setup_per_zone_wmarks``, ``setup_per_zone_lowmem_reserve``; and
  khugepaged's ``set_recommended_min_free_kbytes`` (``mm/khugepaged.c``),
  which raises ``min_free_kbytes`` when THP is enabled (Debian: always);
- ``zone_batchsize`` and ``zone_set_high_and_batch`` / ``zone_highsize``
  (``zone_pcp_update``, which ``setup_per_zone_wmarks`` ends with), per
  :class:`PcpScheme`: 5.10's ``pageset_set_batch`` (``high = 6 * batch``),
  6.1's one ``high``, 6.7+'s ``high_min``/``high_max``;
- ``__zone_watermark_ok`` (with ``__zone_watermark_unusable_free``);
- ``page_zone`` and the zone lookups of the allocator.

``ZoneMixin`` holds the allocator's methods of this seam (see ``buddy.py``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from .types import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    HIGHATOMIC,
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    NR_PCP_LISTS,
    PAGE_SHIFT,
    PAGEBLOCK_NR_PAGES,
    WMARK_HIGH,
    WMARK_LOW,
    WMARK_MIN,
    ZONE_NAMES,
    PcpScheme,
    ZoneType,
)

__all__ = ["PerCpuPages", "Zone", "ZoneMixin"]

# sysctl defaults of 6.1.
_LOWMEM_RESERVE_RATIO = (256, 256, 32)
_WATERMARK_SCALE_FACTOR = 10
#: MIN_PERCPU_PAGELIST_HIGH_FRACTION: 6.7+'s high_max is 1/8 of the zone
_HIGH_MAX_FRACTION = 8
_MIN_FREE_KBYTES_CLAMP = (128, 262144)


class PerCpuPages:
    """``struct per_cpu_pages`` of the one CPU modelled."""

    __slots__ = ("alloc_factor", "batch", "count", "free_count", "free_factor", "free_high_batch",
                 "high", "high_max", "high_min", "lists", "prev_free_high_order")

    def __init__(self) -> None:
        self.count = 0          # pages (not blocks) on all lists
        self.high = 0           # BOOT_PAGESET_HIGH until zone_pcp_update
        self.batch = 1
        self.free_factor = 0    # 5.13-6.6: nr_pcp_free's doubling
        # 6.7+ (PcpScheme.AUTOTUNE)
        self.high_min = 0
        self.high_max = 0
        self.alloc_factor = 0   # nr_pcp_alloc's doubling
        self.free_count = 0     # pages freed since allocations (halved by each)
        self.prev_free_high_order = False   # PCPF_PREV_FREE_HIGH_ORDER
        #: PCPF_FREE_HIGH_BATCH: the CPU's data cache slice holds more than
        #: 3 * batch pages (zone_pcp_update_cacheinfo); QEMU's caches are
        #: MiBs, so set for a zone's pcp once batch is known
        self.free_high_batch = True
        self.lists: list[deque[int]] = [deque() for _ in range(NR_PCP_LISTS)]

    def __repr__(self) -> str:
        return f"PerCpuPages(count={self.count}, high={self.high}, batch={self.batch})"


class Zone:
    """``struct zone``: a span of pfns, its free lists, counters and watermarks."""

    __slots__ = (
        "below_high",
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
        self.name = ZONE_NAMES[ztype]
        self.start_pfn = start_pfn
        self.end_pfn = end_pfn
        self.managed_pages = 0      # pages handed to the buddy (zone->managed_pages)
        self.free_pages = 0         # NR_FREE_PAGES: buddy free pages, pcp pages excluded
        self.watermark = [0, 0, 0]  # _watermark[WMARK_MIN/LOW/HIGH]
        self.lowmem_reserve = [0] * len(ZoneType)
        self.nr_reserved_highatomic = 0
        self.nr_isolate_pageblock = 0
        #: ZONE_BELOW_HIGH (6.7+): an allocation found the zone under its
        #: high watermark; pcp frees then shrink pcp->high
        self.below_high = False
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


class ZoneMixin:
    """The allocator's zones: lookups, watermarks, lowmem reserves, pcp sizes."""

    zones: list[Zone]
    _zone_by_type: dict[int, Zone]
    _zones_desc: list[Zone]
    _pcp_scheme: PcpScheme
    min_free_kbytes: int
    #: khugepaged raises min_free_kbytes (set_recommended_min_free_kbytes)
    khugepaged_min_free: bool

    # ------------------------------------------------------------------ lookups

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

    # ------------------------------------------------------------------ watermarks

    def _setup_per_zone_wmarks(self) -> None:
        """``init_per_zone_wmark_min``: ``calculate_min_free_kbytes``,
        ``__setup_per_zone_wmarks``, ``setup_per_zone_lowmem_reserve`` and the
        ``zone_pcp_update`` that ``setup_per_zone_wmarks`` ends with; then,
        with ``khugepaged_min_free``, khugepaged's raise and the same again."""
        lowmem_pages = sum(z.managed_pages for z in self.zones)
        lowmem_kbytes = lowmem_pages << (PAGE_SHIFT - 10)
        lo, hi = _MIN_FREE_KBYTES_CLAMP
        self.min_free_kbytes = min(max(math.isqrt(lowmem_kbytes * 16), lo), hi)
        self._setup_wmarks_from_min(lowmem_pages)
        if self.khugepaged_min_free:
            recommended = self._recommended_min_free_kbytes()
            if recommended > self.min_free_kbytes:
                self.min_free_kbytes = recommended
                self._setup_wmarks_from_min(lowmem_pages)

    def _recommended_min_free_kbytes(self) -> int:
        """khugepaged's ``set_recommended_min_free_kbytes`` (mm/khugepaged.c):
        two free pageblocks per zone (ZONE_MOVABLE aside), plus
        MIGRATE_PCPTYPES^2 per zone to fall back into, at most 5 % of
        ``nr_free_buffer_pages()`` (the managed pages above each zone's high
        watermark)."""
        zones = [z for z in self.zones if z.managed_pages and z.type <= ZoneType.NORMAL]
        recommended = PAGEBLOCK_NR_PAGES * len(zones) * 2
        recommended += PAGEBLOCK_NR_PAGES * len(zones) * MIGRATE_PCPTYPES * MIGRATE_PCPTYPES
        buffer_pages = sum(max(z.managed_pages - z.watermark[WMARK_HIGH], 0) for z in zones)
        return min(recommended, buffer_pages // 20) << (PAGE_SHIFT - 10)

    def _setup_wmarks_from_min(self, lowmem_pages: int) -> None:
        """``__setup_per_zone_wmarks`` and ``setup_per_zone_lowmem_reserve``
        for the current ``min_free_kbytes``, then ``zone_pcp_update``."""
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

    def clear_watermarks(self) -> None:
        """The zones as ``free_area_init`` leaves them: no watermarks or
        lowmem reserves until ``init_per_zone_wmark_min``."""
        self.min_free_kbytes = 0
        for zone in self.zones:
            zone.watermark = [0] * len(zone.watermark)
            zone.lowmem_reserve = [0] * len(zone.lowmem_reserve)

    def init_per_zone_wmark_min(self) -> None:
        """``init_per_zone_wmark_min`` (a postcore initcall), for a boot that
        set ``watermarks_fixed`` to keep the hand-over and deferred init from
        computing them: the watermarks and lowmem reserves, and (5.14+) the
        per-CPU sizes that ``setup_per_zone_wmarks`` updates with them."""
        self._setup_per_zone_wmarks()

    def boot_pagesets(self) -> None:
        """The boot pageset (``per_cpu_pages_init``: ``BOOT_PAGESET_HIGH`` 0,
        ``BOOT_PAGESET_BATCH`` 1) every zone uses from the buddy hand-over
        until ``setup_per_cpu_pageset``: each order-0 allocation takes one
        page from the buddy, each free goes straight back. ``start_kernel``
        allocates ftrace's records and the tracing ring buffer this way."""
        for zone in self.zones:
            pcp = zone.pcp
            pcp.high, pcp.batch, pcp.high_min, pcp.high_max = 0, 1, 0, 0

    def setup_per_cpu_pageset(self) -> None:
        """``setup_per_cpu_pageset``: the zones' own pagesets, sized from the
        watermarks (``zone_set_high_and_batch``)."""
        for zone in self.zones:
            self._zone_pcp_update(zone)

    @staticmethod
    def _zone_batchsize(zone: Zone) -> int:
        """``zone_batchsize``: ~0.1% of the zone or 1 MiB, /4, clamped to
        2^n - 1 (0 for a zone under 8 MiB: 5.10 then sets high 0, batch 1)."""
        batch = min(zone.managed_pages >> 10, (1 << 20) >> PAGE_SHIFT)
        batch //= 4
        batch = max(batch, 1)
        n = batch + batch // 2
        return (1 << (n.bit_length() - 1)) - 1

    def _zone_pcp_update(self, zone: Zone) -> None:
        """``zone_set_high_and_batch`` for one CPU. 5.10: ``pageset_set_batch``,
        ``high = 6 * batch``. 6.1: ``zone_highsize`` splits the low watermark
        across the node's CPUs (one here), at least 4 * batch. 6.7+: that is
        ``high_min``; ``high_max`` is 1/8 of the zone's managed pages (also at
        least 4 * batch); ``high`` itself is clamped between them when the
        pcp is next used (it starts at the boot pageset's 0)."""
        raw = self._zone_batchsize(zone)
        batch = max(1, raw)
        pcp = zone.pcp
        pcp.batch = batch
        scheme = self._pcp_scheme
        if scheme == PcpScheme.LEGACY:
            pcp.high = 6 * raw
            return
        high_min = max(zone.watermark[WMARK_LOW], batch << 2)
        if scheme == PcpScheme.FREE_FACTOR:
            pcp.high = high_min
            return
        pcp.high_min = high_min
        pcp.high_max = max(zone.managed_pages // _HIGH_MAX_FRACTION, batch << 2)

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
