"""The guest kernel model with 5-level paging (``Kernel.boot(paging_levels=5)``),
as Debian's 6.1 and 7.2 run under QEMU's ``-cpu max``: a PML5 root, the
LA57 layout (PAGE_OFFSET 0xff11000000000000, vmalloc at 0xffa0000000000000),
the boot tables Linux builds for it (head64.c's level4_kernel_pgt, a P4D
table for the direct map), CPA, the validator and ptdump on it, and the
same fragmentation as 4-level paging on a boot and on a workload whose
vmalloc tables come out alike (the layout moves addresses; the vmalloc
space's lazily made tables, a P4D more with 5 levels, can move a page)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emu import PageFault
from emu import pagetable as pt
from guestkernel import PAGE_OFFSET, Kernel, KernelError
from guestkernel.layout import LAYOUT_4LEVEL, LAYOUT_5LEVEL, START_KERNEL_MAP, layout_for

LA57 = 0xFF11000000000000
GiB = 1 << 30


@pytest.fixture(scope="module")
def k5():
    return Kernel.boot("2G", paging_levels=5)


def test_the_layouts_are_linuxs():
    """page_64_types.h / pgtable_64_types.h: __PAGE_OFFSET_BASE_L4/L5,
    VMALLOC_START and VMEMMAP_START of each mode; the image is at the same
    place in both."""
    assert LAYOUT_4LEVEL.page_offset == PAGE_OFFSET == 0xFFFF888000000000
    assert LAYOUT_5LEVEL.page_offset == LA57
    assert LAYOUT_5LEVEL.vmalloc_start == 0xFFA0000000000000
    assert LAYOUT_5LEVEL.vmalloc_end == 0xFFD1FFFFFFFFFFFF           # 12.5 PB
    assert LAYOUT_5LEVEL.vmemmap_start == 0xFFD4000000000000
    assert LAYOUT_5LEVEL.direct_map_end == 0xFF91000000000000        # 32 PB
    assert LAYOUT_4LEVEL.direct_map_end == 0xFFFFC88000000000        # 64 TB
    assert LAYOUT_4LEVEL.start_kernel_map == LAYOUT_5LEVEL.start_kernel_map == START_KERNEL_MAP
    with pytest.raises(ValueError, match="4 or 5"):
        layout_for(3)


def test_a_5_level_boot_walks_a_pml5_and_maps_ram_at_the_la57_page_offset(k5):
    """CR4.LA57 on the CPU; the root is a PML5 whose entry 0x111 links the
    direct map's P4D table and whose entry 511 links level4_kernel_pgt; the
    CPU's walk of every 2M region's first page gives its physical address;
    the 4-level PAGE_OFFSET maps nothing."""
    m = k5.machine
    assert m.paging_levels == 5 and k5.paging_levels == 5 and k5.page_offset == LA57
    root = k5.pgt.root
    e_direct = k5.pgt.get(k5.pgt.slot(root, 0x111))
    e_image = k5.pgt.get(k5.pgt.slot(root, 511))
    assert e_direct & pt.PteFlags.P and e_image & pt.PteFlags.P
    assert {e_direct & pt.ADDR_MASK, e_image & pt.ADDR_MASK} <= k5.pgt.table_pages
    for pa in range(0, k5.max_pfn << 12, 2 << 20):
        if k5.lookup_address(LA57 + pa) is None or not k5.lookup_address(LA57 + pa)[0] & 1:
            continue
        w = m.walk(LA57 + pa)
        assert w.pa == pa
        assert len(w.entries) == 6 - w.level          # PML5E, P4DE, PUDE, PMDE(, PTE)
    assert m.translate(START_KERNEL_MAP + 0x1000000) == 0x1000000        # the image
    with pytest.raises(PageFault):
        m.translate(PAGE_OFFSET + 0x1000000)


def test_a_5_level_boot_splits_what_a_4_level_one_splits(k5):
    """The layout moves the direct map, not the pages: meminfo, vmstat,
    direct_pages_count and the split 2M regions equal the default boot's,
    which sizes its boot-time allocations for the same 5-level kernel; two
    more table pages (the direct map's P4D, level4_kernel_pgt)."""
    k4 = Kernel.boot("2G")
    assert k4.paging_levels == 4 and k4.page_offset == PAGE_OFFSET
    m5, m4 = k5.meminfo(), k4.meminfo()
    assert m5.pop("PageTables") == m4.pop("PageTables") + 8      # the two table pages
    assert m5 == m4 and k5.vmstat() == k4.vmstat()
    assert k5.pgt.direct_pages_count == k4.pgt.direct_pages_count
    assert (k5.pgt.split_2m_region_list(k5.max_pfn).tolist()
            == k4.pgt.split_2m_region_list(k4.max_pfn).tolist())
    assert len(k5.pgt.table_pages) == len(k4.pgt.table_pages) + 2


def test_cpa_on_the_la57_direct_map():
    """set_memory_ro on one page of a 2M page: a split (DirectMap4k +2 MiB,
    one level-2 split), the CPU refuses the store there and allows it next
    door; set_memory_rw and the collapse-free end state validate."""
    k = Kernel.boot("1G", paging_levels=5)
    before = k.meminfo()["DirectMap4k"]
    pfn = k.alloc_pages(0, 0)
    va = k.pfn_to_virt(pfn)
    assert va >> 48 == 0xFF11
    # a 2M-mapped page (not the low 2M)
    _entry, level = k.lookup_address(va)
    k.set_memory_ro(va, 1)
    assert k.lookup_address(va)[1] == 1
    if level == 2:
        assert k.meminfo()["DirectMap4k"] == before + 2048
        assert k.vmstat()["direct_map_level2_splits"] >= 1
    with pytest.raises(PageFault):
        k.machine.translate(va, "w")
    neighbour = va ^ 0x1000
    assert k.machine.translate(neighbour, "w") == (pfn << 12) ^ 0x1000
    k.set_memory_rw(va, 1)
    assert k.machine.translate(va, "w") == pfn << 12
    k.validate()


def test_vmalloc_and_modules_under_5_level_paging():
    """vmalloc() areas come from the LA57 vmalloc range, module memory from
    the module area (the same addresses in both modes); their tables hang
    under the PML5 and the validator's CPU walk agrees with the shadow."""
    from dmfrag.workloads import run_workload
    d = run_workload("modules,vfree-reset:8", ram="1G", paging_levels=5)
    k = d.kernel
    areas = list(k.vmalloc.areas)
    assert any(LAYOUT_5LEVEL.vmalloc_start <= a <= LAYOUT_5LEVEL.vmalloc_end for a in areas)
    assert any(k.profile.modules_vaddr <= a < k.profile.modules_end for a in areas)
    k.validate()
    d4 = run_workload("modules,vfree-reset:8", ram="1G", paging_levels=4)
    lo4, hi4 = LAYOUT_4LEVEL.vmalloc_start, LAYOUT_4LEVEL.vmalloc_end
    assert any(lo4 <= a <= hi4 for a in d4.kernel.vmalloc.areas)
    assert not any(lo4 <= a <= hi4 for a in areas)


def test_a_workload_fragments_the_same_in_both_modes():
    """Every snapshot of a pipes/modules/secretmem run: the same DirectMap
    counters and splits with 5-level paging as with the default (the same
    boot-time allocations); the trace keeps the asked mode and replays in it."""
    from dmfrag.workloads import replay, run_workload, trace_text
    wl = "age:512,modules,secretmem:512"
    d5 = run_workload(wl, ram="2G", paging_levels=5)
    d4 = run_workload(wl, ram="2G")
    def mi(d):      # PageTables counts the two more table pages of 5-level paging
        return [{n: v for n, v in p["meminfo"].items() if n != "PageTables"} for p in d.points]
    assert mi(d5) == mi(d4) and len(d5.points) >= 4
    assert mi(d5)[-1]["DirectMap4k"] > mi(d5)[0]["DirectMap4k"]      # something split
    assert all(p5["meminfo"]["PageTables"] == p4["meminfo"]["PageTables"] + 8
               for p5, p4 in zip(d5.points, d4.points))
    assert [p["vmstat"] for p in d5.points] == [p["vmstat"] for p in d4.points]
    text = trace_text(d5)
    assert json.loads(text.splitlines()[0])["paging_levels"] == 5
    assert "paging_levels" not in json.loads(trace_text(d4).splitlines()[0])
    r, err = replay(text.splitlines())
    assert err is None and r.kernel.paging_levels == 5
    assert r.kernel.meminfo() == d5.kernel.meminfo()


def test_ptdump_prints_the_5_level_map(k5):
    """debugfs page_tables/kernel with LA57: the markers at the 5-level
    addresses, the direct map from 0xff11000000000000, the guard hole's
    16 PGD entries skipped."""
    out = k5.ptdump()
    assert "---[ Low Kernel Mapping ]---" in out and "---[ High Kernel Mapping ]---" in out
    lines = out.splitlines()
    low = lines.index("---[ Low Kernel Mapping ]---")
    assert lines[low - 1].startswith("0xff11000000000000-")
    assert "0xffff888000000000" not in out
    assert any(ln.startswith("0xff10000000000000-0xff11000000000000") for ln in lines)


def test_bad_paging_levels_are_refused_before_any_work():
    for bad in (3, 6, True, "5"):
        with pytest.raises(KernelError, match="paging_levels must be 4 or 5"):
            Kernel.boot("1G", paging_levels=bad)


def test_tlbcost_runs_the_streams_paging_mode():
    """A 5-level capture priced on a 5-level state uses its addresses as
    they are; on a 4-level state its direct-map addresses are moved (same
    pfns): the same accesses fault in neither, and each walk of a 5-level
    state reads one more entry unless the PSCs hold it."""
    from dmfrag.accesses import FETCH, LOAD, AccessStream, tlbcost
    k5 = Kernel.boot("1G", paging_levels=5)
    k4 = Kernel.boot("1G", paging_levels=4)
    rng = np.random.default_rng(3)
    pfns = rng.integers(0x10000, k5.max_pfn, 400).astype(np.uint64)
    va = np.concatenate([np.uint64(LA57) + pfns * np.uint64(4096),
                         np.array([START_KERNEL_MAP + 0x1000000], np.uint64)])
    kind = np.array([LOAD] * len(pfns) + [FETCH], np.uint8)
    s = AccessStream(va, kind, np.full(len(va), 8, np.uint8))
    r5, r4 = tlbcost(k5, s), tlbcost(k4, s)
    assert r5["paging_levels"] == 5 and r4["paging_levels"] == 4
    assert r5["stream"]["relocated"] is False and r4["stream"]["relocated"] is True
    assert r5["state"]["faults"] == r4["state"]["faults"] == 0
    assert r5["state"]["dtlb_walks"] == r4["state"]["dtlb_walks"]
    assert r5["state"]["walk_mem_refs"] > r4["state"]["walk_mem_refs"]


def test_run_and_tlbcost_take_paging_levels(tmp_path, capsys):
    from dmfrag.cli import main
    assert main(["run", "--workload", "modules", "--ram", "1G", "--paging-levels", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["paging_levels"] == 5
    with pytest.raises(SystemExit) as exc:
        main(["run", "--workload", "modules", "--ram", "1G", "--paging-levels", "3"])
    assert exc.value.code == 2
    np.save(tmp_path / "a.npy", np.array([LA57 + 0x100000] * 4, np.uint64))
    assert main(["tlbcost", "--accesses", str(tmp_path / "a.npy"), "--ram", "1G",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["paging_levels"] == 5 and out["stream"]["relocated"] is False
    assert out["state"]["faults"] == 0 and out["state"]["dtlb_walks"] == 1


def test_a_recorded_trace_replays_in_its_kernels_paging_mode():
    """The traces recorded under -cpu max: 6.1's and 7.2's CPA passes name
    LA57 direct-map addresses, 5.10's 4-level ones; a modelled replay runs
    that mode, so the model's addresses are the trace's own."""
    from pathlib import Path

    from dmfrag.modelled import replay_modelled
    from dmfrag.placed import read_trace, trace_paging_levels
    traces = Path(__file__).parent / "data" / "traces"
    for name, levels in (("linux-5.10-2G-modules_bpf-256.jsonl.gz", 4),
                         ("linux-6.1-2G-modules_bpf-256_secretmem-512.jsonl.gz", 5),
                         ("linux-7.2-2G-vfree-reset-256.jsonl.gz", 5)):
        _head, events = read_trace(traces / name)
        assert trace_paging_levels(events) == levels, name
    assert trace_paging_levels([["A", 1, 0, "GFP_KERNEL", 0]]) is None
    res = replay_modelled(traces / "linux-6.1-2G-modules_bpf-256_secretmem-512.jsonl.gz")
    assert res.error is None and res.model.paging_levels == 5
    assert res.model.page_offset == LA57
    res.model.validate(mode="sample", sample=512)
