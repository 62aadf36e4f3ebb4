"""The guest kernel: boot, page allocation, CPA entry points and counters.

``Kernel.boot`` follows x86-64 ``setup_arch`` -> ``start_kernel`` ->
``kernel_init`` as far as the direct map is concerned:

1. the e820 map (pasted boot log or a QEMU-like layout for a RAM size);
2. memblock: RAM from e820, the first 1 MiB and the kernel image reserved;
3. the kernel's page tables: the high kernel mapping of the image with 2M
   pages (``head_64.S`` + ``cleanup_highmap``), then the direct map by
   ``init_mem_mapping`` (ISA range, then top-down steps), tables from the
   brk ``pgt_buf`` and then memblock, counted in ``direct_pages_count`` the
   way 6.1 counts them (re-visited large pages counted again);
4. the struct-page array reserved (64 bytes per page), zones DMA/DMA32/
   Normal, everything memblock did not reserve handed to the buddy
   allocator (``memblock_free_all``);
5. ``free_initmem`` and ``mark_rodata_ro``: the protections of the image
   whose direct-map aliases split a few 2M pages, before
   ``system_state = SYSTEM_RUNNING`` (so vmstat does not count them).
"""

from __future__ import annotations

import enum
from pathlib import Path

from emu import Machine
from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from . import gfp as G
from .cpa import Cpa, CpaData, CpaError, CpaFlags
from .e820 import E820Table, parse_size
from .layout import (
    DEFAULT_PROFILE,
    PAGE_OFFSET,
    PAGE_SIZE,
    PMD_SIZE,
    PROFILES,
    START_KERNEL_MAP,
    KernelProfile,
)
from .memblock import Memblock
from .memory_mapping import init_mem_mapping
from .page_alloc import AllocationError, BuddyAllocator, ZoneType
from .pgtable import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, KernelPageTables
from .policy import Policy, get_policy
from .shadow import Shadow
from .users import BpfJit, ModuleLoader, ProtectedPageTables, Secretmem
from .vmalloc import Vmalloc, VmFlags

__all__ = ["Kernel", "KernelError", "SystemState"]

MiB, GiB = 1 << 20, 1 << 30
#: ptp_classifier_init's filter JITed at boot: a few hundred bytes, so it
#: lands in a bpf_prog_pack (its exact size does not matter: one chunk run).
PTP_CLASSIFIER_JIT_BYTES = 512
#: Size of ``struct page`` on x86-64.
STRUCT_PAGE_SIZE = 64
#: Pages per memory section (SECTION_SIZE_BITS 27: 128 MiB).
SECTION_PAGES = 1 << 15
#: The brk pgt_buf: INIT_PGT_BUF_SIZE (arch/x86/mm/init.c).
INIT_PGT_BUF_PAGES = 6


_GFP_UNMAPPED = int(G.GFP_UNMAPPED)
_GFP_ZERO = int(G.GFP_ZERO)
_NOT_POLICY_GFP = ~int(G.GFP_UNMAPPED | G.GFP_PTE_MAPPED)


class KernelError(RuntimeError):
    """A kernel operation that cannot be done as asked; nothing changed."""


class SystemState(enum.Enum):
    BOOTING = "booting"
    RUNNING = "running"


class Kernel:
    """A booted guest kernel. Build it with :meth:`Kernel.boot`."""

    machine: Machine

    def __init__(self) -> None:  # use Kernel.boot
        self.system_state = SystemState.BOOTING
        self.vmstat_counters: dict[str, int] = {
            "direct_map_level2_splits": 0, "direct_map_level3_splits": 0,
            "direct_map_level2_collapses": 0, "direct_map_level3_collapses": 0,
            "nr_tlb_local_flush_all": 0, "nr_tlb_local_flush_one": 0,
        }
        self._unmapped: dict[int, int] = {}   # pfn -> order, allocated with GFP_UNMAPPED
        self._policy_alloc = self._policy_free = None
        self.highmap_counted = [0, 0, 0, 0, 0]
        self._validator_code: int | None = None
        self._validator_out = 0
        self.validation_generation = 0
        self._in_debug_vm = False
        self.debug_vm = False
        #: what module_alloc/execmem asks of the page allocator (a policy may
        #: add GFP_UNMAPPED, as the 2022 RFC does)
        self.execmem_gfp = int(G.GFP_KERNEL)
        #: secretmem takes GFP_UNMAPPED pages instead of unmapping them itself
        self.secretmem_unmapped = False

    # -- boot -------------------------------------------------------------

    @classmethod
    def boot(cls, ram: str | int | None = "8G", e820: str | Path | E820Table | None = None,
             gbpages: bool = True, policy: str | Policy = "baseline",
             profile: str | KernelProfile = DEFAULT_PROFILE, debug_vm: bool = False,
             **policy_tunables) -> Kernel:
        """Boot a guest kernel.

        ``e820`` (a boot log's text, a path to one, or an E820Table) wins
        over ``ram``; with neither, ``ram`` gives QEMU's PC layout for that
        size. ``policy`` names a registered policy (tunables as keywords)."""
        if isinstance(profile, str):
            try:
                profile = PROFILES[profile]
            except KeyError:
                raise KernelError(f"unknown kernel profile {profile!r}; known: "
                                  f"{', '.join(PROFILES)}") from None
        table = _e820_from(e820, ram)
        pol = get_policy(policy, **policy_tunables)   # a bad name fails before any work
        k = cls()
        k.profile = profile
        k.e820 = table
        k.gbpages = bool(gbpages)
        k.debug_vm = debug_vm
        k.policy = pol
        k.max_pfn = table.max_pfn
        k._boot_memblock()
        k.machine = Machine(k.max_pfn * PAGE_SIZE)
        k._boot_page_tables()
        # What 6.1 counted twice while mapping (see pgtable.py), fixed for life.
        k.boot_overcount = [c - r for c, r in zip(k.pgt.direct_pages_count,
                                                  k.pgt.recount_direct_map(k.max_pfn))]
        k._boot_buddy()
        k.cpa = Cpa(k)
        k.vmalloc = Vmalloc(k)
        k.modules = ModuleLoader(k)
        k.bpf = BpfJit(k)
        k.secretmem = Secretmem(k)
        k.pgtable_protect = ProtectedPageTables(k)
        k._boot_protections()
        k.system_state = SystemState.RUNNING
        k.boot_direct_pages_count = list(k.pgt.direct_pages_count)
        k.shadow.touched.clear()
        k.shadow.touched_va.clear()
        # Call a policy's page hooks only if it overrides them (the hot path).
        k._policy_alloc = pol.alloc_pages if type(pol).alloc_pages is not Policy.alloc_pages else None
        k._policy_free = pol.free_pages if type(pol).free_pages is not Policy.free_pages else None
        k.policy_name = pol.name
        pol.attach(k)
        return k

    def _boot_memblock(self) -> None:
        img = self.profile.image
        mb = Memblock(self.e820)
        end = img.pa(img.end)
        if not mb.is_region_memory(img.phys_start, end - img.phys_start):
            raise KernelError(f"the kernel image [{img.phys_start:#x}, {end:#x}) is not in RAM "
                              "in this memory map")
        mb.reserve(0, 1 << 20, "first 1M (x86/setup: always reserved)")
        mb.reserve(img.phys_start, end - img.phys_start, "kernel image")
        self.memblock = mb

    def _image_page(self, offset: int) -> int:
        """A page inside the image's .data for the static boot tables
        (init_top_pgt, level3_kernel_pgt, level2_kernel_pgt)."""
        img = self.profile.image
        return img.pa(img.sdata) + offset * PAGE_SIZE

    def _boot_page_tables(self) -> None:
        img = self.profile.image
        self.shadow = Shadow(self)
        # pgt_buf lives in .brk (early_alloc_pgt_buf).
        brk = img.pa(img.end_of_kernel_reserve)
        self._pgt_buf = [brk + i * PAGE_SIZE for i in range(INIT_PGT_BUF_PAGES)]
        self.max_pfn_mapped = 0
        self._mapped_lo = self._mapped_hi = 0
        root = self._image_page(0)                     # init_top_pgt
        self.machine.ram[root: root + PAGE_SIZE] = 0
        self.pgt = KernelPageTables(self.machine, root, self._alloc_boot_table,
                                    self._free_pgtable_pa, pti=self.profile.pti)
        # The high kernel mapping: init_top_pgt[511] -> level3_kernel_pgt[510]
        # -> level2_kernel_pgt, 2M pages over the image (cleanup_highmap keeps
        # [_text, roundup(_brk_end, PMD_SIZE))).
        pud, pmd = self._image_page(1), self._image_page(2)
        ram = self.machine.ram
        ram[pud: pud + PAGE_SIZE] = 0
        ram[pmd: pmd + PAGE_SIZE] = 0
        self.pgt.table_pages |= {pud, pmd}
        kp = self.pgt.prot
        self.pgt.set(self.pgt.slot(root, pt.table_index(START_KERNEL_MAP, 4)), pud | kp.KERNPG_TABLE)
        self.pgt.set(self.pgt.slot(pud, pt.table_index(START_KERNEL_MAP, 3)), pmd | kp.KERNPG_TABLE)
        lo = img.text & ~(PMD_SIZE - 1)
        hi = -(-img.brk_end // PMD_SIZE) * PMD_SIZE
        for va in range(lo, hi, PMD_SIZE):
            pa = va - START_KERNEL_MAP
            self.pgt.set(self.pgt.slot(pmd, pt.table_index(va, 2)), pa | kp.PAGE_KERNEL_LARGE_EXEC)
        self.shadow.map_image(lo, hi, kp.PAGE_KERNEL_EXEC)
        # The direct map (init_mem_mapping), top block found by memblock.
        end = self.max_pfn * PAGE_SIZE
        top = self.memblock.phys_alloc_range(PMD_SIZE, PMD_SIZE, 1 << 20, end, "probe")
        self.memblock.free(top, PMD_SIZE)
        calls = init_mem_mapping(self.e820, gbpages=self.gbpages,
                                 kernel=self.profile.step_rule, top_block=top)
        self.init_memory_mapping_calls = calls
        for call in calls:
            for r in call:
                mask = {PAGE_SIZE: 0, PMD_SIZE: 1 << PG_LEVEL_2M,
                        1 << 30: (1 << PG_LEVEL_2M) | (1 << PG_LEVEL_1G)}[r.page_size]
                self.pgt.kernel_physical_mapping_init(r.start, r.end, mask, self.e820)
                self.shadow.map_direct(r.start >> 12, r.end >> 12, self.pgt.prot.PAGE_KERNEL)
            self._add_pfn_range_mapped(call[0].start, call[-1].end)
        self.max_pfn_mapped = self.max_pfn
        self.machine.cr3 = root

    def _add_pfn_range_mapped(self, start: int, end: int) -> None:
        if self._mapped_hi == 0:
            self._mapped_lo, self._mapped_hi = start, end
        else:
            self._mapped_lo = min(self._mapped_lo, start)
            self._mapped_hi = max(self._mapped_hi, end)

    def _alloc_boot_table(self, why: str) -> int:
        """``alloc_low_page``: the brk pgt_buf first, then memblock top-down
        inside what is already mapped."""
        if self.pgt.after_bootmem:
            return self.alloc_pgtable_page(why)
        if self._pgt_buf:
            return self._pgt_buf.pop(0)
        if self._mapped_hi <= self._mapped_lo:
            raise KernelError("boot page tables: pgt_buf exhausted before anything was mapped")
        return self.memblock.phys_alloc_range(PAGE_SIZE, PAGE_SIZE, self._mapped_lo,
                                              self._mapped_hi, "page table")

    def _boot_buddy(self) -> None:
        end = self.max_pfn * PAGE_SIZE
        # NODE_DATA(0) (initmem_init -> alloc_node_data): top-down, first.
        self.memblock.phys_alloc_range(self.profile.node_data_bytes, 64, 0, end, "NODE_DATA(0)")
        # The sparse vmemmap buffer (sparse_init_nid -> sparse_buffer_init):
        # one PMD-aligned block holding 2 MiB of struct pages per present
        # 128 MiB section, top-down.
        sections = {pfn >> 15 for lo, hi in self.e820.ram_ranges()
                    for pfn in range(lo >> 12, hi >> 12, 1 << 15)}
        sections |= {((hi >> 12) - 1) >> 15 for lo, hi in self.e820.ram_ranges()}
        self.memblock.phys_alloc_range(len(sections) * (SECTION_PAGES * STRUCT_PAGE_SIZE), PMD_SIZE,
                                       0, end, "sparse vmemmap buffer")
        dma, dma32 = 16 * MiB >> 12, 4 * GiB >> 12
        bounds = {ZoneType.DMA: (0, min(dma, self.max_pfn)),
                  ZoneType.DMA32: (min(dma, self.max_pfn), min(dma32, self.max_pfn)),
                  ZoneType.NORMAL: (min(dma32, self.max_pfn), self.max_pfn)}
        self.buddy = BuddyAllocator(self.max_pfn, zone_bounds=bounds)
        self.policy.setup_buddy(self.buddy)
        for lo, hi in self.memblock.free_ranges():
            lo, hi = -(-lo // PAGE_SIZE), hi // PAGE_SIZE
            if lo < hi:
                self.buddy.free_range(lo, hi)
        self.pgt.after_bootmem = True

    def _boot_protections(self) -> None:
        """The CPA calls Linux 6.1 makes while booting on one CPU (seen with
        ftrace on the reference kernel), in their order:

        * ``idt_setup_apic_and_irq_gates``: the IDT page read-only;
        * ``alternative_instructions``: on UP, ``free_init_pages`` of the
          SMP-alternatives section (NX and RW, then freed);
        * ``sock_init`` -> ``ptp_classifier_init``: a classic BPF filter is
          JITed, which allocates the first ``bpf_prog_pack`` (RO+X);
        * ``free_initmem``: ``mem_encrypt_free_decrypted_mem`` frees the unused
          part of ``.bss..decrypted`` (NX+RW on a partial 2M image page: a
          split), then the init sections; then ``mark_rodata_ro``.

        ``init_real_mode`` (4K pages below 1 MiB: no split) and the
        ``set_memory_decrypted`` calls (no-ops without memory encryption)
        are left out."""
        img = self.profile.image
        self.set_memory_ro(img.idt_table, 1)
        self._free_init_pages(img.smp_locks, img.smp_locks_end)
        self.bpf.load(PTP_CLASSIFIER_JIT_BYTES)
        self._free_init_pages(img.bss_decrypted_unused, img.end_bss_decrypted)
        self._free_kernel_image_pages(img.init_begin, img.init_end)
        start = img.text
        rodata_start = _pfn_align(img.start_rodata)
        end = img.end_rodata_hpage_align
        text_end = _pfn_align(img.etext)
        rodata_end = _pfn_align(img.end_rodata)
        self.set_memory_ro(start, (end - start) >> 12)
        self.cpa.kernel_set_to_readonly = True
        all_end = -(-img.brk_end // PMD_SIZE) * PMD_SIZE
        self.set_memory_nx(text_end, (all_end - text_end) >> 12)
        self._free_kernel_image_pages(text_end, rodata_start)
        self._free_kernel_image_pages(rodata_end, img.sdata)

    def _free_init_pages(self, begin: int, end: int) -> None:
        """``free_init_pages``: NX and RW (the RW reaches the direct-map
        alias), then the pages go to the buddy allocator."""
        begin, end = _inner_pages(begin, end)
        if end <= begin:
            return
        n = (end - begin) >> 12
        self.set_memory_nx(begin, n)
        self.set_memory_rw(begin, n)
        img = self.profile.image
        self.buddy.free_range(img.pa(begin) >> 12, img.pa(end) >> 12)

    def _free_kernel_image_pages(self, begin: int, end: int) -> None:
        """``free_kernel_image_pages``: ``free_init_pages``, then with PTI the
        high-mapping range is unmapped (not its direct-map alias)."""
        self._free_init_pages(begin, end)
        begin, end = _inner_pages(begin, end)
        if self.profile.pti and end > begin:
            self.set_memory_np_noalias(begin, (end - begin) >> 12)

    # -- page allocation --------------------------------------------------

    def alloc_pages(self, gfp: int, order: int = 0) -> int:
        """Allocate 2^order pages; returns the first PFN.

        The policy sees the request first (when it overrides the hook); what
        it declines comes from the buddy allocator. ``GFP_UNMAPPED`` pages
        leave the direct map (and come back at free); ``GFP_ZERO`` pages are
        zeroed."""
        gfp = int(gfp)
        if order.__class__ is not int or not 0 <= order <= 10:
            raise AllocationError(f"order must be 0..10, not {order!r}")
        pfn = self._policy_alloc(self, gfp, order) if self._policy_alloc else None
        if pfn is None:
            buddy_gfp = gfp & _NOT_POLICY_GFP
            try:
                pfn = self.buddy.alloc_pages(buddy_gfp, order)
            except AllocationError:
                if not self.policy.shrink(self, 1 << order):
                    raise
                pfn = self.buddy.alloc_pages(buddy_gfp, order)
            if gfp & _GFP_UNMAPPED:
                for i in range(1 << order):
                    self.set_direct_map_invalid_noflush(pfn + i)
                self.flush_tlb_kernel_range(self.pfn_to_virt(pfn), self.pfn_to_virt(pfn + (1 << order)))
                self._unmapped[pfn] = order
        if gfp & _GFP_ZERO:
            pa = pfn * PAGE_SIZE
            self.machine.ram[pa: pa + (PAGE_SIZE << order)] = 0
        if self.debug_vm:
            self._debug_vm()
        return pfn

    def free_pages(self, pfn: int, order: int = 0) -> None:
        if self._policy_free and self._policy_free(self, pfn, order):
            return
        if self._unmapped:
            unmapped = self._unmapped.get(pfn)
            if unmapped is not None and unmapped != order:
                raise KernelError(f"free_pages({pfn:#x}, {order}): allocated with order {unmapped}")
        else:
            unmapped = None
        self.buddy.free_pages(pfn, order)   # raises on a bad free, before any change below
        if unmapped is not None:
            del self._unmapped[pfn]
            for i in range(1 << order):
                self.set_direct_map_default_noflush(pfn + i)
        if self.debug_vm:
            self._debug_vm()

    def alloc_pgtable_page(self, why: str = "page table") -> int:
        """An order-0 page for a kernel page table (after boot: the buddy
        allocator, GFP_KERNEL as split_large_page asks); returns its address."""
        pfn = self.buddy.alloc_pages(int(G.GFP_KERNEL), 0)
        pa = pfn * PAGE_SIZE
        self.machine.ram[pa: pa + PAGE_SIZE] = 0
        self.pgt.table_pages.add(pa)
        return pa

    def _free_pgtable_pa(self, pa: int) -> None:
        self.pgt.table_pages.discard(pa)
        self.buddy.free_pages(pa >> 12, 0)

    # -- addresses --------------------------------------------------------

    @staticmethod
    def pfn_to_virt(pfn: int) -> int:
        return PAGE_OFFSET + pfn * PAGE_SIZE

    def virt_to_pfn(self, va: int) -> int:
        if not PAGE_OFFSET <= va < PAGE_OFFSET + self.max_pfn * PAGE_SIZE:
            raise KernelError(f"{va:#x} is not a direct-map address")
        return (va - PAGE_OFFSET) >> 12

    def lookup_address(self, va: int) -> tuple[int, int] | None:
        """(entry, level) of what maps ``va`` (level 1=4K, 2=2M, 3=1G), or None."""
        return self.pgt.lookup_address(int(va))

    # -- TLB --------------------------------------------------------------

    def flush_tlb_all(self) -> None:
        self.vmstat_counters["nr_tlb_local_flush_all"] += 1
        self.machine.flush_tlb()

    def flush_tlb_one_kernel(self, va: int) -> None:
        self.vmstat_counters["nr_tlb_local_flush_one"] += 1
        self.machine.invlpg(va)

    def flush_tlb_kernel_range(self, start: int, end: int) -> None:
        """Per page up to ``tlb_single_page_flush_ceiling``, else everything."""
        from .cpa import TLB_SINGLE_PAGE_FLUSH_CEILING
        pages = (end - start) >> 12
        if pages > TLB_SINGLE_PAGE_FLUSH_CEILING:
            self.flush_tlb_all()
        else:
            for va in range(start, end, PAGE_SIZE):
                self.flush_tlb_one_kernel(va)

    # -- CPA entry points (set_memory.c) ---------------------------------------

    def set_memory_ro(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, 0, int(F.RW))

    def set_memory_rw(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, int(F.RW), 0)

    def set_memory_x(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, 0, int(F.NX))

    def set_memory_nx(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, int(F.NX), 0)

    def set_memory_np(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, 0, int(F.P))

    def set_memory_np_noalias(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, 0, int(F.P),
                                                 in_flag=CpaFlags.NO_CHECK_ALIAS)

    def set_memory_p(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.change_page_attr_set_clr(addr, numpages, int(F.P), 0)

    def set_memory_rox(self, addr: int, numpages: int) -> CpaData:
        """6.2+: read-only and executable in one request."""
        return self.cpa.change_page_attr_set_clr(addr, numpages, 0, int(F.RW | F.NX))

    def set_memory_4k(self, addr: int, numpages: int) -> CpaData:
        """Split to 4K and mark the entries so that no collapse undoes it
        (6.15's _PAGE_KERNEL_4K, a software bit here: collapse.KERNEL_4K)."""
        from .collapse import KERNEL_4K
        return self.cpa.change_page_attr_set_clr(addr, numpages, KERNEL_4K, 0, force_split=True)

    def set_direct_map_invalid_noflush(self, pfn: int) -> CpaData:
        """Clear P and RW of one page's direct-map entry, no alias, no flush."""
        return self._set_pages(pfn, 0, int(F.P | F.RW))

    def set_direct_map_default_noflush(self, pfn: int) -> CpaData:
        """Set P and RW of one page's direct-map entry, no alias, no flush."""
        return self._set_pages(pfn, int(F.P | F.RW), 0)

    def _set_pages(self, pfn: int, set_: int, clr: int) -> CpaData:
        if not isinstance(pfn, int) or not 0 <= pfn < self.max_pfn:
            raise CpaError(f"pfn {pfn!r} is outside [0, {self.max_pfn:#x})")
        va = self.pfn_to_virt(pfn)
        cpa = CpaData([va], 1, set_, clr)
        self.cpa._check_request([va], 1, CpaFlags(0))
        return self.cpa.apply(cpa, False, flush=False)

    # -- kernel users of CPA (see users.py) --------------------------------

    def module_alloc(self, size: int) -> int:
        """arch/x86/kernel/module.c: a module-area vmalloc with VM_FLUSH_RESET_PERMS."""
        return self.vmalloc.vmalloc_node_range(
            size, start=self.profile.modules_vaddr, end=self.profile.modules_end,
            gfp=self.execmem_gfp, flags=VmFlags.FLUSH_RESET_PERMS, caller="module_alloc").addr

    execmem_alloc = module_alloc   # the 6.10+ name of the same allocation

    def alloc_insn_page(self) -> int:
        """kprobes/ftrace: one module_alloc page made RO+X."""
        addr = self.module_alloc(PAGE_SIZE)
        self.set_memory_ro(addr, 1)
        self.set_memory_x(addr, 1)
        return addr

    def vfree(self, addr: int) -> None:
        self.vmalloc.vfree(addr)

    # -- counters (Linux's names) ------------------------------------------

    def split_page_count(self, level: int, highmap: bool = False) -> None:
        """A large page became 512 smaller ones (set_memory.c).

        Linux counts it when ``virt_addr_valid(address)``, which is true for
        the high kernel mapping too: splits of the image's 2M pages change
        DirectMap4k/2M although they are not in the direct map
        (``highmap`` records them apart for the validator)."""
        count = self.pgt.direct_pages_count
        if count[level] == 0:
            return
        if highmap:
            self.highmap_counted[level] -= 1
            self.highmap_counted[level - 1] += 512
        count[level] -= 1
        if self.system_state is SystemState.RUNNING:
            name = {PG_LEVEL_2M: "direct_map_level2_splits",
                    PG_LEVEL_1G: "direct_map_level3_splits"}[level]
            self.vmstat_counters[name] += 1
        count[level - 1] += 512

    def collapse_page_count(self, level: int) -> None:
        """512 entries became one large page (6.15 ``collapse_page_count``)."""
        count = self.pgt.direct_pages_count
        count[level - 1] -= 512
        count[level] += 1
        name = {PG_LEVEL_2M: "direct_map_level2_collapses",
                PG_LEVEL_1G: "direct_map_level3_collapses"}[level]
        self.vmstat_counters[name] += 1

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo's fields that this model keeps, in kB."""
        count = self.pgt.direct_pages_count
        managed = sum(z.managed_pages for z in self.buddy.zones)
        return {
            "MemTotal": managed * 4,
            "MemFree": self.buddy.nr_free() * 4,
            "PageTables": len(self.pgt.table_pages) * 4,
            "DirectMap4k": count[PG_LEVEL_4K] * 4,
            "DirectMap2M": count[PG_LEVEL_2M] * 2048,
            "DirectMap1G": count[PG_LEVEL_1G] * 1048576,
        }

    def vmstat(self) -> dict[str, int]:
        out = dict(self.vmstat_counters)
        out["nr_free_pages"] = self.buddy.nr_free()
        return out

    # -- validation (validate.py) ----------------------------------------

    def validate(self, mode: str = "full", **kw) -> dict[str, int]:
        """Check the model against the CPU; raises ValidationError (see validate.py)."""
        from .validate import validate
        return validate(self, mode, **kw)

    def validator_code_page(self) -> int:
        """An executable page in the module area for the validator's probes."""
        if self._validator_code is None:
            self._validator_code = self.alloc_insn_page()
            self._validator_out = self.alloc_pages(int(G.GFP_KERNEL), 0)
        return self._validator_code

    @property
    def validator_out_pfn(self) -> int:
        self.validator_code_page()
        return self._validator_out

    def _debug_vm(self) -> None:
        """CONFIG_DEBUG_VM: a sample validation after every operation."""
        if self.debug_vm and not self._in_debug_vm and self.system_state is SystemState.RUNNING:
            self._in_debug_vm = True
            try:
                self.validate("sample", sample=256, execution=False)
            finally:
                self._in_debug_vm = False

    def ptdump(self) -> str:
        """The kernel page tables as debugfs ``page_tables/kernel`` prints them."""
        from .ptdump import ptdump
        return ptdump(self)

    def __repr__(self) -> str:
        mi = self.meminfo()
        return (f"Kernel({self.profile.name}, {self.e820.total_ram() / GiB:.2f} GiB RAM, "
                f"policy={self.policy.name!r}, DirectMap4k={mi['DirectMap4k']} kB, "
                f"2M={mi['DirectMap2M']} kB, 1G={mi['DirectMap1G']} kB)")


def _pfn_align(va: int) -> int:
    return -(-va // PAGE_SIZE) * PAGE_SIZE


def _inner_pages(begin: int, end: int) -> tuple[int, int]:
    """The whole pages inside [begin, end) (free_init_pages' alignment)."""
    return _pfn_align(begin), end & ~(PAGE_SIZE - 1)


def _e820_from(e820, ram) -> E820Table:
    if isinstance(e820, E820Table):
        return e820
    if isinstance(e820, Path) or (isinstance(e820, str) and "\n" not in e820
                                  and "BIOS-e820" not in e820):
        path = Path(e820)
        try:
            return E820Table.from_dmesg(path.read_text())
        except OSError as exc:
            raise KernelError(f"cannot read the e820 boot log {str(path)!r}: {exc.strerror}") from None
    if isinstance(e820, str):
        return E820Table.from_dmesg(e820)
    if e820 is not None:
        raise KernelError(f"e820 must be a boot log's text, a path or an E820Table, not "
                          f"{type(e820).__name__}")
    if ram is None:
        raise KernelError("give ram= (e.g. '8G') or e820=")
    parse_size(ram)
    return E820Table.qemu_pc(ram)
