"""The buddy page allocator: a model of Linux 6.1 ``mm/page_alloc.c``.

One node, one CPU, the x86-64 zones DMA (< 16 MiB), DMA32 (< 4 GiB) and
NORMAL. Free memory is kept as naturally aligned blocks of ``2**order`` pages
(order 0..10: ``MAX_ORDER`` is exclusive, as in 6.1) on free lists indexed
``zone.free_area[order][migratetype]``; order-0..3 and pageblock-order pages
pass through a per-CPU pageset (pcp) first. The verbs keep the kernel's names
(``_expand``, ``_rmqueue_smallest``, ``_rmqueue_fallback``,
``_steal_suitable_fallback``, ``_free_one_page``, ``free_pcppages_bulk`` ...)
so that a kernel developer can read one beside the other.

Layout: one module per seam of ``mm/page_alloc.c``. ``BuddyAllocator`` is
one class assembled in ``buddy.py`` from a mixin per seam; the mixins share
the allocator's state and each other's private methods, as the static
functions of ``page_alloc.c`` share ``struct zone``:

- ``types``: constants, ``MigrateType``, ``ZoneType``, ``ALLOC_*`` flags, the
  exceptions, ``order_to_pindex`` / ``pindex_to_order``;
- ``zone``: ``Zone``, ``PerCpuPages``, watermarks, lowmem reserves, pcp
  batch and high, ``__zone_watermark_ok`` (``ZoneMixin``);
- ``buddy``: the buddy core (``__rmqueue_smallest``, ``expand``,
  ``__free_one_page``, free lists, pageblock migratetype bits) and
  ``BuddyAllocator``;
- ``alloc``: ``__alloc_pages``, ``get_page_from_freelist``, ``rmqueue``,
  ``__free_pages``, ``split_page`` (``AllocMixin``);
- ``pcp``: ``rmqueue_pcplist``, ``rmqueue_bulk``, ``free_unref_page``,
  ``nr_pcp_free``, ``free_pcppages_bulk``, ``drain_pages`` (``PcpMixin``);
- ``fallback``: ``find_suitable_fallback``, ``__rmqueue_fallback``,
  ``steal_suitable_fallback`` (up to 6.9) or 6.15's ``__rmqueue_claim``,
  ``try_to_claim_block`` and ``__rmqueue_steal`` (``fallback_scheme``:
  :class:`FallbackScheme`), ``move_freepages_block``, the high-atomic
  reserve (``FallbackMixin``);
- ``memblock``: ``memblock_free_all`` -> ``__free_pages_core``
  (``free_range``, ``MemblockMixin``);
- ``query``: read-only views (``is_free``, ``nr_free``, ``free_list`` ...,
  ``QueryMixin``);
- ``check``: the invariant check (``check``, ``CheckMixin``).

Representation (no Python object per page):

- ``_state``: one byte per pfn. ``0`` for a page that is not the head of a
  block (a tail, a reserved page never freed to the buddy, a hole); else
  ``kind | order`` with kind (``types.PG_*``) ``PG_BUDDY`` (head of a free
  block: PageBuddy), ``PG_ALLOC`` / ``PG_ALLOC_MOVABLE`` (head of an allocated
  block, the latter standing in for PageLRU/__PageMovable), ``PG_PCP`` (head
  of a block on a pcp list). A numpy array read through a memoryview, which
  indexes as fast as a bytearray; it is calloc'ed, so holes cost no memory
  and RAM one byte a page (268 MB for 1 TiB).
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
- pcp ``batch`` is ``zone_batchsize`` (63 for zones of 1 GiB or more);
  ``high`` follows ``pcp_scheme`` (:class:`PcpScheme`): 5.10's ``6 * batch``;
  6.1's ``zone_highsize`` for one CPU, ``max(low_wmark, 4 * batch)``; 6.7+'s
  ``high_min`` (that) and ``high_max`` (1/8 of the zone), ``high`` moving
  between them (``nr_pcp_alloc``, ``nr_pcp_high``, ZONE_BELOW_HIGH; no
  ZONE_RECLAIM_ACTIVE; the time-driven ``decay_pcp_high`` only when a
  caller says it ran: a recorded trace's markers). All are
  recomputed whenever the watermarks are (``setup_per_zone_wmarks`` calls
  ``zone_pcp_update``). pcp lists hold orders 0..3 and ``PAGEBLOCK_ORDER``
  (``pcp_allowed_order``; one list for the THP order, shared by all
  migratetypes, ``NR_PCP_THP == 1``); ``PcpScheme.LEGACY`` restricts them
  to order 0 (the pre-5.13 allocator). 6.1's ``free_factor`` heuristic of
  ``nr_pcp_free`` is modelled (``pcp->free_factor >>= 1`` only when a pcp
  allocation succeeds), and 6.7+'s ``free_count``/``alloc_factor``.
- ``alloc_pages_bulk``: the per-CPU list head, one zone (low watermark +
  the pages asked for, no ALLOC_NOFRAGMENT), ``free_factor`` untouched.
- ``move_freepages``'s count of movable pages (PageLRU or __PageMovable) is
  the number of pages in blocks allocated with migratetype MOVABLE.
- ``NR_FREE_PAGES`` (``zone.free_pages``) counts every buddy free page,
  including those on ISOLATE lists (Linux subtracts them in
  ``set_migratetype_isolate``, which is not modelled: ``set_pageblock_migratetype``
  is the raw setter).
- ``min_free_kbytes`` and the watermarks are recomputed from scratch after
  every ``free_range`` (as ``init_per_zone_wmark_min`` does once at boot,
  ``nr_free_buffer_pages`` = managed pages) until ``watermarks_fixed`` is
  set (a booted kernel sets it after ``memblock_free_all``: Linux computes
  them at its initcalls, before the init memory is freed); with
  ``khugepaged_min_free``, khugepaged's ``set_recommended_min_free_kbytes``
  raise follows; ``page_group_by_mobility_disabled``
  is decided at construction from the zones' spans (``build_all_zonelists``).
- Migratetypes registered by policies (``register_migratetype``) are not
  mergeable across pageblocks and have no pcp lists: their pages are freed
  straight to the buddy (as MIGRATE_ISOLATE pages are), so that a page of such
  a type never reaches another type's pcp list.
"""

from __future__ import annotations

from .buddy import BuddyAllocator
from .types import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NOFRAGMENT,
    ALLOC_WMARK_LOW,
    ALLOC_WMARK_MASK,
    ALLOC_WMARK_MIN,
    HIGHATOMIC,
    ISOLATE,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_PCPTYPES,
    MOVABLE,
    NR_LOWORDER_PCP_LISTS,
    NR_PCP_LISTS,
    PAGE_ALLOC_COSTLY_ORDER,
    PAGE_SHIFT,
    PAGEBLOCK_NR_PAGES,
    PAGEBLOCK_ORDER,
    RECLAIMABLE,
    UNMOVABLE,
    WMARK_HIGH,
    WMARK_LOW,
    WMARK_MIN,
    AllocationError,
    BadFreeError,
    BuddyInvariantError,
    FallbackScheme,
    MigrateType,
    PcpScheme,
    ZoneType,
    largest_aligned_order,
)
from .zone import PerCpuPages, Zone

__all__ = [
    "ALLOC_HARDER",
    "ALLOC_HIGH",
    "ALLOC_NOFRAGMENT",
    "ALLOC_WMARK_LOW",
    "ALLOC_WMARK_MASK",
    "ALLOC_WMARK_MIN",
    "HIGHATOMIC",
    "ISOLATE",
    "MAX_ORDER",
    "MAX_ORDER_NR_PAGES",
    "MIGRATE_PCPTYPES",
    "MOVABLE",
    "NR_LOWORDER_PCP_LISTS",
    "NR_PCP_LISTS",
    "PAGEBLOCK_NR_PAGES",
    "PAGEBLOCK_ORDER",
    "PAGE_ALLOC_COSTLY_ORDER",
    "PAGE_SHIFT",
    "RECLAIMABLE",
    "UNMOVABLE",
    "WMARK_HIGH",
    "WMARK_LOW",
    "WMARK_MIN",
    "AllocationError",
    "BadFreeError",
    "BuddyAllocator",
    "BuddyInvariantError",
    "FallbackScheme",
    "MigrateType",
    "PcpScheme",
    "PerCpuPages",
    "Zone",
    "ZoneType",
    "largest_aligned_order",
]
