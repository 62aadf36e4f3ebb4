"""Module memory as each kernel lays it out and allocates it, held to the
real kernels: the recorded traces (every CPA request of every module load)
and the states dumped from untraced boots (``dmfrag realkernel dump``,
tests/data/states), where the model starts from Linux's own boot and loads
the same five modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmfrag.placed import read_trace
from dmfrag.registry import MODULE_LAYOUTS, modules_for
from guestkernel import Kernel
from guestkernel.truth import load_states

DATA = Path(__file__).parent / "data"
KERNELS = ("5.10", "6.1", "7.2")
#: a recording per kernel whose first steps load the five modules
LOAD_TRACES = {"5.10": DATA / "traces" / "linux-5.10-2G-modules_bpf-256.jsonl.gz",
               "6.1": DATA / "traces" / "linux-6.1-2G-modules_bpf-256_secretmem-512.jsonl.gz",
               "7.2": DATA / "truth" / "linux-7.2-2G-modules.jsonl.gz"}
TYPES = ("text", "rodata", "ro_after_init", "data", "init_text", "init_data")
NX = 1 << 63
RW = 2


def _pages(nbytes: int) -> int:
    return -(-nbytes // 4096)


def _loads(kernel: str) -> list[list[list]]:
    """Per load_module marker, the CPA requests (arguments) until the next
    load or snapshot, with the marker before each."""
    _header, events = read_trace(LOAD_TRACES[kernel])
    loads: list[list[list]] = []
    marker = None
    for e in events:
        if e[0] == "U":
            marker = e
            if e[1] == "load_module":
                loads.append([])
        elif e[0] == "S" and loads and e[1] != "boot":
            break
        elif e[0] == "C" and e[1] == "change_page_attr_set_clr" and e[2] and loads:
            loads[-1].append([marker[1] if marker else None, marker[2] if marker else None,
                              *e[2]])
    return loads


@pytest.mark.parametrize("kernel", KERNELS)
def test_layouts_are_what_each_kernel_allocates(kernel):
    """registry.MODULE_LAYOUTS (module_layout of each package's files: the
    kernel's layout_sections and layout_symtab; __jump_table and, from 6.14,
    .static_call_sites read-only after init; the symbols after a page break
    before 6.4) in pages, against the sizes Linux's own requests show."""
    loads = _loads(kernel)
    assert len(loads) == 5
    for name, reqs in zip(modules_for(kernel), loads):
        want = {t: _pages(n) for t, n in zip(TYPES, MODULE_LAYOUTS[kernel][name])}
        if kernel == "7.2":
            # move_module: execmem_alloc_rw per type with a size, enum order
            # (text, data, rodata, ro_after_init, init text, init data):
            # each one set_memory_nx then set_memory_rw
            sizes = [r[3] for r in reqs if r[1] == "execmem_alloc_rw" and r[0] == "set_memory_nx"]
            order = [t for t in ("text", "data", "rodata", "ro_after_init", "init_text",
                                 "init_data") if want[t]]
            assert sizes == [want[t] for t in order], name
            roai = [r[3] for r in reqs if r[1] == "do_init_module"]
            assert roai == ([want["ro_after_init"]] if want["ro_after_init"] else []), name
        else:
            # module_enable_ro (text, rodata, init text, init rodata RO),
            # module_enable_nx (rodata, ro_after_init, data, init rodata,
            # init data NX): the first nine requests of the load
            ro = [r[3] for r in reqs[:4]]
            nx = [r[3] for r in reqs[4:9]]
            assert all(r[5] == RW for r in reqs[:4]) and all(r[4] == NX for r in reqs[4:9])
            assert ro == [want["text"], want["rodata"], want["init_text"], 0], name
            assert nx == [want["rodata"], want["ro_after_init"], want["data"], 0,
                          want["init_data"]], name


def _from_dump(kernel: str):
    states = load_states(DATA / "states" / f"linux-{kernel}-2G-modules.truth.npz")
    assert [s.point for s in states] == ["boot", "modules", "modules-removed"]
    k = Kernel.from_state(states[0], profile=kernel)
    return states, k


def _counters(k: Kernel, real) -> tuple:
    """DirectMap4k/2M/1G and the split counter where the kernel has one
    (5.10 has not)."""
    mi, vm = k.meminfo(), k.vmstat()
    splits = vm["direct_map_level2_splits"] if "direct_map_level2_splits" in real.counters \
        else None
    return (mi["DirectMap4k"], mi["DirectMap2M"], mi.get("DirectMap1G", 0), splits)


def _real(st) -> tuple:
    c = st.counters
    return (c["DirectMap4k"], c["DirectMap2M"], c.get("DirectMap1G", 0),
            c.get("direct_map_level2_splits"))


def _areas(st) -> dict[int, list[int]]:
    out, off = {}, 0
    for va, n, caller in zip(st.vm_start.tolist(), st.vm_nr_pages.tolist(), st.vm_caller):
        pages = st.vm_pages[off:off + n].tolist()
        off += n
        if ("load_module" in caller or "execmem" in caller) and va >= 0xFFFFFFFFC0000000:
            out[va] = pages
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_modules_from_linuxs_own_boot_split_what_linux_split(kernel):
    """Started from an untraced boot's dumped state, the model loads the
    five modules (their real sizes) and removes them: DirectMap4k/2M/1G and
    the split counter equal Linux's at both snapshots, the module pages lie
    in the 2M regions Linux's do, and (5.10, 7.2) every area is at Linux's
    address. 6.1 frees a module's init layout from a work item after an RCU
    grace period, so some init areas are still there when Linux's next
    module (and its snapshot) comes; the model frees them at once.

    In repeated untraced boots Linux 7.2 splits 2 to 4 2M pages for these
    loads at 2G, the model from each run's own boot the same or one fewer:
    the other allocations between (insmod's, the module structures' slab,
    kworkers) are not modelled."""
    states, k = _from_dump(kernel)
    for name in modules_for(kernel):
        t, r, a, d, it, idata = MODULE_LAYOUTS[kernel][name]
        k.modules.load_module(name, t, r, a, d, init_text=it, init_data=idata)
    assert _counters(k, states[1]) == _real(states[1])
    real = _areas(states[1])
    model = {a.addr: a.pfns() for a in k.vmalloc.areas.values()
             if a.caller.startswith(("module", "execmem"))}
    assert {p >> 9 for ps in model.values() for p in ps} == \
        {p >> 9 for ps in real.values() for p in ps}
    if kernel != "6.1":
        assert sorted(model) == sorted(real)
        assert all(len(model[va]) == len(real[va]) for va in real)
    k.validate()
    for name in modules_for(kernel):
        k.modules.delete_module(name)
    assert _counters(k, states[2]) == _real(states[2])
    assert not [a for a in k.vmalloc.areas.values() if a.caller.startswith(("module", "execmem"))]
    assert _areas(states[2]) == {}
    k.validate()


def test_the_7_2_rox_cache():
    """7.2's module text from the execmem ROX cache (own boot, 2G): the
    first load fills it with one 2M area made ROX whole (its alias read-only
    as one 2M page), the text made RW splits that alias; the next module's
    text takes the first free range (the init text the first one freed);
    each type of data is a vmalloc of its own; once the last module is
    gone the whole 2M is free, its direct map made valid and the area
    vfree'd (execmem_cache_clean)."""
    k = Kernel.boot(ram="2G", profile="7.2")
    cache = k.execmem.rox_cache
    assert cache is not None and not cache.areas
    lay = MODULE_LAYOUTS["7.2"]
    splits = k.vmstat()["direct_map_level2_splits"]
    bfs = k.modules.load_module("bfs", *lay["bfs"][:4], init_text=lay["bfs"][4],
                                init_data=lay["bfs"][5])
    (area,) = cache.areas.values()
    assert area.size == 2 << 20 and area.page_order == 9 and area.pages[0] % 512 == 0
    assert bfs.mem["text"] == area.addr                            # first fit
    assert set(bfs.mem) == {"text", "data", "rodata"}               # init types freed
    # the text made RW for the load split the cache's alias; made ROX
    # again, the whole alias is read-only, at 4K (no collapse: 6.15's
    # collapse walks the request's own range, here the module mapping)
    for pfn in (area.pages[0], area.pages[0] + 1, area.pages[0] + 100):
        entry, level = k.lookup_address(k.pfn_to_virt(pfn))
        assert level == 1 and not entry & RW, hex(pfn)
    assert k.vmstat()["direct_map_level2_splits"] >= splits + 1
    # the cache's own 2M mapping, split when the text was made RW+NX, is one
    # 2M leaf again after set_memory_rox (6.15's collapse walks the
    # request's own range), as the 7.2 recordings free its PTE table
    assert k.lookup_address(area.addr)[1] == 2
    assert k.vmstat()["direct_map_level2_collapses"] == 0     # not a direct-map page
    # bfs's init text (1 page after its 2 text pages) went back: efs's text
    # starts there
    efs = k.modules.load_module("efs", *lay["efs"][:4], init_text=lay["efs"][4],
                                init_data=lay["efs"][5])
    assert efs.mem["text"] == bfs.mem["text"] + 2 * 4096
    assert "ro_after_init" in efs.mem
    for name, vm_caller in (("data", "module efs data"), ("rodata", "module efs rodata")):
        assert k.vmalloc.areas[efs.mem[name]].caller == vm_caller
    k.validate()
    k.modules.delete_module("bfs")
    assert cache.areas                                      # efs's text still there
    k.modules.delete_module("efs")
    assert not cache.areas and not cache.busy and not cache.free_ranges
    assert area.addr not in k.vmalloc.areas
    k.validate()


def test_the_7_2_rox_cache_filled_ahead_of_any_request():
    """execmem_cache_populate as 7.2's boot runs it before tracing starts:
    one 2M area, PMD-mapped, its alias read-only as one 2M page (no
    split), all of it free in the cache; the first module's text then comes
    from it without a new area."""
    k = Kernel.boot(ram="2G", profile="7.2")
    cache = k.execmem.rox_cache
    splits = k.vmstat()["direct_map_level2_splits"]
    addr = cache.populate()
    (area,) = cache.areas.values()
    assert area.addr == addr and area.size == 2 << 20 and area.pages[0] % 512 == 0
    assert cache.free_ranges == [[addr, addr + (2 << 20)]] and not cache.busy
    entry, level = k.lookup_address(k.pfn_to_virt(area.pages[0]))
    assert level == 2 and not entry & RW
    assert k.vmstat()["direct_map_level2_splits"] == splits
    lay = MODULE_LAYOUTS["7.2"]
    bfs = k.modules.load_module("bfs", *lay["bfs"][:4], init_text=lay["bfs"][4],
                                init_data=lay["bfs"][5])
    assert bfs.mem["text"] == addr and len(cache.areas) == 1
    k.validate()


def test_older_kernels_load_one_core_and_one_init_area():
    """6.1 (before module memory types): one module_alloc for the core, one
    for the init layout (freed after init), no ROX cache."""
    k = Kernel.boot(ram="2G", profile="6.1")
    assert k.execmem.rox_cache is None
    t, r, a, d, it, idata = MODULE_LAYOUTS["6.1"]["efs"]
    before = set(k.vmalloc.areas)
    mod = k.modules.load_module("efs", t, r, a, d, init_text=it, init_data=idata)
    (core,) = set(k.vmalloc.areas) - before
    assert mod.base == core and not mod.mem
    assert k.vmalloc.areas[core].size == (2 + 2 + 1 + 2) * 4096
    k.modules.delete_module("efs")
    assert set(k.vmalloc.areas) == before
    k.validate()
