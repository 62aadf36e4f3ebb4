"""Start the model from a real kernel's state (``Kernel.from_state``).

A state read from a real kernel's memory (:mod:`dmfrag.truth`: a QEMU dump,
a kdump vmcore, ``/proc/kcore``) carries its firmware memory map, its page
tables, its free lists and pageblocks. The model boots on the same memory
map (the record the state's kernel release names), then takes over:

* **the direct map and the image mapping**: Linux's tables themselves. Each
  table page Linux links (its PUD, PMD and PTE tables of the direct map, the
  PMD and PTE tables of the image) is written at the same pfn of the model's
  memory with Linux's entries, verbatim (global bit, accessed/dirty and
  software bits included), and the model's P4D-level entries (its PML4,
  or with 5-level paging the P4D table under its PML5) point at them. The
  model runs the paging mode the state's kernel ran (``Kernel.from_state``
  boots it with 5 levels for a state at Linux's LA57 PAGE_OFFSET), so every
  address is Linux's. The model's
  own boot tables of those ranges are dropped. The kernel-image PUD table and
  what hangs off its other slots (modules, fixmap) stay the model's.
* **the shadow** (what the validator expects) becomes what those entries
  say, page by page, so that ``validate()`` holds from the first moment.
* **free memory**: every buddy list in list order with its migratetype, the
  per-CPU lists, the pageblock migratetypes, each zone's managed pages
  (:meth:`BuddyAllocator.load_free_lists`); a page Linux has free that the
  model uses for itself (its top-level table, the module area's tables)
  stays the model's and is counted (``kept_by_model``).
* **counters**: ``direct_pages_count`` and the split/collapse events.
* **users' pages it can identify**: the pages of vmalloc areas (modules, BPF,
  execmem, vmalloc) are owned as vmalloc pages (``PageOwner.VMALLOC``), so
  that nothing frees them through another path; the areas themselves are not
  modelled objects (a workload cannot unload a module it did not load), but
  those in the module range keep their addresses (``Vmalloc.reserve_range``),
  so the model's new module, BPF and execmem areas go where Linux's would.

The system is running (``enter_running``) when this returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from .layout import PAGE_SIZE, PMD_SIZE, START_KERNEL_MAP
from .owner import PageOwner
from .shadow import S_MAPPED, to_shadow
from .truth import rebase_direct

__all__ = ["StateError", "e820_text", "free_lists", "install_state", "install_zone_params",
           "split_as_linux"]

_PHYS = pt.ADDR_MASK
_PS = int(F.PS)
_E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable",
               7: "persistent (type 7)", 12: "persistent (type 12)", 0xEFFFFFFF: "soft reserved"}
_IMAGE_SPAN = 1 << 30


class StateError(ValueError):
    """A state the model cannot start from: says why."""


def e820_text(e820: list[list[int]]) -> str:
    """A firmware e820 table as the boot log prints it (what ``Kernel.boot``
    reads)."""
    lines = []
    for addr, size, typ in e820:
        name = _E820_NAMES.get(int(typ), f"type {int(typ)}")
        lines.append(f"BIOS-e820: [mem {int(addr):#018x}-{int(addr) + int(size) - 1:#018x}] "
                     f"{name}")
    return "\n".join(lines) + "\n"


def _entries(state: Any, page_offset: int) -> dict[tuple[int, int], int]:
    """Linux's entries keyed by (VA in the model's layout, level): the same
    VAs when the model runs the state's paging mode."""
    rel = rebase_direct(state.pt_va, state.page_offset, page_offset)
    return {(int(v), int(lv)): int(e) for v, lv, e in zip(rel, state.pt_level, state.pt_entry)}


def install_state(k: Any, state: Any) -> dict[str, int]:
    """Give the booted (``boot_cpa=False``) model ``k`` the real kernel's
    tables, free memory and counters (see the module doc); returns counts."""
    if state.max_pfn != k.max_pfn:
        raise StateError(f"the state's max_pfn {state.max_pfn:#x} is not the model's "
                         f"{k.max_pfn:#x} on the same memory map")
    ents = _entries(state, k.page_offset)
    ram64 = k.machine.ram64
    pgt = k.pgt
    levels, mask = pgt.levels, pgt.layout.va_mask
    old_tables = set(pgt.table_pages)
    linked: set[int] = set()

    def fill(table_pa: int, level: int, base: int) -> None:
        """Write Linux's level-``level`` entries under ``base`` into the table."""
        linked.add(table_pa)
        ram64[table_pa >> 3: (table_pa >> 3) + 512] = 0
        shift = 12 + 9 * (level - 1)
        for i in range(512):
            va = base + (i << shift)
            e = ents.get((pt.canonical(va, levels), level))
            if e is None:
                continue
            ram64[(table_pa >> 3) + i] = np.uint64(e)
            if level > 1 and not e & _PS:
                fill(e & _PHYS, level - 1, va)

    # the direct map: the model's top-level slots over it take Linux's P4D/PGD entries
    po = k.page_offset
    direct_end = po + (((k.max_pfn << 12) + (1 << 30) - 1) & ~((1 << 30) - 1))
    lo, hi = pt.table_index(po, 4), pt.table_index(direct_end - 1, 4)
    p4d = pgt.p4d_table(po)
    base = (po & mask) & ~((1 << 48) - 1)        # the PML5 slot's (0 with 4 levels)
    for idx in range(lo, hi + 1):
        va = pt.canonical(base + (idx << 39), levels)
        slot = pgt.slot(p4d, idx)
        e = ents.get((va, 4))
        if e is None:
            pgt.set(slot, 0)
            continue
        pgt.set(slot, e)
        fill(e & _PHYS, 3, va & mask)
    # the image: PUD slot of START_KERNEL_MAP in the model's own image PUD table
    top = pgt.get(pgt.slot(pgt.p4d_table(START_KERNEL_MAP), pt.table_index(START_KERNEL_MAP, 4)))
    pud = top & _PHYS
    e = ents.get((START_KERNEL_MAP, 3))
    if e is None:
        raise StateError("the state has no page-table entry for the kernel image")
    pgt.set(pgt.slot(pud, pt.table_index(START_KERNEL_MAP, 3)), e)
    if not e & _PS:
        fill(e & _PHYS, 2, START_KERNEL_MAP & mask)
    linked |= {pgt.root, pud}
    # what the model still links (module area, fixmap; its P4D tables): keep
    still = _linked_tables(ram64, pgt.root, levels)
    for pa in old_tables - still:
        pgt.table_pages.discard(pa)
        k.page_owner[pa >> 12] = PageOwner.NONE
    for pa in still:
        pgt.table_pages.add(pa)
    _shadow_from_entries(k, ents)
    k.flush_tlb_all()

    # free memory
    blocks, pcp, pbmt = free_lists(state)
    managed = {z["name"]: z["managed"] for z in state.zones if z["managed"]}
    try:
        counts = k.buddy.load_free_lists(blocks, pcp, pbmt, managed, state.reserved_mask())
    except ValueError as exc:
        raise StateError(f"the state's free lists do not fit this machine: {exc}") from None
    install_zone_params(k, state)
    kept = 0
    states = k.buddy.page_states()
    for pa in sorted(still):
        pfn = pa >> 12
        if pfn < len(states) and states[pfn] == 1:
            k.buddy.take_page_off_buddy(pfn, 0)
            kept += 1
        k.page_owner[pfn] = PageOwner.PAGE_TABLE
    # users' pages
    vm_pages = state.vm_pages.astype(np.int64)
    vm_pages = vm_pages[(vm_pages >= 0) & (vm_pages < k.max_pfn)]
    owner = k.page_owner
    free_now = k.buddy.page_states()[vm_pages] == 1
    owner[vm_pages[~free_now]] = PageOwner.VMALLOC
    reserved_areas = reserve_module_areas(k, state)

    # counters
    dpc = list(state.direct_pages_count)
    for i in range(min(len(dpc), len(pgt.direct_pages_count))):
        pgt.direct_pages_count[i] = int(dpc[i])
    for name, value in state.counters.items():
        if name in k.vmstat_counters:
            k.vmstat_counters[name] = int(value)
    k.enter_running()
    # Linux's direct_pages_count counts the image mapping's splits too; the
    # model keeps those apart (highmap_counted), and the running count's
    # change since boot is what the split/collapse events say
    recount = pgt.recount_direct_map(k.max_pfn)
    count = pgt.direct_pages_count
    for level in (1, 2, 3):
        k.cpa.highmap_counted[level] = count[level] - recount[level] - k.boot_overcount[level]
    vm = k.vmstat_counters
    s2 = vm["direct_map_level2_splits"] - vm["direct_map_level2_collapses"]
    s3 = vm["direct_map_level3_splits"] - vm["direct_map_level3_collapses"]
    want = {1: 512 * s2, 2: 512 * s3 - s2, 3: -s3}
    k.boot_direct_pages_count = [count[i] - want.get(i, 0) for i in range(len(count))]
    return {**counts, "tables_linked": len(linked), "tables_dropped": len(old_tables - still),
            "kept_by_model": kept, "vmalloc_pages_owned": int(np.count_nonzero(~free_now)),
            "module_areas_reserved": reserved_areas}


def free_lists(state: Any) -> tuple[list, list, np.ndarray]:
    """A state's free memory as :meth:`BuddyAllocator.load_free_lists`
    takes it: the buddy lists' (zone, order, migratetype, head) in list
    order, the per-CPU lists' (a page's migratetype is its pageblock's;
    MOVABLE for the others), and the pageblocks' migratetypes."""
    zones = [z["name"] for z in state.zones]
    blocks = [(zones[z], o, m, p) for z, o, m, p in zip(state.free_zone.tolist(),
                                                         state.free_order.tolist(),
                                                         state.free_mt.tolist(),
                                                         state.free_pfn.tolist())]
    pbmt = state.pageblock_mt
    pcp = []
    for z, o, pfn in zip(state.pcp_zone.tolist(), state.pcp_order.tolist(),
                         state.pcp_pfn.tolist()):
        mt = int(pbmt[pfn >> state.pageblock_order]) if (pfn >> state.pageblock_order) < len(
            pbmt) else 1
        pcp.append((zones[z], o, mt if mt < 3 else 1, pfn))
    return blocks, pcp, pbmt


def install_zone_params(k: Any, state: Any) -> None:
    """Linux's watermarks, lowmem reserves, min_free_kbytes and the first
    CPU's pcp high, batch and free_factor (6.7+: free_count, high_min,
    high_max, alloc_factor and the PCPF flags) where the state has them:
    states read before they were kept go on with the model's own (a state
    without alloc_factor starts it at 0; the flags, at "free high batch"
    set, as QEMU's caches make it)."""
    b = k.buddy
    by_name = {z.name: z for z in b.zones}
    mfk = state.counters.get("min_free_kbytes", -1)
    if mfk > 0:
        b.min_free_kbytes = int(mfk)
    for zi in state.zones:
        zone = by_name.get(zi["name"])
        if zone is None or not zi.get("managed"):
            continue
        if "watermark" in zi:
            zone.watermark = [int(x) for x in zi["watermark"][:3]]
        if "lowmem_reserve" in zi:
            n = min(len(zone.lowmem_reserve), len(zi["lowmem_reserve"]))
            zone.lowmem_reserve[:n] = [int(x) for x in zi["lowmem_reserve"][:n]]
        pcps = zi.get("pcp") or []
        if pcps:
            p = pcps[0]
            for name in ("high", "batch", "free_factor", "free_count", "high_min", "high_max",
                         "alloc_factor"):
                if name in p:
                    setattr(zone.pcp, name, int(p[name]))
            if "flags" in p:    # PCPF_PREV_FREE_HIGH_ORDER BIT(0), PCPF_FREE_HIGH_BATCH BIT(1)
                zone.pcp.prev_free_high_order = bool(p["flags"] & 0x1)
                zone.pcp.free_high_batch = bool(p["flags"] & 0x2)


def _linked_tables(ram64: np.ndarray, root: int, levels: int = 4) -> set[int]:
    """Every table page reachable from ``root`` (kernel half)."""
    out = {root}
    stack = [(root, levels)]
    while stack:
        table, level = stack.pop()
        ents = ram64[table >> 3: (table >> 3) + 512]
        start = 256 if level == levels else 0
        for e in ents[start:].tolist():
            if not e & 1 or level == 1 or (level <= 3 and e & _PS):
                continue
            child = e & _PHYS
            if child not in out:
                out.add(child)
                stack.append((child, level - 1))
    return out


def _shadow_from_entries(k: Any, ents: dict[tuple[int, int], int]) -> None:
    """The shadow's expectation becomes what Linux's entries say: each
    direct-map pfn and image page by its leaf (large leaves' PAT moved to
    the 4K position); a page under a table with no present entry is mapped
    but not present (set_direct_map_invalid)."""
    sh = k.shadow
    direct = np.zeros(k.max_pfn, dtype=np.uint8)
    img_bits: dict[int, int] = {}
    po = k.page_offset
    end = po + k.max_pfn * 4096
    tables_4k: list[int] = []
    for (va, level), e in ents.items():
        if level > 3:
            continue
        if level > 1 and not e & _PS:
            if level == 2:
                tables_4k.append(va)
            continue
        flags = e & ~_PHYS & ((1 << 64) - 1)
        if level > 1:
            flags = pt.pat_large_to_4k(flags) & ~_PS
        bits = to_shadow(flags) | S_MAPPED
        size = 1 << (12 + 9 * (level - 1))
        if po <= va < end:
            a = (va - po) >> 12
            direct[a: min(a + (size >> 12), k.max_pfn)] = bits
        elif START_KERNEL_MAP <= va < START_KERNEL_MAP + _IMAGE_SPAN:
            for p in range(va, va + size, 4096):
                img_bits[p] = bits
    # 4K tables: pages whose entry is absent are mapped, not present
    for va in tables_4k:
        if po <= va < end:
            a = (va - po) >> 12
            seg = direct[a: a + 512]
            seg[seg == 0] = S_MAPPED
    sh.direct[:] = direct
    for p in list(sh.image):
        sh.image[p] = img_bits.get(p, S_MAPPED)
    sh.kernel_ro = True
    sh.touched.clear()
    sh.touched_va.clear()


def _one_table(pfn: int, va: int) -> Any:
    """A ``pgtable_pfn_source`` that gives ``pfn`` once (a split of one 2M
    page takes one table)."""
    given = [pfn]

    def linux_table() -> int:
        if not given:
            raise StateError(f"splitting the direct map at {va:#x} as Linux did took more "
                             f"than Linux's one table page")
        return given.pop()
    return linux_table


def split_as_linux(k: Any, state: Any) -> list[int]:
    """The direct map's large pages that Linux had split by the state's
    moment (a PUD or PMD entry pointing at a table: a CPA split while
    booting, which no split event counts) and that the booted model still
    maps whole: the model splits them too, each with Linux's table page
    (allocated in the state), counting no event as Linux's boot did not.
    1G pages first (7.2 above 4 GiB: its first ftrace trampoline's execmem
    block lies in a 1G page, whose alias split takes a PMD table and then a
    PTE table), then 2M ones. The entries keep the model's attributes.
    Returns the split regions' first pfns, in that order."""
    from .cpa import CpaData
    from .pgtable import PG_LEVEL_1G
    ents = _entries(state, k.page_offset)
    po = k.page_offset
    end = po + k.max_pfn * PAGE_SIZE
    states = k.buddy.page_states()
    done: list[int] = []
    entries = sorted(ents.items())
    for want in (3, 2):
        for (va, level), e in entries:
            if level != want or not po <= va < end or e & _PS or not e & int(F.P):
                continue
            found = k.pgt.lookup_slot(va)
            table_pfn = (e & _PHYS) >> 12
            if found is None or found[1] != want or not 0 <= table_pfn < len(states) \
                    or states[table_pfn] != 2:      # not a leaf there, or the table page not allocated
                continue
            source, k.pgtable_pfn_source = k.pgtable_pfn_source, _one_table(table_pfn, va)
            try:
                if want == 3:
                    k.cpa.split_large_page(CpaData([va], 1, 0, 0), found[0], PG_LEVEL_1G, va)
                else:
                    k.cpa.split_to_4k((va - po) >> 12, 1)
            finally:
                k.pgtable_pfn_source = source
            done.append((va - po) >> 12)
    return done


def reserve_module_areas(k: Any, state: Any, *, pmd_mapped_only: bool = False) -> int:
    """The state's vmalloc areas in the module range keep their addresses:
    the model's new areas go around them, as Linux's would (the model's
    vmalloc() areas elsewhere are few). Those overlapping one of the
    model's own (its boot pack) are left out. ``pmd_mapped_only``: only
    whole, aligned 2M areas (7.x's execmem ROX cache), which take no page
    table of their own (the module area's PMD table is the image's): the
    model does not have the tables of the others. Returns how many are
    kept."""
    reserved = 0
    for start, size in zip(state.vm_start.tolist(), state.vm_size.tolist()):
        # (vm_struct.size counts the guard page)
        if pmd_mapped_only and (start % PMD_SIZE or (size - PAGE_SIZE) % PMD_SIZE):
            continue
        if k.profile.modules_vaddr <= start < k.profile.modules_end:
            try:
                k.vmalloc.reserve_range(int(start), int(size))
                reserved += 1
            except ValueError:
                pass
    return reserved
