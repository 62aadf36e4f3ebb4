"""Read-only views of the allocator's state.

What the kernel shows through ``is_free_buddy_page`` / ``PageBuddy``,
``/proc/buddyinfo`` and ``/proc/zoneinfo`` (``NR_FREE_PAGES``, the pcp
``count``), and the free and pcp lists as a debugger would walk them. Nothing
here changes state.

``QueryMixin`` holds the allocator's methods of this seam (see ``buddy.py``);
it uses ``_find_block`` (buddy core) and ``_resolve_zone`` (zone).
"""

from __future__ import annotations

import numpy as np

from .types import (
    KIND_MASK,
    MAX_ORDER,
    ORDER_MASK,
    PG_ALLOC,
    PG_ALLOC_MOVABLE,
    PG_BUDDY,
    PG_PCP,
    ZoneType,
    order_to_pindex,
)
from .zone import Zone

__all__ = ["QueryMixin"]


class QueryMixin:
    """The allocator's read-only queries."""

    max_pfn: int
    _state: memoryview
    _state_np: np.ndarray

    def is_free(self, pfn: int) -> bool:
        """Whether ``pfn`` lies in a buddy free block (pcp pages are not free:
        the buddy sees them as allocated, as PageBuddy does)."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        block = self._find_block(pfn)
        return block is not None and block[2] == PG_BUDDY

    def in_pcp(self, pfn: int) -> bool:
        """Whether ``pfn`` heads a block sitting on a per-cpu list (freed by
        its user, not yet back in the buddy)."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        return self._state[pfn] & KIND_MASK == PG_PCP

    def block_of(self, pfn: int) -> tuple[int, int, str] | None:
        """(head pfn, order, "free" | "pcp" | "allocated") of the block
        holding ``pfn``; None for a page never given to the buddy (reserved)."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        block = self._find_block(pfn)
        if block is None:
            return None
        head, order, kind = block
        return head, order, {PG_BUDDY: "free", PG_PCP: "pcp"}.get(kind, "allocated")

    def page_states(self) -> np.ndarray:
        """One byte per pfn: 0 reserved (never given to the buddy), 1 free
        (a buddy block or on a pcp list), 2 allocated. Vectorised: for a
        replay that keeps its own per-page map from here on."""
        st = self._state_np[: self.max_pfn]
        out = np.zeros(self.max_pfn, dtype=np.uint8)
        for s, e in self._handed:
            out[s:e] = 2
        heads = np.flatnonzero(st)
        kinds = st[heads] & KIND_MASK
        orders = st[heads] & ORDER_MASK
        for kind_code, val in ((PG_BUDDY, 1), (PG_PCP, 1)):
            sel = kinds == kind_code
            for h, o in zip(heads[sel].tolist(), orders[sel].tolist()):
                out[h: h + (1 << o)] = val
        return out

    def allocated_order(self, pfn: int) -> int | None:
        """The order of the allocated block headed by ``pfn``, else None."""
        if not 0 <= pfn < self.max_pfn:
            raise ValueError(f"pfn {pfn:#x} out of range")
        v = self._state[pfn]
        if v & KIND_MASK in (PG_ALLOC, PG_ALLOC_MOVABLE):
            return v & ORDER_MASK
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
            idx = np.flatnonzero((seg & 0xE0) == PG_ALLOC)   # both ALLOC kinds
            total += int((np.int64(1) << (seg[idx] & ORDER_MASK).astype(np.int64)).sum())
        return total

    def free_list(self, zone: Zone | ZoneType | int, order: int, mt: int) -> list[int]:
        """The pfns on one free list, from the kernel list's head to its tail."""
        (z,) = self._resolve_zone(zone)
        return list(reversed(z.free_area[order][mt]))

    def pcp_list(self, zone: Zone | ZoneType | int, mt: int, order: int = 0) -> list[int]:
        """The pfns on one pcp list, head first."""
        (z,) = self._resolve_zone(zone)
        return [x >> 4 for x in z.pcp.lists[order_to_pindex(mt, order)]]
