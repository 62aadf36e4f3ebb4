"""Entry encoding and the software walker (emu.pagetable)."""

import numpy as np
import pytest

from emu import pagetable as pt
from emu.pagetable import Access, PfErr
from emu.pagetable import PteFlags as F


def test_level_geometry():
    assert [pt.level_shift(lv) for lv in (1, 2, 3, 4, 5)] == [12, 21, 30, 39, 48]
    assert [pt.level_size(lv) for lv in (1, 2, 3)] == [4096, 2 << 20, 1 << 30]
    assert pt.Level.PMD.label == "2M" and pt.Level.PUD.page_size == 1 << 30
    va = 0xFFFF888123456789
    assert [pt.table_index(va, lv) for lv in (4, 3, 2, 1)] == [
        (va >> 39) & 511, (va >> 30) & 511, (va >> 21) & 511, (va >> 12) & 511]
    assert pt.table_index(0xFF11000000000000, 5) == 0x111     # LA57's direct map
    with pytest.raises(ValueError, match="level"):
        pt.level_shift(6)


def test_canonical():
    assert pt.is_canonical(0x00007FFFFFFFFFFF) and pt.is_canonical(0xFFFF800000000000)
    assert not pt.is_canonical(0x0000800000000000)
    assert pt.canonical(0x100 << 39) == 0xFFFF800000000000
    assert pt.canonical(0x110 << 39) == 0xFFFF880000000000


def test_make_entry_and_decode():
    e = pt.make_entry(0x200000, F.P | F.RW | F.PS | F.NX | F.PAT_LARGE, level=2)
    assert e == 0x200000 | 0x83 | (1 << 63) | (1 << 12)
    assert pt.entry_addr(e, 2) == 0x200000          # bit 12 is PAT, not frame
    assert pt.entry_flags(e, 2) & F.PAT_LARGE
    assert pt.entry_addr(0x1234F003, 1) == 0x1234F000
    with pytest.raises(ValueError, match="aligned"):
        pt.make_entry(0x201000, F.P | F.PS, level=2)
    with pytest.raises(ValueError, match="PML4"):
        pt.make_entry(0x1000, F.P | F.PS, level=4)


def test_pat_moves_between_formats():
    large = int(F.P | F.RW | F.PS | F.PAT_LARGE | F.PWT)
    small = pt.pat_large_to_4k(large)
    assert small == int(F.P | F.RW | F.PAT | F.PWT)   # PS gone, PAT at bit 7
    assert not small & (1 << 12)
    back = pt.large_flags_from_4k(small)
    assert back == large
    # Without PAT nothing moves, PS is still dropped / added.
    assert pt.pat_large_to_4k(int(F.P | F.PS)) == int(F.P)
    assert pt.pat_4k_to_large(int(F.P | F.RW)) == int(F.P | F.RW)


def _tables():
    """PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000, 1 MiB of RAM."""
    ram = np.zeros(1 << 17, np.uint64)
    ram[0x1000 // 8 + 1] = 0x2000 | F.P | F.RW          # va 512G..1T
    ram[0x2000 // 8 + 0] = 0x3000 | F.P | F.RW
    ram[0x2000 // 8 + 1] = (1 << 30) | F.P | F.PS        # 1G leaf, read-only
    ram[0x3000 // 8 + 0] = 0x4000 | F.P | F.RW
    ram[0x3000 // 8 + 1] = 0x200000 | F.P | F.RW | F.PS | F.NX   # 2M leaf
    ram[0x4000 // 8 + 3] = 0x7000 | F.P | F.RW
    ram[0x4000 // 8 + 4] = 0x8000 | F.P | (1 << 45)      # reserved bit (MAXPHYADDR 40)
    return ram


def test_walk_levels_and_rights():
    ram = _tables()
    base = 1 << 39
    r = pt.walk(ram, 0x1000, base + 0x3123, "w")
    assert (r.pa, r.level, r.writable, r.executable) == (0x7123, 1, True, True)
    r = pt.walk(ram, 0x1000, base + 0x200000 + 0x1234, "r")
    assert (r.pa, r.level, r.executable) == (0x201234, 2, False)
    r = pt.walk(ram, 0x1000, base + (1 << 30) + 0x42, "x")
    assert (r.pa, r.level, r.writable) == ((1 << 30) + 0x42, 3, False)


@pytest.mark.parametrize("off, access, code, level", [
    (0x5000, "r", 0, 1),                            # PTE not present
    (0x5000, "w", PfErr.W, 1),
    (0x5000, "x", PfErr.ID, 1),
    (0x200000, "x", PfErr.P | PfErr.ID, 2),         # NX 2M page
    ((1 << 30), "w", PfErr.P | PfErr.W, 3),         # read-only 1G page
    (0x4000, "r", PfErr.P | PfErr.RSVD, 1),         # reserved bit 45
    (2 << 30, "r", 0, 3),                           # PDPTE not present
])
def test_walk_faults(off, access, code, level):
    r = pt.walk(_tables(), 0x1000, (1 << 39) + off, access)
    assert isinstance(r, pt.WalkFault)
    assert (r.error_code, r.level, r.access) == (PfErr(code), level, Access(access))


def test_walk_rejects_noncanonical_and_bad_access():
    with pytest.raises(ValueError, match="canonical"):
        pt.walk(_tables(), 0x1000, 1 << 47, "r")
    with pytest.raises(ValueError, match="access"):
        pt.walk(_tables(), 0x1000, 0, "q")
