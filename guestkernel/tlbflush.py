"""Kernel TLB flushes (arch/x86/mm/tlb.c), counted as /proc/vmstat counts them.

The ceiling lives here once: ``flush_tlb_kernel_range`` flushes page by page
up to ``tlb_single_page_flush_ceiling`` pages and everything above it; CPA's
own ``cpa_flush`` asks :meth:`TlbFlush.is_full` for the same decision.
"""

from __future__ import annotations

from typing import Protocol

from .layout import PAGE_SIZE

__all__ = ["TLB_SINGLE_PAGE_FLUSH_CEILING", "Cpu", "TlbFlush"]

#: arch/x86/mm/tlb.c: above this many pages a range flush becomes a full flush.
TLB_SINGLE_PAGE_FLUSH_CEILING = 33


class Cpu(Protocol):
    """What a flush needs of the CPU (an ``emu.Machine`` is one)."""

    def flush_tlb(self) -> None: ...
    def invlpg(self, va: int) -> None: ...


class TlbFlush:
    """The kernel's flush primitives over one CPU; ``vmstat`` is the kernel's
    event-counter dict (``nr_tlb_local_flush_all`` / ``_one``)."""

    def __init__(self, cpu: Cpu, vmstat: dict[str, int]) -> None:
        self.cpu = cpu
        self.vmstat = vmstat
        vmstat.setdefault("nr_tlb_local_flush_all", 0)
        vmstat.setdefault("nr_tlb_local_flush_one", 0)

    @staticmethod
    def is_full(nr_pages: int) -> bool:
        """Whether a flush of ``nr_pages`` pages flushes everything."""
        return nr_pages > TLB_SINGLE_PAGE_FLUSH_CEILING

    def flush_tlb_all(self) -> None:
        self.vmstat["nr_tlb_local_flush_all"] += 1
        self.cpu.flush_tlb()

    def flush_tlb_one_kernel(self, va: int) -> None:
        self.vmstat["nr_tlb_local_flush_one"] += 1
        self.cpu.invlpg(va)

    def flush_tlb_kernel_range(self, start: int, end: int) -> None:
        """Per page up to the ceiling, else everything."""
        if self.is_full((end - start) >> 12):
            self.flush_tlb_all()
        else:
            for va in range(start, end, PAGE_SIZE):
                self.flush_tlb_one_kernel(va)
