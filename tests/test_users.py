"""The kernel's users of CPA: vmalloc/vfree with VM_FLUSH_RESET_PERMS, module
loading, bpf_prog_pack, secretmem, guest_memfd, insn pages; and ptdump."""

from __future__ import annotations

import pytest
from helpers import counters_match_tables

from emu import PageFault
from emu.pagetable import PfErr
from emu.pagetable import PteFlags as F
from guestkernel import Kernel
from guestkernel.users import GuestMemfd, UsersError
from guestkernel.vmalloc import VmallocError


@pytest.fixture()
def k() -> Kernel:
    return Kernel.boot(ram="4G")


def direct_level(k: Kernel, pfn: int) -> int:
    return k.lookup_address(k.pfn_to_virt(pfn))[1]


def test_module_load_sets_permissions_and_splits_the_alias(k):
    mod = k.modules.load_module("bfs", text=3 * 4096, rodata=4096, ro_after_init=4096, data=4096)
    base, m = mod.base, k.machine
    # The module area starts with the 2M bpf_prog_pack JITed at boot, then
    # its guard page.
    assert base == k.profile.modules_vaddr + (2 << 20) + 4096
    text_pfns = mod.area.pfns()[:3]
    # Module text: RO+X; rodata and ro_after_init: RO+NX; data: RW+NX.
    assert m.translate(base, "x") == text_pfns[0] << 12
    with pytest.raises(PageFault) as exc:
        m.translate(base, "w")
    assert exc.value.error_code == PfErr.P | PfErr.W
    for page, writable in ((3, False), (4, False), (5, True)):
        entry, level = k.lookup_address(base + page * 4096)
        assert level == 1 and bool(entry & F.RW) == writable and entry & F.NX
    # Direct-map aliases of the RO pages are RO (and never executable) ...
    for pfn in mod.area.pfns()[:5]:
        entry, level = k.lookup_address(k.pfn_to_virt(pfn))
        assert level == 1 and not entry & F.RW and entry & F.NX
    # ... so each 2M region holding them is split: here one the boot BPF
    # pack already split (its pages are pfn 0x100000 on, the first 2M of
    # the Normal zone, and the per-CPU unit's free tail near the top of
    # RAM, where these land), so no new split is counted.
    regions2m = {pfn >> 9 for pfn in mod.area.pfns()[:5]}
    pack = {pfn >> 9 for pfn in k.vmalloc.find_area(k.profile.modules_vaddr).pfns()}
    assert pack == {0x100000 >> 9, 0x13BA00000 >> 21}
    assert regions2m == {0x13BA00000 >> 21}
    assert k.vmstat()["direct_map_level2_splits"] == 0
    counters_match_tables(k)
    # Unload: vfree resets the aliases to RW; the split stays.
    k.modules.delete_module("bfs")
    for pfn in text_pfns:
        entry, level = k.lookup_address(k.pfn_to_virt(pfn))
        assert level == 1 and entry & F.RW and entry & F.P
    with pytest.raises(PageFault):
        m.translate(base, "r")
    counters_match_tables(k)


def test_bpf_prog_pack_does_cpa_once(k):
    first = k.bpf.load(200)
    splits = k.vmstat()["direct_map_level2_splits"]
    pfns = k.vmalloc.find_area(first.pack).pfns()
    assert len(pfns) == 512
    progs = [k.bpf.load(120) for _ in range(500)]
    assert k.vmstat()["direct_map_level2_splits"] == splits     # packed: no new CPA
    assert {p.pack for p in progs} == {first.pack}
    assert progs[0].addr == first.addr + 256                     # 64-byte chunks
    assert k.machine.translate(progs[10].addr, "x")
    big = k.bpf.load(3 << 20)                                    # larger than a pack
    assert big.pack is None
    with pytest.raises(UsersError):
        k.bpf.free(first.addr + 64)


def test_bpf_without_pack_splits_per_program():
    k = Kernel.boot(ram="4G")
    k.bpf.use_pack = False
    for _ in range(8):
        k.bpf.load(100)
    assert len(k.vmalloc.areas) == 8 + 1     # plus the pack JITed at boot
    counters_match_tables(k)


def test_secretmem_pages_leave_the_direct_map(k):
    before = k.meminfo()["DirectMap4k"]
    pfns = [k.secretmem.fault() for _ in range(1100)]   # beyond the regions split at boot
    for pfn in pfns:
        entry, level = k.lookup_address(k.pfn_to_virt(pfn))
        assert level == 1 and not entry & F.P
        with pytest.raises(PageFault) as exc:
            k.machine.translate(k.pfn_to_virt(pfn))
        assert exc.value.error_code == PfErr(0)
    grown = k.meminfo()["DirectMap4k"] - before
    assert grown == 2048 * k.vmstat()["direct_map_level2_splits"] > 0
    for pfn in pfns:
        k.secretmem.free(pfn)
        assert k.machine.translate(k.pfn_to_virt(pfn), "w") == pfn << 12
    assert k.meminfo()["DirectMap4k"] - before == grown      # unchanged after free
    with pytest.raises(UsersError):
        k.secretmem.free(pfns[0])


def test_guest_memfd_and_insn_pages(k):
    gm = k.guest_memfd
    pfns = gm.populate(16)
    assert all(not k.lookup_address(k.pfn_to_virt(p))[0] & F.P for p in pfns)
    page = k.alloc_insn_page()
    entry, level = k.lookup_address(page)
    assert not entry & F.RW and not entry & F.NX
    counters_match_tables(k)


def test_vmalloc_bad_input(k):
    with pytest.raises(VmallocError, match="bad size"):
        k.vmalloc.vmalloc_node_range(0)
    with pytest.raises(VmallocError, match="not the start"):
        k.vfree(0xFFFFC90000001000)
    with pytest.raises(VmallocError, match="no 0x"):
        k.vmalloc.vmalloc_node_range(8 << 20, start=0xFFFFC90000000000, end=0xFFFFC90000100000)
    with pytest.raises(UsersError, match="already loaded"):
        k.modules.load_module("a", 4096)
        k.modules.load_module("a", 4096)


def test_ptdump_format(k):
    k.modules.load_module("qnx4", text=8192, rodata=4096, data=4096)
    out = k.ptdump().splitlines()
    assert out[0] == "---[ User Space ]---"
    headers = [line for line in out if line.startswith("---[")]
    assert headers[:4] == ["---[ User Space ]---", "---[ Kernel Space ]---",
                           "---[ LDT remap ]---", "---[ Low Kernel Mapping ]---"]
    assert "0xffff888040000000-0xffff888080000000           1G     RW         PSE         NX pud" in out
    i = out.index("---[ Modules ]---")
    assert out[i + 1] == ("0xffffffffc0000000-0xffffffffc0200000           2M     ro"
                          "                     x  pte")          # the boot bpf_prog_pack
    assert out[i + 2].startswith("0xffffffffc0200000-0xffffffffc0201000           4K")  # guard
    assert out[i + 3] == ("0xffffffffc0201000-0xffffffffc0203000           8K     ro"
                          "                     x  pte")          # qnx4's text
    # The sizes of the lines cover the address space without gaps.
    ranges = [line.split()[0].split("-") for line in out if line.startswith("0x")]
    for (a0, a1), (b0, _b1) in zip(ranges, ranges[1:]):
        assert a1 == b0 or int(a1, 16) == 0xFFFF880000000000 and int(b0, 16) == 0xFFFF880000000000


def test_protected_page_tables_are_ro_in_the_direct_map(k):
    pfn = k.pgtable_protect.alloc()
    va = k.pfn_to_virt(pfn)
    entry, level = k.lookup_address(va)
    assert level == 1 and not entry & F.RW
    with pytest.raises(PageFault) as exc:
        k.machine.translate(va, "w")
    assert exc.value.error_code == PfErr.P | PfErr.W
    assert int(k.machine.ram64[pfn * 512]) == 0            # GFP_PGTABLE zeroes it
    k.pgtable_protect.free(pfn)
    assert k.machine.translate(va, "w") == pfn << 12
    with pytest.raises(UsersError):
        k.pgtable_protect.free(pfn)
    counters_match_tables(k)


def test_failed_vmalloc_gives_back_every_page_it_took():
    """A vmalloc larger than free memory fails as a MemoryError
    (AllocationError is one) and its rollback frees the pages it took: free
    pages, table pages and the validator agree with before."""
    from guestkernel import Kernel
    from guestkernel.page_alloc import AllocationError
    k = Kernel.boot(ram="1G")
    def free_pages() -> int:        # the free lists and the per-CPU lists
        return k.buddy.nr_free() + k.buddy.nr_pcp_pages()
    free, tables, areas = free_pages(), set(k.pgt.table_pages), dict(k.vmalloc.areas)
    assert issubclass(AllocationError, MemoryError)
    with pytest.raises(MemoryError, match="page allocation failure"):
        k.vmalloc.vmalloc_node_range((free + 1) * 4096)
    assert free_pages() == free
    assert set(k.pgt.table_pages) == tables and k.vmalloc.areas == areas
    k.validate("full")


def test_module_init_layout_is_its_own_area_protected_then_freed(k, monkeypatch):
    """load_module with init sections (6.1's move_module, complete_formation,
    do_init_module): the init layout is a second module_alloc after the
    core's; module_enable_ro/nx/x go core then init (text RO, init text RO,
    rodata RO, init rodata RO; NX on the core's rodata, ro_after_init and
    data, then the init rodata and data; X on both texts); ro_after_init
    becomes RO after init; then the init layout is freed with its aliases
    reset to RW."""
    calls = []
    for kind in ("ro", "rw", "nx", "x"):
        real = getattr(k.cpa, f"set_memory_{kind}")
        monkeypatch.setattr(k.cpa, f"set_memory_{kind}",
                            lambda addr, n, _k=kind, _r=real: (calls.append((_k, addr, n)),
                                                              _r(addr, n))[1])
    freed = {}
    vfree = k.vmalloc.vfree
    monkeypatch.setattr(k.vmalloc, "vfree", lambda addr: (
        freed.__setitem__(addr, k.vmalloc.areas[addr].pfns()), vfree(addr))[1])
    before = set(k.vmalloc.areas)
    mod = k.modules.load_module("bfs", text=3 * 4096, rodata=4096, ro_after_init=4096,
                                data=4096, init_text=2 * 4096, init_rodata=100, init_data=8)
    core = mod.base
    assert set(k.vmalloc.areas) - before == {core}           # the init layout is gone
    assert (mod.init_text_pages, mod.init_rodata_pages, mod.init_data_pages) == (2, 1, 1)
    init = next(addr for kind, addr, _n in calls if kind == "ro" and addr != core)
    assert init > core                                         # allocated after the core
    P = 4096
    expect = [("ro", core, 3), ("ro", init, 2), ("ro", core + 3 * P, 1), ("ro", init + 2 * P, 1),
              ("nx", core + 3 * P, 1), ("nx", core + 4 * P, 1), ("nx", core + 5 * P, 1),
              ("nx", init + 2 * P, 1), ("nx", init + 3 * P, 1),
              ("x", core, 3), ("x", init, 2), ("ro", core + 4 * P, 1)]
    assert calls[:len(expect)] == expect
    # the init layout's pages went back with RW aliases (vm_reset_perms)
    for pfn in freed[init]:
        entry, _level = k.lookup_address(k.pfn_to_virt(pfn))
        assert entry & F.RW and entry & F.NX
    assert k.machine.translate(core, "x") == mod.area.pfns()[0] << 12
    k.validate("full")


def test_a_module_whose_init_protection_fails_is_not_loaded(k, monkeypatch):
    """Out of memory while protecting the init layout (its text's
    set_memory_x): the init steps and then the core's are undone, both
    layouts freed, every alias back, and no module is left behind."""
    from guestkernel.page_alloc import AllocationError
    aliases = {pfn: k.lookup_address(k.pfn_to_virt(pfn))[0] & (F.RW | F.NX)
               for pfn in range(0x100000, 0x100000 + 4096)}
    areas = set(k.vmalloc.areas)
    real_x = k.cpa.set_memory_x
    cores = []

    def set_memory_x(addr, n):
        if cores and addr != cores[0]:
            raise AllocationError(0, 0, "injected: no page for the table")
        cores.append(addr)
        return real_x(addr, n)

    monkeypatch.setattr(k.cpa, "set_memory_x", set_memory_x)
    with pytest.raises(MemoryError, match="injected"):
        k.modules.load_module("bfs", text=8192, rodata=4096, data=4096, init_text=4096,
                              init_data=4096)
    assert "bfs" not in k.modules.modules and set(k.vmalloc.areas) == areas
    assert {pfn: k.lookup_address(k.pfn_to_virt(pfn))[0] & (F.RW | F.NX)
            for pfn in aliases} == aliases
    k.validate("full")
