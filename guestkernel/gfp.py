"""GFP flags (include/linux/gfp_types.h), without the leading underscores.

The modifiers that matter to the direct map are modelled; the rest of the
kernel's reclaim/IO flags are accepted where they exist in Linux so that
call sites read like the kernel's, and ignored.
"""

from __future__ import annotations

import enum

__all__ = [
    "GFP",
    "GFP_ACCOUNT",
    "GFP_ATOMIC",
    "GFP_COMP",
    "GFP_DIRECT_RECLAIM",
    "GFP_DMA",
    "GFP_DMA32",
    "GFP_FS",
    "GFP_HIGH",
    "GFP_HIGHMEM",
    "GFP_HIGHUSER",
    "GFP_HIGHUSER_MOVABLE",
    "GFP_IO",
    "GFP_KERNEL",
    "GFP_KERNEL_ACCOUNT",
    "GFP_KSWAPD_RECLAIM",
    "GFP_MOVABLE",
    "GFP_NOWAIT",
    "GFP_NOWARN",
    "GFP_PGTABLE",
    "GFP_PTE_MAPPED",
    "GFP_RECLAIM",
    "GFP_RECLAIMABLE",
    "GFP_UNMAPPED",
    "GFP_USER",
    "GFP_ZERO",
    "gfp_migratetype_index",
    "gfp_zone_index",
    "parse_gfp",
]


class GFP(enum.IntFlag):
    DMA = 1 << 0
    HIGHMEM = 1 << 1
    DMA32 = 1 << 2
    MOVABLE = 1 << 3
    RECLAIMABLE = 1 << 4
    HIGH = 1 << 5
    IO = 1 << 6
    FS = 1 << 7
    ZERO = 1 << 8
    DIRECT_RECLAIM = 1 << 10
    KSWAPD_RECLAIM = 1 << 11
    NOWARN = 1 << 13
    COMP = 1 << 16
    ACCOUNT = 1 << 22
    # Not in mainline: the flags the direct-map proposals add.
    UNMAPPED = 1 << 27     # Rapoport 2022: page removed from the direct map
    PTE_MAPPED = 1 << 28   # Rapoport 2021: page mapped at PTE level in the direct map


GFP_DMA = GFP.DMA
GFP_HIGHMEM = GFP.HIGHMEM
GFP_DMA32 = GFP.DMA32
GFP_MOVABLE = GFP.MOVABLE
GFP_RECLAIMABLE = GFP.RECLAIMABLE
GFP_HIGH = GFP.HIGH
GFP_IO = GFP.IO
GFP_FS = GFP.FS
GFP_ZERO = GFP.ZERO
GFP_NOWARN = GFP.NOWARN
GFP_COMP = GFP.COMP
GFP_DIRECT_RECLAIM = GFP.DIRECT_RECLAIM
GFP_KSWAPD_RECLAIM = GFP.KSWAPD_RECLAIM
GFP_RECLAIM = GFP.DIRECT_RECLAIM | GFP.KSWAPD_RECLAIM
GFP_ACCOUNT = GFP.ACCOUNT
GFP_UNMAPPED = GFP.UNMAPPED
GFP_PTE_MAPPED = GFP.PTE_MAPPED

GFP_ATOMIC = GFP.HIGH | GFP.KSWAPD_RECLAIM
GFP_KERNEL = GFP_RECLAIM | GFP.IO | GFP.FS
GFP_KERNEL_ACCOUNT = GFP_KERNEL | GFP.ACCOUNT
GFP_NOWAIT = GFP.KSWAPD_RECLAIM
GFP_USER = GFP_KERNEL
GFP_HIGHUSER = GFP_USER | GFP.HIGHMEM
GFP_HIGHUSER_MOVABLE = GFP_HIGHUSER | GFP.MOVABLE
GFP_PGTABLE = GFP_KERNEL_ACCOUNT | GFP.ZERO

_ZONE_MASK = GFP.DMA | GFP.DMA32 | GFP.HIGHMEM | GFP.MOVABLE


def gfp_migratetype_index(gfp: int) -> int:
    """MIGRATE_UNMOVABLE 0, MIGRATE_MOVABLE 1, MIGRATE_RECLAIMABLE 2
    (``gfp_migratetype``)."""
    if gfp & GFP.MOVABLE and gfp & GFP.RECLAIMABLE:
        raise ValueError("GFP_MOVABLE and GFP_RECLAIMABLE are mutually exclusive")
    if gfp & GFP.MOVABLE:
        return 1
    if gfp & GFP.RECLAIMABLE:
        return 2
    return 0


def gfp_zone_index(gfp: int) -> int:
    """Highest zone the request may use: 0 ZONE_DMA, 1 ZONE_DMA32,
    2 ZONE_NORMAL (x86-64 has no highmem: HIGHMEM/MOVABLE mean NORMAL)."""
    if gfp & GFP.DMA and gfp & GFP.DMA32:
        raise ValueError("GFP_DMA and GFP_DMA32 are mutually exclusive")
    if gfp & GFP.DMA:
        return 0
    if gfp & GFP.DMA32:
        return 1
    return 2


#: the composite names the kernel's tracepoints print (show_gfp_flags,
#: include/trace/events/mmflags.h), as far as the model's flags go
_TRACE_NAMES: dict[str, int] = {
    "GFP_KERNEL": int(GFP_KERNEL), "GFP_KERNEL_ACCOUNT": int(GFP_KERNEL_ACCOUNT),
    "GFP_ATOMIC": int(GFP_ATOMIC), "GFP_NOWAIT": int(GFP_NOWAIT),
    "GFP_NOIO": int(GFP_RECLAIM), "GFP_NOFS": int(GFP_RECLAIM | GFP.IO),
    "GFP_USER": int(GFP_USER), "GFP_HIGHUSER": int(GFP_HIGHUSER),
    "GFP_HIGHUSER_MOVABLE": int(GFP_HIGHUSER_MOVABLE),
    "GFP_TRANSHUGE": int((GFP_HIGHUSER_MOVABLE | GFP.COMP | GFP.NOWARN) & ~GFP.DIRECT_RECLAIM),
    "GFP_TRANSHUGE_LIGHT": int((GFP_HIGHUSER_MOVABLE | GFP.COMP | GFP.NOWARN) & ~GFP_RECLAIM),
    "GFP_DMA": int(GFP.DMA), "GFP_DMA32": int(GFP.DMA32),
    "__GFP_RECLAIM": int(GFP_RECLAIM),
    **{f"__GFP_{f.name}": int(f) for f in GFP if f.name not in ("UNMAPPED", "PTE_MAPPED")},
}


def parse_gfp(text: str) -> int:
    """The GFP mask a tracepoint printed (``GFP_KERNEL|__GFP_ZERO``,
    ``GFP_HIGHUSER_MOVABLE``, ``none``...): the flags the model has; the
    kernel's others (``__GFP_NOMEMALLOC``, ``__GFP_HARDWALL``,
    ``__GFP_RETRY_MAYFAIL``...) change nothing here and are dropped, as is
    a raw ``0x...`` remainder."""
    gfp = 0
    for name in text.split("|"):
        name = name.strip()
        gfp |= _TRACE_NAMES.get(name, 0)
    return gfp
