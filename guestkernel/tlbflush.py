"""Kernel TLB flushes (arch/x86/mm/tlb.c), counted as /proc/vmstat counts them.

The ceiling lives here once: ``flush_tlb_kernel_range`` flushes page by page
up to ``tlb_single_page_flush_ceiling`` pages and everything above it; CPA's
own ``cpa_flush`` asks :meth:`TlbFlush.is_full` for the same decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
        self._deferring = 0
        self._pending = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """While the CPU runs no code (a trace replay: nothing is cached
        that a flush must drop before it is used), the flushes inside are
        counted as the kernel counts them but not made one by one: one full
        flush at the end leaves the CPU where they would have (an INVLPG on
        the emulated CPU costs as much as a hundred page allocations)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring:
                self.sync()

    def sync(self) -> None:
        """Make the flushes a :meth:`deferred` block has held back now (before
        the CPU runs code inside one: the validator's probes)."""
        if self._pending:
            self._pending = False
            self.cpu.flush_tlb()

    @staticmethod
    def is_full(nr_pages: int) -> bool:
        """Whether a flush of ``nr_pages`` pages flushes everything."""
        return nr_pages > TLB_SINGLE_PAGE_FLUSH_CEILING

    def flush_tlb_all(self) -> None:
        self.vmstat["nr_tlb_local_flush_all"] += 1
        if self._deferring:
            self._pending = True
            return
        self.cpu.flush_tlb()

    def flush_tlb_one_kernel(self, va: int) -> None:
        self.vmstat["nr_tlb_local_flush_one"] += 1
        if self._deferring:
            self._pending = True
            return
        self.cpu.invlpg(va)

    def flush_tlb_kernel_range(self, start: int, end: int) -> None:
        """Per page up to the ceiling, else everything."""
        if self.is_full((end - start) >> 12):
            self.flush_tlb_all()
        else:
            for va in range(start, end, PAGE_SIZE):
                self.flush_tlb_one_kernel(va)
