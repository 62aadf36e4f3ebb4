"""memblock: the boot-time memory allocator (mm/memblock.c model).

``memory`` is the RAM the firmware reported; ``reserved`` what boot code
has taken. Allocations are top-down by default, as on x86-64 since 3.9.
Only a few dozen regions exist at boot, so plain sorted lists serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from .e820 import E820Table

PAGE = 4096

__all__ = ["Memblock", "MemblockError", "Region"]


class MemblockError(MemoryError):
    """No room for a boot-time allocation, or a bad reservation."""


@dataclass(frozen=True, order=True)
class Region:
    base: int
    end: int
    name: str = ""

    @property
    def size(self) -> int:
        return self.end - self.base


def _merge(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(regions):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class Memblock:
    def __init__(self, e820: E820Table):
        self.memory: list[tuple[int, int]] = e820.ram_ranges()
        self.reserved: list[Region] = []

    def reserve(self, base: int, size: int, name: str) -> None:
        """``memblock_reserve``."""
        if size <= 0 or base < 0:
            raise MemblockError(f"memblock_reserve({base:#x}, {size:#x}): bad range")
        self.reserved.append(Region(base, base + size, name))
        self.reserved.sort()

    def free(self, base: int, size: int) -> None:
        """``memblock_phys_free``: drop the reservation of [base, base+size),
        all of it or a part (the per-CPU unit's unused tail); a range that
        some reservation does not cover in full is a MemblockError and
        changes nothing."""
        end = base + size
        if size <= 0 or not any(r.base <= base and end <= r.end for r in self.reserved):
            raise MemblockError(f"memblock_phys_free({base:#x}, {size:#x}): not a reservation")
        out: list[Region] = []
        for r in self.reserved:
            if r.end <= base or r.base >= end:
                out.append(r)
                continue
            if r.base < base:
                out.append(Region(r.base, base, r.name))
            if r.end > end:
                out.append(Region(end, r.end, r.name))
        self.reserved = sorted(out)

    def _free_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """memory minus reserved, clipped to [start, end), ascending."""
        taken = _merge([(r.base, r.end) for r in self.reserved])
        out = []
        for lo, hi in self.memory:
            lo, hi = max(lo, start), min(hi, end)
            cur = lo
            for tlo, thi in taken:
                if thi <= cur or tlo >= hi:
                    continue
                if tlo > cur:
                    out.append((cur, tlo))
                cur = max(cur, thi)
            if cur < hi:
                out.append((cur, hi))
        return out

    def phys_alloc_range(self, size: int, align: int, start: int, end: int, name: str) -> int:
        """``memblock_phys_alloc_range``, top-down: the highest aligned free
        block in [start, end). Raises MemblockError if there is none."""
        for lo, hi in reversed(self._free_ranges(start, end)):
            base = (hi - size) // align * align
            if base >= lo:
                self.reserve(base, size, name)
                return base
        raise MemblockError(f"memblock: no {size:#x} bytes aligned {align:#x} in "
                            f"[{start:#x}, {end:#x}) for {name}")

    def alloc_try_nid(self, size: int, align: int, name: str, min_addr: int = 0,
                      max_addr: int = 0) -> int:
        """``memblock_alloc_try_nid``: top-down in [min_addr, max_addr) (0:
        up to the end of memory; never below the first page), and where
        that has no room, again without the lower bound
        (``memblock_alloc_internal``). Raises MemblockError if neither fits."""
        hi = max_addr or (1 << 62)
        try:
            return self.phys_alloc_range(size, align, max(min_addr, PAGE), hi, name)
        except MemblockError:
            if min_addr <= PAGE:
                raise
        return self.phys_alloc_range(size, align, PAGE, hi, name)

    def is_region_memory(self, base: int, size: int) -> bool:
        return any(lo <= base and base + size <= hi for lo, hi in self.memory)

    def is_reserved(self, pa: int) -> bool:
        return any(r.base <= pa < r.end for r in self.reserved)

    def free_ranges(self) -> list[tuple[int, int]]:
        """What ``memblock_free_all`` hands to the buddy allocator."""
        return self._free_ranges(0, 1 << 62)

    def reserved_bytes(self) -> int:
        return sum(hi - lo for lo, hi in _merge([(r.base, r.end) for r in self.reserved]))
