"""Constants, enums and exceptions shared by the page allocator.

Mirrors the definitions ``mm/page_alloc.c`` takes from its headers:

- ``include/linux/mmzone.h``: ``MAX_ORDER``, ``MAX_ORDER_NR_PAGES``,
  ``enum migratetype`` (``MigrateType``), ``enum zone_type`` (``ZoneType``),
  ``enum zone_watermarks`` (``WMARK_*``), ``NR_PCP_LISTS`` and
  ``migratetype_is_mergeable``;
- ``include/linux/pageblock-flags.h``: ``pageblock_order`` / ``pageblock_nr_pages``;
- ``mm/internal.h``: the ``ALLOC_*`` flags the model acts on;
- ``mm/page_alloc.c`` itself: ``order_to_pindex`` / ``pindex_to_order``;
- the stand-in for ``page->flags`` (PageBuddy and friends): the ``PG_*``
  kinds of the per-pfn state byte (see the package docstring);
- the failures: ``AllocationError`` (``__alloc_pages`` returning NULL),
  ``BadFreeError`` (``bad_page()``) and ``BuddyInvariantError``.
"""

from __future__ import annotations

import enum

__all__ = [
    "ALLOC_HARDER",
    "ALLOC_HIGH",
    "ALLOC_NOFRAGMENT",
    "ALLOC_WMARK_LOW",
    "ALLOC_WMARK_MASK",
    "ALLOC_WMARK_MIN",
    "HIGHATOMIC",
    "ISOLATE",
    "KIND_MASK",
    "MAX_MIGRATETYPES",
    "MAX_ORDER",
    "MAX_ORDER_NR_PAGES",
    "MIGRATE_PCPTYPES",
    "MOVABLE",
    "NR_LOWORDER_PCP_LISTS",
    "NR_PCP_LISTS",
    "ORDER_MASK",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "PAGE_ALLOC_COSTLY_ORDER",
    "PAGE_SHIFT",
    "PCP_BATCH_SCALE_MAX",
    "PG_ALLOC",
    "PG_ALLOC_MOVABLE",
    "PG_BUDDY",
    "PG_PCP",
    "RECLAIMABLE",
    "UNMOVABLE",
    "WMARK_HIGH",
    "WMARK_LOW",
    "WMARK_MIN",
    "ZONE_NAMES",
    "AllocationError",
    "BadFreeError",
    "BuddyInvariantError",
    "MigrateType",
    "PcpScheme",
    "ZoneType",
    "largest_aligned_order",
    "migratetype_is_mergeable",
    "order_to_pindex",
    "pindex_to_order",
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
MAX_MIGRATETYPES = 16               # a migratetype fits the 4 low bits of a pcp entry
PCP_BATCH_SCALE_MAX = 5             # CONFIG_PCP_BATCH_SCALE_MAX (6.7+; Debian keeps the default)


class PcpScheme(enum.IntEnum):
    """How the per-CPU lists are sized and drained, by kernel generation."""

    #: before 5.13: order-0 lists only; ``high = 6 * batch``; a free that
    #: reaches ``high`` drains ``batch`` pages round-robin over the types
    LEGACY = 0
    #: 5.13-6.6: orders 0-3 and THP; ``high = max(low_wmark, 4 * batch)``;
    #: ``nr_pcp_free`` doubles the drain with ``free_factor``
    FREE_FACTOR = 1
    #: 6.7+ (as in 7.2): ``high`` floats between ``high_min`` (the low
    #: watermark) and ``high_max`` (1/8 of the zone), grown by refills and
    #: by frees that reach it, shrunk while the zone is below its high
    #: watermark; refills scale with ``alloc_factor``, drains with
    #: ``free_count``; a drain frees to the pageblock's current type (6.10)
    AUTOTUNE = 2


class FallbackScheme(enum.IntEnum):
    """How a request takes memory of another migratetype, by kernel generation."""

    #: up to 6.9 (5.10, 6.1): ``__rmqueue_fallback`` takes the largest
    #: fallback block (a movable request that cannot claim its pageblock:
    #: the smallest) and ``steal_suitable_fallback`` moves it, and perhaps
    #: its pageblock's free pages, to the requested type's lists
    MOVE_BLOCK = 0
    #: 6.15+ (as in 7.2): ``__rmqueue_claim`` takes the largest block whose
    #: pageblock it may and can claim (``try_to_claim_block``: half of it
    #: free or alike), else ``__rmqueue_steal`` splits the smallest fallback
    #: block on its own type's lists, the pageblock left alone;
    #: ``rmqueue_bulk`` stays in the mode that last gave a page. (6.10-6.14's
    #: middle form is not modelled.)
    CLAIM_OR_STEAL = 1


#: 6.15+ ``enum rmqueue_mode`` (no CMA here: RMQUEUE_CMA is never entered)
RMQUEUE_NORMAL, RMQUEUE_CLAIM, RMQUEUE_STEAL = 0, 2, 3

WMARK_MIN, WMARK_LOW, WMARK_HIGH = 0, 1, 2

# alloc_flags (mm/internal.h), only those the model acts on.
ALLOC_WMARK_MIN = WMARK_MIN
ALLOC_WMARK_LOW = WMARK_LOW
ALLOC_WMARK_MASK = 0x03
ALLOC_HARDER = 0x10        # atomic: dip a further quarter below min, use high-atomic reserves
ALLOC_HIGH = 0x20          # __GFP_HIGH: dip to half of min
ALLOC_NOFRAGMENT = 0x100   # try the lower zones before fragmenting a pageblock (6.1 fast path)

# The per-pfn state byte (page->flags): kind in the high nibble, order in the low nibble.
PG_BUDDY = 0x10            # head of a free block (PageBuddy, buddy_order)
PG_ALLOC = 0x20            # head of an allocated block
PG_ALLOC_MOVABLE = 0x30    # the same, allocated MOVABLE (stands in for PageLRU/__PageMovable)
PG_PCP = 0x40              # head of a block on a pcp list
KIND_MASK = 0xF0
ORDER_MASK = 0x0F


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
ZONE_NAMES = {ZoneType.DMA: "DMA", ZoneType.DMA32: "DMA32", ZoneType.NORMAL: "Normal"}


class AllocationError(MemoryError):
    """``alloc_pages`` found no page (the kernel returns NULL). Nothing changed.

    A ``MemoryError``: callers that roll back on a failed allocation (vmalloc,
    and through it module and BPF loads) catch it as one.

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


def largest_aligned_order(start: int, end: int) -> int:
    """The order of the largest buddy block that starts at ``start`` (aligned
    to its size) and ends by ``end``: how ``__free_pages_memory`` and
    ``free_prepared_contig_range`` cut a range of pages into blocks."""
    align = (start & -start).bit_length() - 1 if start else MAX_ORDER - 1
    return min(MAX_ORDER - 1, align, (end - start).bit_length() - 1)


def order_to_pindex(migratetype: int, order: int) -> int:
    """``order_to_pindex``: low orders have a list per pcp type, THP one shared list."""
    if order > PAGE_ALLOC_COSTLY_ORDER:
        return NR_LOWORDER_PCP_LISTS
    return MIGRATE_PCPTYPES * order + migratetype


def pindex_to_order(pindex: int) -> int:
    """``pindex_to_order``."""
    if pindex == NR_LOWORDER_PCP_LISTS:
        return PAGEBLOCK_ORDER
    return pindex // MIGRATE_PCPTYPES


def migratetype_is_mergeable(mt: int) -> bool:
    """``migratetype_is_mergeable``: only the pcp types merge across pageblocks."""
    return mt < MIGRATE_PCPTYPES
