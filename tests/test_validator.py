"""The validator catches each class of bug, and a correct kernel passes."""

from __future__ import annotations

import broken_policies  # noqa: F401  (registers the test policy)
import pytest

from emu.pagetable import PteFlags as F
from guestkernel import PAGE_OFFSET, Kernel
from guestkernel.shadow import S_PAT
from guestkernel.validate import ValidationError

PA2M = 0x3000_0000                  # a 2M page of the direct map on every guest here


def boot(bug: str) -> Kernel:
    return Kernel.boot(ram="2G", policy="test-planted-bug", bug=bug)


def test_clean_kernel_validates_in_both_modes():
    k = Kernel.boot(ram="2G")
    full = k.validate("full")
    assert full["translated"] >= (2 << 30) // 4096 - 1024   # every direct-map page
    assert full["executed"] == 64
    k.set_memory_ro(PAGE_OFFSET + PA2M + 0x3000, 5)
    assert k.validate("sample", sample=128)["translated"] >= 128


def test_fixture_operations_are_correct_without_a_bug():
    k = boot("none")
    k.policy.split_2m(k, PA2M)
    k.validate("full")
    k.policy.collapse_2m(k, PA2M)
    assert k.lookup_address(PAGE_OFFSET + PA2M)[1] == 2
    assert k.vmstat()["direct_map_level2_collapses"] == 1
    k.validate("full")
    pfn = k.alloc_pages(0, 0)
    k.machine.translate(k.pfn_to_virt(pfn))
    k.policy.unmap(k, pfn)
    k.validate("full")


def test_catches_a_dropped_flush():
    k = boot("dropped-flush")
    pfn = k.alloc_pages(0, 0)
    va = k.pfn_to_virt(pfn)
    k.set_memory_4k(va, 1)              # already split: the unmap itself flushes nothing
    k.machine.translate(va, "w")        # the CPU caches the translation
    k.policy.unmap(k, pfn)
    with pytest.raises(ValidationError, match=r"\[translation\] at 0x[0-9a-f]+ direct map: 'r' "
                       r"access: expected fault \(not present\), CPU/tables gave allowed") as exc:
        k.validate("sample", sample=16)
    assert exc.value.va == va


def test_catches_a_pat_bit_not_moved_on_split():
    k = boot("pat-not-moved")
    slot, _ = k.pgt.lookup_slot(PAGE_OFFSET + PA2M)
    k.pgt.set(slot, k.pgt.get(slot) | int(F.PAT_LARGE))   # a write-combining 2M page
    k.shadow.direct[PA2M >> 12: (PA2M >> 12) + 512] |= S_PAT
    k.machine.flush_tlb()
    k.validate("full")                                     # consistent before the split
    k.policy.split_2m(k, PA2M)
    with pytest.raises(ValidationError, match=r"\[translation\] .* wrong frame") as exc:
        k.validate("full", execution=False)
    assert exc.value.va == PAGE_OFFSET + PA2M
    assert exc.value.expected == f"pa {PA2M:#x}" and exc.value.actual == f"pa {PA2M + 0x1000:#x}"


def test_catches_a_split_table_with_wrong_attributes():
    k = boot("wrong-split-attrs")
    k.policy.split_2m(k, PA2M)
    with pytest.raises(ValidationError, match=r"'w' access: expected allowed \(RW NX\), "
                       r"CPU/tables gave fault") as exc:
        k.validate("full")
    assert exc.value.va == PAGE_OFFSET + PA2M


def test_catches_a_merge_of_different_permissions():
    k = boot("merge-different-perms")
    ro = PAGE_OFFSET + PA2M + 7 * 4096
    k.set_memory_ro(ro, 1)                  # splits; one PTE differs
    k.policy.collapse_2m(k, PA2M)
    with pytest.raises(ValidationError, match=r"'w' access: expected fault \(RO NX\), "
                       r"CPU/tables gave allowed") as exc:
        k.validate("full")
    assert exc.value.va == ro


def test_catches_a_leaked_table_page():
    k = boot("leaked-table")
    k.set_memory_ro(PAGE_OFFSET + PA2M, 1)      # split, then restore: 512 equal PTEs
    k.set_memory_rw(PAGE_OFFSET + PA2M, 1)
    k.policy.collapse_2m(k, PA2M)
    with pytest.raises(ValidationError, match=r"\[pgtable-pages\] .* linked nowhere \(leaked\)"):
        k.validate("full")


def test_catches_a_counter_not_updated():
    k = boot("counter-not-updated")
    k.set_memory_ro(PAGE_OFFSET + PA2M, 1)
    k.set_memory_rw(PAGE_OFFSET + PA2M, 1)
    k.policy.collapse_2m(k, PA2M)
    with pytest.raises(ValidationError, match=r"\[counters\] DirectMap4k disagrees with the "
                       r"live tables: expected 6112 pages \(recount 3552 \+ boot re-count 0 "
                       r"\+ image-mapping splits 2560\), CPU/tables gave 6624 pages"):
        k.validate("full")


def test_catches_a_table_freed_while_linked():
    k = Kernel.boot(ram="2G")
    k.set_memory_4k(PAGE_OFFSET + PA2M, 1)
    slot, level = k.pgt.lookup_slot(PAGE_OFFSET + PA2M)
    table = slot - (slot & 511) << 3
    k.buddy.free_pages(table >> 12, 0)      # behind the page tables' back
    with pytest.raises(ValidationError, match=r"freed while linked"):
        k.validate("full")


def test_debug_vm_validates_after_each_operation():
    k = Kernel.boot(ram="2G", debug_vm=True, policy="test-planted-bug", bug="dropped-flush")
    pfn = k.alloc_pages(0, 0)
    k.set_memory_4k(k.pfn_to_virt(pfn), 1)
    k.machine.translate(k.pfn_to_virt(pfn))
    # set_direct_map_invalid_noflush is validated as it returns: the
    # caller has not flushed yet, so debug_vm sees the stale translation.
    with pytest.raises(ValidationError, match="translation"):
        k.policy.unmap(k, pfn)


def test_bad_mode():
    k = Kernel.boot(ram="2G")
    with pytest.raises(ValueError, match="mode must be"):
        k.validate("quick")


def test_set_memory_4k_over_the_whole_direct_map_counts_as_linux_does():
    """set_memory_4k on every 2M page of a 2G direct map also splits the
    image mapping's 2M pages (the alias of the image's frames), and Linux
    counts those in direct_pages_count (virt_addr_valid accepts image
    addresses). The 2M counter reaches 0 before the last direct-map splits,
    and split_page_count returns early for them: Linux ends at DirectMap2M 0
    and DirectMap4k = everything it ever counted; the validator must expect
    that (it once reported the counters as wrong)."""
    k = Kernel.boot(ram="2G")
    for lo, hi in k.e820.ram_ranges():
        for pa in range(-(-lo // (2 << 20)) * (2 << 20), hi, 2 << 20):
            if k.lookup_address(PAGE_OFFSET + pa)[1] > 1:
                k.set_memory_4k(PAGE_OFFSET + pa, 1)
    mi = k.meminfo()
    # 24448 kB of 4K at boot + 512 x 4 kB for each of the 1012 2M pages
    # counted at boot (1012 = 2072576 kB / 2048): nothing is left at 2M. The
    # 27 image splits took 27 of those, so the last 27 direct-map splits
    # went uncounted.
    assert (mi["DirectMap4k"], mi["DirectMap2M"], mi["DirectMap1G"]) == (
        24448 + 1012 * 2048, 0, 0)
    assert k.highmap_counted[1] == 27 * 512 and k.cpa.uncounted_splits[2] == 27
    k.validate("full")


def test_validate_after_an_oom_runs_every_check_it_can():
    """The first validate() after the guest ran out of memory has no page for
    its probe code: it says the execution check was skipped instead of
    raising, and every other check runs."""
    from guestkernel.gfp import GFP_KERNEL
    k = Kernel.boot(ram="1G")
    held = []
    with pytest.raises(MemoryError, match="page allocation failure: order:0"):
        while True:
            held.append(k.alloc_pages(GFP_KERNEL, 0))
    stats = k.validate("full")
    assert stats["execution_skipped"] == 1 and stats["executed"] == 0
    assert stats["translated"] > 200_000
    # above the high watermark again (khugepaged's min_free_kbytes: 44 MiB)
    for _ in range(max(z.wmark_high for z in k.buddy.zones) + 2048):
        k.free_pages(held.pop(), 0)
    stats = k.validate("full")
    assert "execution_skipped" not in stats and stats["executed"] > 0


def test_catches_a_secret_page_left_in_the_direct_map():
    """Ownership of unmapped pages: a page secretmem holds that the CPU's
    direct map still maps is a violation, whatever the shadow says (a
    policy's cache of "unmapped" pages that were not)."""
    k = Kernel.boot(ram="1G")
    pfn = k.secretmem.fault()
    assert k.validate("sample")["unmapped_owned"] == 1
    slot, _level = k.pgt.lookup_slot(k.pfn_to_virt(pfn))
    k.pgt.set(slot, k.pgt.get(slot) | int(F.P))         # mapped behind everyone's back
    with pytest.raises(ValidationError, match=r"\[ownership\].*belongs to secretmem but is "
                                              r"mapped in the direct map") as exc:
        k.validate("sample")
    assert exc.value.va == k.pfn_to_virt(pfn)
