"""Zones, their per-CPU pagesets and watermarks.

Mirrors ``struct zone`` and ``struct per_cpu_pages`` (``include/linux/mmzone.h``)
and, from ``mm/page_alloc.c``:

- ``init_per_zone_wmark_min``: ``calculate_min_free_kbytes``,
  ``__setup_per_zone_wmarks``, ``setup_per_zone_lowmem_reserve``;
- ``zone_batchsize`` and ``zone_set_high_and_batch`` / ``zone_highsize``
  (``zone_pcp_update``, which ``setup_per_zone_wmarks`` ends with);
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
    WMARK_HIGH,
    WMARK_LOW,
    WMARK_MIN,
    ZONE_NAMES,
    ZoneType,
)

__all__ = ["PerCpuPages", "Zone", "ZoneMixin"]

# sysctl defaults of 6.1.
_LOWMEM_RESERVE_RATIO = (256, 256, 32)
_WATERMARK_SCALE_FACTOR = 10
_MIN_FREE_KBYTES_CLAMP = (128, 262144)


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
        self.name = ZONE_NAMES[ztype]
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


class ZoneMixin:
    """The allocator's zones: lookups, watermarks, lowmem reserves, pcp sizes."""

    zones: list[Zone]
    _zone_by_type: dict[int, Zone]
    _zones_desc: list[Zone]
    min_free_kbytes: int

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
