"""A small page-table builder for tests, demos and benchmarks.

It hands out table pages from a physical range the caller reserves and maps
ranges with 4K/2M/1G leaves, vectorised with numpy for 4K runs. The guest
kernel model (``guestkernel``) keeps its own tables; this is the bare-metal
way to put mappings in front of the CPU.
"""

from __future__ import annotations

import numpy as np

from . import pagetable as pt
from .pagetable import PteFlags

__all__ = ["PageTableBuilder"]

_TABLE_FLAGS = PteFlags.P | PteFlags.RW


class PageTableBuilder:
    """Builds tables in ``machine.ram`` for the machine's paging mode (4
    levels, or 5 on a ``Machine(paging_levels=5)``), table pages taken from
    the physical range ``[pool_start, pool_end)``. ``root`` is the root
    table's (PML4's or PML5's) physical address. Guest RAM may start at a
    physical address other than 0 (``machine.ram_base``, for an attached
    Unicorn)."""

    def __init__(self, machine, pool_start: int, pool_end: int):
        if pool_start % pt.PAGE_SIZE or pool_end % pt.PAGE_SIZE or pool_end <= pool_start:
            raise ValueError("the table pool must be a non-empty page-aligned range")
        base = machine.ram_base
        if pool_start < base or pool_end > base + machine.ram_bytes:
            raise ValueError(f"table pool [{pool_start:#x}, {pool_end:#x}) is outside guest "
                             f"RAM [{base:#x}, {base + machine.ram_bytes:#x})")
        self.m = machine
        self.levels = getattr(machine, "paging_levels", 4)
        self._first = base >> 3    # ram64 index of physical address 0 is -_first
        self._next = pool_start
        self._end = pool_end
        self.tables: list[int] = []
        self.root = self._alloc_table()

    def _alloc_table(self) -> int:
        if self._next >= self._end:
            raise MemoryError("page-table pool exhausted")
        pa, self._next = self._next, self._next + pt.PAGE_SIZE
        self.m.ram64[(pa >> 3) - self._first: ((pa + pt.PAGE_SIZE) >> 3) - self._first] = 0
        self.tables.append(pa)
        return pa

    def _table_for(self, va: int, level: int) -> int:
        """Physical address of the table at ``level`` covering ``va``,
        creating missing intermediate tables (the root is level 4 or 5)."""
        table = self.root
        for lvl in range(self.levels, level, -1):
            slot = (table >> 3) - self._first + pt.table_index(va, lvl)
            entry = int(self.m.ram64[slot])
            if not entry & PteFlags.P:
                new = self._alloc_table()
                self.m.ram64[slot] = new | _TABLE_FLAGS
                table = new
            elif pt.is_leaf(entry, lvl):
                raise ValueError(f"{va:#x}: a {pt.Level(lvl).label} leaf already maps this range")
            else:
                table = entry & pt.ADDR_MASK
        return table

    def map(self, va: int, pa: int, size: int, page_size: int = pt.PAGE_SIZE,
            flags: int = PteFlags.P | PteFlags.RW) -> None:
        """Map ``[va, va+size)`` to ``[pa, pa+size)`` with leaves of ``page_size``."""
        level = {pt.PAGE_SIZE: 1, 1 << 21: 2, 1 << 30: 3}.get(page_size)
        if level is None:
            raise ValueError(f"page size must be 4K, 2M or 1G, not {page_size:#x}")
        if va % page_size or pa % page_size or size % page_size or size <= 0:
            raise ValueError(f"va {va:#x}, pa {pa:#x} and size {size:#x} must be "
                             f"{pt.Level(level).label}-aligned")
        leaf = int(flags) | (int(PteFlags.PS) if level > 1 else 0)
        span = 512 * page_size  # what one table of this level covers
        done = 0
        while done < size:
            cur = va + done
            table = self._table_for(cur, level)
            first = pt.table_index(cur, level)
            n = min(512 - first, (size - done) // page_size)
            frames = pa + done + np.arange(n, dtype=np.uint64) * np.uint64(page_size)
            slot = (table >> 3) - self._first + first
            self.m.ram64[slot: slot + n] = frames | np.uint64(leaf)
            done += n * page_size
            assert n * page_size <= span

    def leaf_slot(self, va: int) -> tuple[int, int]:
        """(index into ``machine.ram64``, level) of the leaf entry mapping ``va``."""
        table = self.root
        for lvl in range(self.levels, 0, -1):
            slot = (table >> 3) - self._first + pt.table_index(va, lvl)
            entry = int(self.m.ram64[slot])
            if not entry & PteFlags.P:
                raise ValueError(f"{va:#x} is not mapped (level {lvl} entry not present)")
            if pt.is_leaf(entry, lvl):
                return slot, lvl
            table = entry & pt.ADDR_MASK
        raise AssertionError("unreachable")
