"""``/sys/kernel/debug/page_tables/kernel`` (arch/x86/mm/dump_pagetables.c).

The kernel's walker (mm/ptdump.c) reports every leaf and every hole, with
its level, and ``note_page`` prints one line per run of entries whose
protection bits, effective protection (RW/USER and-ed, NX or-ed down the
levels) and level stay the same, plus the ``---[ marker ]---`` headers. The
Debian 6.1 build has CONFIG_X86_5LEVEL: running with 4 levels, the p4d level
is folded into the PGD and holes in the top table are reported as "p4d".
PTE tables are scanned with numpy, so a split direct map dumps quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from .layout import START_KERNEL_MAP

if TYPE_CHECKING:
    from .api import KernelApi as Kernel

__all__ = ["ptdump"]

_PTE_FLAGS_MASK = ((1 << 64) - 1) & ~(((1 << 52) - 1) & ~0xFFF)
_LEVEL_NAME = ("pgd", "p4d", "pud", "pmd", "pte")
_UNITS = "BKMGTPE"
_M64 = (1 << 64) - 1


def _markers(k: Kernel) -> list[tuple[int, str, int]]:
    """(start, name, max_lines) as address_markers[] for x86-64, 4- or
    5-level (pt_dump_init moves the LDT, direct map, vmalloc and vmemmap
    markers to the 5-level layout: LDT_BASE_ADDR is LDT_PGD_ENTRY_L5 -240
    << 48)."""
    lay = k.layout
    ldt = 0xFFFF880000000000 if lay.paging_levels == 4 else 0xFF10000000000000
    return [
        (0, "User Space", 0),
        (1 << 63, "Kernel Space", 0),
        (ldt, "LDT remap", 0),
        (lay.page_offset, "Low Kernel Mapping", 0),
        (lay.vmalloc_start, "vmalloc() Area", 0),
        (lay.vmemmap_start, "Vmemmap", 0),
        (0xFFFFFE0000000000, "CPU entry Area", 0),
        (0xFFFFFF0000000000, "ESPfix Area", 16),
        (0xFFFFFFEF00000000, "EFI Runtime Services", 0),
        (START_KERNEL_MAP, "High Kernel Mapping", 0),
        (k.profile.modules_vaddr, "Modules", 0),
        (k.profile.modules_end, "End Modules", 0),
        (0xFFFFFFFFFF579000, "Fixmap Area", 0),
        (_M64, "", 0),
    ]


def _effective(parent: int, val: int) -> int:
    """effective_prot: USER and RW and-ed, NX or-ed down the levels."""
    prot = val & _PTE_FLAGS_MASK
    user = parent & prot & int(F.US)
    rw = parent & prot & int(F.RW)
    nx = (parent | prot) & int(F.NX)
    return user | rw | nx


def _prot_text(pr: int, level: int) -> str:
    if not pr & F.P:
        return " " * 30 + _LEVEL_NAME[level]
    s = "USR " if pr & F.US else "    "
    s += "RW " if pr & F.RW else "ro "
    s += "PWT " if pr & F.PWT else "    "
    s += "PCD " if pr & F.PCD else "    "
    s += "PSE " if level <= 3 and pr & F.PS else "    "
    pat = (level == 4 and pr & F.PAT) or (level in (2, 3) and pr & F.PAT_LARGE)
    s += "PAT " if pat else "    "
    s += "GLB " if pr & F.G else "    "
    s += "NX " if pr & F.NX else "x  "
    return s + _LEVEL_NAME[level]


class _State:
    def __init__(self, markers):
        self.markers = markers
        self.mi = 0
        self.level = -1
        self.cur = self.eff = 0
        self.start = 0
        self.lines = 0
        self.out: list[str] = []

    def note(self, addr: int, level: int, val: int, eff: int) -> None:
        new_prot = val & _PTE_FLAGS_MASK
        new_eff = eff if val else 0
        if self.level == -1:
            self.cur, self.eff, self.level, self.lines = new_prot, new_eff, level, 0
            self.out.append(f"---[ {self.markers[0][1]} ]---")
            return
        nxt = self.markers[self.mi + 1][0]
        if new_prot == self.cur and new_eff == self.eff and level == self.level and addr < nxt:
            return
        max_lines = self.markers[self.mi][2]
        if not max_lines or self.lines < max_lines:
            delta = (addr - self.start) & _M64
            unit = 0
            while delta and not delta & 1023 and unit < len(_UNITS) - 1:
                delta >>= 10
                unit += 1
            self.out.append(f"0x{self.start:016x}-0x{addr:016x}   {delta:9d}{_UNITS[unit]} "
                            f"{_prot_text(self.cur, self.level)}")
        self.lines += 1
        if addr >= nxt:
            if max_lines and self.lines > max_lines:
                n = self.lines - max_lines
                self.out.append(f"... {n} entr{'y' if n == 1 else 'ies'} skipped ... ")
            self.mi += 1
            self.lines = 0
            self.out.append(f"---[ {self.markers[self.mi][1]} ]---")
        self.start, self.cur, self.eff, self.level = addr, new_prot, new_eff, level


def ptdump(k: Kernel) -> str:
    """The kernel page tables in the debugfs ``page_tables/kernel`` format."""
    st = _State(_markers(k))
    ram64 = k.machine.ram64
    root = k.pgt.root
    full = int(F.RW | F.US)  # effective_prot starts from "everything allowed"

    def walk(table: int, depth: int, lo: int, hi: int, parent: int) -> None:
        """Entries of ``table`` (depth 0 pgd with 5-level paging; 1 p4d, the
        top table with 4-level, folded into the PGD; 2 pud; 3 pmd; 4 pte)
        covering [lo, hi)."""
        shift = {0: 48, 1: 39, 2: 30, 3: 21, 4: 12}[depth]
        size = 1 << shift
        table_base = lo & ~((size << 9) - 1) & _M64
        first = (lo >> shift) & 511
        last = ((hi - 1) >> shift) & 511
        entries = ram64[(table >> 3) + first: (table >> 3) + last + 1]
        if depth == 4:
            _pte_runs(st, entries, table_base + first * size, parent)
            return
        for i, raw in enumerate(entries.tolist()):
            addr = table_base + (first + i) * size
            val = int(raw)
            if val == 0:
                st.note(addr, depth, 0, 0)
                continue
            leaf = depth > 1 and (val & F.PS or not val & F.P)
            eff = _effective(parent, val)
            if leaf or not val & F.P:
                st.note(addr, depth, val, eff)
                continue
            walk(val & pt.ADDR_MASK, depth + 1, addr, addr + size, eff)

    # The two halves ptdump walks: user space, and the kernel from the end of
    # the guard hole (the hypervisor range is skipped: 16 PGD entries from
    # GUARD_HOLE_PGD_ENTRY -256).
    if k.paging_levels == 4:
        walk(root, 1, 0, 1 << 47, full)
        walk(root, 1, 0xFFFF880000000000, 1 << 64, full)
    else:
        walk(root, 0, 0, 1 << 56, full)
        walk(root, 0, 0xFF10000000000000, 1 << 64, full)
    st.note(0, -1, 0, 0)  # flush the last run (ptdump_walk_pgd's final note_page)
    return "\n".join(st.out) + "\n"


def _pte_runs(st: _State, entries: np.ndarray, base: int, parent: int) -> None:
    """note_page for 512 PTEs, one call per run of equal (prot, present)."""
    prot = entries & np.uint64(_PTE_FLAGS_MASK)
    nonzero = entries != 0
    key = np.where(nonzero, prot, np.uint64(0))
    change = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    for idx in change.tolist():
        val = int(entries[idx])
        st.note(base + idx * 4096, 4, val, _effective(parent, val) if val else 0)
