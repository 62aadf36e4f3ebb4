"""How Linux chooses the direct map's page sizes at boot (arch/x86/mm/init.c).

``init_mem_mapping`` maps the ISA range [0, 1 MiB) first, then all RAM up to
``max_pfn`` *top-down in steps* (``memory_map_top_down``): the first step is
the 2 MiB block at the top of RAM, and each step after that grows by a
factor (2^5 in 3.x, 2^8 = ``PMD_SHIFT - PAGE_SHIFT - 1`` since 4.0: each
rule is a :class:`guestkernel.versions.StepRule`).
Each step is cut by the RAM ranges of memblock, and each piece goes through
``init_memory_mapping`` -> ``split_mem_range``: a 4K head up to the first
2 MiB boundary, 2M up to the first 1 GiB boundary, 1G for the aligned middle
(with gbpages), 2M and 4K for the tail; then ``adjust_range_page_size_mask``
promotes a piece to 2M/1G when the whole aligned block around it is RAM, and
neighbours of one size merge. The result, in the order the kernel maps it,
is what 3.x kernels printed as ``[mem A-B] page 4k|2M|1G`` lines.

The steps matter: they decide the order tables are built in, and (later) the
``direct_pages_count`` accounting of Linux 6.1, which counts a large page
again when a later step finds it already mapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .e820 import E820Table
from .versions import STEP_RULES, StepRule

__all__ = ["ISA_END_ADDRESS", "MapRange", "init_mem_mapping", "split_mem_range"]

PAGE_SIZE = 4096
PMD_SIZE = 2 << 20
PUD_SIZE = 1 << 30
ISA_END_ADDRESS = 0x100000

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _round_down(x: int, a: int) -> int:
    return x // a * a


@dataclass(frozen=True)
class MapRange:
    """``struct map_range``: [start, end) mapped with ``page_size``."""

    start: int
    end: int
    page_size: int

    @property
    def label(self) -> str:
        return {PAGE_SIZE: "4k", PMD_SIZE: "2M", PUD_SIZE: "1G"}[self.page_size]

    def __str__(self) -> str:
        return f"[mem {self.start:#010x}-{self.end - 1:#010x}] page {self.label}"


def _size_of(mask: int) -> int:
    if mask & (1 << PG_LEVEL_1G):
        return PUD_SIZE
    if mask & (1 << PG_LEVEL_2M):
        return PMD_SIZE
    return PAGE_SIZE


def split_mem_range(start: int, end: int, e820: E820Table, *, gbpages: bool = True
                    ) -> list[MapRange]:
    """Linux's ``split_mem_range`` for x86-64 with ``adjust_range_page_size_mask``
    and the merge of neighbours, for [start, end) (page aligned)."""
    page_size_mask = (1 << PG_LEVEL_2M) | ((1 << PG_LEVEL_1G) if gbpages else 0)
    mr: list[list[int]] = []  # [start, end, mask]

    def save_mr(s: int, e: int, mask: int) -> None:
        if s < e:
            mr.append([s, e, mask])

    limit = end
    pos = start
    # Head: up to the first 2M boundary, 4K.
    head_end = min(_round_up(pos, PMD_SIZE), limit)
    if pos < head_end:
        save_mr(pos, head_end, 0)
        pos = head_end
    # 2M up to the first 1G boundary.
    s = _round_up(pos, PMD_SIZE)
    e = min(_round_up(pos, PUD_SIZE), _round_down(limit, PMD_SIZE))
    if s < e:
        save_mr(s, e, page_size_mask & (1 << PG_LEVEL_2M))
        pos = e
    # 1G for the aligned middle.
    s = _round_up(pos, PUD_SIZE)
    e = _round_down(limit, PUD_SIZE)
    if s < e:
        save_mr(s, e, page_size_mask & ((1 << PG_LEVEL_2M) | (1 << PG_LEVEL_1G)))
        pos = e
    # 2M tail.
    s = _round_up(pos, PMD_SIZE)
    e = _round_down(limit, PMD_SIZE)
    if s < e:
        save_mr(s, e, page_size_mask & (1 << PG_LEVEL_2M))
        pos = e
    # 4K tail.
    save_mr(pos, limit, 0)

    # adjust_range_page_size_mask (boot only): promote a piece whose aligned
    # surrounding block is all RAM.
    for r in mr:
        if page_size_mask & (1 << PG_LEVEL_2M) and not r[2] & (1 << PG_LEVEL_2M):
            if e820.is_region_memory(_round_down(r[0], PMD_SIZE), _round_up(r[1], PMD_SIZE)):
                r[2] |= 1 << PG_LEVEL_2M
        if page_size_mask & (1 << PG_LEVEL_1G) and not r[2] & (1 << PG_LEVEL_1G):
            if e820.is_region_memory(_round_down(r[0], PUD_SIZE), _round_up(r[1], PUD_SIZE)):
                r[2] |= 1 << PG_LEVEL_1G
    # Merge contiguous pieces of the same size.
    merged: list[list[int]] = []
    for r in mr:
        if merged and merged[-1][1] == r[0] and merged[-1][2] == r[2]:
            merged[-1][1] = r[1]
        else:
            merged.append(r)
    return [MapRange(s, e, _size_of(mask)) for s, e, mask in merged]


def init_mem_mapping(e820: E820Table, *, gbpages: bool = True,
                     step_rule: StepRule = STEP_RULES["4.0"],
                     top_block: int | None = None) -> list[list[MapRange]]:
    """The ``init_memory_mapping`` calls of boot, in order, each as its
    ``split_mem_range`` result.

    ``step_rule`` is the kernel's (:data:`guestkernel.versions.STEP_RULES`).
    ``top_block`` is where ``memblock_phys_alloc_range(PMD_SIZE, PMD_SIZE,
    ...)`` found the first 2 MiB block, top-down; by default the highest
    2M-aligned block that is all RAM."""
    shift = step_rule.shift
    end = e820.max_pfn * PAGE_SIZE
    calls = [split_mem_range(0, ISA_END_ADDRESS, e820, gbpages=gbpages)]
    if top_block is None:
        top_block = _top_free_block(e820, ISA_END_ADDRESS, end)
    real_end = top_block + PMD_SIZE
    step = PMD_SIZE
    last_start = real_end
    mapped = 0
    map_start = ISA_END_ADDRESS
    while last_start > map_start:
        if last_start > step:
            start = max(_round_down(last_start - 1, step), map_start)
        else:
            start = map_start
        pieces = _init_range_memory_mapping(start, last_start, e820, gbpages)
        calls.extend(pieces)
        new = sum(r.end - r.start for call in pieces for r in call)
        last_start = start
        if step_rule.grow_when_total:
            mapped += new
            if mapped >= step:
                step <<= shift
        else:
            if new > mapped:
                step <<= shift
            mapped += new
    if real_end < end:
        calls.extend(_init_range_memory_mapping(real_end, end, e820, gbpages))
    return calls


def _init_range_memory_mapping(r_start: int, r_end: int, e820: E820Table,
                               gbpages: bool) -> list[list[MapRange]]:
    out = []
    for lo, hi in e820.ram_ranges():
        start, end = max(lo, r_start), min(hi, r_end)
        if start >= end:
            continue
        out.append(split_mem_range(start, end, e820, gbpages=gbpages))
    return out


def _top_free_block(e820: E820Table, lo: int, hi: int) -> int:
    for start, end in reversed(e820.ram_ranges()):
        block = _round_down(min(end, hi) - PMD_SIZE, PMD_SIZE)
        if block >= max(start, lo) and block + PMD_SIZE <= min(end, hi):
            return block
    raise ValueError("no 2 MiB block of RAM for the first page tables")
