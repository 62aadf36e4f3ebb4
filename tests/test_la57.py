"""5-level paging (CR4.LA57) on the emulated CPU: 57-bit addresses, a PML5
root built by the builder, the software walker agreeing with the CPU's own
walk, INVLPG through the machine's service chain, and the TLB model's walks
reading five entries where four-level ones read four. Linux's LA57 direct
map starts at 0xff11000000000000 (Debian's kernels boot so under QEMU's
-cpu max)."""

from __future__ import annotations

import numpy as np
import pytest
from unicorn import x86_const as X

from emu import Machine, PageFault
from emu import pagetable as pt
from emu.builder import PageTableBuilder
from emu.pagetable import PteFlags
from emu.tlb import PyTlb, TlbModel

LA57_DIRECT = 0xFF11000000000000
RW_NX = PteFlags.P | PteFlags.RW | PteFlags.NX


@pytest.fixture(scope="module")
def m5():
    m = Machine(64 << 20, paging_levels=5)
    b = PageTableBuilder(m, 60 << 20, 64 << 20)
    b.map(LA57_DIRECT, 0, 32 << 20, 1 << 21, RW_NX)                   # 2M pages
    b.map(LA57_DIRECT + (32 << 20), 32 << 20, 8 << 20, 4096, RW_NX)   # 4K pages
    b.map(0x400000, 0x400000, 1 << 21, 1 << 21, PteFlags.P)           # code, RX
    m.cr3 = b.root
    return m, b


def test_57_bit_canonical_addresses():
    assert pt.is_canonical(LA57_DIRECT, 5) and not pt.is_canonical(LA57_DIRECT)
    assert pt.canonical(0x111 << 48, 5) == LA57_DIRECT
    assert pt.is_canonical(0xFFFF888000000000, 5)
    assert not pt.is_canonical(0x0100000000000000, 5)
    with pytest.raises(ValueError, match="paging levels must be 4 or 5"):
        pt.is_canonical(0, 3)
    with pytest.raises(ValueError, match="paging_levels must be 4 or 5"):
        Machine(1 << 20, paging_levels=3)


def test_the_cpu_walks_five_levels_as_the_software_walker(m5):
    """The CPU's translation of LA57 addresses (2M and 4K leaves) equals the
    software walk, which reads five entries, PML5E first; a 4-level
    machine refuses the same address as non-canonical."""
    m, b = m5
    rng = np.random.default_rng(5)
    for off in rng.integers(0, 40 << 20, 200).tolist():
        va = LA57_DIRECT + off
        w = m.walk(va, "w")
        assert isinstance(w, pt.WalkResult) and w.pa == off
        assert m.translate(va, "w") == off
        assert len(w.entries) == (4 if off < (32 << 20) else 5)
        assert w.level == (2 if off < (32 << 20) else 1)
        assert w.entries[0] & pt.ADDR_MASK != b.root        # a PML5E points at a PML4
    with pytest.raises(PageFault) as exc:
        m.translate(LA57_DIRECT + (48 << 20), "r")          # not mapped
    assert exc.value.error_code == 0                        # read, not present
    m4 = Machine(1 << 20)
    with pytest.raises(ValueError, match="not a canonical address"):
        m4.translate(LA57_DIRECT, "r")


def test_code_runs_and_invlpg_works_under_la57(m5):
    """A load through the LA57 direct map by code the CPU runs, a PTE changed
    behind the CPU's back stays cached until INVLPG, then the new mapping
    is what the CPU sees."""
    from emu.asm import assemble
    m, b = m5
    va = LA57_DIRECT + (33 << 20)
    m.ram[(33 << 20): (33 << 20) + 8] = np.frombuffer((0x1111).to_bytes(8, "little"), np.uint8)
    m.ram[(34 << 20): (34 << 20) + 8] = np.frombuffer((0x2222).to_bytes(8, "little"), np.uint8)
    code = assemble(f"mov rax, {va:#x}; mov rbx, [rax]", 0x400000)
    r = m.run(code, at=0x400000)
    assert r.status.value == "completed" and m.uc.reg_read(X.UC_X86_REG_RBX) == 0x1111
    slot, level = b.leaf_slot(va)
    assert level == 1
    old = int(m.ram64[slot])
    m.ram64[slot] = (34 << 20) | int(RW_NX)
    try:
        m.invlpg(va)
        r = m.run(code, at=0x400000)
        assert r.status.value == "completed" and m.uc.reg_read(X.UC_X86_REG_RBX) == 0x2222
        assert m.stats["invlpg_full_fallback"] == 0
    finally:
        m.ram64[slot] = old
        m.invlpg(va)


@pytest.mark.parametrize("cls", [TlbModel, PyTlb])
def test_a_cold_five_level_walk_reads_five_entries(cls):
    """With every paging-structure cache empty, a 4K walk reads one entry
    per level: five under LA57, four under 4-level paging; the next page
    in the same PT hits the PDE cache and reads one."""
    refs = {}
    for levels, base in ((4, 0xFFFF888000000000), (5, LA57_DIRECT)):
        m = Machine(16 << 20, paging_levels=levels)
        b = PageTableBuilder(m, 12 << 20, 16 << 20)
        b.map(base, 0, 8 << 20, 4096, RW_NX)
        m.cr3 = b.root
        t = cls("skylake")
        t.prime(m)
        t.access(base + 0x1000, 0)
        first = t.raw_counters()["walk_mem_refs"]
        t.access(base + 0x2000, 0)
        refs[levels] = (first, t.raw_counters()["walk_mem_refs"] - first)
    assert refs == {4: (4, 1), 5: (5, 1)}


@pytest.mark.parametrize("cls", [TlbModel, PyTlb])
def test_the_pml5e_cache_saves_the_top_read(cls):
    """Two pages 512 GiB apart under one PML5E (different PML4Es): the
    second walk misses the PML4E cache. With a PML5E cache (golden-cove,
    zen4) it starts at the PML4E and reads four entries, a PML5E-cache hit;
    without one (skylake, which has no LA57) it reads all five."""
    m = Machine(16 << 20, paging_levels=5)
    b = PageTableBuilder(m, 12 << 20, 16 << 20)
    b.map(LA57_DIRECT, 0, 4 << 20, 4096, RW_NX)
    b.map(LA57_DIRECT + (512 << 30), 4 << 20, 4 << 20, 4096, RW_NX)
    m.cr3 = b.root
    got = {}
    for preset in ("skylake", "golden-cove", "zen4"):
        t = cls(preset)
        t.prime(m)
        t.access(LA57_DIRECT + 0x1000, 0)
        c0 = t.raw_counters()
        t.access(LA57_DIRECT + (512 << 30) + 0x1000, 0)
        c1 = t.raw_counters()
        got[preset] = (c0["walk_mem_refs"], c1["walk_mem_refs"] - c0["walk_mem_refs"],
                       c1["psc_hit_pml5e"])
    assert got == {"skylake": (5, 5, 0), "golden-cove": (5, 4, 1), "zen4": (5, 4, 1)}
    # a 4-level machine never looks the PML5E cache up
    m4 = Machine(16 << 20)
    b4 = PageTableBuilder(m4, 12 << 20, 16 << 20)
    b4.map(0xFFFF888000000000, 0, 4 << 20, 4096, RW_NX)
    m4.cr3 = b4.root
    t = cls("golden-cove")
    t.prime(m4)
    t.access(0xFFFF888000001000, 0)
    assert t.raw_counters()["walk_mem_refs"] == 4 and t.raw_counters()["psc_hit_pml5e"] == 0
