"""Booting the guest kernel: the named steps, in the order Linux runs them.

``boot`` follows x86-64 ``setup_arch`` -> ``start_kernel`` ->
``kernel_init`` as far as the direct map is concerned:

1. :func:`e820__memory_setup`: the memory map, from a pasted boot log or
   QEMU's PC layout for a RAM size; a log's ``Linux version`` line picks the
   kernel record when none is given;
2. :func:`e820__memblock_setup`: memblock from e820, the first 1 MiB and the
   kernel image reserved;
3. :func:`init_mem_mapping`: the high kernel mapping of the image with 2M
   pages (``head_64.S`` + ``cleanup_highmap``), then the direct map top-down
   in steps, tables from the brk ``pgt_buf`` and then memblock, counted in
   ``direct_pages_count`` the way the kernel counts them, and the
   ``init_memory_mapping:`` lines the kernel logs;
4. :func:`mem_init`: ``NODE_DATA(0)`` and the sparse vmemmap buffer from
   memblock, zones DMA/DMA32/Normal, and everything memblock did not
   reserve handed to the buddy allocator (``memblock_free_all``); on kernels
   whose deferred struct-page init leaves them so, the pageblocks of the
   deferred range that start with a reserved page UNMOVABLE
   (:func:`deferred_reserved_pageblocks`); the watermarks computed once;
5. the running kernel's subsystems (:class:`guestkernel.kernel.Kernel`);
   on the boot pagesets (high 0, batch 1), :func:`ftrace_init` takes its
   dyn_ftrace record pages (the record's ``ftrace_pages``, or a pasted
   log's "ftrace: allocated P pages" line), then ``setup_per_cpu_pageset``
   gives the zones their own per-CPU lists;
6. :func:`boot_cpa_calls`: the CPA calls the kernel makes while booting
   (its record's ``boot_cpa``), before ``system_state = SYSTEM_RUNNING``
   (so vmstat does not count their splits).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emu import Machine
from emu import pagetable as pt

from . import gfp as G
from .bootmem import (
    HARNESS_CMDLINE,
    BootmemError,
    BootMemory,
    early_allocations,
    present_sections,
)
from .cpa import Cpa
from .e820 import E820Table, E820Type, GiB, MiB
from .layout import PAGE_SIZE, PMD_SIZE, START_KERNEL_MAP, layout_for
from .memblock import Memblock
from .memory_mapping import init_mem_mapping as plan_mem_mapping
from .page_alloc import PAGEBLOCK_NR_PAGES, BuddyAllocator, MigrateType, PcpScheme, ZoneType
from .pgtable import PG_LEVEL_1G, PG_LEVEL_2M, KernelPageTables
from .policy import Policy
from .shadow import Shadow
from .users import BpfJit
from .versions import BootCpaCall, KernelVersion, get_version, version_from_boot_log

__all__ = [
    "BootError",
    "BootTables",
    "boot_cpa_calls",
    "e820__memblock_setup",
    "e820__memory_setup",
    "init_mem_mapping",
    "mem_init",
    "select_version",
]

#: ptp_classifier_init's filter JITed at boot: a few hundred bytes, so it
#: lands in a bpf_prog_pack (its exact size does not matter: one chunk run).
PTP_CLASSIFIER_JIT_BYTES = 512
#: Size of ``struct page`` on x86-64.
STRUCT_PAGE_SIZE = 64
#: Pages per memory section (SECTION_SIZE_BITS 27: 128 MiB).
SECTION_PAGES = 1 << 15
#: The brk pgt_buf: INIT_PGT_BUF_SIZE (arch/x86/mm/init.c).
INIT_PGT_BUF_PAGES = 6


class BootError(ValueError):
    """The kernel cannot boot on this input; nothing was built."""


# -- 1. the memory map ------------------------------------------------------


def e820__memory_setup(e820: str | Path | E820Table | None, ram: str | int | None
                       ) -> tuple[E820Table, str | None]:
    """The e820 table and the boot log's text (None when the map did not
    come from a log). ``e820`` wins over ``ram``; with neither, ``ram``
    gives QEMU's PC layout for that size.

    ``e820`` is a boot log's text (a ``str``, always: never taken as a file
    name, so text that happens to be one line is not opened), a
    :class:`pathlib.Path` to read one from, or an :class:`E820Table`. The
    map must fit the emulated CPU's physical address space
    (``emu.machine.MAX_RAM_BYTES``): checked here, before anything is
    built, so the error names the limit and not a failed allocation."""
    from emu.machine import MAX_RAM_BYTES
    log: str | None = None
    if isinstance(e820, E820Table):
        table = e820
    elif isinstance(e820, Path):
        try:
            log = e820.read_text()
        except OSError as exc:
            raise BootError(f"cannot read the e820 boot log {str(e820)!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise BootError(f"the e820 boot log {str(e820)!r} is not text (UTF-8)") from None
        if not log:
            raise BootError(f"the e820 boot log {str(e820)!r} is empty")
        table = E820Table.from_dmesg(log)
    elif isinstance(e820, str):
        log = e820
        table = E820Table.from_dmesg(e820)
    elif e820 is not None:
        raise BootError(f"e820 must be a boot log's text (str), a pathlib.Path or an E820Table, "
                        f"not {type(e820).__name__}")
    elif ram is None:
        raise BootError("give ram= (e.g. '8G') or e820=")
    else:
        table = E820Table.qemu_pc(ram)
    end = table.max_pfn * PAGE_SIZE
    if end > MAX_RAM_BYTES:
        # QEMU's layout puts RAM beyond 3 GiB above 4 GiB: 1 GiB more address space.
        most = (MAX_RAM_BYTES - GiB) // MiB
        from_ram = e820 is None
        where = f"RAM {ram!r} in QEMU's PC layout" if from_ram else "the e820 map's RAM"
        hint = f"; a RAM size is at most {most}M" if from_ram else ""
        raise BootError(f"{where} ends at {end:#x}, beyond the emulated CPU's limit: guest RAM "
                        f"must end at or below {MAX_RAM_BYTES:#x} ({MAX_RAM_BYTES / GiB:.3f} GiB: "
                        f"40-bit physical addresses less the machine's service pages and "
                        f"2 MiB){hint}")
    return table, log


def select_version(profile: str | KernelVersion | None, log: str | None
                   ) -> tuple[KernelVersion, str]:
    """The kernel record to follow and why: the one asked for, else the
    one the boot log's ``Linux version`` line names (nearest known), else
    the default (6.1)."""
    if profile is not None:
        v = get_version(profile)
        return v, f"kernel {v.name} (asked for)"
    if log is not None:
        found = version_from_boot_log(log)
        if found is not None:
            return found
        v = get_version("6.1")
        return v, "boot log names no kernel version: using the 6.1 record"
    v = get_version("6.1")
    return v, "kernel 6.1 (default)"


# -- 2. memblock --------------------------------------------------------------


def e820__memblock_setup(e820: E820Table, version: KernelVersion,
                         initrd: tuple[int, int] | None = None) -> Memblock:
    """memblock from e820 with the early reservations (x86/setup): the
    first 1 MiB, the kernel image, and the initrd where the boot loader
    put it (``early_reserve_initrd``: before anything is allocated, so
    every top-down allocation lands below it; :func:`bootmem.initrd_range`)."""
    img = version.image
    mb = Memblock(e820)
    end = img.pa(img.end)
    if not mb.is_region_memory(img.phys_start, end - img.phys_start):
        raise BootError(f"the kernel image [{img.phys_start:#x}, {end:#x}) is not in RAM "
                        "in this memory map")
    if version.reserve_first_1m:
        mb.reserve(0, 1 << 20, "first 1M (x86/setup: always reserved)")
    else:
        # before 5.13: the first 64K (reserve_low), the BIOS area from the
        # top of the low RAM (reserve_bios_regions) and the real-mode blob
        mb.reserve(0, 64 << 10, "reserve_low")
        low = [hi for lo, hi in e820.ram_ranges() if hi <= 1 << 20]
        bios = max(low) if low else 0
        if bios < 1 << 20:
            mb.reserve(bios, (1 << 20) - bios, "reserve_bios_regions")
        rm = real_mode_base(e820, version)
        if rm is not None and version.real_mode is not None:
            mb.reserve(rm, version.real_mode[0] * PAGE_SIZE, "reserve_real_mode")
    # the image to __end_of_kernel_reserve and the brk it used (reserve_brk);
    # the brk's unused tail up to _end goes to the buddy allocator
    brk = -(-img.pa(img.brk_end) // PAGE_SIZE) * PAGE_SIZE
    mb.reserve(img.phys_start, brk - img.phys_start, "kernel image")
    if initrd is not None:
        lo, hi = initrd
        if lo < end and img.phys_start < hi:
            raise BootError(f"the initrd [{lo:#x}, {hi:#x}) overlaps the kernel image")
        mb.reserve(lo, hi - lo, "initrd")
    return mb


# -- 3. the kernel's page tables ------------------------------------------------


@dataclass
class BootTables:
    """What ``init_mem_mapping`` leaves behind."""

    pgt: KernelPageTables
    shadow: Shadow
    #: each init_memory_mapping call's ranges, in the order mapped
    calls: list = field(default_factory=list)
    #: what the kernel counted twice while mapping, per level (fixed for life)
    boot_overcount: list[int] = field(default_factory=list)
    #: the lines the kernel logs (3.x prints them; 6.1 made them pr_debug)
    log: list[str] = field(default_factory=list)


class _EarlyTableAlloc:
    """``alloc_low_page`` before the buddy allocator: the brk ``pgt_buf``
    first, then memblock top-down inside what is already mapped."""

    def __init__(self, memblock: Memblock, brk: int) -> None:
        self.memblock = memblock
        self.pgt_buf = [brk + i * PAGE_SIZE for i in range(INIT_PGT_BUF_PAGES)]
        self.pgt_buf_top = brk + INIT_PGT_BUF_PAGES * PAGE_SIZE
        self.mapped_lo = self.mapped_hi = 0
        #: init_range_memory_mapping's can_use_brk_pgt: a range that
        #: overlaps the brk buffer's unused pages takes its tables from memblock
        self.can_use_brk_pgt = True

    def start_range(self, start: int, end: int) -> None:
        """Before mapping [start, end): may the brk buffer serve it?"""
        buf_end = self.pgt_buf[0] if self.pgt_buf else self.pgt_buf_top
        self.can_use_brk_pgt = max(start, buf_end) >= min(end, self.pgt_buf_top)

    def add_pfn_range_mapped(self, start: int, end: int) -> None:
        if self.mapped_hi == 0:
            self.mapped_lo, self.mapped_hi = start, end
        else:
            self.mapped_lo = min(self.mapped_lo, start)
            self.mapped_hi = max(self.mapped_hi, end)

    def __call__(self, why: str) -> int:
        if self.pgt_buf and self.can_use_brk_pgt:
            return self.pgt_buf.pop(0)
        if self.mapped_hi <= self.mapped_lo:
            raise BootError("boot page tables: pgt_buf exhausted before anything was mapped")
        return self.memblock.phys_alloc_range(PAGE_SIZE, PAGE_SIZE, self.mapped_lo,
                                              self.mapped_hi, "page table")


def _no_free_at_boot(pa: int) -> None:
    raise BootError(f"boot page tables: table page {pa:#x} freed before the buddy allocator")


def init_mem_mapping(machine: Machine, e820: E820Table, memblock: Memblock,
                     version: KernelVersion, gbpages: bool) -> BootTables:
    """The high kernel mapping, then the direct map (arch/x86/mm/init.c)."""
    img = version.image
    max_pfn = e820.max_pfn
    layout = layout_for(machine.paging_levels)
    shadow = Shadow(max_pfn, img, version.alias_masks_nx, layout.page_offset)
    alloc = _EarlyTableAlloc(memblock, img.pa(img.end_of_kernel_reserve))
    # init_top_pgt, level3_kernel_pgt, level2_kernel_pgt, level2_fixmap_pgt
    # (and with 5-level paging level4_kernel_pgt) live in the image's .data.
    root, pud, pmd, p4d, fixmap = (img.pa(img.sdata) + i * PAGE_SIZE for i in range(5))
    statics = (root, pud, pmd, fixmap) + ((p4d,) if layout.paging_levels == 5 else ())
    ram = machine.ram
    for page in statics:
        ram[page: page + PAGE_SIZE] = 0
    pgt = KernelPageTables(machine, root, alloc, _no_free_at_boot, pti=version.pti,
                           layout=layout)
    pgt.table_pages |= set(statics)
    kp = pgt.prot
    # init_top_pgt[511] -> level3_kernel_pgt[510] -> level2_kernel_pgt, 2M
    # pages over the image (cleanup_highmap keeps [_text, roundup(_brk_end, PMD_SIZE))).
    # head_64.S: init_top_pgt[511] = level3_kernel_pgt + _PAGE_TABLE_NOENC,
    # level3_kernel_pgt[510] = level2_kernel_pgt + _KERNPG_TABLE_NOENC; with
    # LA57 (head64.c __startup_64) init_top_pgt[511] = level4_kernel_pgt and
    # level4_kernel_pgt[511] = level3_kernel_pgt, both + _PAGE_TABLE_NOENC.
    top = root
    if layout.paging_levels == 5:
        pgt.set(pgt.slot(root, pt.table_index(START_KERNEL_MAP, 5)), p4d | kp.PAGE_TABLE)
        top = p4d
    pgt.set(pgt.slot(top, pt.table_index(START_KERNEL_MAP, 4)), pud | kp.PAGE_TABLE)
    pgt.set(pgt.slot(pud, pt.table_index(START_KERNEL_MAP, 3)), pmd | kp.KERNPG_TABLE)
    # level3_kernel_pgt[511] = level2_fixmap_pgt + _PAGE_TABLE_NOENC: the last
    # GiB (the module area, then the fixmap) has its PMD table from the
    # start, so the first module_alloc takes only a PTE table from the buddy
    pgt.set(pgt.slot(pud, pt.table_index(_FIXMAP_PMD_BASE, 3)), fixmap | kp.PAGE_TABLE)
    lo = img.text & ~(PMD_SIZE - 1)
    hi = -(-img.brk_end // PMD_SIZE) * PMD_SIZE
    for va in range(lo, hi, PMD_SIZE):
        pgt.set(pgt.slot(pmd, pt.table_index(va, 2)),
                (va - START_KERNEL_MAP) | kp.PAGE_KERNEL_LARGE_EXEC)
    shadow.map_image(lo, hi, kp.PAGE_KERNEL_EXEC)
    # The direct map, from the top block memblock finds (memory_map_top_down).
    end = max_pfn * PAGE_SIZE
    top = memblock.phys_alloc_range(PMD_SIZE, PMD_SIZE, 1 << 20, end, "probe")
    memblock.free(top, PMD_SIZE)
    calls = plan_mem_mapping(e820, gbpages=gbpages, step_rule=version.step_rule, top_block=top)
    log = ["Using GB pages for direct mapping"] if gbpages else []
    for call in calls:
        log.append(f"init_memory_mapping: [mem {call[0].start:#010x}-{call[-1].end - 1:#010x}]")
        alloc.start_range(call[0].start, call[-1].end)
        for r in call:
            log.append(str(r))
            mask = {PAGE_SIZE: 0, PMD_SIZE: 1 << PG_LEVEL_2M,
                    1 << 30: (1 << PG_LEVEL_2M) | (1 << PG_LEVEL_1G)}[r.page_size]
            pgt.kernel_physical_mapping_init(r.start, r.end, mask, e820)
            shadow.map_direct(r.start >> 12, r.end >> 12, kp.PAGE_KERNEL)
        alloc.add_pfn_range_mapped(call[0].start, call[-1].end)
    machine.cr3 = root
    # What the kernel counted twice while mapping (see pgtable.py), fixed for life.
    overcount = [c - r for c, r in zip(pgt.direct_pages_count, pgt.recount_direct_map(max_pfn))]
    return BootTables(pgt, shadow, calls, overcount, log)


# -- 4. the page allocator ----------------------------------------------------------


def page_alloc_init_late(buddy: BuddyAllocator) -> None:
    """``page_alloc_init_late`` (kernel_init_freeable, after the early
    initcalls and smp_init, before the other initcalls): deferred struct-page
    init frees the top zone's memory past its first section
    (``deferred_init_memmap``), then the watermarks are computed once, as
    the initcalls that follow do."""
    buddy.page_alloc_init_late()
    buddy.watermarks_fixed = True


#: the GiB level2_fixmap_pgt maps (level3_kernel_pgt's last slot)
_FIXMAP_PMD_BASE = 0xFFFFFFFFC0000000


def _pcp_follows_watermarks(version: KernelVersion) -> bool:
    """5.14+: ``setup_per_zone_wmarks`` ends with ``zone_pcp_update`` (the
    per-CPU lists are sized from the low watermark)."""
    return version.pcp_scheme != PcpScheme.LEGACY


def defer_watermarks(buddy: BuddyAllocator, version: KernelVersion) -> None:
    """Where the per-CPU lists follow the watermarks (5.14+): no watermarks
    until ``init_per_zone_wmark_min`` (a postcore initcall, after
    ``ptp_classifier_init``'s core initcall: :func:`boot_cpa_calls` makes
    it there). Neither the hand-over nor deferred init computes them,
    so ``setup_per_cpu_pageset`` sizes the per-CPU lists from the managed
    pages before deferred init (2G: batch 15, against 63 from the postcore
    initcall on) and no low watermark. Before 5.14 the lists do not follow
    the watermarks; the model's there are set at the hand-over."""
    if _pcp_follows_watermarks(version):
        buddy.watermarks_fixed = True
        buddy.clear_watermarks()


def postcore_initcalls(buddy: BuddyAllocator, version: KernelVersion) -> None:
    """After ``sock_init``'s core initcall (the boot's first BPF JIT):
    ``init_per_zone_wmark_min``, a postcore initcall, on kernels whose
    watermarks :func:`defer_watermarks` held back. Linux runs the
    postcore initcalls in link order: arch/x86's, then kernel/'s
    (``dma_atomic_pool_init``: the atomic DMA pools, ``audit_init``: a
    kernel thread), then mm/'s (``bdi_class_init``, ``mm_sysfs_init``,
    then this one; 6.1's and 7.2's initcall tables, read off their debug
    vmlinux). ``Kernel.boot`` models none of those pages, so it makes this
    right after the JIT; a replay of a recorded boot makes it where the
    trace shows (``dmfrag.modelled``)."""
    if _pcp_follows_watermarks(version):
        buddy.init_per_zone_wmark_min()


def first_deferred_pfn(buddy: BuddyAllocator) -> int:
    """``defer_init``: the node's highest zone initialises its struct pages
    for the first section's worth (PAGES_PER_SECTION, 128 MiB) and defers
    the rest from the next section boundary on (2 GiB: pfn 0x10000; above
    4 GiB: 0x108000). Lower zones are initialised in full."""
    top = max((z for z in buddy.zones if z.spanned_pages), key=lambda z: z.start_pfn)
    pfn = top.start_pfn + SECTION_PAGES      # nr_initialised > PAGES_PER_SECTION from here
    return -(-pfn // SECTION_PAGES) * SECTION_PAGES


def _pageblocks_outside(ranges: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """The pageblocks in [start, end) (pfns) whose first page is not
    wholly inside one of ``ranges`` (physical addresses, [lo, hi))."""
    return [pfn for pfn in range(start, end, PAGEBLOCK_NR_PAGES)
            if not any(lo <= pfn * PAGE_SIZE and (pfn + 1) * PAGE_SIZE <= hi
                       for lo, hi in ranges)]


def deferred_reserved_pageblocks(buddy: BuddyAllocator, memblock: Memblock) -> list[int]:
    """Pageblocks of the deferred range whose first page is not free
    memory (reserved, or a hole): no one sets their migratetype, so it
    stays 0, UNMOVABLE (see ``KernelVersion.deferred_reserved_unmovable``)."""
    return _pageblocks_outside(memblock.free_ranges(), first_deferred_pfn(buddy), buddy.max_pfn)


def unset_pageblocks(e820: E820Table, max_pfn: int) -> list[int]:
    """The pageblocks ``memmap_init`` gives no type: it marks a pageblock
    MOVABLE at its first pfn while walking memblock's memory (the e820's
    RAM), so a pageblock whose first page is a hole or reserved by the e820
    keeps type 0, UNMOVABLE. Under QEMU that is the first one (pfn 0:
    trim_bios_range reserves the first page), whose free pages (0x100 to
    0x1ff) sit on the DMA zone's UNMOVABLE lists in the trace-start dumps of
    5.10, 6.1 and 7.2: the DMA atomic pool's first block comes from there."""
    return _pageblocks_outside(e820.ram_ranges(), 0, max_pfn)


def mem_init(e820: E820Table, memblock: Memblock, version: KernelVersion,
             policy: Policy, cmdline: str = HARNESS_CMDLINE,
             bootmem: BootMemory | None = None, percpu_pages: int | None = None,
             paging_levels: int | None = None) -> BuddyAllocator:
    """The last memblock allocations, the zones, and memblock_free_all.
    With the record's :class:`~guestkernel.versions.BootmemRecord`, every
    allocation :func:`bootmem.early_allocations` makes (where each went in
    ``bootmem``); without one, NODE_DATA and the sparse vmemmap buffer."""
    max_pfn = e820.max_pfn
    end = max_pfn * PAGE_SIZE
    if version.bootmem is not None:
        try:
            early_allocations(memblock, e820, version, cmdline,
                              bootmem if bootmem is not None else BootMemory(), percpu_pages,
                              paging_levels)
        except BootmemError as exc:
            raise BootError(str(exc)) from None
    else:
        # NODE_DATA(0) (initmem_init -> alloc_node_data): top-down, first.
        memblock.phys_alloc_range(version.node_data_bytes, 64, 0, end, "NODE_DATA(0)")
        # The sparse vmemmap buffer (sparse_init_nid -> sparse_buffer_init): one
        # PMD-aligned block holding 2 MiB of struct pages per present 128 MiB
        # section, top-down.
        sections = present_sections(e820)
        memblock.phys_alloc_range(len(sections) * (SECTION_PAGES * STRUCT_PAGE_SIZE),
                                  PMD_SIZE, 0, end, "sparse vmemmap buffer")
    dma, dma32 = 16 * MiB >> 12, 4 * GiB >> 12
    bounds = {ZoneType.DMA: (0, min(dma, max_pfn)),
              ZoneType.DMA32: (min(dma, max_pfn), min(dma32, max_pfn)),
              ZoneType.NORMAL: (min(dma32, max_pfn), max_pfn)}
    buddy = BuddyAllocator(max_pfn, zone_bounds=bounds, pcp_scheme=version.pcp_scheme,
                           khugepaged_min_free=version.khugepaged_min_free,
                           fallback_scheme=version.fallback_scheme)
    policy.setup_buddy(buddy)
    for pfn in unset_pageblocks(e820, max_pfn):
        buddy.set_pageblock_migratetype(pfn, MigrateType.UNMOVABLE)
    if version.deferred_reserved_unmovable:
        for pfn in deferred_reserved_pageblocks(buddy, memblock):
            buddy.set_pageblock_migratetype(pfn, MigrateType.UNMOVABLE)
    deferred = first_deferred_pfn(buddy) if version.deferred_init else buddy.max_pfn
    buddy.deferred_free_order = version.deferred_free_order
    for lo, hi in memblock.free_ranges():
        lo, hi = -(-lo // PAGE_SIZE), hi // PAGE_SIZE
        if lo < hi:
            buddy.free_range(lo, min(hi, max(lo, deferred)))
            buddy.defer_range(max(lo, deferred), hi)
    if not buddy.deferred:
        # init_per_zone_wmark_min (postcore_initcall) and khugepaged
        # (subsys_initcall) set the watermarks and pcp sizes from the managed
        # pages as they are now; freeing the init memory later does not redo
        # it (with deferred pages, page_alloc_init_late computes them)
        buddy.watermarks_fixed = True
    return buddy


# -- 6. the boot-time CPA calls -------------------------------------------------------


def _pfn_align(va: int) -> int:
    return -(-va // PAGE_SIZE) * PAGE_SIZE


def _inner_pages(begin: int, end: int) -> tuple[int, int]:
    """The whole pages inside [begin, end) (free_init_pages' alignment)."""
    return _pfn_align(begin), end & ~(PAGE_SIZE - 1)


def _free_init_pages(cpa: Cpa, buddy: BuddyAllocator, version: KernelVersion, begin: int,
                     end: int) -> None:
    """``free_init_pages``: NX and RW (the RW reaches the direct-map alias),
    then ``free_reserved_area``: the pages to the buddy allocator one at a
    time, through the per-CPU list."""
    begin, end = _inner_pages(begin, end)
    if end <= begin:
        return
    n = (end - begin) >> 12
    cpa.set_memory_nx(begin, n)
    cpa.set_memory_rw(begin, n)
    img = version.image
    pa = img.pa(begin) if begin >= START_KERNEL_MAP else begin - cpa.page_offset
    buddy.free_reserved_area(pa >> 12, (pa >> 12) + n)


def free_initrd_mem(cpa: Cpa, buddy: BuddyAllocator, version: KernelVersion,
                    initrd: tuple[int, int] | None) -> None:
    """``free_initrd_mem`` (x86): ``free_init_pages`` on the initrd's
    direct-map range, once populate_rootfs has unpacked it."""
    if initrd is not None:
        _free_init_pages(cpa, buddy, version, cpa.page_offset + initrd[0],
                         cpa.page_offset + initrd[1])


def _free_kernel_image_pages(cpa: Cpa, buddy: BuddyAllocator, version: KernelVersion,
                             begin: int, end: int) -> None:
    """``free_kernel_image_pages``: ``free_init_pages``, then with PTI the
    high-mapping range is unmapped (not its direct-map alias)."""
    _free_init_pages(cpa, buddy, version, begin, end)
    begin, end = _inner_pages(begin, end)
    if version.pti and end > begin:
        cpa.set_memory_np_noalias(begin, (end - begin) >> 12)


def _mark_rodata_ro(cpa: Cpa, buddy: BuddyAllocator, version: KernelVersion) -> None:
    img = version.image
    start = img.text
    rodata_start = _pfn_align(img.start_rodata)
    end = img.end_rodata_hpage_align
    text_end = _pfn_align(img.etext)
    rodata_end = _pfn_align(img.end_rodata)
    cpa.set_memory_ro(start, (end - start) >> 12)
    cpa.kernel_set_to_readonly = True
    all_end = -(-img.brk_end // PMD_SIZE) * PMD_SIZE
    cpa.set_memory_nx(text_end, (all_end - text_end) >> 12)
    _free_kernel_image_pages(cpa, buddy, version, text_end, rodata_start)
    _free_kernel_image_pages(cpa, buddy, version, rodata_end, img.sdata)


def real_mode_base(e820: E820Table, version: KernelVersion) -> int | None:
    """Where ``reserve_real_mode`` puts the real-mode blob: memblock's
    top-down ``memblock_phys_alloc_range(size, PAGE_SIZE, 0, 1 MiB)``, the
    highest page-aligned RAM below 1 MiB that holds it; None without a
    record of the blob or room for it ("No sub-1M memory is available for
    the trampoline")."""
    if version.real_mode is None:
        return None
    size = version.real_mode[0] * PAGE_SIZE
    best = None
    for e in e820.entries:
        if e.type is not E820Type.RAM or e.start >= 1 << 20:
            continue
        top = min(e.end, 1 << 20) & ~(PAGE_SIZE - 1)
        lo = -(-e.start // PAGE_SIZE) * PAGE_SIZE
        if top - size >= max(lo, PAGE_SIZE) and (best is None or top - size > best):
            best = top - size
    return best


_FTRACE_PAGES = re.compile(r"ftrace: allocated (\d+) pages with (\d+) groups")


def ftrace_pages(version: KernelVersion, log: str | None = None) -> int:
    """How many pages ``ftrace_init`` takes for its dyn_ftrace records: what
    a pasted boot log says ("ftrace: allocated P pages with G groups"), else
    the kernel record's measured figure."""
    m = _FTRACE_PAGES.search(log or "")
    return int(m.group(1)) if m else version.ftrace_pages


def ftrace_init(buddy: BuddyAllocator, pages: int) -> list[int]:
    """``ftrace_init`` -> ``ftrace_process_locs`` -> ``ftrace_allocate_pages``
    (kernel/trace/ftrace.c), in ``start_kernel`` right after ``mm_init``:
    groups of GFP_KERNEL|__GFP_ZERO pages, each the largest power of two
    that the records left still fill (``fls(pages) - 1``), so the groups are
    the binary decomposition of the total, largest first (6.1: 159 pages =
    128 + 16 + 8 + 4 + 2 + 1, the "6 groups" its boot log prints). They
    hold the records for the kernel's life. Returns the groups' first pfns."""
    gfp = int(G.GFP_KERNEL | G.GFP_ZERO)
    out = []
    for order in range(pages.bit_length() - 1, -1, -1):
        if pages >> order & 1:
            out.append(buddy.alloc_pages(gfp, order))
    return out


def boot_cpa_calls(cpa: Cpa, buddy: BuddyAllocator, bpf: BpfJit, version: KernelVersion,
                   only: Callable[[BootCpaCall], bool] | None = None,
                   real_mode: int | None = None,
                   initrd: tuple[int, int] | None = None, *,
                   postcore: bool = True) -> None:
    """The CPA calls of boot, in the record's order (found with ftrace on
    the reference kernel). ``postcore``: make :func:`postcore_initcalls`
    right after the boot's first JIT (a replay that knows where
    ``init_per_zone_wmark_min`` ran makes it there instead):

    * ``idt_setup_apic_and_irq_gates``: the IDT page read-only;
    * ``alternative_instructions``: on UP, ``free_init_pages`` of the
      SMP-alternatives section (NX and RW, then freed);
    * ``do_init_real_mode`` -> ``set_real_mode_permissions``: the real-mode
      blob at ``real_mode`` (:func:`real_mode_base`) NX, its start RO, its
      text X (4K pages below 1 MiB: no split);
    * ``page_alloc_init_late``: with deferred struct-page init, the top
      zone's memory past its first section freed (:func:`page_alloc_init_late`);
    * ``sock_init`` -> ``ptp_classifier_init``: a classic BPF filter is
      JITed, which allocates the first ``bpf_prog_pack`` (RO+X) where the
      kernel has packs;
    * ``populate_rootfs`` -> ``free_initrd_mem``: the initrd's pages
      ``initrd`` ([start, end) physical) freed one at a time;
    * ``free_initmem``: ``mem_encrypt_free_decrypted_mem`` frees the unused
      part of ``.bss..decrypted`` (NX+RW on a partial 2M image page: a
      split), then the init sections; then ``mark_rodata_ro``.

    The ``set_memory_decrypted`` calls (no-ops without memory encryption)
    are left out."""
    img = version.image
    for call in version.boot_cpa:
        if only is not None and not only(call):
            continue
        if call is BootCpaCall.IDT_RO:
            cpa.set_memory_ro(img.idt_table, 1)
        elif call is BootCpaCall.FREE_SMP_ALTERNATIVES:
            _free_init_pages(cpa, buddy, version, img.smp_locks, img.smp_locks_end)
        elif call is BootCpaCall.REAL_MODE:
            if real_mode is not None and version.real_mode is not None:
                pages, ro, text, ntext = version.real_mode
                base = cpa.page_offset + real_mode
                cpa.set_memory_nx(base, pages)
                cpa.set_memory_ro(base, ro)
                cpa.set_memory_x(base + text * PAGE_SIZE, ntext)
        elif call is BootCpaCall.PAGE_ALLOC_INIT_LATE:
            page_alloc_init_late(buddy)
        elif call is BootCpaCall.PTP_CLASSIFIER_BPF:
            bpf.load(PTP_CLASSIFIER_JIT_BYTES)
            if postcore:
                postcore_initcalls(buddy, version)
        elif call is BootCpaCall.FREE_INITRD:
            free_initrd_mem(cpa, buddy, version, initrd)
        elif call is BootCpaCall.FREE_BSS_DECRYPTED:
            _free_init_pages(cpa, buddy, version, img.bss_decrypted_unused, img.end_bss_decrypted)
        elif call is BootCpaCall.FREE_INITMEM:
            _free_kernel_image_pages(cpa, buddy, version, img.init_begin, img.init_end)
        elif call is BootCpaCall.MARK_RODATA_RO:
            _mark_rodata_ro(cpa, buddy, version)
        else:  # pragma: no cover - a new BootCpaCall member must be handled here
            raise AssertionError(f"boot CPA call {call} has no handler")
