"""Kernel versions as data: one record per kernel the model follows.

Every behaviour that differs between the kernels the model knows lives in
one :class:`KernelVersion` record, and code asks the record ("does this
kernel pack BPF programs?", "which step rule maps the direct map?"); no
code compares version numbers.

The records and where each fact comes from:

* ``3.13``: the Ubuntu 3.13 machine of ``tests/data/dmesg-e820-example.log``
  (its ``[mem ...] page`` lines pin the step rule). Only the boot-time
  direct map is modelled faithfully; the image layout is borrowed from the
  6.1 build (3.13 kernels did not print theirs).
* ``5.10``: Debian's ``linux-image-5.10.0-32-amd64`` (5.10.223). No
  ``bpf_prog_pack`` (5.18), no secretmem (5.14), no ``direct_map_*``
  vmstat counters (5.16).
* ``6.1``: Debian's ``linux-image-6.1.0-56-amd64`` (6.1.192), the reference
  every boot figure of the model is tested against.
* ``7.2``: Debian's ``linux-binary-7.2.13+deb14-amd64`` (7.2.13): BPF packs
  and execmem made read-only+executable with ``set_memory_rox``, whose CPA
  collapses split direct-map pages again (6.15), and vmstat's
  ``direct_map_level{2,3}_collapses``.

Each record's image layout was read from its kernel's /proc/kallsyms under
QEMU, and its boot-time CPA calls from an ftrace of
``__change_page_attr_set_clr`` with stack traces at boot (``ftrace=function
ftrace_filter=__change_page_attr_set_clr trace_options=func_stack_trace``):
5.10 JITs the boot filter with ``set_memory_ro`` + ``set_memory_x`` (no
pack); 7.2 makes its first ``bpf_prog_pack`` RO+X with ``set_memory_rox``;
both also call ``init_real_mode`` (4K pages below 1 MiB: no split) and free
the initrd with ``free_init_pages`` (attributes it already has: no change).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from .layout import DEBIAN_5_10_IMAGE, DEBIAN_6_1_IMAGE, DEBIAN_7_2_IMAGE, KernelImage
from .page_alloc.types import FallbackScheme, PcpScheme

__all__ = [
    "DEFAULT_VERSION",
    "STEP_RULES",
    "VERSIONS",
    "BootCpaCall",
    "BootmemRecord",
    "KernelVersion",
    "StepRule",
    "VersionError",
    "get_version",
    "nearest_version",
    "step_rule_for",
    "version_from_boot_log",
]


class VersionError(ValueError):
    """An unknown kernel version name, or a boot log naming no known kernel."""


@dataclass(frozen=True)
class StepRule:
    """How ``memory_map_top_down`` (arch/x86/mm/init.c) grows its step.

    ``shift``: the step grows by ``2**shift``; ``grow_when_total``: grow once
    the total mapped reaches the step (``mapped_ram_size >= step_size``),
    else when the range just mapped exceeds everything mapped before it
    (``new_mapped_ram_size > mapped_ram_size``)."""

    name: str
    #: the first release with this rule
    since: tuple[int, int]
    shift: int
    grow_when_total: bool
    history: str


#: The rules, oldest first.
STEP_RULES: dict[str, StepRule] = {
    # v3.9 ("x86, mm: setup page table in top-down"): STEP_SIZE_SHIFT 5,
    # inline. v3.13 moved it into get_new_step_size() (Yinghai Lu, with the
    # movable-node series) unchanged: same shift, same condition.
    "3.9": StepRule("3.9", (3, 9), 5, False,
                    "3.9-3.x: step <<= 5 when the new range exceeds all mapped before "
                    "(get_new_step_size() from 3.13, same rule)"),
    # Jan Beulich, "x86: Fix step size adjustment during initial memory
    # mapping" (2015): get_new_step_size() shifts by PMD_SHIFT - PAGE_SHIFT - 1
    # and the caller grows once the total mapped reaches the step.
    "4.0": StepRule("4.0", (4, 0), 8, True,
                    "4.0+: step <<= PMD_SHIFT - PAGE_SHIFT - 1 once the total mapped "
                    "reaches the step"),
}


class BootCpaCall(enum.Enum):
    """The CPA calls a kernel makes while booting (one CPU), found with
    ftrace on the reference kernels; run in the record's order."""

    #: idt_setup_apic_and_irq_gates: the IDT page read-only
    IDT_RO = "idt_ro"
    #: alternative_instructions on UP: free_init_pages of .smp_locks
    FREE_SMP_ALTERNATIVES = "free_smp_alternatives"
    #: do_init_real_mode (early_initcall) -> set_real_mode_permissions: the
    #: real-mode trampoline below 1 MiB NX, its text and read-only data RO,
    #: its text X (4K pages: no split)
    REAL_MODE = "real_mode"
    #: kernel_init_freeable -> page_alloc_init_late: deferred struct-page
    #: init frees the top zone past its first section (no CPA; where its
    #: frees fall among the boot calls decides where the first
    #: bpf_prog_pack's pages come from)
    PAGE_ALLOC_INIT_LATE = "page_alloc_init_late"
    #: sock_init -> ptp_classifier_init: a classic BPF filter JITed
    PTP_CLASSIFIER_BPF = "ptp_classifier_bpf"
    #: populate_rootfs (rootfs_initcall) -> free_initrd_mem: x86's
    #: free_init_pages on the initrd's direct map (NX and RW: what it has,
    #: no change), its pages freed one at a time (free_reserved_area)
    FREE_INITRD = "free_initrd"
    #: free_initmem -> mem_encrypt_free_decrypted_mem: unused .bss..decrypted
    FREE_BSS_DECRYPTED = "free_bss_decrypted"
    #: free_initmem: the init sections
    FREE_INITMEM = "free_initmem"
    #: mark_rodata_ro: text+rodata RO, the rest NX, the gaps freed
    MARK_RODATA_RO = "mark_rodata_ro"

    @property
    def before_fs_initcall(self) -> bool:
        """Whether the call comes before ``fs_initcall`` (start_kernel, or a
        core initcall): before boot-time kprobe events exist, so a recorded
        trace has no arguments for it (:mod:`dmfrag.recorder`)."""
        return self in (BootCpaCall.IDT_RO, BootCpaCall.FREE_SMP_ALTERNATIVES,
                        BootCpaCall.REAL_MODE, BootCpaCall.PTP_CLASSIFIER_BPF)


_ALL_BOOT_CPA = tuple(BootCpaCall)


@dataclass(frozen=True)
class BootmemRecord:
    """One build's boot-time memblock allocations on QEMU's PC machine with
    one CPU (:mod:`guestkernel.bootmem`), read off its ``memblock=debug``
    boot log (``tests/data/memblock``)."""

    #: 5-level paging at run time (``-cpu max`` has LA57; Debian builds
    #: CONFIG_X86_5LEVEL): MAX_PHYSMEM_BITS 52 (a 2 MiB mem_section root
    #: array, a P4D table for the vmemmap), else 46 (5.10 stays 4-level:
    #: its 32 KiB root array)
    pgtable_l5: bool
    #: the usemap (pageblock flags and subsection map) per section
    usemap_section_bytes: int
    #: one sparse vmemmap buffer for all sections (until 6.x), else a 2 MiB
    #: block per section (vmemmap_populate_hugepages)
    vmemmap_buffer: bool
    #: setup_arch's small objects (HPET, IO-APIC, e820 resources, firmware
    #: map, nosave regions) come before sparse_init (7.x), not after
    setup_arch_small_first: bool
    #: "percpu: Embedded N pages/cpu": the first chunk's pages kept
    percpu_embedded_pages: int
    #: pcpu_setup_first_chunk's and pcpu_alloc_first_chunk's objects, bytes
    percpu_chunk_allocs: tuple[int, ...]
    #: alloc_bootmem_cpumask_var calls
    cpumask_allocs: int
    #: start_kernel's 9-byte allocation freed at once (6.x)
    start_kernel_scratch: bool
    #: swiotlb's page-aligned slot tables, and its small objects, bytes
    swiotlb_tables: tuple[int, ...]
    swiotlb_small: tuple[int, ...] = ()
    #: spp_getpage: the fixmap's page tables
    fixmap_pages: int = 3


_PCPU_CHUNK_5_10 = (8, 8, 4, 8, 0x2A0, 0x90, 0x100, 0x108, 0x40, 0x90, 0x380, 0x388, 0xE0)
_PCPU_CHUNK_6_1 = (8, 8, 4, 8, 0x170, 0x90, 0x100, 0x108, 0x40, 0x90, 0x380, 0x388, 0xE0)
_PCPU_CHUNK_7_2 = (8, 8, 4, 8, 0x170, 0x88, 0x100, 0x108, 0x40, 0x88, 0x380, 0x388, 0xE0)


#: the GFP of slub's high-order new slab pages as the bpf_prog_load
#: recordings print it (allocate_slab's first try)
_SLAB_HIGH = ("__GFP_IO|__GFP_FS|__GFP_NOWARN|__GFP_NORETRY|__GFP_COMP|__GFP_NOMEMALLOC|"
              "__GFP_HARDWALL")
#: Why 6.1's and 7.2's recorded slab rates are not applied yet: their JIT
#: images share packs, so the slab pages change no BPF figure, but with them
#: the secretmem step after the programs are freed spreads over 1 to 3 more
#: 2M regions than Linux's (6.1 at 2G: 10 splits against Linux's 8 or 9; at
#: 8G +10 against +7), whether the model frees each slab page when its last
#: program goes or keeps them all: slub's partial lists (min_partial), its
#: per-CPU slabs and the RCU-deferred program frees are not modelled, and
#: are the next thing to model before these rates go in.
BPF_SLAB_NOT_APPLIED = ("6.1", "7.2")

@dataclass(frozen=True)
class KernelVersion:
    """What the model follows for one kernel (build)."""

    name: str
    #: (major, minor) for picking the nearest record from a boot log
    release: tuple[int, int]
    #: the Debian package this record was measured on, or ""
    package: str
    image: KernelImage
    step_rule: StepRule
    modules_vaddr: int
    modules_end: int
    #: PTI: the kernel clears _PAGE_GLOBAL from its mappings
    pti: bool
    #: sizeof(pg_data_t) as allocated for NODE_DATA(0)
    node_data_bytes: int
    #: boot-time CPA calls, in order
    boot_cpa: tuple[BootCpaCall, ...]
    #: bpf_prog_pack (5.18+): small JIT images share 2 MiB packs
    bpf_prog_pack: bool
    bpf_prog_pack_size: int = 2 << 20
    bpf_prog_chunk_size: int = 64
    #: the x86-64 JIT's image of a 2-instruction socket filter (r0 = 0;
    #: exit): prologue, one xor, epilogue; bpf_prog_info.jited_prog_len read
    #: under QEMU by the guest's bpf_load (each further r0 = 0 adds 2 bytes)
    bpf_jit_base_len: int = 16
    #: what bpf_prog_load allocates before the JIT image, in order: (order,
    #: GFP, kept with the program): the program's own page, kept, and the
    #: verifier's buffers, freed (last first) before the image; read off the
    #: recorded traces' bpf:2048 steps (the same pattern for each program)
    bpf_load_pages: tuple[tuple[int, str, bool], ...] = ()
    #: the slab pages a fresh kernel's caches take as programs' objects fill
    #: them (bpf_prog_aux, the file, the maps' and verifier's kmallocs):
    #: (order, GFP, programs per page), the rate of each kind of new slab
    #: page in a recorded fresh bpf step, taken after the verifier's buffers
    #: go, before the image (where the recordings show them). Which cache
    #: and when its page fills is not modelled; on an aged kernel the
    #: caches' partly free slabs take many of the objects (fewer new pages)
    bpf_load_slab: tuple[tuple[int, str, int], ...] = ()
    #: CPA alias processing leaves NX alone on the direct map (6.2+, when
    #: set_memory_rox arrived: the alias of executable memory stays NX)
    alias_masks_nx: bool = False
    #: users that make their memory RO+X with one set_memory_rox call (6.2+)
    set_memory_rox_users: frozenset[str] = frozenset()
    #: cpa_collapse_large_pages after set_memory_rox (6.15)
    collapse_after_rox: bool = False
    #: the execmem ROX cache (6.14+): executable memory from a cache of
    #: 2M pages kept RO+X
    execmem_rox_cache: bool = False
    #: module memory types (6.4, "module: replace module_layout with
    #: module_memory"): each of text, data, rodata, ro_after_init, init
    #: text, init data and init rodata is its own execmem_alloc, where older
    #: kernels make one core and one init module_alloc
    module_mem_types: bool = False
    #: sections load_module makes read-only after init besides
    #: .data..ro_after_init: __jump_table (4.15) and .static_call_sites
    #: (6.14, module_mark_ro_after_init)
    module_ro_after_init_sections: tuple[str, ...] = ("__jump_table",)
    #: vmalloc takes its pages in the largest orders that fit (up to a PMD's
    #: worth) and splits them, instead of one order-0 page at a time, so an
    #: area's pages are physically contiguous where memory allows (7.x)
    vmalloc_high_order: bool = False
    #: alloc_pages_exact's make_alloc_exact frees the pages past the size
    #: with __free_pages_ok(FPI_TO_TAIL): straight to the buddy, at the
    #: free list's tail, where older kernels free_page() them onto the
    #: per-CPU list's head (read off the Debian builds' code: 5.10 calls
    #: __free_pages, 6.1.0-56 and 7.2 __free_pages_ok)
    alloc_exact_tail_to_buddy: bool = False
    #: vmalloc takes order-0 pages from the bulk allocator, up to 100 a call
    #: (5.13, "mm/vmalloc: use bulk page allocator in __vmalloc_area_node")
    vmalloc_bulk: bool = True
    #: mem_init ends with preallocate_vmalloc_pages (5.9, "x86/mm/64: Do not
    #: sync vmalloc/ioremap mappings"; arch/x86/mm/init_64.c): one table
    #: page per top-level entry over the vmalloc space, right after
    #: memblock_free_all, before tracing can see it
    vmalloc_prealloc: bool = True
    #: vfree gives an area's pages back with free_pages_bulk: each run of
    #: physically contiguous pages as the largest aligned blocks (7.x,
    #: free_prepared_contig_range), not one page at a time
    vfree_contig_free: bool = False
    #: ftrace_init's dyn_ftrace record pages ("ftrace: allocated P pages
    #: with G groups" in the boot log; 0: not measured), allocated right
    #: after the buddy hand-over as the binary decomposition of P
    ftrace_pages: int = 0
    #: what a traced boot allocates between the buddy hand-over and its first
    #: page event beyond the vmalloc space's tables, ftrace's records and the
    #: ring buffer (early slab, per-CPU and trace-event data): (order-0
    #: UNMOVABLE pages, order-0 RECLAIMABLE pages). Read off the recorder's
    #: trace-start dumps under QEMU (2G, 4G and 8G: the same within a page);
    #: the modelled replay makes them from its own boot (0: not measured;
    #: 7.2's execmem ROX cache block, made before tracing too, is not in
    #: it: one PMD entry of the image's level2_fixmap_pgt maps it, no table).
    #: They depend on the recorder a little: 6.1's recordings made since
    #: the calculate_min_free_kbytes marker (a command line 26 bytes
    #: longer) have one page more than those before (217)
    early_untraced_pages: tuple[int, int] = (0, 0)
    #: how many of the early UNMOVABLE pages come before the recorder's
    #: first ftrace trampoline (early_trace_init starts the function
    #: tracer; the trampoline's page made read-only splits its direct-map
    #: 2M page: the split's table, and on 6.1 the page and its module-area
    #: page table, are early pages; on 7.x the page is the execmem ROX
    #: cache's, whose first 2M block comes with it). Read off the 2G boots'
    #: trace-start dumps: 6.1's page 0x69e5 is the 114th page of the early
    #: run, 7.2's split table 0x6626 the 142nd (the module mapping's table
    #: before it freed and taken again; any place inside the run gives the
    #: model the same free pages at the first event). None: no such
    #: trampoline modelled
    early_trampoline_at: int | None = None
    #: of early_untraced_pages, those the trampoline holds on the 2G boot
    #: the count was read off (6.1: its page, the module area's page table,
    #: the split's table; 7.2: the split's table, the module mapping's
    #: freed by the collapse). On a bigger machine the model's trampoline
    #: may hold a table more, and so does Linux's: 7.2's trace-start dumps
    #: at 4G, 8G and 16G have one early page more than at 2G
    early_trampoline_pages: int = 0
    #: the allocations start_kernel makes between init_IRQ's set_memory_ro
    #: of the IDT and setup_per_cpu_pageset (the IDT split's own tables
    #: not counted), read off recordings with the setup_per_cpu_pageset
    #: marker (the same at 2G and 4G): where a replay of a recording
    #: without the marker sets the zones' per-CPU lists up; None: unknown.
    #: (7.2's 3 is in event order, as recordings without the marker have
    #: it; a 7.2 recording with take probes puts the allocations where
    #: their pages were taken, and the number varies from boot to boot)
    pcp_setup_after_idt: int | None = None
    #: CONFIG_DEFERRED_STRUCT_PAGE_INIT leaves a pageblock of the deferred
    #: range whose first page is reserved at migratetype 0 (UNMOVABLE):
    #: neither memmap_init (it stops at first_deferred_pfn) nor
    #: deferred_free_range (it sets MOVABLE only at the pageblock-aligned
    #: pages it frees) gives it one; its free pages (e.g. the unused part of
    #: a 2M per-CPU unit) sit on the UNMOVABLE lists. Read off the dumped
    #: 5.10 and 6.1 kernels; 7.2 has every pageblock MOVABLE there
    deferred_reserved_unmovable: bool = False
    #: CONFIG_DEFERRED_STRUCT_PAGE_INIT (Debian's builds): memblock_free_all
    #: frees the top zone's first section only, page_alloc_init_late the rest
    deferred_init: bool = False
    #: the blocks deferred_free_range frees whole: pageblocks (order 9), or
    #: MAX_ORDER blocks (order 10; 7.2's trace frees the deferred range in
    #: order-10 blocks, 6.1's in order-9)
    deferred_free_order: int = 9
    #: memfd_secret (5.14+)
    secretmem: bool = True
    #: per-CPU lists hold orders 1-3 and THP too (5.13, "mm/page_alloc: allow
    #: high-order pages to be stored on the per-cpu lists"); before, order 0 only
    pcp_high_orders: bool = True
    #: per-CPU lists that size themselves (6.7, "mm: tune PCP high
    #: automatically": high_min/high_max, alloc_factor, free_count)
    pcp_autotune: bool = False
    #: claim a fallback pageblock or steal one block of it (6.15, "mm:
    #: page_alloc: speed up fallbacks in rmqueue_bulk()" and its series):
    #: FallbackScheme.CLAIM_OR_STEAL; before, MOVE_BLOCK
    fallback_claim_or_steal: bool = False
    #: THP on (Debian: CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS): khugepaged's
    #: set_recommended_min_free_kbytes raises min_free_kbytes at boot
    khugepaged_min_free: bool = True
    #: the direct_map_* counters /proc/vmstat prints on this kernel
    vmstat_counters: tuple[str, ...] = ()
    #: the real-mode blob (set_real_mode_permissions), in pages: (its size,
    #: read-only from its start, text start, text size); read off the dumped
    #: kernels' direct maps (dmfrag.truth) under QEMU, where the blob sits at
    #: the top of the RAM below 1 MiB (memblock top-down below 0x9f000)
    real_mode: tuple[int, int, int, int] | None = None
    #: the whole first 1 MiB reserved (5.13, "x86/setup: Always reserve the
    #: first 1M of RAM"); before, the first 64K, the BIOS area and the
    #: real-mode blob only
    reserve_first_1m: bool = True
    #: the boot-time memblock allocations (None: NODE_DATA and the vmemmap
    #: buffer only, for records with no memblock=debug log)
    bootmem: BootmemRecord | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def pcp_scheme(self) -> PcpScheme:
        """The allocator's :class:`~guestkernel.page_alloc.PcpScheme`."""
        if not self.pcp_high_orders:
            return PcpScheme.LEGACY
        return PcpScheme.AUTOTUNE if self.pcp_autotune else PcpScheme.FREE_FACTOR

    @property
    def fallback_scheme(self) -> FallbackScheme:
        """The allocator's :class:`~guestkernel.page_alloc.FallbackScheme`."""
        return (FallbackScheme.CLAIM_OR_STEAL if self.fallback_claim_or_steal
                else FallbackScheme.MOVE_BLOCK)

    def has_vmstat(self, counter: str) -> bool:
        return counter in self.vmstat_counters


_SPLITS = ("direct_map_level2_splits", "direct_map_level3_splits")
_COLLAPSES = ("direct_map_level2_collapses", "direct_map_level3_collapses")
_MODULES_1G_IMAGE = (0xFFFFFFFFC0000000, 0xFFFFFFFFFF000000)   # KERNEL_IMAGE_SIZE 1 GiB (KASLR builds)

VERSIONS: dict[str, KernelVersion] = {
    "3.13": KernelVersion(
        name="3.13", release=(3, 13), package="", image=DEBIAN_6_1_IMAGE,
        step_rule=STEP_RULES["3.9"], modules_vaddr=0xFFFFFFFFA0000000,
        modules_end=0xFFFFFFFFFF000000, pti=False, node_data_bytes=0x2B000,
        boot_cpa=(BootCpaCall.FREE_INITMEM, BootCpaCall.MARK_RODATA_RO),
        bpf_prog_pack=False, secretmem=False, pcp_high_orders=False, vmalloc_bulk=False,
        vmalloc_prealloc=False,
        notes=(("Ubuntu 3.13.0-55: step rule and boot page sizes from its boot log; image "
               "layout borrowed from the 6.1 build"),)),
    "5.10": KernelVersion(
        name="5.10", release=(5, 10), package="linux-image-5.10.0-32-amd64",
        image=DEBIAN_5_10_IMAGE, step_rule=STEP_RULES["4.0"],
        modules_vaddr=_MODULES_1G_IMAGE[0], modules_end=_MODULES_1G_IMAGE[1], pti=True,
        node_data_bytes=0x2A000,
        boot_cpa=(BootCpaCall.IDT_RO, BootCpaCall.FREE_SMP_ALTERNATIVES,
                  BootCpaCall.REAL_MODE, BootCpaCall.PAGE_ALLOC_INIT_LATE,
                  BootCpaCall.PTP_CLASSIFIER_BPF, BootCpaCall.FREE_INITRD,
                  BootCpaCall.FREE_BSS_DECRYPTED,
                  BootCpaCall.FREE_INITMEM, BootCpaCall.MARK_RODATA_RO),
        bpf_prog_pack=False, secretmem=False, real_mode=(6, 2, 1, 1), pcp_high_orders=False,
        vmalloc_bulk=False, ftrace_pages=144, early_untraced_pages=(209, 2),
        pcp_setup_after_idt=0,
        deferred_reserved_unmovable=True,
        reserve_first_1m=False, deferred_init=True,
        bpf_jit_base_len=15,
        # linux-5.10-8G-bpf-2048: 278 order-0, 256 order-1 and 97
        # reclaimable order-0 new slab pages for 2048 programs
        bpf_load_slab=((0, "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY", 7),
                       (1, _SLAB_HIGH, 8),
                       (0, "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY|__GFP_RECLAIMABLE", 21)),
        bpf_load_pages=((0, "GFP_HIGHUSER|__GFP_NOWARN|__GFP_ZERO", True),
                        (0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN|__GFP_ZERO", False),
                        (0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN", False)),
        bootmem=BootmemRecord(
            pgtable_l5=False, usemap_section_bytes=56, vmemmap_buffer=True,
            setup_arch_small_first=False, percpu_embedded_pages=63,
            percpu_chunk_allocs=_PCPU_CHUNK_5_10, cpumask_allocs=5, start_kernel_scratch=False,
            swiotlb_tables=(0x20000, 0x40000)),
        notes=("Debian 5.10.223 under QEMU TCG, nokaslr; boot meminfo equals it at 3G and 8G",)),
    "6.1": KernelVersion(
        name="6.1", release=(6, 1), package="linux-image-6.1.0-56-amd64",
        image=DEBIAN_6_1_IMAGE, step_rule=STEP_RULES["4.0"],
        modules_vaddr=_MODULES_1G_IMAGE[0], modules_end=_MODULES_1G_IMAGE[1], pti=True,
        node_data_bytes=0x2B000, boot_cpa=_ALL_BOOT_CPA, bpf_prog_pack=True,
        vmstat_counters=_SPLITS, real_mode=(7, 3, 1, 2), ftrace_pages=159,
        early_untraced_pages=(218, 2), early_trampoline_at=113, early_trampoline_pages=3, alloc_exact_tail_to_buddy=True, pcp_setup_after_idt=1,
        deferred_reserved_unmovable=True, deferred_init=True,
        # Not applied (see BPF_SLAB_NOT_APPLIED): linux-6.1-8G-bpf-2048_secretmem-
        # 4096 has 257 order-2, 243 order-0 and 98 reclaimable order-0 new slab
        # pages for 2048 programs, ((2, _SLAB_HIGH, 8), (0, "GFP_KERNEL|
        # __GFP_NOWARN|__GFP_NORETRY", 8), (0, ..."|__GFP_RECLAIMABLE", 21))
        bpf_load_pages=((0, "GFP_HIGHUSER|__GFP_NOWARN|__GFP_ZERO|__GFP_ACCOUNT", True),
                        (0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN|__GFP_ZERO", False),
                        (0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN", False)),
        bootmem=BootmemRecord(
            pgtable_l5=True, usemap_section_bytes=56, vmemmap_buffer=True,
            setup_arch_small_first=False, percpu_embedded_pages=62,
            percpu_chunk_allocs=_PCPU_CHUNK_6_1, cpumask_allocs=5, start_kernel_scratch=True,
            swiotlb_tables=(0xC0000,), swiotlb_small=(0x10,)),
        notes=("Debian linux-image-6.1.0-56-amd64 (6.1.192) under QEMU TCG, nokaslr",)),
    "7.2": KernelVersion(
        name="7.2", release=(7, 2), package="linux-binary-7.2.13+deb14-amd64",
        image=DEBIAN_7_2_IMAGE, step_rule=STEP_RULES["4.0"],
        modules_vaddr=_MODULES_1G_IMAGE[0], modules_end=_MODULES_1G_IMAGE[1], pti=True,
        node_data_bytes=0x2B080, boot_cpa=_ALL_BOOT_CPA, bpf_prog_pack=True,
        alias_masks_nx=True, set_memory_rox_users=frozenset({"bpf", "execmem"}),
        collapse_after_rox=True, execmem_rox_cache=True, vmalloc_high_order=True,
        module_mem_types=True, alloc_exact_tail_to_buddy=True, fallback_claim_or_steal=True,
        module_ro_after_init_sections=("__jump_table", ".static_call_sites"),
        pcp_autotune=True, vfree_contig_free=True, ftrace_pages=196, bpf_jit_base_len=25,
        early_untraced_pages=(273, 4), early_trampoline_at=140, early_trampoline_pages=1, pcp_setup_after_idt=3,
        deferred_init=True, deferred_free_order=10,
        # Not applied (see BPF_SLAB_NOT_APPLIED): linux-7.2-8G-bpf-2048_secretmem-
        # 4096 has 289 order-0, 255 order-2 and 97 reclaimable order-0 new slab
        # pages for 2048 programs, ((0, "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY|
        # __GFP_COMP|__GFP_NOMEMALLOC", 7), (2, _SLAB_HIGH, 8), (0, the same with
        # __GFP_RECLAIMABLE, 21))
        bpf_load_pages=((0, "GFP_HIGHUSER|__GFP_ZERO|__GFP_NOWARN", True),
                        (4, "GFP_NOWAIT|__GFP_IO|__GFP_FS|__GFP_ZERO|__GFP_COMP|__GFP_ACCOUNT",
                         False),
                        (0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_ZERO|__GFP_NOWARN", False),
                        (0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN", False)),
        bootmem=BootmemRecord(
            pgtable_l5=True, usemap_section_bytes=88, vmemmap_buffer=False,
            setup_arch_small_first=True, percpu_embedded_pages=63,
            percpu_chunk_allocs=_PCPU_CHUNK_7_2, cpumask_allocs=2, start_kernel_scratch=True,
            swiotlb_tables=(0xC0000,), swiotlb_small=(0x10,)),
        vmstat_counters=_SPLITS + _COLLAPSES, real_mode=(7, 3, 1, 2),
        notes=(("Debian 7.2.13 under QEMU TCG, nokaslr; boot meminfo equals it at 3G and 8G "
                "once vmalloc takes high orders (the first bpf_prog_pack is one 2M block: one "
                "alias split, not two)"),)),
}
DEFAULT_VERSION = "6.1"

#: Names the model accepted before versions were records.
_ALIASES = {"debian-6.1": "6.1", "linux-6.1": "6.1", "linux-3.13": "3.13",
            "debian-5.10": "5.10", "debian-7.2": "7.2"}


def get_version(name: str | KernelVersion) -> KernelVersion:
    """The record for ``name`` ("6.1", "5.10", ...)."""
    if isinstance(name, KernelVersion):
        return name
    key = _ALIASES.get(name, name) if isinstance(name, str) else None
    try:
        return VERSIONS[key]  # type: ignore[index]
    except KeyError:
        raise VersionError(f"unknown kernel profile {name!r}; known: "
                           f"{', '.join(VERSIONS)}") from None


_LINUX_VERSION = re.compile(r"Linux version (\d+)\.(\d+)")


def step_rule_for(release: tuple[int, int]) -> StepRule:
    """The step rule in force in ``release`` (the oldest rule for a kernel
    older than every rule: top-down stepping arrived in 3.9)."""
    rules = sorted(STEP_RULES.values(), key=lambda r: r.since)
    in_force = [r for r in rules if r.since <= release]
    return in_force[-1] if in_force else rules[0]


def nearest_version(release: tuple[int, int]) -> KernelVersion:
    """The record to follow for a kernel the model may not know: among the
    records with the step rule in force in ``release``, the newest not newer
    than it, else the oldest newer one."""
    rule = step_rule_for(release)
    same = sorted((v for v in VERSIONS.values() if v.step_rule == rule), key=lambda v: v.release)
    older = [v for v in same if v.release <= release]
    return older[-1] if older else same[0]


def version_from_boot_log(text: str) -> tuple[KernelVersion, str] | None:
    """The record for the kernel a boot log names in its ``Linux version
    X.Y...`` line (:func:`nearest_version`), with a sentence saying what was
    chosen; None when the log has no such line."""
    m = _LINUX_VERSION.search(text)
    if m is None:
        return None
    logged = (int(m.group(1)), int(m.group(2)))
    chosen = nearest_version(logged)
    how = "exact" if chosen.release == logged else "nearest"
    return chosen, (f"boot log names Linux {logged[0]}.{logged[1]}: using the {chosen.name} "
                    f"record ({how}; step rule {chosen.step_rule.name})")
