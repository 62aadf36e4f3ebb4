"""The buddy allocator (guestkernel.page_alloc) against Linux 6.1 mm/page_alloc.c."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guestkernel.gfp import (
    GFP_ATOMIC,
    GFP_DMA,
    GFP_DMA32,
    GFP_HIGHUSER_MOVABLE,
    GFP_KERNEL,
    GFP_MOVABLE,
    GFP_NOWAIT,
    GFP_RECLAIMABLE,
)
from guestkernel.page_alloc import (
    MAX_ORDER,
    PAGEBLOCK_NR_PAGES,
    AllocationError,
    BadFreeError,
    BuddyAllocator,
    BuddyInvariantError,
    MigrateType,
    PcpScheme,
    ZoneType,
)

UNMOVABLE, MOVABLE, RECLAIMABLE, HIGHATOMIC, ISOLATE = list(MigrateType)
DMA, DMA32, NORMAL = list(ZoneType)


def one_zone(pages: int, ztype: ZoneType = ZoneType.NORMAL, **kw) -> BuddyAllocator:
    """A machine of one zone [0, pages), all of it handed to the buddy."""
    b = BuddyAllocator(pages, {ztype: (0, pages)}, page_group_by_mobility_disabled=False, **kw)
    b.free_range(0, pages)
    return b


def snapshot(b: BuddyAllocator) -> tuple:
    """Everything an allocation or free may change."""
    lists = tuple(tuple(b.free_list(z, o, mt) for o in range(MAX_ORDER)
                        for mt in range(b.nr_migratetypes)) for z in b.zones)
    pcp = tuple(tuple(tuple(lst) for lst in z.pcp.lists) for z in b.zones)
    counters = tuple((z.free_pages, z.pcp.count, z.nr_reserved_highatomic) for z in b.zones)
    return (lists, pcp, counters, b._state_np.tobytes(), b._pageblock_np.tobytes())


# ---------------------------------------------------------------- split / merge


def test_order0_from_a_fresh_max_order_block_leaves_one_block_per_order() -> None:
    b = one_zone(1024)
    assert b.free_list(NORMAL, 10, MOVABLE) == [0]
    # zone_batchsize of a 4 MiB zone is 1: the pcp refill takes just this page.
    assert b.zones[0].pcp.batch == 1
    pfn = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 0)
    assert pfn == 0 and b.allocated_order(0) == 0
    assert b.nr_pcp_pages() == 0
    for order in range(10):
        assert b.free_list(NORMAL, order, MOVABLE) == [1 << order]
    assert b.nr_free(order=10) == 0 and b.nr_free() == 1023
    b.check()

    b.free_pages(0, 0)                          # to the pcp list, below high
    assert b.pcp_list(NORMAL, MOVABLE) == [0] and b.nr_free() == 1023
    assert not b.is_free(0) and b.allocated_order(0) is None
    b.check()
    b.drain_pages()
    assert b.free_list(NORMAL, 10, MOVABLE) == [0]
    assert all(b.nr_free(order=o) == 0 for o in range(10))
    assert b.nr_free() == 1024 and b.nr_pcp_pages() == 0
    b.check()


def test_pcp_refill_takes_a_batch_in_physical_order() -> None:
    b = one_zone(1 << 18, ZoneType.DMA32)       # 1 GiB: batch 63 (zone_batchsize)
    assert b.zones[0].pcp.batch == 63
    pfn = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 0)
    assert pfn == 0
    # rmqueue_bulk appends at the tail the pages expand() hands out in order.
    assert b.pcp_list(DMA32, MOVABLE) == list(range(1, 63))
    assert b.nr_pcp_pages() == 62 and b.zones[0].free_pages == (1 << 18) - 63
    b.check()


def test_higher_order_split_and_merge() -> None:
    b = one_zone(1024, ZoneType.DMA32)
    p4 = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 4)   # order 4 has no pcp list
    assert p4 == 0 and b.allocated_order(0) == 4
    assert [b.free_list(DMA32, o, MOVABLE) for o in range(4, 10)] == [
        [16], [32], [64], [128], [256], [512]]
    assert b.is_free(16) and b.is_free(1023) and not b.is_free(15)
    b.free_pages(0, 4)
    assert b.free_list(DMA32, 10, MOVABLE) == [0] and b.nr_free() == 1024
    b.check()


def test_freed_block_goes_to_the_tail_when_its_parent_buddy_is_free() -> None:
    """__free_one_page's buddy_merge_likely: a block whose next-higher buddy
    is free is queued at the tail so it stays free and can merge."""
    b = one_zone(1024, ZoneType.DMA32)
    gfp = GFP_HIGHUSER_MOVABLE
    a = b.alloc_pages(gfp, 4)       # 0
    b.alloc_pages(gfp, 4)           # 16
    b.alloc_pages(gfp, 5)           # 32
    x1 = b.alloc_pages(gfp, 4)      # 64: splits 64/o6 into 64, 80/o4, 96/o5
    b.alloc_pages(gfp, 4)           # 80
    assert (a, x1) == (0, 64) and b.free_list(DMA32, 5, MOVABLE) == [96]
    b.free_pages(a, 4)              # buddy 16 and parent's buddy 32 allocated: head
    b.free_pages(x1, 4)             # buddy 80 allocated, parent's buddy 96 free: tail
    assert b.free_list(DMA32, 4, MOVABLE) == [0, 64]
    b.check()


# ---------------------------------------------------------------- boot


def test_free_range_hands_over_largest_aligned_blocks() -> None:
    b = BuddyAllocator(0x2000)      # DMA [0, 0x1000), DMA32 [0x1000, 0x2000)
    b.free_range(1, 0x9f)           # the usual first e820 range, page 0 reserved
    expected = {0: [1, 158], 1: [2, 156], 2: [4, 152], 3: [8, 144], 4: [16, 128],
                5: [32], 6: [64]}
    for order, pfns in expected.items():
        assert sorted(b.free_list(DMA, order, MOVABLE)) == pfns
    assert b.zones[0].managed_pages == 0x9e and b.nr_free() == 0x9e
    assert not b.is_free(0) and not b.is_free(0x9f)
    b.free_range(0x100, 0x2000)
    # FPI_TO_TAIL: boot blocks are queued in pfn order, so allocations start low.
    assert b.free_list(DMA32, 10, MOVABLE) == [0x1000, 0x1400, 0x1800, 0x1c00]
    assert b.free_list(DMA, 10, MOVABLE) == [0x400, 0x800, 0xc00]
    with pytest.raises(ValueError, match="overlaps"):
        b.free_range(0x1f00, 0x2000)
    b.check()


def test_adjacent_free_ranges_merge() -> None:
    b = BuddyAllocator(1024, {NORMAL: (0, 1024)}, page_group_by_mobility_disabled=False)
    b.free_range(0, 512)
    b.free_range(512, 1024)
    assert b.free_list(NORMAL, 10, MOVABLE) == [0] and b.nr_free(order=9) == 0
    b.check()


def test_tiny_machines_disable_grouping_by_mobility() -> None:
    # build_all_zonelists: page_group_by_mobility_disabled below 5 pageblocks.
    b = BuddyAllocator(2048)        # < pageblock_nr_pages * MIGRATE_TYPES pages
    b.free_range(0, 2048)
    assert b.page_group_by_mobility_disabled
    assert b.get_pageblock_migratetype(0) == UNMOVABLE
    assert b.nr_free(mt=UNMOVABLE) == 2048
    pfn = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 0)   # gfp_migratetype: UNMOVABLE
    assert b.nr_free(mt=MOVABLE) == 0 and b.allocated_order(pfn) == 0
    b.set_pageblock_migratetype(512, MOVABLE)      # set_pageblock_migratetype forces it
    assert b.get_pageblock_migratetype(512) == UNMOVABLE
    b.check()


# ---------------------------------------------------------------- zones, watermarks


def x86_layout() -> BuddyAllocator:
    """DMA, 128 MiB of DMA32, 128 MiB of NORMAL (4 GiB up), as an e820 gives them."""
    b = BuddyAllocator(0x100000 + 0x8000)
    b.free_range(1, 0x9f)
    b.free_range(0x100, 0x1000)
    b.free_range(0x1000, 0x9000)
    b.free_range(0x100000, 0x108000)
    return b


def test_zone_boundaries_and_zonelist_order() -> None:
    b = x86_layout()
    assert [z.name for z in b.zones] == ["DMA", "DMA32", "Normal"]
    assert [(z.start_pfn, z.end_pfn) for z in b.zones] == [
        (0, 0x1000), (0x1000, 0x100000), (0x100000, 0x108000)]
    assert b.alloc_pages(GFP_DMA, 0) < 0x1000
    assert 0x1000 <= b.alloc_pages(GFP_DMA32, 0) < 0x100000
    assert b.alloc_pages(GFP_KERNEL, 0) >= 0x100000
    assert b.alloc_pages(GFP_HIGHUSER_MOVABLE, 3) >= 0x100000
    with pytest.raises(ValueError, match="mutually exclusive"):
        b.alloc_pages(GFP_DMA | GFP_DMA32, 0)
    with pytest.raises(ValueError, match="mutually exclusive"):
        b.alloc_pages(GFP_MOVABLE | GFP_RECLAIMABLE, 0)
    b.check()


def test_watermarks_follow_6_1_formulas() -> None:
    b = x86_layout()
    managed = {z.type: z.managed_pages for z in b.zones}
    total = sum(managed.values())
    assert total == 0x9e + 0xf00 + 0x8000 + 0x8000
    # calculate_min_free_kbytes: sqrt(lowmem_kbytes * 16), clamped to [128, 262144].
    assert b.min_free_kbytes == math.isqrt(total * 4 * 16) == 2109
    pages_min = b.min_free_kbytes >> 2
    for z in b.zones:
        assert z.wmark_min == pages_min * z.managed_pages // total
        gap = max(z.wmark_min >> 2, z.managed_pages * 10 // 10000)
        assert (z.wmark_low, z.wmark_high) == (z.wmark_min + gap, z.wmark_min + 2 * gap)
    dma, dma32, normal = b.zones
    # setup_per_zone_lowmem_reserve with sysctl_lowmem_reserve_ratio 256/256/32.
    assert dma.lowmem_reserve == [0, managed[DMA32] // 256, (managed[DMA32] + managed[NORMAL])
                                  // 256]
    assert dma32.lowmem_reserve == [0, 0, managed[NORMAL] // 256]
    assert normal.lowmem_reserve == [0, 0, 0]
    # zone_batchsize / zone_highsize for one CPU.
    assert [z.pcp.batch for z in b.zones] == [1, 7, 7]
    assert [z.pcp.high for z in b.zones] == [max(z.wmark_low, 4 * z.pcp.batch)
                                             for z in b.zones]


def test_16g_layout_figures() -> None:
    max_pfn = (17 << 30) >> 12          # 16 GiB of RAM with a 1 GiB hole below 4 GiB
    b = BuddyAllocator(max_pfn)
    b.free_range(1, 0x9f)
    b.free_range(0x100, 0xc0000)
    b.free_range(0x100000, max_pfn)
    assert b.min_free_kbytes == 16383   # just under 16 MiB, as on a 16 GiB box
    assert [z.pcp.batch for z in b.zones] == [1, 63, 63]
    b.check()


def test_gfp_kernel_falls_back_to_dma32_then_stops_at_the_watermarks() -> None:
    b = x86_layout()
    dma, dma32, normal = b.zones
    zones_used = []
    with pytest.raises(AllocationError) as err:
        while True:
            pfn = b.alloc_pages(GFP_KERNEL, 4)
            zones_used.append(b.page_zone(pfn).type)
            if zones_used[-1] != NORMAL and zones_used.count(DMA32) == 1:
                # The first fallback: the fast path left NORMAL at its low watermark.
                assert normal.wmark_low <= normal.free_pages < normal.wmark_low + 16
    # NORMAL first, then DMA32 once NORMAL is at low, then (slow path) each
    # zone down to min + lowmem_reserve[ZONE_NORMAL].
    assert zones_used[0] == NORMAL and DMA32 in zones_used
    first_dma32 = zones_used.index(DMA32)
    assert set(zones_used[:first_dma32]) == {NORMAL}
    for z in b.zones:
        assert z.free_pages >= z.wmark_min + z.lowmem_reserve[NORMAL]
    # DMA comes last in the zonelist, and keeps its lowmem reserve.
    assert zones_used.index(DMA) > first_dma32
    assert dma.free_pages >= dma.wmark_min + dma.lowmem_reserve[NORMAL] > 0
    e = err.value
    assert e.gfp == GFP_KERNEL and e.order == 4 and "Normal" in e.reason
    assert str(e).startswith(f"page allocation failure: order:4, mode:{int(GFP_KERNEL):#x}: ")

    before = snapshot(b)
    with pytest.raises(AllocationError):
        b.alloc_pages(GFP_KERNEL, 4)
    assert snapshot(b) == before
    b.check()

    # Order 0 goes a little lower, a pcp batch at a time (rmqueue_bulk may
    # take up to batch - 1 pages past the watermark, as in Linux).
    with pytest.raises(AllocationError):
        while True:
            b.alloc_pages(GFP_KERNEL, 0)
    for z in (dma32, normal):
        assert z.free_pages + z.pcp.batch > z.wmark_min + z.lowmem_reserve[NORMAL]
    # __GFP_HIGH and atomic requests may dip below min.
    pfn = b.alloc_pages(GFP_ATOMIC, 0)
    assert b.allocated_order(pfn) == 0
    # GFP_DMA still gets the DMA zone, which NORMAL requests never touched.
    assert b.alloc_pages(GFP_DMA, 0) < 0x1000
    b.check()


def test_allocation_failure_on_a_full_zone_changes_nothing() -> None:
    b = one_zone(1024)
    before = snapshot(b)
    with pytest.raises(AllocationError) as err:
        b.alloc_pages(GFP_KERNEL, 10)   # 1024 free, but the watermark is 80
    assert err.value.order == 10 and "below watermark" in err.value.reason
    assert snapshot(b) == before
    b.check()


# ---------------------------------------------------------------- fallback


def test_unmovable_request_claims_a_mostly_free_movable_pageblock() -> None:
    b = one_zone(512, ZoneType.DMA32)    # preferred zone DMA32: no ALLOC_NOFRAGMENT
    m = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 0)
    assert m == 0 and b.get_pageblock_migratetype(0) == MOVABLE
    u = b.alloc_pages(GFP_KERNEL, 0)
    # __rmqueue_fallback took the largest MOVABLE block (order 8 at 256);
    # steal_suitable_fallback moved all 511 free pages and, as more than half
    # of the block is free, claimed it.
    assert u == 1
    assert b.get_pageblock_migratetype(0) == UNMOVABLE
    assert b.nr_free(mt=MOVABLE) == 0
    for order in range(1, 9):
        assert b.free_list(DMA32, order, UNMOVABLE) == [1 << order]
    assert b.nr_free(mt=UNMOVABLE) == 510
    b.check()


def test_unmovable_request_takes_a_whole_max_order_block_under_nofragment() -> None:
    b = one_zone(2048)      # preferred zone NORMAL: the fast path uses ALLOC_NOFRAGMENT
    u = b.alloc_pages(GFP_KERNEL, 0)
    assert u == 0
    # An order-10 block spans two pageblocks: change_pageblock_range claims both.
    assert [b.get_pageblock_migratetype(p) for p in (0, 512, 1024, 1536)] == [
        UNMOVABLE, UNMOVABLE, MOVABLE, MOVABLE]
    assert [b.free_list(NORMAL, o, UNMOVABLE) for o in range(10)] == [
        [1 << o] for o in range(10)]
    assert b.free_list(NORMAL, 10, MOVABLE) == [1024]
    b.check()


def test_steal_moves_free_pages_but_keeps_a_mostly_movable_pageblock() -> None:
    b = one_zone(1024, ZoneType.DMA32)
    gfp = GFP_HIGHUSER_MOVABLE
    assert [b.alloc_pages(gfp, o) for o in (8, 7, 9)] == [0, 256, 512]
    # pageblock 0: 384 pages allocated movable, 128 free (384 as order 7).
    u = b.alloc_pages(GFP_KERNEL, 0)
    assert u == 384
    # free (128) + alike (512 - 128 - 384 = 0) < 256: the pageblock stays
    # MOVABLE, but its free pages moved to the UNMOVABLE lists.
    assert b.get_pageblock_migratetype(0) == MOVABLE
    assert b.nr_free(mt=MOVABLE) == 0
    assert [b.free_list(DMA32, o, UNMOVABLE) for o in range(7)] == [
        [385], [386], [388], [392], [400], [416], [448]]
    b.check()


def test_movable_fallback_without_steal_splits_the_smallest_block() -> None:
    b = one_zone(4096, ZoneType.DMA32)
    # Park the upper 3072 pages in a type nothing falls back to, so that the
    # watermarks stay met while the first two pageblocks are used up.
    parked = b.register_migratetype("PARKED")
    for pfn in range(1024, 4096, PAGEBLOCK_NR_PAGES):
        b.set_pageblock_migratetype(pfn, parked)
        b.move_freepages_block(pfn, parked)
    assert b.nr_free(mt=parked) == 3072
    gfp = GFP_HIGHUSER_MOVABLE
    assert [b.alloc_pages(gfp, o) for o in (9, 8, 7, 6, 5)] == [0, 512, 768, 896, 960]
    b.set_pageblock_migratetype(512, UNMOVABLE)
    assert b.move_freepages_block(512, UNMOVABLE) == 32        # 992/o5
    assert b.alloc_pages(GFP_KERNEL, 4) == 992
    assert b.alloc_pages(GFP_KERNEL, 2) == 1008
    assert [b.free_list(DMA32, o, UNMOVABLE) for o in (2, 3)] == [[1012], [1016]]
    # A movable order-0 request: the largest fallback block is order 3, too
    # small for a movable request to steal its pageblock (< pageblock_order/2),
    # so __rmqueue_fallback moves the smallest block (1012/o2) alone.
    assert b.alloc_pages(gfp, 0) == 1012
    assert b.get_pageblock_migratetype(512) == UNMOVABLE
    assert b.free_list(DMA32, 3, UNMOVABLE) == [1016]
    assert [b.free_list(DMA32, o, MOVABLE) for o in (0, 1)] == [[1013], [1014]]
    b.check()


def test_movable_steal_counts_movable_pages_as_alike() -> None:
    b = one_zone(4096, ZoneType.DMA32)
    parked = b.register_migratetype("PARKED")       # keeps the watermarks met
    for pfn in range(1024, 4096, PAGEBLOCK_NR_PAGES):
        b.set_pageblock_migratetype(pfn, parked)
        b.move_freepages_block(pfn, parked)
    assert b.alloc_pages(GFP_KERNEL, 8) == 0          # claims pageblocks 0 and 1
    assert b.get_pageblock_migratetype(512) == UNMOVABLE
    assert b.alloc_pages(GFP_KERNEL, 9) == 512
    b.set_pageblock_migratetype(0, MOVABLE)
    b.move_freepages_block(0, MOVABLE)
    assert [b.alloc_pages(GFP_HIGHUSER_MOVABLE, 7) for _ in range(2)] == [256, 384]
    b.free_pages(0, 8)                                # to the MOVABLE list
    b.set_pageblock_migratetype(0, UNMOVABLE)
    assert b.move_freepages_block(0, UNMOVABLE) == 256
    # MOVABLE order-4 request, nothing MOVABLE free: the order-8 UNMOVABLE
    # block may be stolen (order >= pageblock_order/2); free (256) plus
    # movable pages (256) make the whole block: it becomes MOVABLE again.
    assert b.alloc_pages(GFP_HIGHUSER_MOVABLE, 4) == 0
    assert b.get_pageblock_migratetype(0) == MOVABLE
    assert b.nr_free(mt=UNMOVABLE) == 0 and b.nr_free(mt=MOVABLE) == 240
    b.check()


def test_zone_boundary_inside_a_pageblock() -> None:
    b = BuddyAllocator(2048, {DMA: (0, 768), DMA32: (768, 2048)},
                       page_group_by_mobility_disabled=False)
    b.free_range(0, 2048)
    # __free_pages_memory: 512/o8 ends DMA; DMA32 starts with 768/o8.
    assert b.free_list(DMA, 8, MOVABLE) == [512] and b.free_list(DMA32, 8, MOVABLE) == [768]
    # Pageblock [512, 1024) crosses the boundary: move_freepages_block does
    # nothing from DMA (its end is outside), and from DMA32 scans [pfn, 1024)
    # only, so a free block whose head lies before pfn stays put.
    assert b.move_freepages_block(600, UNMOVABLE) == 0
    assert b.move_freepages_block(800, UNMOVABLE) == 0
    assert b.move_freepages_block(768, UNMOVABLE) == 256
    assert b.free_list(DMA32, 8, UNMOVABLE) == [768]
    # The two free order-8 buddies 512 and 768 never merge across zones.
    b.check()


def test_high_order_atomic_allocation_reserves_a_pageblock() -> None:
    b = one_zone(4096, ZoneType.DMA32)
    zone = b.zones[0]
    # Use up the zone down to its low watermark with order-4 movable blocks.
    with pytest.raises(AllocationError):
        while True:
            b.alloc_pages(GFP_HIGHUSER_MOVABLE | GFP_NOWAIT, 4)
    # GFP_NOWAIT has no __GFP_HIGH: the slow path stops at min.
    assert zone.wmark_min <= zone.free_pages < zone.wmark_min + 16
    pfn = b.alloc_pages(GFP_ATOMIC, 1)     # slow path, ALLOC_HARDER
    assert b.get_pageblock_migratetype(pfn) == HIGHATOMIC
    assert zone.nr_reserved_highatomic == PAGEBLOCK_NR_PAGES
    reserved_free = b.nr_free(mt=HIGHATOMIC)
    assert reserved_free > 0
    # Ordinary requests no longer see the reserve (__zone_watermark_unusable_free).
    with pytest.raises(AllocationError):
        b.alloc_pages(GFP_NOWAIT, 4)
    # A high-order atomic request is served from it first (rmqueue_buddy).
    p4 = b.alloc_pages(GFP_ATOMIC, 4)
    assert b.get_pageblock_migratetype(p4) == HIGHATOMIC
    assert b.nr_free(mt=HIGHATOMIC) == reserved_free - 16
    # free_unref_page puts a HIGHATOMIC page on the MOVABLE pcp list; the
    # drain returns it to the HIGHATOMIC free list it came from.
    b.free_pages(pfn, 1)
    assert b.pcp_list(DMA32, MOVABLE, 1) == [pfn]
    b.drain_pages()
    b.free_pages(p4, 4)
    assert b.nr_free(mt=HIGHATOMIC) == reserved_free + 2
    b.check()
    assert b.unreserve_highatomic_pageblock(GFP_KERNEL, force=True)
    assert zone.nr_reserved_highatomic == 0 and b.nr_free(mt=HIGHATOMIC) == 0
    assert b.get_pageblock_migratetype(pfn) == UNMOVABLE
    b.check()


# ---------------------------------------------------------------- pcp


def test_pcp_drains_a_batch_when_over_high() -> None:
    b = one_zone(1 << 16, ZoneType.DMA32)
    pcp = b.zones[0].pcp
    pfns = [b.alloc_pages(GFP_KERNEL, 0) for _ in range(pcp.high + 200)]
    for p in pfns:
        b.free_pages(p, 0)
        assert pcp.count < pcp.high
    assert b.nr_free() + b.nr_pcp_pages() == 1 << 16
    b.check()
    b.drain_pages()
    assert b.nr_pcp_pages() == 0 and b.nr_free() == 1 << 16
    assert b.nr_free(order=10) == 1 << 16     # everything merged back
    b.check()


def test_pcp_drain_batches_double_and_high_order_frees_drain_all() -> None:
    """nr_pcp_free: while frees go on without allocations, each drain is twice
    the last; then an order-1..3 free drains the whole pcp (free_high)."""
    b = one_zone(1 << 18, ZoneType.DMA32)
    pcp = b.zones[0].pcp
    assert (pcp.batch, pcp.high) == (63, b.zones[0].wmark_low) == (63, 1286)
    p1 = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 1)
    pfns = [b.alloc_pages(GFP_KERNEL, 0) for _ in range(pcp.high + 400)]
    counts = []
    for p in pfns:
        before = pcp.count
        b.free_pages(p, 0)
        if pcp.count < before:
            counts.append(before + 1 - pcp.count)
    assert counts[:3] == [63, 126, 252] and pcp.free_factor > 0
    assert pcp.count > 0 and b.pcp_list(DMA32, MOVABLE, 1) != []   # refill leftovers
    b.free_pages(p1, 1)              # round robin from the order-1 list, wrapping
    assert pcp.count == 0 and b.nr_free() == 1 << 18
    b.check()


def test_pcp_drain_follows_a_pageblock_isolated_meanwhile() -> None:
    b = one_zone(1024)
    p = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 0)
    b.free_pages(p, 0)                           # on the MOVABLE pcp list
    b.set_pageblock_migratetype(p, ISOLATE)
    b.drain_pages()
    # free_pcppages_bulk re-reads the pageblock when some are isolated; the
    # merge stops at pageblock order against the MOVABLE neighbour.
    assert b.free_list(NORMAL, 9, ISOLATE) == [0]
    assert b.free_list(NORMAL, 9, MOVABLE) == [512]
    b.check()


def test_pcp_pages_are_neither_free_nor_allocated() -> None:
    b = one_zone(1024)
    p = b.alloc_pages(GFP_KERNEL, 0)
    b.free_pages(p, 0)
    assert b.nr_pcp_pages() == 1 and b.nr_allocated() == 0
    assert not b.is_free(p) and b.allocated_order(p) is None
    with pytest.raises(BadFreeError, match="pcp"):
        b.free_pages(p, 0)
    assert b.alloc_pages(GFP_KERNEL, 0) == p     # the pcp head is reused first
    b.check()


def test_order0_only_pcp_option() -> None:
    b = one_zone(1 << 16, ZoneType.DMA32, pcp_scheme=PcpScheme.LEGACY)
    p = b.alloc_pages(GFP_KERNEL, 1)
    b.free_pages(p, 1)
    assert b.nr_pcp_pages() == 0 and b.nr_free() == 1 << 16
    b2 = one_zone(1 << 16, ZoneType.DMA32)
    p = b2.alloc_pages(GFP_KERNEL, 1)
    blocks = b2.zones[0].pcp.batch >> 1        # rmqueue_bulk: batch >> order blocks
    assert b2.nr_pcp_pages() == 2 * (blocks - 1)
    b2.free_pages(p, 1)
    assert b2.nr_pcp_pages() == 2 * blocks
    b2.check()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("case", "match"), [
    ("double", "double free"),
    ("never", "never allocated"),
    ("tail", "inside the allocated order-2 block"),
    ("wrong_order", "wrong order"),
    ("misaligned", "not aligned"),
    ("order_range", "out of range"),
    ("negative_order", "out of range"),
    ("pfn_range", "pfn out of range"),
    ("negative_pfn", "pfn out of range"),
    ("in_free_block", "inside the free"),
])
def test_bad_free_is_refused_and_changes_nothing(case: str, match: str) -> None:
    b = BuddyAllocator(0x2000)
    b.free_range(1, 0x2000)
    p0 = b.alloc_pages(GFP_DMA32, 0)
    p2 = b.alloc_pages(GFP_DMA32 | GFP_MOVABLE, 2)
    b.free_pages(p0, 0)
    b.drain_pages()
    args = {"double": (p0, 0), "never": (0, 0), "tail": (p2 + 1, 0), "wrong_order": (p2, 1),
            "misaligned": (p2 + 1, 1), "order_range": (p2, MAX_ORDER),
            "negative_order": (p2, -1), "pfn_range": (0x2000, 0), "negative_pfn": (-4, 2),
            "in_free_block": (0x1fff, 0)}[case]
    nr_free, before = b.nr_free(), snapshot(b)
    with pytest.raises(BadFreeError, match=match):
        b.free_pages(*args)
    assert b.nr_free() == nr_free and snapshot(b) == before
    b.check()


def test_bad_allocation_arguments() -> None:
    b = one_zone(1024)
    before = snapshot(b)
    for order in (-1, MAX_ORDER, 64):
        with pytest.raises(ValueError, match="order"):
            b.alloc_pages(GFP_KERNEL, order)
    with pytest.raises(ValueError):
        b.alloc_pages(GFP_DMA | GFP_DMA32)
    with pytest.raises(ValueError):
        b.alloc_pages(GFP_KERNEL, 0, migratetype=ISOLATE)
    with pytest.raises(ValueError):
        b.alloc_pages(GFP_KERNEL, 0, migratetype=99)
    with pytest.raises(AllocationError, match="no zone"):
        b.alloc_pages(GFP_DMA, 0)       # this machine has no ZONE_DMA
    assert snapshot(b) == before
    b.check()


def test_check_names_a_broken_invariant() -> None:
    b = one_zone(1024)
    p = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 0)
    b._state[p + 1] = 0                 # a free head forgets it is free
    with pytest.raises(BuddyInvariantError, match="cover every pfn|free list"):
        b.check()
    b = one_zone(1024)
    b.zones[0].free_pages += 1
    with pytest.raises(BuddyInvariantError, match="NR_FREE_PAGES"):
        b.check()
    b = one_zone(1024)
    b._pageblock_mt[1] = 9
    with pytest.raises(BuddyInvariantError, match="pageblock migratetypes"):
        b.check()


# ---------------------------------------------------------------- policies


def test_registered_migratetype_has_no_fallbacks_and_no_pcp() -> None:
    b = one_zone(2048)
    unmapped = b.register_migratetype("UNMAPPED")
    assert unmapped == 5 and b.migratetype_name(unmapped) == "UNMAPPED"
    with pytest.raises(ValueError):
        b.register_migratetype("UNMAPPED")
    with pytest.raises(AllocationError):
        b.alloc_pages(GFP_KERNEL, 0, migratetype=unmapped)
    # A policy steals a pageblock for its type (the 2022 RFC's approach).
    b.set_pageblock_migratetype(1536, unmapped)
    assert b.move_freepages_block(1536, unmapped) == 0   # upper half of an order-10 block
    b.set_pageblock_migratetype(1024, unmapped)
    assert b.move_freepages_block(1024, unmapped) == 1024
    p = b.alloc_pages(GFP_KERNEL, 0, migratetype=unmapped)
    assert p == 1024 and b.nr_pcp_pages() == 0
    b.free_pages(p, 0)                  # straight back to the buddy, merged
    assert b.free_list(NORMAL, 10, unmapped) == [1024] and b.nr_pcp_pages() == 0
    # Other types do not fall back into it.
    assert b.nr_free(mt=unmapped) == 1024
    b.check()
    with pytest.raises(RuntimeError):
        b.register_migratetype("LATE")


def test_isolated_pageblocks_do_not_merge_with_their_neighbours() -> None:
    b = one_zone(2048, ZoneType.DMA32)
    p = b.alloc_pages(GFP_HIGHUSER_MOVABLE, 9)       # 0
    assert p == 0
    b.set_pageblock_migratetype(0, ISOLATE)
    b.free_pages(0, 9)
    # The order-9 buddy at 512 is MOVABLE: no merge across an isolated block.
    assert b.free_list(DMA32, 9, ISOLATE) == [0]
    assert b.free_list(DMA32, 9, MOVABLE) == [512]
    assert b.zones[0].nr_isolate_pageblock == 1
    b.check()
    b.set_pageblock_migratetype(0, MOVABLE)
    assert b.move_freepages_block(0, MOVABLE) == 512
    assert b.zones[0].nr_isolate_pageblock == 0
    b.check()


# ---------------------------------------------------------------- stateful


GFPS = [GFP_KERNEL, GFP_HIGHUSER_MOVABLE, GFP_KERNEL | GFP_RECLAIMABLE, GFP_DMA, GFP_DMA32,
        GFP_ATOMIC, GFP_NOWAIT, GFP_DMA32 | GFP_MOVABLE]
ORDERS = [0, 0, 0, 0, 1, 2, 3, 4, 5, 9, 10]


class BuddyMachine(RuleBasedStateMachine):
    """Random allocations, frees and drains on a small three-zone machine with
    holes; every step ends with check() and page conservation."""

    @initialize(pcp_scheme=st.sampled_from(list(PcpScheme)))
    def boot(self, pcp_scheme: PcpScheme) -> None:
        # DMA/DMA32 meet inside a pageblock: merging and move_freepages_block
        # stop at the zone boundary.
        self.b = BuddyAllocator(8192, {DMA: (0, 1000), DMA32: (1000, 4096),
                                       NORMAL: (4096, 8192)}, pcp_scheme=pcp_scheme)
        for s, e in ((1, 990), (1000, 6000), (6100, 8192)):
            self.b.free_range(s, e)
        self.managed = 989 + 5000 + 2092
        self.allocated: dict[int, int] = {}

    def _alloc(self, gfp: int, order: int) -> None:
        before = snapshot(self.b)
        try:
            pfn = self.b.alloc_pages(gfp, order)
        except AllocationError:
            assert snapshot(self.b) == before
            return
        assert pfn % (1 << order) == 0 and pfn not in self.allocated
        assert self.b.page_zone(pfn).type <= {GFP_DMA: DMA, GFP_DMA32: DMA32}.get(
            gfp & (GFP_DMA | GFP_DMA32), NORMAL)
        self.allocated[pfn] = order

    @rule(gfp=st.sampled_from(GFPS), order=st.sampled_from(ORDERS))
    def alloc(self, gfp: int, order: int) -> None:
        self._alloc(gfp, order)

    @rule(gfp=st.sampled_from(GFPS), order=st.sampled_from([0, 3, 4]),
          n=st.integers(1, 150))
    def alloc_many(self, gfp: int, order: int, n: int) -> None:
        for _ in range(n):
            self._alloc(gfp, order)

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.allocated)))
        self.b.free_pages(pfn, self.allocated.pop(pfn))

    @precondition(lambda self: self.allocated)
    @rule(fraction=st.floats(0.2, 1.0), seed=st.integers(0, 2**16))
    def free_many(self, fraction: float, seed: int) -> None:
        pfns = sorted(self.allocated)
        rng = np.random.default_rng(seed)
        for pfn in rng.permutation(pfns)[:max(1, int(len(pfns) * fraction))]:
            self.b.free_pages(int(pfn), self.allocated.pop(int(pfn)))

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def bad_free(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.allocated)))
        order = self.allocated[pfn]
        wrong = data.draw(st.sampled_from([o for o in range(MAX_ORDER) if o != order]))
        before = snapshot(self.b)
        with pytest.raises(BadFreeError):
            self.b.free_pages(pfn, wrong)
        assert snapshot(self.b) == before

    @rule()
    def drain(self) -> None:
        self.b.drain_pages()
        assert self.b.nr_pcp_pages() == 0

    @rule(pfn=st.integers(0, 8191), mt=st.sampled_from([UNMOVABLE, MOVABLE, RECLAIMABLE,
                                                           ISOLATE]))
    def change_pageblock(self, pfn: int, mt: int) -> None:
        self.b.set_pageblock_migratetype(pfn, mt)
        self.b.move_freepages_block(pfn, mt)

    @rule(force=st.booleans())
    def unreserve(self, force: bool) -> None:
        self.b.unreserve_highatomic_pageblock(GFP_KERNEL, force)

    @invariant()
    def consistent(self) -> None:
        b = self.b
        b.check()
        in_use = sum(1 << o for o in self.allocated.values())
        assert b.nr_free() + b.nr_pcp_pages() + in_use == self.managed
        assert b.nr_allocated() == in_use
        for pfn, order in self.allocated.items():
            assert b.allocated_order(pfn) == order


BuddyMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_buddy_state_machine = BuddyMachine.TestCase


# -- the C loops (_cbuddy.c) against their Python reference ----------------------


@pytest.mark.parametrize("trace", [
    "traces/linux-5.10-2G-modules_bpf-256.jsonl.gz",       # 5.10's order-0 lists and drain
    "truth/linux-6.1-2G-bpf-64.jsonl.gz",                  # 6.1's high-order lists
    "traces/linux-7.2-2G-vfree-reset-256.jsonl.gz",        # 7.2's claim or steal, self-sizing lists
])
def test_the_c_loops_leave_the_state_the_python_reference_leaves(trace, monkeypatch):
    """The allocator's C loops (rmqueue_bulk's __rmqueue_smallest, __free_one_page,
    order-0 alloc and free on the per-CPU lists) work on the Python state:
    a modelled replay gives every allocation the same pfn, and leaves the
    same page states, free lists (in list order) and per-CPU lists, with
    the C module as without it (DMFRAG_PURE_PYTHON_ALLOC=1's path)."""
    from guestkernel.page_alloc import alloc, buddy, pcp
    from guestkernel.page_alloc._native import cbuddy
    if cbuddy is None:
        pytest.skip("the C module is not built (or DMFRAG_PURE_PYTHON_ALLOC is set)")
    from dmfrag.modelled import replay_modelled
    path = Path(__file__).parent / "data" / trace

    def run():
        r = replay_modelled(path)
        b = r.model.buddy
        lists = [[list(d) for d in area] for z in b.zones for area in z.free_area]
        pcps = [[list(lst) for lst in z.pcp.lists] for z in b.zones]
        return r.model_pfns, r.bulk_pfns, bytes(b._state_np), lists, pcps, r.snapshots

    with_c = run()
    for mod in (alloc, buddy, pcp):
        monkeypatch.setattr(mod, "cbuddy", None)
    python = run()
    assert with_c[0] == python[0] and len(with_c[0]) > 1000
    assert with_c[1:] == python[1:]
