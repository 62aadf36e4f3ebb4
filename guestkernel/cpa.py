"""Change page attributes (arch/x86/mm/pat/set_memory.c model, Linux 6.1).

One :class:`CpaData` record carries a request (``struct cpa_data``);
``change_page_attr_set_clr`` runs it page by page through
``__change_page_attr``, which for a large page asks
``should_split_large_page`` for one of three outcomes (unchanged, rewritten
in place, split) and splits with ``split_large_page`` (a table page from the
buddy allocator, all 512 entries with the old attributes, PAT moved,
then a full flush). Aliases: a change to a vmalloc/module or kernel-image
address is applied to its direct-map alias too (NX-only changes are not,
as in 6.1). Edits only mark a flush as due; ``cpa_flush`` at the end flushes
per page up to ``tlb_single_page_flush_ceiling`` pages, else everything.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from . import collapse
from .layout import PAGE_SIZE, START_KERNEL_MAP
from .pgtable import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, KernelPageTables
from .shadow import Shadow
from .tlbflush import TLB_SINGLE_PAGE_FLUSH_CEILING, TlbFlush
from .versions import KernelVersion

__all__ = ["TLB_SINGLE_PAGE_FLUSH_CEILING", "Cpa", "CpaData", "CpaError", "CpaFlags",
           "CpaObserver", "SplitOutcome"]

#: The software bit set_memory_4k leaves on the entries it split (6.15's
#: _PAGE_KERNEL_4K): no collapse undoes them.
KERNEL_4K = collapse.KERNEL_4K
_ROX_CLR = int(F.RW | F.NX)
_P = int(F.P)
# The flags as plain ints for the hot paths: IntFlag's own operators build
# an enum member on every call (the results are the same numbers).
_RW, _NX, _PS, _PAT_LARGE = int(F.RW), int(F.NX), int(F.PS), int(F.PAT_LARGE)


class CpaError(ValueError):
    """A CPA request that cannot be carried out; nothing was changed."""


class CpaFlags(enum.IntFlag):
    FLUSHTLB = 1
    ARRAY = 2
    PAGES_ARRAY = 4
    NO_CHECK_ALIAS = 8


class SplitOutcome(enum.Enum):
    """What ``should_split_large_page`` decided for a large page."""

    UNCHANGED = "unchanged"       # requested protection equals the current one
    REWRITTEN = "rewritten"       # the whole large page changed in place
    SPLIT = "split"


_ARRAY = int(CpaFlags.ARRAY)
_ARRAY_OR_PAGES = int(CpaFlags.ARRAY | CpaFlags.PAGES_ARRAY)
_FLUSHTLB = int(CpaFlags.FLUSHTLB)
_NO_CHECK_ALIAS = int(CpaFlags.NO_CHECK_ALIAS)


@dataclass
class CpaData:
    """``struct cpa_data``."""

    vaddr: list[int]               # start address, or one address per page with ARRAY
    numpages: int
    mask_set: int
    mask_clr: int
    flags: CpaFlags = CpaFlags(0)
    force_split: bool = False
    force_flush_all: bool = False
    force_static_prot: bool = False
    curpage: int = 0
    pfn: int = 0
    #: outcomes seen, for tests and tracing: (address, level, SplitOutcome)
    decisions: list[tuple[int, int, SplitOutcome]] = field(default_factory=list)
    #: direct-map PFNs whose 4K entry this request (or its aliases) rewrote:
    #: where a merging policy looks for tables to collapse
    changed: list[int] = field(default_factory=list)
    #: PFNs whose direct-map alias was left alone: out of the direct map
    #: as a whole large page (see Cpa._process_alias)
    alias_skipped: set[int] = field(default_factory=set)

    def addr(self, i: int) -> int:
        # int(): IntFlag's own & builds an enum member on every call (hot)
        if int(self.flags) & _ARRAY:
            return self.vaddr[i]
        return self.vaddr[0] + i * PAGE_SIZE


#: Called with a request before it runs, or after it and its flush.
CpaObserver = Callable[[CpaData], None]


class Cpa:
    """CPA over the kernel's page tables.

    It owns the whole request: checking it before anything changes, the
    shadow record the validator checks against, the page-table work, split
    and collapse accounting (``direct_pages_count`` and vmstat), the table
    pages a split needs (through ``alloc_pgtable_page``, the kernel's
    ``alloc_pages(GFP_KERNEL, 0)``) and the flush. Observers (a policy's
    hooks, CONFIG_DEBUG_VM, the oracle) are told before and after each
    request; none of them is called by name."""

    def __init__(self, *, pgt: KernelPageTables, shadow: Shadow, version: KernelVersion,
                 max_pfn: int, tlb: TlbFlush, vmstat: dict[str, int],
                 alloc_pgtable_page: Callable[[str], int],
                 free_pgtable_page: Callable[[int], None], gbpages: bool) -> None:
        self.pgt = pgt
        #: the direct map's base in this kernel's layout (4- or 5-level)
        self.page_offset = pgt.page_offset
        self.shadow = shadow
        self.version = version
        self.image = version.image
        self.max_pfn = max_pfn
        #: RAM below this is in the direct map (all of it once booted)
        self.max_pfn_mapped = max_pfn
        self.tlb = tlb
        self.vmstat = vmstat
        self.gbpages = gbpages
        self.alloc_pgtable_page = alloc_pgtable_page
        self.free_pgtable_page = free_pgtable_page
        for name in ("direct_map_level2_splits", "direct_map_level3_splits",
                     "direct_map_level2_collapses", "direct_map_level3_collapses"):
            vmstat.setdefault(name, 0)
        #: mark_rodata_ro has run: static_protections keep text/rodata RO
        self.kernel_set_to_readonly = False
        #: system_state == SYSTEM_RUNNING: splits are counted in vmstat
        self.system_running = False
        #: splits of the image mapping counted in direct_pages_count (x86's
        #: virt_addr_valid accepts image addresses), per level
        self.highmap_counted = [0, 0, 0, 0, 0]
        #: direct-map splits Linux does not count because the level's
        #: counter had already reached 0 (split_page_count returns early)
        self.uncounted_splits = [0, 0, 0, 0, 0]
        #: table entries collapse attempts read (collapse.CollapseContext)
        self.collapse_scanned = 0
        #: CPA requests run (checked, not refused), for what a policy costs
        self.requests = 0
        self._new_tables: list[int] = []      # table pages the running request took
        self._before: list[CpaObserver] = []
        self._after: list[CpaObserver] = []

    def add_observer(self, *, before: CpaObserver | None = None,
                     after: CpaObserver | None = None) -> None:
        """Be called with every request before it runs and/or after its flush."""
        if before is not None:
            self._before.append(before)
        if after is not None:
            self._after.append(after)

    def remove_observer(self, fn: CpaObserver) -> None:
        for lst in (self._before, self._after):
            if fn in lst:
                lst.remove(fn)

    # -- helpers ------------------------------------------------------------

    def pfn_to_virt(self, pfn: int) -> int:
        return self.page_offset + pfn * PAGE_SIZE

    def _within_direct_map(self, va: int) -> bool:
        po = self.page_offset
        return po <= va < po + self.max_pfn_mapped * PAGE_SIZE

    def _virt_addr_valid_highmap(self, va: int) -> bool:
        """x86 ``__virt_addr_valid`` accepts the kernel image mapping (below
        KERNEL_IMAGE_SIZE) when its frame is RAM: splits there are counted."""
        img = self.image
        if not START_KERNEL_MAP <= va < START_KERNEL_MAP + (1 << 30):
            return False
        pfn = (va - img.text + img.phys_start) >> 12
        return 0 <= pfn < self.max_pfn_mapped

    def _within_image(self, va: int) -> bool:
        img = self.image
        return img.text <= va < img.brk_end

    def _pfn_in_highmap(self, pfn: int) -> bool:
        return self.image.pfn_in_highmap(pfn)

    # -- the entry points (set_memory.c) -----------------------------------

    def set_memory_ro(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, 0, int(F.RW))

    def set_memory_rw(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, int(F.RW), 0)

    def set_memory_x(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, 0, int(F.NX))

    def set_memory_nx(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, int(F.NX), 0)

    def set_memory_np(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, 0, int(F.P))

    def set_memory_np_noalias(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, 0, int(F.P),
                                             in_flag=CpaFlags.NO_CHECK_ALIAS)

    def set_memory_p(self, addr: int, numpages: int) -> CpaData:
        return self.change_page_attr_set_clr(addr, numpages, int(F.P), 0)

    def set_memory_rox(self, addr: int, numpages: int) -> CpaData:
        """6.2+: read-only and executable in one request; on a kernel that
        collapses (6.15+) the direct map is collapsed after it."""
        return self.change_page_attr_set_clr(addr, numpages, 0, _ROX_CLR)

    def set_memory_4k(self, addr: int, numpages: int) -> CpaData:
        """Split to 4K and mark the entries so that no collapse undoes it."""
        return self.change_page_attr_set_clr(addr, numpages, KERNEL_4K, 0, force_split=True)

    def split_to_4k(self, pfn: int, nr_pages: int) -> CpaData:
        """Map direct-map [pfn, pfn+nr_pages) at PTE level with no attribute
        change and no 4K-only mark (the grouping RFCs' remap; a collapse may
        undo it later)."""
        return self.change_page_attr_set_clr(self.pfn_to_virt(pfn), nr_pages, 0, 0,
                                             force_split=True)

    def set_direct_map_invalid_noflush(self, pfn: int) -> CpaData:
        """Clear P and RW of one page's direct-map entry, no alias, no flush."""
        return self._set_pages(pfn, 0, int(F.P | F.RW))

    def set_direct_map_default_noflush(self, pfn: int) -> CpaData:
        """Set P and RW of one page's direct-map entry, no alias, no flush."""
        return self._set_pages(pfn, int(F.P | F.RW), 0)

    def set_direct_map_valid_noflush(self, pfn: int, nr: int, valid: bool) -> CpaData:
        """6.13+: ``nr`` pages from ``pfn`` made present and writable
        (``__set_pages_p``) or not present (``__set_pages_np``) in one
        request, no alias, no flush: a 2M page the range covers whole keeps
        its size."""
        if valid:
            return self._set_pages(pfn, int(F.P | F.RW), 0, nr)
        return self._set_pages(pfn, 0, int(F.P | F.RW), nr)

    def _set_pages(self, pfn: int, set_: int, clr: int, nr: int = 1) -> CpaData:
        if isinstance(pfn, bool) or not isinstance(pfn, int) or not 0 <= pfn < self.max_pfn \
                or pfn + nr > self.max_pfn:
            raise CpaError(f"pfn {pfn!r} (+{nr}) is outside [0, {self.max_pfn:#x})")
        va = self.pfn_to_virt(pfn)
        self._check_request([va], nr, CpaFlags(0))
        return self.apply(CpaData([va], nr, set_, clr), False, flush=False)

    def remove_from_direct_map(self, pfn: int, nr_pages: int = 1) -> None:
        """Take [pfn, pfn+nr_pages) out of the direct map and flush them
        (``set_direct_map_invalid_noflush`` per page, then one
        ``flush_tlb_kernel_range``), as secretmem and the grouping RFCs do.
        All or nothing: when a page's split finds no table page, the pages
        already taken out are put back (they are 4K now: no allocation) and
        the MemoryError propagates."""
        done = 0
        try:
            for done in range(nr_pages):
                self.set_direct_map_invalid_noflush(pfn + done)
        except MemoryError:
            self.restore_direct_map(pfn, done)
            raise
        self.tlb.flush_tlb_kernel_range(self.pfn_to_virt(pfn), self.pfn_to_virt(pfn + nr_pages))

    def restore_direct_map(self, pfn: int, nr_pages: int = 1) -> None:
        """Put [pfn, pfn+nr_pages) back (``set_direct_map_default_noflush``:
        making a page present needs no flush)."""
        for i in range(nr_pages):
            self.set_direct_map_default_noflush(pfn + i)

    def collapse_large_pages(self, pfns) -> tuple[int, int]:
        """Collapse the direct-map tables covering ``pfns`` where the 6.15
        rule allows (see :mod:`guestkernel.collapse`); (2M, 1G) collapses."""
        return collapse.collapse_direct_map(self, pfns)

    # -- counters (Linux's names) ------------------------------------------

    def split_page_count(self, level: int, highmap: bool = False) -> None:
        """A large page became 512 smaller ones (set_memory.c).

        Linux counts it when ``virt_addr_valid(address)``, which is true for
        the high kernel mapping too: splits of the image's 2M pages change
        DirectMap4k/2M although they are not in the direct map
        (``highmap`` records them apart for the validator)."""
        count = self.pgt.direct_pages_count
        if count[level] == 0:
            # Linux returns here: once image splits (counted too) have taken
            # a level's counter to 0, later splits change nothing.
            if not highmap:
                self.uncounted_splits[level] += 1
            return
        if highmap:
            self.highmap_counted[level] -= 1
            self.highmap_counted[level - 1] += 512
        count[level] -= 1
        if self.system_running:
            name = {PG_LEVEL_2M: "direct_map_level2_splits",
                    PG_LEVEL_1G: "direct_map_level3_splits"}[level]
            self.vmstat[name] += 1
        count[level - 1] += 512

    def collapse_page_count(self, level: int) -> None:
        """512 entries became one large page (6.15 ``collapse_page_count``)."""
        count = self.pgt.direct_pages_count
        count[level - 1] -= 512
        count[level] += 1
        if self.system_running:        # as split_page_count: boot's are not events
            name = {PG_LEVEL_2M: "direct_map_level2_collapses",
                    PG_LEVEL_1G: "direct_map_level3_collapses"}[level]
            self.vmstat[name] += 1

    # -- static protections (6.1 static_protections) ---------------------------

    def static_protections(self, prot: int, start: int, pfn: int, npg: int, lpsize: int) -> int:
        if not prot & _P:
            return prot
        img = self.image
        end = start + npg * PAGE_SIZE - 1
        forbidden = 0
        # Text NX: never make kernel text (high mapping) non-executable.
        if start <= img.etext - 1 and end >= img.text:
            forbidden |= _NX
        # Text RO: once read-only, large pages of the image stay RO when
        # only part of them is changed.
        if lpsize != npg * PAGE_SIZE or start & (lpsize - 1 if lpsize else 0):
            if (self.kernel_set_to_readonly and start <= img.end_rodata_hpage_align - 1
                    and end >= img.text):
                found = self.pgt.lookup_address(start)
                if found is not None and found[1] != PG_LEVEL_4K:
                    forbidden |= _RW
        # Rodata RO (by PFN: covers the direct-map alias too).
        if self.kernel_set_to_readonly:
            spfn_ro = img.pa(img.start_rodata) >> 12
            epfn_ro = (img.pa(img.end_rodata) >> 12) - 1
            if pfn <= epfn_ro and pfn + npg - 1 >= spfn_ro:
                forbidden |= _RW
        return prot & ~forbidden

    # -- the request ---------------------------------------------------------

    def change_page_attr_set_clr(self, addr: int | list[int], numpages: int, mask_set: int,
                                 mask_clr: int, force_split: bool = False,
                                 in_flag: CpaFlags = CpaFlags(0)) -> CpaData:
        addrs = list(addr) if isinstance(addr, (list, tuple)) else [int(addr)]
        flags = CpaFlags(in_flag) & (CpaFlags.ARRAY | CpaFlags.NO_CHECK_ALIAS)
        self._check_request(addrs, numpages, flags)
        cpa = CpaData(addrs, numpages, int(mask_set), int(mask_clr), flags=flags,
                      force_split=force_split)
        if not cpa.mask_set and not cpa.mask_clr and not force_split:
            return cpa
        checkalias = (cpa.mask_set | cpa.mask_clr) != int(F.NX)
        if int(flags) & _NO_CHECK_ALIAS:
            checkalias = False
        return self.apply(cpa, checkalias, flush=True)

    def apply(self, cpa: CpaData, checkalias: bool, *, flush: bool) -> CpaData:
        """Run a checked request: record it in the shadow, the observers
        around the page-table work, the flush when due (``flush=False`` for
        the ``_noflush`` entry points: the caller flushes), and on a kernel
        that collapses, the collapse after ``set_memory_rox``."""
        for fn in self._before:
            fn(cpa)
        self._change_page_attr_set_clr_or_undo(cpa, checkalias)
        self.requests += 1
        self.shadow.apply(cpa, checkalias, kernel_ro=self.kernel_set_to_readonly)
        if flush and int(cpa.flags) & _FLUSHTLB:
            self.cpa_flush(cpa)
        if self.version.collapse_after_rox and cpa.mask_set == 0 and cpa.mask_clr == _ROX_CLR:
            # 6.15's cpa_collapse_large_pages walks the PMDs of the request's
            # own range (not of the aliases it changed): a set_memory_rox on
            # module or BPF memory collapses nothing in the direct map.
            primary = [(cpa.addr(i) - self.page_offset) >> 12 for i in range(cpa.numpages)
                       if self._within_direct_map(cpa.addr(i))]
            if primary:
                self.collapse_large_pages(primary)
            elif not int(cpa.flags) & _ARRAY:
                # ... and of module memory it is the request's own mapping
                # that collapses (the execmem cache's 2M, its text ROX again)
                collapse.collapse_kernel_range(self, cpa.addr(0), cpa.numpages)
        for fn in self._after:
            fn(cpa)
        return cpa

    def _change_page_attr_set_clr_or_undo(self, cpa: CpaData, checkalias: bool) -> None:
        """The page-table work of a request, all or nothing: when a split
        finds no page for its table (guest OOM), every entry written is put
        back, the tables it took are freed, the counters restored and the
        TLB flushed, and the MemoryError propagates. (Linux returns -ENOMEM
        with the pages before the failure changed; the model refuses to
        leave a half-done request behind, so the shadow, recorded only after
        success, and the tables never disagree.)"""
        pgt = self.pgt
        journal: list[tuple[int, int]] = []
        saved = (list(pgt.direct_pages_count), dict(self.vmstat), list(self.highmap_counted),
                 list(self.uncounted_splits))
        self._new_tables = []
        pgt.journal = journal
        try:
            self._change_page_attr_set_clr(cpa, checkalias)
        except MemoryError:
            pgt.journal = None
            pgt.undo(journal)
            for table in self._new_tables:
                self.free_pgtable_page(table)
            pgt.direct_pages_count[:] = saved[0]
            self.vmstat.update(saved[1])
            self.highmap_counted[:] = saved[2]
            self.uncounted_splits[:] = saved[3]
            # No translation of an undone entry may survive (not counted:
            # the failed request leaves no trace in vmstat).
            self.tlb.cpu.flush_tlb()
            raise
        finally:
            pgt.journal = None
            self._new_tables = []

    def _check_request(self, addrs: list[int], numpages: int, flags: CpaFlags) -> None:
        """Refuse what Linux would WARN about or fail on half-way, before
        anything changes: misaligned or unmapped addresses, bad counts."""
        if isinstance(numpages, bool) or not isinstance(numpages, int) or numpages <= 0:
            raise CpaError(f"numpages must be a positive integer, not {numpages!r}")
        array = int(flags) & _ARRAY
        if array and len(addrs) != numpages:
            raise CpaError(f"{len(addrs)} addresses for numpages={numpages}")
        starts = addrs if array else [addrs[0]]
        span = 1 if array else numpages
        lv = self.pgt.levels
        for start in starts:
            if not isinstance(start, int) or start % PAGE_SIZE:
                raise CpaError(f"address {start!r} is not page aligned")
            if (not pt.is_canonical(start, lv)
                    or not pt.is_canonical(start + span * PAGE_SIZE - 1, lv)):
                raise CpaError(f"range at {start:#x} of {span} pages is not canonical")
            va, end = start, start + span * PAGE_SIZE
            while va < end:
                found = self.pgt.lookup_address(va)
                if found is None or found[0] == 0:
                    raise CpaError(f"{va:#x} is not mapped (in a request for "
                                   f"[{start:#x}, {end:#x}))")
                _entry, level = found
                size = pt.level_size(level)
                va = (va & ~(size - 1)) + size

    def _change_page_attr_set_clr(self, cpa: CpaData, checkalias: bool) -> None:
        numpages = cpa.numpages
        rempages = numpages
        while rempages:
            cpa.numpages = rempages
            if int(cpa.flags) & _ARRAY_OR_PAGES:
                cpa.numpages = 1
            self._change_page_attr(cpa, primary=checkalias)
            if checkalias:
                self._process_alias(cpa)
            assert 0 < cpa.numpages <= rempages
            rempages -= cpa.numpages
            cpa.curpage += cpa.numpages
        cpa.numpages = numpages

    def _change_page_attr(self, cpa: CpaData, primary: bool) -> None:
        address = cpa.addr(cpa.curpage)
        pgt = self.pgt
        while True:
            found = pgt.lookup_slot(address)
            if found is None or pgt.get(found[0]) == 0:
                # __cpa_process_fault: aliases of unmapped pages are skipped.
                if not primary or self._within_direct_map(address):
                    cpa.numpages = 1
                    if self._within_direct_map(address):
                        cpa.pfn = (address - self.page_offset) >> 12
                    return
                raise CpaError(f"CPA: {address:#x} is not mapped")
            slot, level = found
            old = pgt.get(slot)
            if level == PG_LEVEL_4K:
                pfn = (old & pt.ADDR_MASK) >> 12
                new_prot = (old & ~pt.ADDR_MASK) & ~cpa.mask_clr | cpa.mask_set
                new_prot = self.static_protections(new_prot, address, pfn, 1, 0)
                new = (old & pt.ADDR_MASK) | new_prot
                cpa.pfn = pfn
                if old != new:
                    pgt.set(slot, new)
                    if not int(cpa.flags) & _FLUSHTLB:
                        cpa.flags |= CpaFlags.FLUSHTLB
                    if self._within_direct_map(address):
                        cpa.changed.append(pfn)
                cpa.numpages = 1
                return
            outcome = self.should_split_large_page(slot, level, address, cpa)
            cpa.decisions.append((address, level, outcome))
            if outcome is not SplitOutcome.SPLIT:
                return
            self.split_large_page(cpa, slot, level, address)
            # repeat: the address is now mapped one level down

    def should_split_large_page(self, slot: int, level: int, address: int,
                                cpa: CpaData) -> SplitOutcome:
        if cpa.force_split:
            return SplitOutcome.SPLIT
        pgt = self.pgt
        old = pgt.get(slot)
        old_prot = (old & ~pt.ADDR_MASK) | (old & _PAT_LARGE)
        old_pfn = pt.entry_addr(old, level) >> 12
        psize = pt.level_size(level)
        pmask = ~(psize - 1)
        lpaddr = (address + psize) & pmask
        numpages = (lpaddr - address) >> 12
        cpa.numpages = min(cpa.numpages, numpages)
        # Requested protection, computed in 4K format then back to large.
        req = pt.pat_large_to_4k(old_prot)
        req = (req & ~cpa.mask_clr) | cpa.mask_set
        req = pt.pat_4k_to_large(req)
        if req & _P:
            req |= _PS
        pfn = old_pfn + ((address & (psize - 1)) >> 12)
        cpa.pfn = pfn
        lpaddr = address & pmask
        numpages = psize >> 12
        chk = self.static_protections(old_prot, lpaddr, old_pfn, numpages, psize)
        if chk != old_prot:
            cpa.force_static_prot = True
            return SplitOutcome.SPLIT
        if req == old_prot:
            return SplitOutcome.UNCHANGED
        if address != lpaddr or cpa.numpages != numpages:
            return SplitOutcome.SPLIT
        new_prot = self.static_protections(req, lpaddr, old_pfn, numpages, psize)
        if new_prot != req:
            return SplitOutcome.SPLIT
        pgt.set(slot, (old_pfn << 12) | new_prot)
        cpa.flags |= CpaFlags.FLUSHTLB
        return SplitOutcome.REWRITTEN

    def split_large_page(self, cpa: CpaData, slot: int, level: int, address: int) -> None:
        """Allocate an order-0 page for the new table (``alloc_pages(GFP_KERNEL,
        0)``) and install it (``__split_large_page``)."""
        table = self.alloc_pgtable_page("cpa split")
        self._new_tables.append(table)
        self.__split_large_page(cpa, slot, level, address, table)

    def __split_large_page(self, cpa: CpaData, slot: int, level: int, address: int,
                           table: int) -> None:
        pgt = self.pgt
        old = pgt.get(slot)
        if level == PG_LEVEL_2M:
            ref_prot = pt.pat_large_to_4k((old & ~pt.ADDR_MASK) | (old & F.PAT_LARGE))
            pfninc, lpinc = 1, PAGE_SIZE
        elif level == PG_LEVEL_1G:
            ref_prot = (old & ~pt.ADDR_MASK) | (old & F.PAT_LARGE)  # 2M entries keep PS
            if not ref_prot & F.P:
                ref_prot &= ~int(F.PS)
            pfninc, lpinc = 512, 1 << 21
        else:
            raise AssertionError(f"split of a level-{level} entry")
        ref_pfn = pt.entry_addr(old, level) >> 12
        lpaddr = address & ~(pt.level_size(level) - 1)
        base = table >> 3
        if cpa.force_static_prot and lpinc == PAGE_SIZE:
            for i in range(512):
                pfn = ref_pfn + i * pfninc
                prot = self.static_protections(ref_prot, lpaddr + i * lpinc, pfn, 1, 0)
                pgt.ram64[base + i] = (pfn << 12) | prot
        else:
            # the same 512 entries, (pfn << 12) | ref_prot, in one assignment
            pfns = np.arange(512, dtype=np.uint64) * np.uint64(pfninc) + np.uint64(ref_pfn)
            pgt.ram64[base: base + 512] = (pfns << np.uint64(12)) | np.uint64(int(ref_prot))
        if self._within_direct_map(address):
            self.split_page_count(level)
        elif self._virt_addr_valid_highmap(address):
            self.split_page_count(level, highmap=True)
        pgt.set(slot, table | pgt.prot.KERNPG_TABLE)
        # Flush before changing the new PTEs (the TLB application note).
        self.tlb.flush_tlb_all()

    def unmapped_whole(self, pfn: int) -> bool:
        """Whether ``pfn`` is out of the direct map as part of a whole large
        page taken out (a non-present 2M or 1G entry: unmapped-alloc's
        chunks), rather than one page at a time."""
        found = self.pgt.lookup_slot(self.page_offset + (pfn << 12))
        if found is None or found[1] == PG_LEVEL_4K:
            return False
        entry = self.pgt.get(found[0])
        return entry != 0 and not entry & _P

    def _process_alias(self, cpa: CpaData) -> None:
        pfn = cpa.pfn
        if not (0 <= pfn < self.max_pfn_mapped):
            return
        vaddr = cpa.addr(cpa.curpage)
        if not self._within_direct_map(vaddr):
            laddr = self.page_offset + (pfn << 12)
            if self.unmapped_whole(pfn):
                # The page is out of the direct map with its whole 2M (an
                # unmapped-alloc chunk): its alias has nothing to keep
                # consistent, and changing the non-present 2M entry would
                # split it, undoing the grouping (the 2023 design keeps its
                # pages out of alias processing). The shadow skips it too.
                cpa.alias_skipped.add(pfn)
                return
            alias = CpaData([laddr], cpa.numpages, cpa.mask_set, cpa.mask_clr,
                            flags=cpa.flags & ~(CpaFlags.ARRAY | CpaFlags.PAGES_ARRAY),
                            force_split=cpa.force_split)
            if self.version.alias_masks_nx:
                alias.mask_clr &= ~int(F.NX)
            cpa.force_flush_all = True
            self._change_page_attr_set_clr(alias, False)
            cpa.decisions.extend(alias.decisions)
            cpa.changed.extend(alias.changed)
            if int(alias.flags) & _FLUSHTLB:
                cpa.flags |= CpaFlags.FLUSHTLB
        if not self._within_image(vaddr) and self._pfn_in_highmap(pfn):
            img = self.image
            hva = img.text + ((pfn << 12) - img.phys_start)
            alias = CpaData([hva], cpa.numpages, cpa.mask_set, cpa.mask_clr,
                            flags=cpa.flags & ~(CpaFlags.ARRAY | CpaFlags.PAGES_ARRAY),
                            force_split=cpa.force_split)
            cpa.force_flush_all = True
            self._change_page_attr_set_clr(alias, False)
            cpa.decisions.extend(alias.decisions)
            if int(alias.flags) & _FLUSHTLB:
                cpa.flags |= CpaFlags.FLUSHTLB

    def cpa_flush(self, cpa: CpaData) -> None:
        """Per-page INVLPG up to the ceiling, else a full flush."""
        if cpa.force_flush_all or self.tlb.is_full(cpa.numpages):
            self.tlb.flush_tlb_all()
        else:
            for i in range(cpa.numpages):
                self.tlb.flush_tlb_one_kernel(cpa.addr(i))
