"""The machine's own pages: an empty root table and the INVLPG stub.

Eight pages outside guest RAM, mapped into the CPU's physical address space
next to it (never written by guest code, never handed out by a builder):

* ``ROOT``: an empty PML4, CR3 before any tables are loaded;
* ``PDPT`` -> ``PD`` -> ``PT``: a chain that a borrowed, not-present PML4
  slot of the current tables points to while the machine runs code of its
  own (with 5-level paging, a borrowed PML5 slot points to ``P4``, whose
  first entry points to ``PDPT``);
* ``CODE`` (PT[0], RX): the calibration code at its start and, at its very
  end, ``invlpg [rdi]; invlpg [rsi]``. PT[1] is not present, so the fetch
  after the stub faults and ends the run;
* ``DATA``: mapped by PT[2] RW+NX, PT[3] read-only and PT[4] with a
  reserved bit, so the calibration faults on it with known error codes.

Where they go (:func:`place`): the highest free 32 KiB below the CPU's
physical-address limit (``1 << MAXPHYADDR``); a machine made by
``Machine(ram_bytes)`` thus has them at ``(1 << 40) - 32 KiB``, and an
attached ``Uc`` has them in the highest gap of its own memory map. The page
tables of the service chain must be reachable by 40-bit physical addresses,
hence below the limit.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from unicorn import UC_HOOK_INTR, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from . import pagetable as pt
from .asm import assemble
from .cpustate import MAXPHYADDR, ExceptionState, context_words, flush_cpu_tlb
from .faults import MachineError
from .pagetable import PteFlags

__all__ = ["BORROW_ORDER", "SVC_PAGES", "SVC_SIZE", "ServicePages", "borrow_slot", "place"]

SVC_PAGES = 8
SVC_SIZE = SVC_PAGES * pt.PAGE_SIZE
# Service page roles (offsets in pages from the base).
ROOT, PDPT, PD, PT, CODE, DATA, P4 = range(7)
#: PML4 slots borrowed for the stub, Linux's hypervisor hole (0xffff8000...
#: to 0xffff87ff...) first: nothing of the kernel model lives there.
BORROW_ORDER = tuple(range(0x100, 0x110)) + tuple(range(0x110, 0x200)) + tuple(range(0x100))

_STUB = bytes([0x0F, 0x01, 0x3F, 0x0F, 0x01, 0x3E])  # invlpg [rdi]; invlpg [rsi]


def place(regions: Iterable[tuple[int, int, int]], *, limit: int = 1 << MAXPHYADDR,
          size: int = SVC_SIZE) -> int:
    """Highest ``size``-aligned base below ``limit`` whose ``size`` bytes
    overlap none of ``regions`` (``uc.mem_regions()``: begin, inclusive end,
    perms)."""
    cand = limit - size
    for begin, end, _perms in sorted(regions, reverse=True):
        if cand < 0:
            break
        if begin >= cand + size:
            continue               # entirely above the candidate
        if end < cand:
            return cand            # entirely below (regions do not overlap)
        cand = (begin - size) // size * size
    if cand < 0:
        raise MachineError(f"no free {size // 1024} KiB of physical address space below "
                           f"{limit:#x} for the machine's service pages")
    return cand


def borrow_slot(pml4: np.ndarray) -> int | None:
    """A not-present slot of ``pml4`` (512 entries) for the stub, or None."""
    present = (pml4 & np.uint64(PteFlags.P)).astype(bool)
    return next((s for s in BORROW_ORDER if not present[s]), None)


class ServicePages:
    """The service pages, mapped into ``uc`` at physical ``base`` from
    ``host`` (``SVC_SIZE`` bytes at host address ``host_addr``; the caller
    keeps that memory alive as long as ``uc``)."""

    def __init__(self, uc: Uc, base: int, host: np.ndarray, host_addr: int, levels: int = 4):
        if len(host) != SVC_SIZE:
            raise ValueError(f"service pages need {SVC_SIZE:#x} bytes, not {len(host):#x}")
        self.base = base
        self.levels = levels
        self._q8 = host
        self._q64 = host.view(np.uint64)
        uc.mem_map_ptr(base, SVC_SIZE, UC_PROT_ALL, host_addr)
        self._build_tables()

    def pa(self, page: int) -> int:
        return self.base + page * pt.PAGE_SIZE

    @property
    def root(self) -> int:
        """The empty PML4 (CR3 before the user loads tables)."""
        return self.pa(ROOT)

    @property
    def stub_pml4e(self) -> int:
        """The root entry (PML4E, or PML5E with 5-level paging) that links
        the service chain into a borrowed slot."""
        first = PDPT if self.levels == 4 else P4
        return self.pa(first) | PteFlags.P | PteFlags.RW

    def slot_va(self, slot: int) -> int:
        """The first address the root's ``slot`` maps."""
        return pt.canonical(slot << pt.level_shift(self.levels), self.levels)

    def stub_entry_va(self, slot: int) -> int:
        """Where the stub starts when the chain sits in root slot ``slot``."""
        return self.slot_va(slot) + self.stub_offset

    def _build_tables(self) -> None:
        q = self._q64
        tbl = PteFlags.P | PteFlags.RW
        q[P4 * 512] = self.pa(PDPT) | tbl
        q[PDPT * 512] = self.pa(PD) | tbl
        q[PD * 512] = self.pa(PT) | tbl
        ptb = PT * 512
        q[ptb + 0] = self.pa(CODE) | PteFlags.P
        q[ptb + 2] = self.pa(DATA) | tbl | PteFlags.NX
        q[ptb + 3] = self.pa(DATA) | PteFlags.P | PteFlags.NX
        q[ptb + 4] = self.pa(DATA) | tbl | PteFlags.NX | (1 << (MAXPHYADDR + 1))
        self.stub_offset = pt.PAGE_SIZE - len(_STUB)
        self._write(CODE, self.stub_offset, _STUB)

    def _write(self, page: int, offset: int, data: bytes) -> None:
        start = page * pt.PAGE_SIZE + offset
        self._q8[start: start + len(data)] = np.frombuffer(data, np.uint8)

    def calibrate(self, uc: Uc) -> ExceptionState:
        """Raise #PFs of known error codes (SDM 4.7) in the service chain and
        locate the CPU's exception state from them. The CPU state is
        restored afterwards; CR3 must be :attr:`root`."""
        slot = BORROW_ORDER[0]
        va = self.slot_va(slot)
        page = pt.PAGE_SIZE
        cases = [  # (code, rbx, expected error code)
            ("mov rax, [rbx]", va + 1 * page, 0x00),   # read, not present
            ("mov [rbx], rax", va + 1 * page, 0x02),   # write, not present
            ("mov [rbx], rax", va + 3 * page, 0x03),   # write, read-only
            ("jmp rbx", va + 2 * page, 0x11),          # fetch, NX
            ("mov rax, [rbx]", va + 4 * page, 0x09),   # read, reserved bit
            ("jmp rbx", va + 1 * page, 0x10),          # fetch, not present
        ]
        entry = ROOT * 512 + slot
        self._q64[entry] = self.stub_pml4e
        clean = uc.context_save()
        clean_words = context_words(uc)
        seen = []
        hook = uc.hook_add(UC_HOOK_INTR, lambda u, _intno, _ud: u.emu_stop())
        try:
            for text, rbx, _ in cases:
                self._write(CODE, 0, assemble(text, va))
                uc.ctl_flush_tb()
                uc.reg_write(X.UC_X86_REG_RBX, rbx)
                uc.emu_start(va, va + self.stub_offset)
                seen.append(context_words(uc))
                uc.context_restore(clean)
        finally:
            uc.hook_del(hook)
            self._q64[entry] = 0
            self._write(CODE, 0, bytes(16))
            uc.ctl_flush_tb()
            flush_cpu_tlb(uc)
        return ExceptionState.locate(uc, clean_words, seen, [c[2] for c in cases])
