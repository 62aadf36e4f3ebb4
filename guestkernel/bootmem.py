"""The boot-time memblock allocations of ``setup_arch`` and ``start_kernel``.

Before the buddy allocator exists, Linux takes its early memory from
memblock, top-down from the end of RAM (x86-64 since 3.9). What memblock
holds when ``memblock_free_all`` hands the rest to the buddy allocator
decides the free lists every later allocation starts from: which 2 MiB
regions near the top of RAM are partly taken (the per-CPU unit's freed
tail, the holes between the hash tables), and so where the first
``bpf_prog_pack`` or module lands. This module makes those allocations
in the kernel's order, each the size the kernel asks for:

* ``early_reserve_initrd``: the initrd where the boot loader put it (the
  boot log's ``RAMDISK: [mem a-b]`` line, else QEMU's rule: the top of the
  RAM below 4 GiB less the image, page aligned: :func:`qemu_initrd_range`);
* ``initmem_init``: ``NODE_DATA(0)``;
* ``sparse_init``: the ``mem_section`` root array (sized by
  ``MAX_PHYSMEM_BITS``: 52 with 5-level paging, else 46), one root page per
  16 GiB of sections present, the node's pageblock bitmaps (``usemap``,
  near ``NODE_DATA``), the ``struct page`` array (one 2 MiB block per
  128 MiB section: one buffer before 6.x's removal of the sparse buffer,
  a block per section after) and the vmemmap page tables;
* ``setup_arch``'s small objects (the HPET and IO-APIC resources, a
  ``struct resource`` per e820 entry, a firmware-map entry per BIOS-e820
  entry, a nosave region per gap in RAM below ``max_pfn``);
* ``setup_command_line``: two copies of the command line;
* ``setup_per_cpu_areas``: the first chunk's 2 MiB unit, 2 MiB aligned
  above 16 MiB, with its unused tail freed at once (the log's "percpu:
  Embedded N pages/cpu"), its allocation info (freed after) and the
  chunk's own small objects;
* ``vfs_caches_init_early``: the dentry and inode hash tables
  (``alloc_large_system_hash``: one bucket per 8 KiB and 16 KiB of low
  memory, a power of two);
* the fixmap page tables (``spp_getpage``) and, with RAM above 4 GiB,
  swiotlb's 64 MiB bounce buffer below 4 GiB and its slot tables.

The byte sizes of the small objects are a kernel build's own (struct
sizes), read off its ``memblock=debug`` boot log under QEMU and kept in
:class:`guestkernel.versions.BootmemRecord`; the committed logs
(``tests/data/memblock``) pin the result: the reserved pages at the
buddy hand-over equal Linux's, page for page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .e820 import E820Table, E820Type, GiB, MiB
from .layout import PAGE_SIZE, PMD_SIZE
from .memblock import Memblock, MemblockError

__all__ = [
    "DEFAULT_INITRD_BYTES",
    "HARNESS_CMDLINE",
    "BootMemory",
    "BootmemError",
    "alloc_large_system_hash",
    "boot_command_line",
    "early_allocations",
    "initrd_range",
    "nr_kernel_pages",
    "percpu_embedded_pages",
    "present_sections",
    "qemu_initrd_range",
]

#: SMP_CACHE_BYTES: memblock_alloc's alignment
SMP_CACHE_BYTES = 64
#: __pa(MAX_DMA_ADDRESS): the vmemmap and per-CPU blocks stay above it
MAX_DMA_ADDRESS = 16 * MiB
#: a memory section (SECTION_SIZE_BITS 27) and its struct pages (64 bytes each)
SECTION_BYTES = 128 * MiB
SECTION_MEMMAP_BYTES = (SECTION_BYTES // PAGE_SIZE) * 64
#: sizeof(struct mem_section) (with page_ext): 128 per root page
MEM_SECTION_BYTES = 32
SECTIONS_PER_ROOT = PAGE_SIZE // MEM_SECTION_BYTES
#: the per-CPU first chunk's unit on x86-64 (PMD_SIZE atoms, one CPU)
PCPU_UNIT_BYTES = 2 * MiB
#: swiotlb's default bounce buffer (IO_TLB_DEFAULT_SIZE)
SWIOTLB_BYTES = 64 * MiB
#: the project's boot initramfs (busybox and the helpers, no modules):
#: "Freeing initrd memory: 2480K" (620 pages) in the committed boot logs,
#: which put it at [top - 620 pages, top): a file of more than 619 pages
#: and less than 620 (QEMU rounds the start down from the top's last byte)
DEFAULT_INITRD_BYTES = 2480 * 1024 - 512
#: the command line the real-kernel harness boots with (dmfrag.realkernel)
HARNESS_CMDLINE = "console=ttyS0 nokaslr secretmem.enable=1 panic=-1"
#: sizes of setup_arch's small objects on QEMU's PC machine: the HPET
#: resource (acpi_parse_hpet: a struct resource and its name) and the
#: IO-APIC's (io_apic_init_mappings); a struct resource per e820 entry
#: (e820__reserve_resources), a firmware_map_entry per BIOS entry, a
#: nosave_region per gap
HPET_RESOURCE_BYTES = 73
IOAPIC_RESOURCE_BYTES = 75
RESOURCE_BYTES = 64
FIRMWARE_MAP_ENTRY_BYTES = 104
NOSAVE_REGION_BYTES = 32

_RAMDISK = re.compile(r"RAMDISK: \[mem (0x[0-9a-fA-F]+)-(0x[0-9a-fA-F]+)\]")
_CMDLINE = re.compile(r"Command line: ?(.*)$", re.MULTILINE)
_TIMESTAMP = re.compile(r"^\[\s*[0-9.]+\]\s*")


class BootmemError(ValueError):
    """The boot-time allocations do not fit this memory map."""


@dataclass
class BootMemory:
    """Where each boot-time allocation went: name -> list of (base, size)."""

    placed: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: the initrd's reserved range [start, end) (page aligned), or None
    initrd: tuple[int, int] | None = None
    #: the first per-CPU chunk's unit and the pages of it kept
    percpu_unit: int = 0
    percpu_pages: int = 0

    def add(self, name: str, base: int, size: int) -> None:
        self.placed.setdefault(name, []).append((base, size))


# -- inputs from a boot log, or QEMU's defaults ---------------------------------------


def qemu_initrd_range(e820: E820Table, size: int) -> tuple[int, int]:
    """Where QEMU's Linux loader (``x86_load_linux``) puts an initrd of
    ``size`` bytes: ``initrd_max`` is the last byte of the RAM below 4 GiB
    (the kernel allows an initrd anywhere below 4 GiB since 2.6.x), the
    image starts at ``(initrd_max - size)`` rounded down to a page; the
    kernel reserves it to the next page boundary."""
    low = [hi for lo, hi in e820.ram_ranges() if lo < 1 << 32]
    top = min(max(low), 1 << 32)
    base = (top - 1 - size) & ~(PAGE_SIZE - 1)
    return base, -(-(base + size) // PAGE_SIZE) * PAGE_SIZE


def initrd_range(e820: E820Table, log: str | None, size: int | tuple[int, int] | None
                 ) -> tuple[int, int] | None:
    """The initrd's pages: a boot log's ``RAMDISK: [mem a-b]`` line wins,
    then ``size``: a [start, end) range as it was, or an initrd of that
    many bytes placed as QEMU does (None: the project's boot initramfs; 0:
    no initrd)."""
    m = _RAMDISK.search(log or "")
    if m:
        lo, hi = int(m.group(1), 16), int(m.group(2), 16) + 1
        where = "the boot log's RAMDISK"
    elif isinstance(size, tuple):
        lo, hi = size
        where = "the initrd"
    else:
        if size is None:
            size = DEFAULT_INITRD_BYTES
        if not isinstance(size, int) or size < 0:
            raise BootmemError(f"initrd size must be >= 0 bytes, not {size!r}")
        if size == 0:
            return None
        lo, hi = qemu_initrd_range(e820, size)
        if not e820.is_region_memory(lo, hi):
            raise BootmemError(f"an initrd of {size} bytes does not fit the RAM below 4 GiB")
        return lo, hi
    if lo >= hi or not e820.is_region_memory(lo, hi):
        raise BootmemError(f"{where} [{lo:#x}-{hi - 1:#x}] is not in RAM in this memory map")
    return lo, -(-hi // PAGE_SIZE) * PAGE_SIZE


_PERCPU = re.compile(r"percpu: Embedded (\d+) pages/cpu")


def percpu_embedded_pages(log: str | None) -> int | None:
    """The first chunk's pages a boot log's "percpu: Embedded N pages/cpu"
    line gives (None without one: the kernel record's)."""
    m = _PERCPU.search(log or "")
    if m is None:
        return None
    n = int(m.group(1))
    if not 0 < n <= PCPU_UNIT_BYTES // PAGE_SIZE:
        raise BootmemError(f"the boot log's per-CPU chunk of {n} pages does not fit its "
                           f"{PCPU_UNIT_BYTES >> 20} MiB unit")
    return n


def boot_command_line(log: str | None) -> str:
    """The kernel command line: a boot log's ``Command line:`` line, else
    the one the project's real-kernel harness boots with."""
    for raw in (log or "").splitlines():
        line = _TIMESTAMP.sub("", raw)
        m = _CMDLINE.match(line)
        if m:
            return m.group(1)
    return HARNESS_CMDLINE


# -- sizes the kernel computes ------------------------------------------------------------


def _zone_bounds(max_pfn: int) -> list[tuple[int, int]]:
    dma, dma32 = MAX_DMA_ADDRESS // PAGE_SIZE, (4 * GiB) // PAGE_SIZE
    return [(0, min(dma, max_pfn)), (min(dma, max_pfn), min(dma32, max_pfn)),
            (min(dma32, max_pfn), max_pfn)]


def nr_kernel_pages(e820: E820Table) -> int:
    """``nr_kernel_pages`` (free_area_init_core): each zone's present pages
    less its memmap (``calc_memmap_size``: the spanned pages' struct pages,
    or the present ones' where holes make up more than 1/16)."""
    ram = [(lo >> 12, hi >> 12) for lo, hi in e820.ram_ranges()]
    total = 0
    first = ram[0][0]
    for lo, hi in _zone_bounds(e820.max_pfn):
        lo = max(lo, first)
        present = sum(max(0, min(h, hi) - max(r, lo)) for r, h in ram)
        if not present:
            continue
        lo = min(max(r, lo) for r, h in ram if h > lo and r < hi)
        hi = max(min(h, hi) for r, h in ram if h > lo and r < hi)
        spanned = hi - lo
        pages = present if spanned > present + (present >> 4) else spanned
        memmap = -(-(pages * 64) // PAGE_SIZE)
        total += present - memmap if present >= memmap else present
    return total


def alloc_large_system_hash(kernel_pages: int, bucketsize: int, scale: int) -> int:
    """``alloc_large_system_hash``'s table size in bytes for a boot-time
    table with no size on the command line: one bucket per 2^scale bytes
    of low memory (rounded up to whole MiB; the scale grows by 2 for each
    4x beyond 64 GiB), a power of two, at most 1/16 of memory."""
    n = -(-kernel_pages // 256) * 256
    adapt = (64 * GiB) // PAGE_SIZE
    while adapt < n:
        scale += 1
        adapt <<= 2
    n >>= scale - 12
    if n * bucketsize < PAGE_SIZE:
        n = PAGE_SIZE // bucketsize
    n = 1 << (n - 1).bit_length()
    most = min(((kernel_pages * PAGE_SIZE) >> 4) // bucketsize, 0x80000000)
    n = min(n, most)
    return bucketsize << (n.bit_length() - 1)


def _nosave_regions(e820: E820Table) -> int:
    """How many ``register_nosave_region`` calls allocate
    (``e820__register_nosave_regions``): each gap before an entry and each
    non-RAM entry below ``max_pfn``, a region contiguous with the last one
    extending it instead."""
    limit = e820.max_pfn
    pfn, last_end, n = 0, None, 0

    def register(start: int, end: int) -> None:
        nonlocal last_end, n
        if last_end is not None and last_end == start:
            last_end = end
            return
        n += 1
        last_end = end

    for e in e820.entries:
        up = -(-e.start // PAGE_SIZE)
        if pfn < up:
            register(pfn, up)
        pfn = e.end // PAGE_SIZE
        if e.type is not E820Type.RAM:
            register(up, pfn)
        if pfn >= limit:
            break
    return n


def present_sections(e820: E820Table) -> list[int]:
    """The 128 MiB memory sections holding RAM (memblocks_present)."""
    out = set()
    for lo, hi in e820.ram_ranges():
        out.update(range(lo // SECTION_BYTES, (hi - 1) // SECTION_BYTES + 1))
    return sorted(out)


# -- the allocations, in the kernel's order ------------------------------------------------


def early_allocations(mb: Memblock, e820: E820Table, version, cmdline: str,
                      out: BootMemory, percpu_pages: int | None = None,
                      paging_levels: int | None = None) -> BootMemory:
    """Everything ``setup_arch`` and ``start_kernel`` take from memblock
    after ``init_mem_mapping`` and before ``memblock_free_all``, in the
    order ``version`` (a KernelVersion with a ``bootmem`` record) makes
    them. ``paging_levels``: the mode the kernel runs in, when not the
    record's (``pgtable_l5`` sizes the mem_section roots and the vmemmap's
    tables). Raises BootmemError if memory runs out."""
    rec = version.bootmem
    if paging_levels is not None and rec.pgtable_l5 != (paging_levels == 5):
        rec = replace(rec, pgtable_l5=paging_levels == 5)
    try:
        _allocate(mb, e820, version, rec, cmdline, out,
                  percpu_pages if percpu_pages is not None else rec.percpu_embedded_pages)
    except MemblockError as exc:
        raise BootmemError(f"the boot-time allocations do not fit this memory map: {exc}"
                           ) from None
    return out


def _allocate(mb: Memblock, e820: E820Table, version, rec, cmdline: str, out: BootMemory,
              percpu_pages: int) -> None:
    def alloc(name: str, size: int, align: int = SMP_CACHE_BYTES, lo: int = 0,
              hi: int = 0) -> int:
        base = mb.alloc_try_nid(size, align, name, lo, hi)
        out.add(name, base, size)
        return base

    # initmem_init -> alloc_node_data
    node = alloc("NODE_DATA(0)", version.node_data_bytes)
    if rec.setup_arch_small_first:
        _setup_arch_small(alloc, e820)
    # sparse_init: the mem_section roots, a root page per 16 GiB present
    sections = present_sections(e820)
    phys_bits = 52 if rec.pgtable_l5 else 46
    roots = (1 << (phys_bits - 27)) // SECTIONS_PER_ROOT
    alloc("mem_section", roots * 8)
    for _root in sorted({s // SECTIONS_PER_ROOT for s in sections}):
        alloc("sparse_index_alloc", PAGE_SIZE)
    # the node's usemaps, in the section of NODE_DATA if there is room
    # (sparse_early_usemaps_alloc_pgdat_section), else anywhere
    goal = node // SECTION_BYTES * SECTION_BYTES
    size = rec.usemap_section_bytes * len(sections)
    try:
        alloc("usemap", size, lo=goal, hi=goal + SECTION_BYTES)
    except MemblockError:
        alloc("usemap", size)
    _vmemmap(alloc, rec, sections)
    if not rec.setup_arch_small_first:
        _setup_arch_small(alloc, e820)
    # setup_command_line: saved_command_line and static_command_line
    for _ in range(2):
        alloc("command line", len(cmdline) + 1)
    _setup_per_cpu_areas(mb, alloc, rec, out, percpu_pages)
    for _ in range(rec.cpumask_allocs):
        alloc("alloc_bootmem_cpumask_var", 8)
    if rec.start_kernel_scratch:
        base = alloc("start_kernel", 9)
        mb.free(base, 9)
    # vfs_caches_init_early: the dentry hash (scale 13), the inode hash (scale 14)
    pages = nr_kernel_pages(e820)
    alloc("Dentry cache hash table", alloc_large_system_hash(pages, 8, 13))
    alloc("Inode-cache hash table", alloc_large_system_hash(pages, 8, 14))
    for _ in range(rec.fixmap_pages):
        alloc("spp_getpage", PAGE_SIZE, PAGE_SIZE)
    if e820.max_pfn > (4 * GiB) // PAGE_SIZE:
        # pci_swiotlb_detect: RAM above 4 GiB; the bounce buffer below 4 GiB
        # (memblock_alloc_low), then its slot tables anywhere
        alloc("swiotlb", SWIOTLB_BYTES, PAGE_SIZE, hi=1 << 32)
        for size in rec.swiotlb_tables:
            alloc("swiotlb tables", size, PAGE_SIZE)
        for size in rec.swiotlb_small:
            alloc("swiotlb", size)


def _setup_arch_small(alloc, e820: E820Table) -> None:
    alloc("acpi_parse_hpet", HPET_RESOURCE_BYTES)
    alloc("io_apic_init_mappings", IOAPIC_RESOURCE_BYTES)
    alloc("e820__reserve_resources", RESOURCE_BYTES * len(e820.entries))
    for _ in range(e820.firmware_entries):
        alloc("firmware_map_add_early", FIRMWARE_MAP_ENTRY_BYTES)
    for _ in range(_nosave_regions(e820)):
        alloc("register_nosave_region", NOSAVE_REGION_BYTES)


def _vmemmap(alloc, rec, sections: list[int]) -> None:
    """The struct page array, 2 MiB per section, and its page tables: a
    PMD table per GiB of vmemmap, the P4D (5-level) and PUD tables above
    them, made as the first section of each needs them."""
    if rec.vmemmap_buffer:
        alloc("vmemmap", SECTION_MEMMAP_BYTES * len(sections), PMD_SIZE, lo=MAX_DMA_ADDRESS)
    pmd_tables: set[int] = set()
    for s in sections:
        gib = s * SECTION_MEMMAP_BYTES // GiB
        if gib not in pmd_tables:
            for _ in range((2 if rec.pgtable_l5 else 1) if not pmd_tables else 0):
                alloc("vmemmap page table", PAGE_SIZE, PAGE_SIZE, lo=MAX_DMA_ADDRESS)
            pmd_tables.add(gib)
            alloc("vmemmap page table", PAGE_SIZE, PAGE_SIZE, lo=MAX_DMA_ADDRESS)
        if not rec.vmemmap_buffer:
            alloc("vmemmap", SECTION_MEMMAP_BYTES, PMD_SIZE, lo=MAX_DMA_ADDRESS)


def _setup_per_cpu_areas(mb: Memblock, alloc, rec, out: BootMemory, pages: int) -> None:
    """``pcpu_embed_first_chunk`` for one CPU: the allocation info and the
    areas array, the unit, its unused tail freed; the first chunk's own
    objects; then the info and areas freed."""
    info = alloc("pcpu_alloc_info", PAGE_SIZE, PAGE_SIZE)
    areas = alloc("pcpu_embed_first_chunk", PAGE_SIZE)
    unit = alloc("percpu unit", PCPU_UNIT_BYTES, PMD_SIZE, lo=MAX_DMA_ADDRESS)
    used = pages * PAGE_SIZE
    mb.free(unit + used, PCPU_UNIT_BYTES - used)
    out.percpu_unit, out.percpu_pages = unit, pages
    for size in rec.percpu_chunk_allocs:
        alloc("pcpu_setup_first_chunk", size)
    mb.free(info, PAGE_SIZE)
    mb.free(areas, PAGE_SIZE)
