"""Failed kernel operations leave the model as it was (issue: failure paths).

Each test makes an operation fail (the guest out of memory, or one page
short at a chosen point) and checks what a kernel developer would: the
error, then counters, tables, free pages and the CPU's view with
``validate("full")``."""

from __future__ import annotations

import pytest

from guestkernel import PAGE_OFFSET, Kernel
from guestkernel.gfp import GFP_KERNEL
from guestkernel.page_alloc import AllocationError

GiB = 1 << 30


def _state(k: Kernel, *vas: int) -> tuple:
    """What a failed operation must leave as it was. MemFree (and vmstat's
    nr_free_pages) is Linux's NR_FREE_PAGES, which leaves out the per-CPU
    lists: a table page taken and given back may have refilled the list
    from the buddy on the way (Linux does not undo that either), so the
    free pages are compared with the lists' counted in."""
    b = k.buddy
    meminfo = {key: v for key, v in k.meminfo().items() if key != "MemFree"}
    vmstat = {key: v for key, v in k.vmstat().items() if key != "nr_free_pages"}
    return (meminfo, vmstat, b.nr_free() + b.nr_pcp_pages(), set(k.pgt.table_pages),
            [k.lookup_address(va) for va in vas], list(k.cpa.highmap_counted))


def _exhaust(k: Kernel) -> list[int]:
    held = []
    with pytest.raises(MemoryError):
        while True:
            held.append(k.alloc_pages(GFP_KERNEL, 0))
    return held


def _fail_on_table(k: Kernel, nth: int) -> list[int]:
    """Make the nth page-table page CPA asks for fail as a guest OOM."""
    taken: list[int] = []
    real = k.cpa.alloc_pgtable_page

    def alloc(why: str) -> int:
        if len(taken) + 1 == nth:
            raise AllocationError(GFP_KERNEL, 0, "injected: no page for the table")
        taken.append(real(why))
        return taken[-1]
    k.cpa.alloc_pgtable_page = alloc
    return taken


def test_cpa_split_without_a_page_changes_nothing():
    """set_memory_ro inside a 2M page of an exhausted guest: the split finds
    no page; the entry, the counters and the shadow stay as they were (the
    shadow once said RO while the tables stayed RW)."""
    k = Kernel.boot(ram="1G")
    va = PAGE_OFFSET + 0x30000000
    _exhaust(k)
    before = _state(k, va)
    with pytest.raises(MemoryError, match="page allocation failure: order:0"):
        k.set_memory_ro(va, 1)
    assert _state(k, va) == before
    assert k.lookup_address(va)[1] == 2
    k.validate("full")


def test_cpa_fails_half_way_through_a_1g_split_and_undoes_the_first_half():
    """A page inside a 1G mapping needs two tables (1G -> 2M -> 4K): the
    first is taken and linked, the second is not to be had. The 1G entry
    comes back, the first table goes back to the allocator, the counters and
    vmstat are as before, and no stale translation survives."""
    k = Kernel.boot(ram="4G")
    va = PAGE_OFFSET + GiB + 5 * 4096
    assert k.lookup_address(va)[1] == 3
    before = _state(k, va, va + (2 << 20))
    taken = _fail_on_table(k, 2)
    with pytest.raises(MemoryError, match="injected"):
        k.set_memory_ro(va, 1)
    assert len(taken) == 1 and taken[0] not in k.pgt.table_pages
    assert _state(k, va, va + (2 << 20)) == before
    assert k.machine.translate(va, "w") == GiB + 5 * 4096     # still writable, by the CPU
    k.validate("full")
    # With memory again, the same request succeeds and splits as Linux does.
    k.cpa.alloc_pgtable_page = k.alloc_pgtable_page
    k.set_memory_ro(va, 1)
    assert k.lookup_address(va)[1] == 1
    assert k.vmstat()["direct_map_level3_splits"] == 1
    assert k.vmstat()["direct_map_level2_splits"] == 1
    k.validate("full")


def test_failed_alias_split_of_a_module_page_undoes_the_module_mapping_change():
    """A request on a vmalloc address changes the page, then its direct-map
    alias; when the alias split fails, the vmalloc PTE is put back too."""
    k = Kernel.boot(ram="2G")
    for _ in range(1000):           # a page whose direct-map alias is in a 2M page
        area = k.vmalloc.vmalloc_node_range(4096)
        pfn = area.pages[0]
        if k.lookup_address(k.pfn_to_virt(pfn))[1] == 2:
            break
    assert k.lookup_address(k.pfn_to_virt(pfn))[1] == 2
    before = _state(k, area.addr, k.pfn_to_virt(pfn))
    _fail_on_table(k, 1)
    with pytest.raises(MemoryError, match="injected"):
        k.set_memory_ro(area.addr, 1)
    assert _state(k, area.addr, k.pfn_to_virt(pfn)) == before
    k.machine.translate(area.addr, "w")
    k.validate("full")


@pytest.mark.parametrize("fail_at", [1, 2])     # the load splits two 2M pages
def test_failed_module_load_gives_back_its_area_and_pages(fail_at):
    """The nth table page a module load's CPA calls need is not to be had:
    the load raises MemoryError, the module is not loaded, its area and
    pages are gone, every alias it changed is RW again (validate checks the
    CPU's view against that), and the name can be loaded later. Splits made
    by the steps that succeeded stay (Linux never merges them back)."""
    k = Kernel.boot(ram="2G")
    areas, mods = dict(k.vmalloc.areas), dict(k.modules.modules)
    _fail_on_table(k, fail_at)
    with pytest.raises(MemoryError, match="injected"):
        k.modules.load_module("big", text=3 << 20, rodata=2 << 20, data=1 << 20)
    assert k.vmalloc.areas == areas and k.modules.modules == mods
    assert not (k.page_owner == 1).sum() - sum(len(a.pfns()) for a in areas.values())
    k.validate("full")
    k.cpa.alloc_pgtable_page = k.alloc_pgtable_page
    mod = k.modules.load_module("big", text=3 << 20, rodata=2 << 20, data=1 << 20)
    assert mod.live
    k.validate("full")


def test_failed_bpf_load_on_a_kernel_without_packs():
    """5.10 gives each program its own module_alloc (the first two dozen
    land in already split 2M pages: the image's, where the init sections
    were freed page by page; the slab pages the caches take as programs
    load take some of those pages too); the one whose alias needs a split
    that fails leaves no area and no page behind (its own page, its new
    slab pages), and the programs before it stay loaded."""
    k = Kernel.boot(ram="2G", profile="5.10")
    areas = dict(k.vmalloc.areas)
    _fail_on_table(k, 1)
    free = None
    with pytest.raises(MemoryError, match="injected"):
        for _ in range(1500):
            free = k.buddy.nr_free() + k.buddy.nr_pcp_pages()
            k.bpf.load(4096)
    # the boot filter (ptp_classifier) and those that needed no split (22)
    assert 1 + 20 <= len(k.bpf.progs) <= 1 + 40
    assert set(k.vmalloc.areas) == set(areas) | set(k.bpf.progs)
    assert k.buddy.nr_free() + k.buddy.nr_pcp_pages() == free      # the failed load took nothing
    k.validate("full")


@pytest.mark.parametrize("user", ["secretmem", "guest_memfd", "pgtable_protect", "vmalloc",
                                  "page table"])
def test_freeing_a_page_through_the_wrong_path_is_refused_with_its_owner(user):
    """A secret page (or a vmalloc page, a protected or live page table) freed
    with free_pages would go back to the allocator unmapped or read-only,
    and the next GFP_KERNEL user would fault: refused, naming the owner and
    the right path; nothing changes."""
    from guestkernel.kernel import KernelError
    k = Kernel.boot(ram="1G")
    if user == "vmalloc":
        pfn, owner, path = k.vmalloc.vmalloc_node_range(4096).pages[0], "vmalloc", "vfree"
    elif user == "page table":
        k.set_memory_ro(PAGE_OFFSET + 0x30000000, 1)          # a split: a new PTE table
        pfn = k.pgt.lookup_slot(PAGE_OFFSET + 0x30000000)[0] >> 9
        owner, path = "page_table", "page-table code"
    elif user == "pgtable_protect":
        pfn, owner, path = k.pgtable_protect.alloc(), "protected_pgtable", "pgtable_protect.free"
    else:
        pfn = getattr(k, user).fault()
        owner, path = user, f"{user}.free"
    before = _state(k, k.pfn_to_virt(pfn))
    with pytest.raises(KernelError, match=f"free_pages\\({pfn:#x}, 0\\): the page belongs to "
                                          f"{owner}; free it through .*{path}"):
        k.free_pages(pfn, 0)
    assert _state(k, k.pfn_to_virt(pfn)) == before
    k.validate("full")


def test_error_classes_users_can_catch():
    from guestkernel.boot import BootError
    from guestkernel.cpa import CpaError
    from guestkernel.kernel import KernelError
    from guestkernel.page_alloc import BadFreeError
    from guestkernel.users import UsersError
    from guestkernel.vmalloc import VmallocBadRequest, VmallocNoSpace
    assert issubclass(AllocationError, MemoryError) and issubclass(VmallocNoSpace, MemoryError)
    for bad in (KernelError, BootError, CpaError, BadFreeError, UsersError, VmallocBadRequest):
        assert issubclass(bad, ValueError), bad
    k = Kernel.boot(ram="1G")
    with pytest.raises(KernelError, match="order must be 0..10"):
        k.alloc_pages(GFP_KERNEL, 11)
    with pytest.raises(MemoryError) as err:
        k.alloc_pages(GFP_KERNEL, 10)          # 4 MiB: the 1G guest has no free order-10 block
        k.alloc_pages(GFP_KERNEL, 10)
        while True:
            k.alloc_pages(GFP_KERNEL, 10)
    assert err.value.order == 10 and err.value.gfp == GFP_KERNEL


def _page_in_2m(k: Kernel, alloc) -> int:
    """Allocate with ``alloc`` until a page's direct-map entry is a 2M leaf."""
    for _ in range(2000):
        pfn = alloc()
        if k.lookup_address(k.pfn_to_virt(pfn))[1] == 2:
            return pfn
    raise AssertionError("no page under a 2M mapping")


def test_failed_secretmem_fault_gives_the_page_back():
    k = Kernel.boot(ram="2G")
    _page_in_2m(k, lambda: k.alloc_pages(GFP_KERNEL, 0))   # the pcp now serves 2M-mapped pages
    pages = set(k.secretmem.pages)
    _fail_on_table(k, 1)
    with pytest.raises(MemoryError, match="injected"):
        for _ in range(600):
            k.secretmem.fault()
    assert k.secretmem.pages >= pages
    fresh = k.secretmem.pages - pages
    assert all(k.lookup_address(k.pfn_to_virt(p)) is None or
               k.lookup_address(k.pfn_to_virt(p))[0] & 1 == 0 for p in fresh)
    assert (k.page_owner == 2).sum() == len(k.secretmem.pages)
    k.validate("full")


def test_gfp_unmapped_alloc_across_two_2m_pages_is_all_or_nothing():
    """An order-10 GFP_UNMAPPED block spans two 2M pages: the first is split
    and its pages unmapped, the second split finds no page: the first 512
    pages are mapped again and the block goes back to the allocator."""
    from guestkernel.gfp import GFP_UNMAPPED
    k = Kernel.boot(ram="2G")
    before = _state(k)
    taken = _fail_on_table(k, 2)
    with pytest.raises(MemoryError, match="injected"):
        k.alloc_pages(GFP_KERNEL | GFP_UNMAPPED, 10)
    assert len(taken) == 1                 # the first 2M page's split stays, as in Linux
    after = _state(k)
    assert after[0]["DirectMap2M"] == before[0]["DirectMap2M"] - 2048
    assert after[2] == before[2] - 1                # only the table page is gone
    k.validate("full")


def test_vfree_with_reset_perms_under_oom_still_frees_the_area():
    """vm_reset_perms ignores what set_direct_map_* return (Linux): a module
    unloaded when no table page is to be had still goes away, and every
    alias is mapped RW again."""
    k = Kernel.boot(ram="2G")
    k.modules.load_module("m", text=5 << 20, data=1 << 20)
    areas = len(k.vmalloc.areas)
    _fail_on_table(k, 1)
    k.modules.delete_module("m")
    assert len(k.vmalloc.areas) == areas - 1 and "m" not in k.modules.modules
    k.validate("full")
