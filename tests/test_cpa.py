"""CPA in the spirit of arch/x86/mm/pat/cpa-test.c: attribute changes on
direct-map ranges, then lookup_address levels and flags, the counters, the
table pages allocated, the flushes, and what the CPU does."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import counters_match_tables

from emu import PageFault, RunStatus
from emu.pagetable import ADDR_MASK, HW_MANAGED, PfErr
from emu.pagetable import PteFlags as F
from guestkernel import PAGE_OFFSET, Kernel
from guestkernel.cpa import CpaError, SplitOutcome

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture()
def k() -> Kernel:
    return Kernel.boot(ram="6G")   # 1G pages at [1G,2G) and [4G,7G)


def snapshot(k: Kernel):
    tables = sorted(k.pgt.table_pages)
    return (dict(k.meminfo()), dict(k.vmstat()), tables,
            [k.machine.ram64[t >> 3: (t >> 3) + 512].copy() for t in tables])


def same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and all(
        np.array_equal(x, y) for x, y in zip(a[3], b[3]))


def test_ro_on_one_page_of_a_2m_page_splits_it(k):
    va = PAGE_OFFSET + 0x3000_0000 + 0x5000            # inside [2M,1G): a 2M page
    tables = len(k.pgt.table_pages)
    before = k.meminfo()
    cpa = k.set_memory_ro(va, 1)
    assert cpa.decisions[0][1:] == (2, SplitOutcome.SPLIT)
    entry, level = k.lookup_address(va)
    assert level == 1 and not entry & F.RW and entry & F.NX and entry & F.P
    assert (entry & ((1 << 52) - 4096)) == 0x3000_5000
    nb, nbe = k.lookup_address(va + 4096)
    assert nbe == 1 and nb & F.RW                       # the rest keeps the old attributes
    after = k.meminfo()
    assert after["DirectMap4k"] - before["DirectMap4k"] == 2048
    assert before["DirectMap2M"] - after["DirectMap2M"] == 2048
    assert k.vmstat()["direct_map_level2_splits"] == 1
    assert len(k.pgt.table_pages) == tables + 1         # one PTE page from the buddy
    counters_match_tables(k)
    with pytest.raises(PageFault) as exc:
        k.machine.translate(va, "w")
    assert exc.value.error_code == PfErr.P | PfErr.W
    # Restoring the attribute does not restore the 2M page (no merge in mainline).
    k.set_memory_rw(va, 1)
    assert k.lookup_address(va)[1] == 1 and k.lookup_address(va)[0] & F.RW
    assert k.machine.translate(va, "w") == 0x3000_5000


def test_whole_large_page_is_rewritten_in_place(k):
    va = PAGE_OFFSET + 0x2000_0000                      # a whole 2M page
    cpa = k.set_memory_ro(va, 512)
    assert [d[2] for d in cpa.decisions] == [SplitOutcome.REWRITTEN]
    entry, level = k.lookup_address(va)
    assert level == 2 and entry & F.PS and not entry & F.RW
    assert k.vmstat()["direct_map_level2_splits"] == 0
    # Same protection again: unchanged, nothing written, no flush due.
    flushes = dict(k.vmstat())
    cpa = k.set_memory_ro(va + 0x1000, 3)
    assert [d[2] for d in cpa.decisions] == [SplitOutcome.UNCHANGED]
    assert k.vmstat()["nr_tlb_local_flush_one"] == flushes["nr_tlb_local_flush_one"]


def test_1g_split_keeps_2m_leaves(k):
    va = PAGE_OFFSET + 5 * GiB + 0x12345000
    k.set_memory_ro(va, 1)
    # 1G -> 512 x 2M (PS kept), then the 2M page holding va -> 512 x 4K.
    assert k.vmstat()["direct_map_level3_splits"] == 1
    assert k.vmstat()["direct_map_level2_splits"] == 1
    assert k.lookup_address(va)[1] == 1
    e2, l2 = k.lookup_address(PAGE_OFFSET + 5 * GiB)
    assert l2 == 2 and e2 & F.PS and e2 & F.RW
    assert (e2 & ((1 << 52) - 4096)) == 5 * GiB
    counters_match_tables(k)
    assert k.machine.translate(PAGE_OFFSET + 5 * GiB + 0x200000 * 7 + 8) == 5 * GiB + 0x200000 * 7 + 8


def set_pat_large(k: Kernel, va: int, level: int) -> int:
    """Mark the large direct-map leaf mapping ``va`` WC/WT-like (PAT index
    bit, bit 12 of a 2M/1G leaf); return its flags (bits outside 51:12)."""
    slot, found = k.pgt.lookup_slot(va)
    assert found == level
    entry = k.pgt.get(slot) | int(F.PAT_LARGE)
    k.pgt.set(slot, entry)
    k.machine.flush_tlb()
    return entry & ~ADDR_MASK & ~int(HW_MANAGED)


def assert_ptes_of_split_2m(k: Kernel, va2m: int, pa2m: int, large_flags: int, ro_va: int):
    """All 512 PTEs that replaced the 2M leaf at ``va2m``: PAT in bit 7 (no
    PS there), bit 12 nothing but the frame's lowest bit (the frames run
    contiguously from ``pa2m``), every other flag the large page's (RW
    cleared only on ``ro_va``, the page the CPA call asked for)."""
    want = large_flags & ~int(F.PS) | int(F.PAT)
    for i in range(512):
        va = va2m + i * 4096
        entry, level = k.lookup_address(va)
        assert level == 1, hex(va)
        assert entry & ADDR_MASK == pa2m + i * 4096, (i, hex(entry))   # bit 12 == i & 1
        flags = entry & ~ADDR_MASK & ~int(HW_MANAGED)
        assert flags == (want & ~int(F.RW) if va == ro_va else want), (i, hex(entry))
    # The CPU's walk agrees: an even page translates to an even frame.
    for i in (0, 1, 2, 511):
        assert k.machine.translate(va2m + i * 4096 + 8) == pa2m + i * 4096 + 8


def test_split_of_a_2m_page_moves_the_pat_bit(k):
    va2m, pa2m = PAGE_OFFSET + 0x1000_0000, 0x1000_0000
    large = set_pat_large(k, va2m, 2)
    assert large & F.PS and large & F.RW and large & F.P
    ro_va = va2m + 0x3000                                # odd page: bit 12 of its frame set
    k.set_memory_ro(ro_va, 1)
    assert k.vmstat()["direct_map_level2_splits"] == 1
    assert_ptes_of_split_2m(k, va2m, pa2m, large, ro_va)
    counters_match_tables(k)


def test_split_of_a_1g_page_keeps_pat_large_in_its_2m_leaves(k):
    """1G -> 512 x 2M: PAT stays in bit 12 (still large leaves); then the
    2M leaf holding the page -> 512 x 4K: PAT moves to bit 7."""
    va1g, pa1g = PAGE_OFFSET + 5 * GiB, 5 * GiB
    large = set_pat_large(k, va1g, 3)
    ro_va = va1g + 7 * 2 * MiB + 0x5000
    k.set_memory_ro(ro_va, 1)
    assert k.vmstat()["direct_map_level3_splits"] == 1
    assert k.vmstat()["direct_map_level2_splits"] == 1
    for j in range(512):
        va = va1g + j * 2 * MiB
        if j == 7:
            continue
        entry, level = k.lookup_address(va)
        assert level == 2, j
        # bits 51:12 hold the 2M frame and PAT_LARGE, bits 20:13 reserved (0)
        assert entry & ADDR_MASK == (pa1g + j * 2 * MiB) | int(F.PAT_LARGE), (j, hex(entry))
        assert entry & ~ADDR_MASK & ~int(HW_MANAGED) == large, (j, hex(entry))
        assert k.machine.translate(va + 0x1000 + 8) == pa1g + j * 2 * MiB + 0x1000 + 8
    assert_ptes_of_split_2m(k, va1g + 7 * 2 * MiB, pa1g + 7 * 2 * MiB, large, ro_va)
    counters_match_tables(k)


def test_1g_collapse_keeps_a_2m_leafs_pat_bit():
    k = Kernel.boot(ram="6G", policy="cpa-merge")
    va1g = PAGE_OFFSET + 5 * GiB
    page = va1g + 7 * 2 * MiB + 0x5000
    k.set_memory_ro(page, 1)                              # 1G -> 2M leaves, one -> 4K
    set_pat_large(k, va1g + 3 * 2 * MiB, 2)               # one 2M leaf WC/WT-like
    k.set_memory_rw(page, 1)                              # the 4K table merges back
    entry, level = k.lookup_address(va1g + 3 * 2 * MiB)
    assert level == 2 and entry & F.PAT_LARGE, (level, hex(entry))


def test_flush_ceiling(k):
    base = PAGE_OFFSET + 0x3000_0000
    k.set_memory_4k(base, 512)                         # split first
    one = k.vmstat()["nr_tlb_local_flush_one"]
    full = k.vmstat()["nr_tlb_local_flush_all"]
    k.set_memory_ro(base, 33)
    assert k.vmstat()["nr_tlb_local_flush_one"] - one == 33
    assert k.vmstat()["nr_tlb_local_flush_all"] == full
    k.set_memory_ro(base + 33 * 4096, 34)
    assert k.vmstat()["nr_tlb_local_flush_all"] == full + 1
    assert k.vmstat()["nr_tlb_local_flush_one"] - one == 33


def test_no_stale_translation_after_cpa(k):
    """Run guest code through the page before and after: the CPU sees the
    change (CPA flushed what it cached)."""
    va = PAGE_OFFSET + 0x3000_0000 + 0x7000
    code_va = k.alloc_insn_page()
    assert k.machine.run("mov rax, [rbx]\nmov [rbx], rax", at=code_va,
                         regs={"rbx": va}).status is RunStatus.COMPLETED
    k.set_memory_ro(va, 1)
    r = k.machine.run("mov rax, [rbx]\nmov [rbx], rax", at=code_va, regs={"rbx": va})
    assert r.status is RunStatus.FAULTED and r.fault.cr2 == va
    assert r.fault.error_code == PfErr.P | PfErr.W


def test_random_ranges_like_cpa_test(k):
    """cpa-test.c: random ranges, change and restore, check every page."""
    rng = random.Random(42)
    regions = [(0x200000, 1 * GiB), (1 * GiB, 2 * GiB), (4 * GiB, 7 * GiB)]
    done = []
    for _ in range(40):
        lo, hi = rng.choice(regions)
        n = rng.choice([1, 3, 17, 511, 512, 600, 1024])
        pa = rng.randrange(lo, hi - n * 4096, 4096)
        k.set_memory_np(PAGE_OFFSET + pa, n)
        done.append((pa, n))
        for i in (0, n // 2, n - 1):
            entry, _ = k.lookup_address(PAGE_OFFSET + pa + i * 4096)
            assert not entry & F.P
            with pytest.raises(PageFault):
                k.machine.translate(PAGE_OFFSET + pa + i * 4096)
        counters_match_tables(k)
    for pa, n in done:
        k.set_memory_p(PAGE_OFFSET + pa, n)
    for pa, n in done:
        for i in (0, n // 2, n - 1):
            assert k.machine.translate(PAGE_OFFSET + pa + i * 4096, "w") == pa + i * 4096
    counters_match_tables(k)
    assert k.vmstat()["direct_map_level2_splits"] > 0


@pytest.mark.parametrize("call, match", [
    (lambda k: k.set_memory_ro(PAGE_OFFSET + 0x3000_0123, 1), "not page aligned"),
    (lambda k: k.set_memory_ro(PAGE_OFFSET + 0x3000_0000, 0), "positive"),
    (lambda k: k.set_memory_ro(PAGE_OFFSET + 0xC000_0000, 1), "not mapped"),       # PCI hole
    (lambda k: k.set_memory_ro(PAGE_OFFSET + 0xBFFC_0000, 64), "not mapped"),      # runs into it
    (lambda k: k.set_memory_nx(0x1234000, 1), "not mapped"),                       # user space
    (lambda k: k.set_direct_map_invalid_noflush(1 << 40), "outside"),
])
def test_bad_requests_change_nothing(k, call, match):
    before = snapshot(k)
    with pytest.raises(CpaError, match=match):
        call(k)
    assert same(before, snapshot(k))


def test_set_direct_map_noflush_leaves_stale_until_flush(k):
    pfn = k.alloc_pages(0, 0)
    va = k.pfn_to_virt(pfn)
    code = k.alloc_insn_page()
    assert k.machine.run("mov rax, [rbx]", at=code, regs={"rbx": va}).status is RunStatus.COMPLETED
    k.set_direct_map_invalid_noflush(pfn)
    # No flush: the CPU may still use its cached translation...
    r = k.machine.run("mov rax, [rbx]", at=code, regs={"rbx": va})
    assert r.status is RunStatus.COMPLETED
    k.flush_tlb_kernel_range(va, va + 4096)
    r = k.machine.run("mov rax, [rbx]", at=code, regs={"rbx": va})
    assert r.status is RunStatus.FAULTED and r.fault.error_code == PfErr(0)
    k.set_direct_map_default_noflush(pfn)
    k.free_pages(pfn, 0)


def test_deferred_flushes_are_counted_and_made_once_at_the_end():
    """A trace replay defers its TLB flushes (the CPU runs no code
    meanwhile): each is counted as the kernel counts it, none reaches the
    CPU until the block ends (one full flush), and validate() inside the
    block makes the held-back flush first, so the CPU never uses a stale
    translation."""
    from guestkernel import Kernel
    from guestkernel.layout import PAGE_OFFSET
    k = Kernel.boot(ram="1G")
    k.validate("full")                           # the CPU has run code: it caches
    machine = k.machine
    before = dict(machine.stats)
    ones = k.vmstat()["nr_tlb_local_flush_one"]
    with k.tlb.deferred():
        k.set_memory_ro(PAGE_OFFSET + 0x10000000, 1)
        k.set_memory_rw(PAGE_OFFSET + 0x10000000, 1)
        assert k.vmstat()["nr_tlb_local_flush_one"] > ones
        assert machine.stats["invlpg"] == before["invlpg"]
        assert machine.stats["flush_tlb"] == before["flush_tlb"]
        k.set_memory_ro(PAGE_OFFSET + 0x10000000, 1)
        k.validate("full")                       # syncs first: sees the RO page
        assert machine.stats["flush_tlb"] == before["flush_tlb"] + 1
        k.set_memory_rw(PAGE_OFFSET + 0x10000000, 1)
    assert machine.stats["flush_tlb"] == before["flush_tlb"] + 2
    assert machine.stats["invlpg"] == before["invlpg"]
    k.validate("full")
