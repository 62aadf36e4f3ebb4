"""x86-64 paging, 4-level and 5-level (LA57): entry encoding and a software
page walker.

Pure functions over integers and numpy arrays, after the Intel SDM vol. 3A
chapter 4 ("Paging") and Linux's ``arch/x86/include/asm/pgtable_types.h``.
The software walker exists only to cross-check the emulated CPU (and to
reconstruct #PF error codes, which Unicorn does not report); everything that
claims to be "what the CPU does" asks the CPU (:meth:`emu.Machine.translate`).

Levels are numbered as Linux's ``enum pg_level`` does: 1 = 4K (PTE),
2 = 2M (PMD), 3 = 1G (PUD), 4 = PML4 (PGD with 4-level paging, P4D with
5), 5 = PML5 (PGD with 5-level paging: CR4.LA57, 57-bit virtual addresses).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ADDR_MASK",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PTRS_PER_TABLE",
    "Access",
    "Level",
    "PfErr",
    "PteFlags",
    "WalkFault",
    "WalkResult",
    "canonical",
    "entry_addr",
    "entry_flags",
    "fault_error_code",
    "is_canonical",
    "is_leaf",
    "large_flags_from_4k",
    "large_to_4k_flags",
    "level_shift",
    "level_size",
    "make_entry",
    "pat_4k_to_large",
    "pat_large_to_4k",
    "table_index",
    "walk",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTRS_PER_TABLE = 512
#: Bits 51:12 of an entry hold the physical address (of a table or a page).
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)


class PteFlags(enum.IntFlag):
    """Entry bits (SDM 4.5, tables 4-14..4-19). PS exists only in PDPTE/PDE;
    bit 7 of a 4K PTE is PAT, and in a 1G/2M leaf PAT moves to bit 12."""

    P = 1 << 0        # present
    RW = 1 << 1       # writable
    US = 1 << 2       # user accessible
    PWT = 1 << 3      # page write-through
    PCD = 1 << 4      # page cache disable
    A = 1 << 5        # accessed (set by the CPU on a walk)
    D = 1 << 6        # dirty (set by the CPU on a write, leaf only)
    PS = 1 << 7       # page size (PDPTE/PDE): this entry is a 1G/2M leaf
    PAT = 1 << 7      # same bit in a 4K PTE: the PAT index bit
    G = 1 << 8        # global: survives a CR3 load (with CR4.PGE)
    SW1 = 1 << 9      # ignored by the CPU; Linux: _PAGE_BIT_SOFTW1 (SPECIAL)
    SW2 = 1 << 10     # ignored by the CPU; Linux: _PAGE_BIT_SOFTW2 (UFFD_WP/CPA_TEST)
    SW3 = 1 << 11     # ignored by the CPU; Linux: _PAGE_BIT_SOFTW3 (SPECIAL)
    PAT_LARGE = 1 << 12  # PAT index bit of a 2M/1G leaf
    NX = 1 << 63      # no execute (with EFER.NXE)


#: Flags the CPU writes behind the kernel's back; compare entries without them.
HW_MANAGED = PteFlags.A | PteFlags.D


class PfErr(enum.IntFlag):
    """Page-fault error code bits (SDM 4.7)."""

    P = 1 << 0      # 0: not present; 1: protection violation
    W = 1 << 1      # the access was a write
    U = 1 << 2      # the access was made at CPL 3
    RSVD = 1 << 3   # a reserved bit was set in some paging-structure entry
    ID = 1 << 4     # the access was an instruction fetch (with NXE or SMEP)


class Level(enum.IntEnum):
    """Linux's ``enum pg_level`` (and the PML5 of 5-level paging)."""

    PTE = 1   # 4K
    PMD = 2   # 2M
    PUD = 3   # 1G
    PGD = 4   # PML4 (a 512G slot; never a leaf)
    PML5 = 5  # 5-level paging's root (a 256T slot; never a leaf)

    @property
    def page_size(self) -> int:
        return level_size(self)

    @property
    def label(self) -> str:
        return {1: "4K", 2: "2M", 3: "1G", 4: "512G", 5: "256T"}[int(self)]


class Access(enum.Enum):
    READ = "r"
    WRITE = "w"
    EXEC = "x"

    @classmethod
    def parse(cls, access: str | Access) -> Access:
        if isinstance(access, Access):
            return access
        try:
            return cls(access)
        except ValueError:
            raise ValueError(f"access must be 'r', 'w' or 'x', not {access!r}") from None


def level_shift(level: int) -> int:
    """Address bits mapped below an entry of ``level`` (12, 21, 30, 39, 48)."""
    if not 1 <= level <= 5:
        raise ValueError(f"paging level must be 1..5, not {level}")
    return PAGE_SHIFT + 9 * (level - 1)


def level_size(level: int) -> int:
    return 1 << level_shift(level)


def table_index(va: int, level: int) -> int:
    """Index of ``va`` in the table at ``level`` (the PML4 is level 4)."""
    return (va >> level_shift(level)) & (PTRS_PER_TABLE - 1)


def _va_bits(levels: int) -> int:
    if levels not in (4, 5):
        raise ValueError(f"paging levels must be 4 or 5, not {levels}")
    return 48 if levels == 4 else 57


def is_canonical(va: int, levels: int = 4) -> bool:
    """Canonical for 4-level paging (48 bits: bits 63:47 all equal) or
    5-level (57 bits: bits 63:56 all equal)."""
    bits = _va_bits(levels)
    top = va >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def canonical(va: int, levels: int = 4) -> int:
    """Sign-extend the top bit of a 48-bit (57-bit with ``levels=5``) address
    to its canonical 64-bit form."""
    bits = _va_bits(levels)
    va &= (1 << bits) - 1
    return va | (((1 << 64) - 1) & ~((1 << bits) - 1)) if va & (1 << (bits - 1)) else va


def make_entry(pa: int, flags: int, level: int = 1) -> int:
    """Encode an entry pointing at ``pa`` (a table, or a page of ``level``).

    ``flags`` must include PS for a 2M/1G leaf; ``pa`` must be aligned to the
    page size of the leaf (4K for a table)."""
    align = level_size(level) if (level in (2, 3) and flags & PteFlags.PS) else PAGE_SIZE
    if pa % align or pa < 0 or pa >= 1 << 52:
        raise ValueError(f"physical address {pa:#x} is not a {align:#x}-aligned 52-bit address")
    if level >= 4 and flags & PteFlags.PS:
        raise ValueError(f"a {'PML4' if level == 4 else 'PML5'} entry cannot be a leaf (PS is "
                         f"reserved there)")
    bits = int(flags) & ~ADDR_MASK & ((1 << 64) - 1)
    if level in (2, 3) and flags & PteFlags.PS:
        bits |= int(flags) & PteFlags.PAT_LARGE  # bit 12 is PAT in a large leaf
    return (pa & ADDR_MASK) | bits


def entry_addr(entry: int, level: int = 1) -> int:
    """Physical address an entry points at; for a 2M/1G leaf the PAT bit (12)
    and reserved low bits are not part of the frame."""
    addr = entry & ADDR_MASK
    if level in (2, 3) and entry & PteFlags.PS:
        addr &= ~(level_size(level) - 1)
    return addr


def entry_flags(entry: int, level: int = 1) -> PteFlags:
    """Flag bits of an entry: everything outside bits 51:12, plus bit 12
    (PAT_LARGE) when the entry is a 2M/1G leaf."""
    flags = entry & ~ADDR_MASK & ((1 << 64) - 1)
    if level in (2, 3) and entry & PteFlags.PS:
        flags |= entry & PteFlags.PAT_LARGE
    return PteFlags(flags)


def is_leaf(entry: int, level: int) -> bool:
    return level == 1 or (level in (2, 3) and bool(entry & PteFlags.PS))


def pat_large_to_4k(flags: int) -> int:
    """Move the PAT bit of a 2M/1G leaf (bit 12) to its 4K position (bit 7).

    The result has no PS: in a 4K PTE bit 7 *is* PAT (Linux:
    ``pgprot_large_2_4k``)."""
    flags = int(flags) & ~int(PteFlags.PS)
    if flags & PteFlags.PAT_LARGE:
        flags = (flags & ~int(PteFlags.PAT_LARGE)) | int(PteFlags.PAT)
    return flags


def pat_4k_to_large(flags: int) -> int:
    """Move the PAT bit of a 4K PTE (bit 7) to its large position (bit 12).

    PS is *not* added (Linux: ``pgprot_4k_2_large``); callers add it."""
    flags = int(flags)
    if flags & PteFlags.PAT:
        flags = (flags & ~int(PteFlags.PAT)) | int(PteFlags.PAT_LARGE)
    return flags


def large_to_4k_flags(large_entry_flags: int) -> int:
    """Flags for the 4K PTEs that split a 2M leaf: PS dropped, PAT moved."""
    return pat_large_to_4k(large_entry_flags)


def large_flags_from_4k(pte_flags: int) -> int:
    """Flags for a 2M/1G leaf built from 4K PTE flags: PAT moved, PS set."""
    return pat_4k_to_large(pte_flags) | int(PteFlags.PS)


@dataclass(frozen=True)
class WalkResult:
    """A successful translation."""

    va: int
    pa: int
    level: int                 # leaf level: 1 = 4K, 2 = 2M, 3 = 1G
    entries: tuple[int, ...]   # entries read, the root's (PML4E or PML5E) first
    writable: bool             # RW at every level (CR0.WP is on: it binds CPL 0)
    executable: bool           # NX clear at every level
    user: bool                 # US at every level

    @property
    def page_size(self) -> int:
        return level_size(self.level)

    @property
    def leaf(self) -> int:
        return self.entries[-1]


@dataclass(frozen=True)
class WalkFault:
    """A walk that faults: the #PF the CPU must raise."""

    va: int
    access: Access
    error_code: PfErr
    level: int    # level whose entry stopped the walk (the leaf for a permission fault)


def _rsvd_mask(level: int, leaf: bool, maxphyaddr: int, nxe: bool) -> int:
    """Reserved bits of an entry (SDM tables 4-14..4-20)."""
    mask = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)  # bits 51:MAXPHYADDR
    if not nxe:
        mask |= 1 << 63
    if level >= 4:
        mask |= int(PteFlags.PS)  # PS must be 0 in a PML4E and a PML5E
    if leaf and level == 2:
        mask |= ((1 << 21) - 1) & ~((1 << 13) - 1)  # bits 20:13
    if leaf and level == 3:
        mask |= ((1 << 30) - 1) & ~((1 << 13) - 1)  # bits 29:13
    return mask


def walk(ram64: np.ndarray, cr3: int, va: int, access: str | Access = "r", *,
         maxphyaddr: int = 40, nxe: bool = True, user: bool = False,
         ram_base: int = 0, levels: int = 4) -> WalkResult | WalkFault:
    """Walk the tables at ``cr3`` in ``ram64`` (RAM as uint64) for ``va``:
    4-level, or 5-level with ``levels=5`` (CR4.LA57).

    ``ram64[0]`` holds physical address ``ram_base`` (RAM need not start at 0).

    Supervisor accesses (CPL 0) with CR0.WP set, no SMEP/SMAP, no protection
    keys: the configuration :class:`emu.Machine` runs. The checks run in the
    CPU's order: present and reserved bits level by level, permissions on the
    combined rights of all levels at the end. Entries outside ``ram64``
    read as all-ones (no RAM there): such a walk is reported by ValueError.
    """
    access = Access.parse(access)
    if not is_canonical(va, levels):
        raise ValueError(f"{va:#x} is not a canonical address (the CPU raises #GP, not #PF)")
    base_err = PfErr(0)
    if access is Access.WRITE:
        base_err |= PfErr.W
    elif access is Access.EXEC and nxe:
        base_err |= PfErr.ID
    if user:
        base_err |= PfErr.U
    table = cr3 & ADDR_MASK
    entries: list[int] = []
    writable = executable = usr = True
    for level in range(levels, 0, -1):
        slot = ((table - ram_base) >> 3) + table_index(va, level)
        if not 0 <= slot < len(ram64):
            raise ValueError(f"walk of {va:#x} reads a level-{level} table at "
                             f"{table:#x}, outside guest RAM")
        entry = int(ram64[slot])
        entries.append(entry)
        if not entry & PteFlags.P:
            return WalkFault(va, access, base_err, level)
        leaf = is_leaf(entry, level)
        if entry & _rsvd_mask(level, leaf, maxphyaddr, nxe):
            return WalkFault(va, access, base_err | PfErr.P | PfErr.RSVD, level)
        writable &= bool(entry & PteFlags.RW)
        usr &= bool(entry & PteFlags.US)
        if nxe:
            executable &= not entry & PteFlags.NX
        if leaf:
            size = level_size(level)
            pa = entry_addr(entry, level) | (va & (size - 1))
            denied = ((access is Access.WRITE and not writable)
                      or (access is Access.EXEC and not executable)
                      or (user and not usr))
            if denied:
                return WalkFault(va, access, base_err | PfErr.P, level)
            return WalkResult(va, pa, level, tuple(entries), writable, executable, usr)
        table = entry & ADDR_MASK
    raise AssertionError("unreachable: a PTE is always a leaf")


def fault_error_code(ram64: np.ndarray, cr3: int, va: int, access: str | Access, *,
                     maxphyaddr: int = 40, nxe: bool = True, levels: int = 4) -> PfErr | None:
    """The #PF error code an access to ``va`` raises now, or None if it does not fault."""
    res = walk(ram64, cr3, va, access, maxphyaddr=maxphyaddr, nxe=nxe, levels=levels)
    return res.error_code if isinstance(res, WalkFault) else None
