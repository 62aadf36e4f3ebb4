"""The allocator's invariant check.

Where the kernel has scattered ``VM_BUG_ON_PAGE`` / ``bad_page`` checks
(``__free_one_page``, ``check_new_pages``, ``free_pcppages_bulk``) and
``CONFIG_DEBUG_VM`` walks, the model has one vectorised pass over the per-pfn
state byte, the pageblock bits, the free lists and the pcp lists:
``BuddyAllocator.check``.

``CheckMixin`` holds the allocator's method of this seam (see ``buddy.py``);
it uses ``_pageblock_zone`` (buddy core).
"""

from __future__ import annotations

import numpy as np

from .types import (
    HIGHATOMIC,
    ISOLATE,
    KIND_MASK,
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    MOVABLE,
    NR_LOWORDER_PCP_LISTS,
    ORDER_MASK,
    PAGEBLOCK_ORDER,
    PG_ALLOC,
    PG_ALLOC_MOVABLE,
    PG_BUDDY,
    PG_PCP,
    RECLAIMABLE,
    BuddyInvariantError,
    pindex_to_order,
)
from .zone import Zone

__all__ = ["CheckMixin"]


class CheckMixin:
    """``BuddyAllocator.check``."""

    max_pfn: int
    zones: list[Zone]
    page_group_by_mobility_disabled: bool
    _handed: list[list[int]]
    _mt_names: list[str]
    _state_np: np.ndarray
    _pageblock_np: np.ndarray

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
        kinds = vals & KIND_MASK
        orders = (vals & ORDER_MASK).astype(np.int64)
        bad = ~np.isin(kinds, (PG_BUDDY, PG_ALLOC, PG_ALLOC_MOVABLE, PG_PCP)) | (
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
                        wrong = st[keys] != (PG_BUDDY | order)
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
        n_buddy = int((kinds == PG_BUDDY).sum())
        if n_lists != n_buddy:
            fail("free list membership", f"{n_buddy} free heads, {n_lists} list entries "
                 "(a head on no list or on two)")
        # Free buddies below pageblock order always merge.
        fb = (kinds == PG_BUDDY) & (orders < PAGEBLOCK_ORDER)
        fidx, ford = idx[fb], orders[fb]
        bud = fidx ^ (np.int64(1) << ford)
        unmerged = st[bud] == (PG_BUDDY | ford)
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
                order = pindex_to_order(pindex)
                for x in lst:
                    pfn, mt = x >> 4, x & 0xF
                    if not zone.zone_spans_pfn(pfn) or st[pfn] != PG_PCP | order:
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
        if n_pcp != int((kinds == PG_PCP).sum()):
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
