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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emu import pagetable as pt
from emu.pagetable import PteFlags as F

from .layout import PAGE_OFFSET, PAGE_SIZE, START_KERNEL_MAP
from .pgtable import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["TLB_SINGLE_PAGE_FLUSH_CEILING", "Cpa", "CpaData", "CpaError", "CpaFlags"]

#: arch/x86/mm/tlb.c: above this many pages a range flush becomes a full flush.
TLB_SINGLE_PAGE_FLUSH_CEILING = 33


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

    def addr(self, i: int) -> int:
        if self.flags & CpaFlags.ARRAY:
            return self.vaddr[i]
        return self.vaddr[0] + i * PAGE_SIZE


class Cpa:
    """CPA over one kernel's page tables."""

    def __init__(self, kernel: Kernel):
        self.k = kernel
        self.kernel_set_to_readonly = False

    # -- helpers ------------------------------------------------------------

    def _within_direct_map(self, va: int) -> bool:
        return PAGE_OFFSET <= va < PAGE_OFFSET + self.k.max_pfn_mapped * PAGE_SIZE

    def _virt_addr_valid_highmap(self, va: int) -> bool:
        """x86 ``__virt_addr_valid`` accepts the kernel image mapping (below
        KERNEL_IMAGE_SIZE) when its frame is RAM: splits there are counted."""
        img = self.k.profile.image
        if not START_KERNEL_MAP <= va < START_KERNEL_MAP + (1 << 30):
            return False
        pfn = (va - img.text + img.phys_start) >> 12
        return 0 <= pfn < self.k.max_pfn_mapped

    def _within_image(self, va: int) -> bool:
        img = self.k.profile.image
        return img.text <= va < img.brk_end

    def _pfn_in_highmap(self, pfn: int) -> bool:
        img = self.k.profile.image
        lo, hi = img.pa(img.text) >> 12, img.pa(img.brk_end) >> 12
        return lo <= pfn < hi

    # -- static protections (6.1 static_protections) ---------------------------

    def static_protections(self, prot: int, start: int, pfn: int, npg: int, lpsize: int) -> int:
        if not prot & F.P:
            return prot
        img = self.k.profile.image
        end = start + npg * PAGE_SIZE - 1
        forbidden = 0
        # Text NX: never make kernel text (high mapping) non-executable.
        if start <= img.etext - 1 and end >= img.text:
            forbidden |= int(F.NX)
        # Text RO: once read-only, large pages of the image stay RO when
        # only part of them is changed.
        if lpsize != npg * PAGE_SIZE or start & (lpsize - 1 if lpsize else 0):
            if (self.kernel_set_to_readonly and start <= img.end_rodata_hpage_align - 1
                    and end >= img.text):
                found = self.k.pgt.lookup_address(start)
                if found is not None and found[1] != PG_LEVEL_4K:
                    forbidden |= int(F.RW)
        # Rodata RO (by PFN: covers the direct-map alias too).
        if self.kernel_set_to_readonly:
            spfn_ro = img.pa(img.start_rodata) >> 12
            epfn_ro = (img.pa(img.end_rodata) >> 12) - 1
            if pfn <= epfn_ro and pfn + npg - 1 >= spfn_ro:
                forbidden |= int(F.RW)
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
        if flags & CpaFlags.NO_CHECK_ALIAS:
            checkalias = False
        return self.apply(cpa, checkalias, flush=True)

    def apply(self, cpa: CpaData, checkalias: bool, *, flush: bool) -> CpaData:
        """Run a checked request: record it in the shadow, the policy's
        before/after hooks around the page-table work, the flush when due
        (``flush=False`` for the ``_noflush`` entry points: the caller
        flushes), and CONFIG_DEBUG_VM's validation."""
        k = self.k
        k.shadow.apply(cpa, checkalias)
        k.policy.cpa_before(k, cpa)
        self._change_page_attr_set_clr(cpa, checkalias)
        if flush and cpa.flags & CpaFlags.FLUSHTLB:
            self.cpa_flush(cpa)
        k.policy.cpa_after(k, cpa)
        if k.debug_vm:
            k._debug_vm()
        return cpa

    def _check_request(self, addrs: list[int], numpages: int, flags: CpaFlags) -> None:
        """Refuse what Linux would WARN about or fail on half-way, before
        anything changes: misaligned or unmapped addresses, bad counts."""
        if isinstance(numpages, bool) or not isinstance(numpages, int) or numpages <= 0:
            raise CpaError(f"numpages must be a positive integer, not {numpages!r}")
        if flags & CpaFlags.ARRAY and len(addrs) != numpages:
            raise CpaError(f"{len(addrs)} addresses for numpages={numpages}")
        starts = addrs if flags & CpaFlags.ARRAY else [addrs[0]]
        span = 1 if flags & CpaFlags.ARRAY else numpages
        for start in starts:
            if not isinstance(start, int) or start % PAGE_SIZE:
                raise CpaError(f"address {start!r} is not page aligned")
            if not pt.is_canonical(start) or not pt.is_canonical(start + span * PAGE_SIZE - 1):
                raise CpaError(f"range at {start:#x} of {span} pages is not canonical")
            va, end = start, start + span * PAGE_SIZE
            while va < end:
                found = self.k.pgt.lookup_address(va)
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
            if cpa.flags & (CpaFlags.ARRAY | CpaFlags.PAGES_ARRAY):
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
        pgt = self.k.pgt
        while True:
            found = pgt.lookup_slot(address)
            if found is None or pgt.get(found[0]) == 0:
                # __cpa_process_fault: aliases of unmapped pages are skipped.
                if not primary or self._within_direct_map(address):
                    cpa.numpages = 1
                    if self._within_direct_map(address):
                        cpa.pfn = (address - PAGE_OFFSET) >> 12
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
        pgt = self.k.pgt
        old = pgt.get(slot)
        old_prot = (old & ~pt.ADDR_MASK) | (old & F.PAT_LARGE)
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
        if req & F.P:
            req |= int(F.PS)
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
        table = self.k.alloc_pgtable_page("cpa split")
        self.__split_large_page(cpa, slot, level, address, table)

    def __split_large_page(self, cpa: CpaData, slot: int, level: int, address: int,
                           table: int) -> None:
        pgt = self.k.pgt
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
        for i in range(512):
            pfn = ref_pfn + i * pfninc
            prot = ref_prot
            if cpa.force_static_prot and lpinc == PAGE_SIZE:
                prot = self.static_protections(ref_prot, lpaddr + i * lpinc, pfn, 1, 0)
            pgt.ram64[base + i] = (pfn << 12) | prot
        if self._within_direct_map(address):
            self.k.split_page_count(level)
        elif self._virt_addr_valid_highmap(address):
            self.k.split_page_count(level, highmap=True)
        pgt.set(slot, table | pgt.prot.KERNPG_TABLE)
        # Flush before changing the new PTEs (the TLB application note).
        self.k.flush_tlb_all()

    def _process_alias(self, cpa: CpaData) -> None:
        pfn = cpa.pfn
        if not (0 <= pfn < self.k.max_pfn_mapped):
            return
        vaddr = cpa.addr(cpa.curpage)
        profile = self.k.profile
        if not self._within_direct_map(vaddr):
            laddr = PAGE_OFFSET + (pfn << 12)
            alias = CpaData([laddr], cpa.numpages, cpa.mask_set, cpa.mask_clr,
                            flags=cpa.flags & ~(CpaFlags.ARRAY | CpaFlags.PAGES_ARRAY),
                            force_split=cpa.force_split)
            if profile.alias_masks_nx:
                alias.mask_clr &= ~int(F.NX)
            cpa.force_flush_all = True
            self._change_page_attr_set_clr(alias, False)
            cpa.decisions.extend(alias.decisions)
            cpa.changed.extend(alias.changed)
            cpa.flags |= alias.flags & CpaFlags.FLUSHTLB
        if not self._within_image(vaddr) and self._pfn_in_highmap(pfn):
            img = profile.image
            hva = img.text + ((pfn << 12) - img.phys_start)
            alias = CpaData([hva], cpa.numpages, cpa.mask_set, cpa.mask_clr,
                            flags=cpa.flags & ~(CpaFlags.ARRAY | CpaFlags.PAGES_ARRAY),
                            force_split=cpa.force_split)
            cpa.force_flush_all = True
            self._change_page_attr_set_clr(alias, False)
            cpa.decisions.extend(alias.decisions)
            cpa.flags |= alias.flags & CpaFlags.FLUSHTLB

    def cpa_flush(self, cpa: CpaData) -> None:
        """Per-page INVLPG up to the ceiling, else a full flush."""
        if cpa.force_flush_all or cpa.numpages > TLB_SINGLE_PAGE_FLUSH_CEILING:
            self.k.flush_tlb_all()
        else:
            for i in range(cpa.numpages):
                self.k.flush_tlb_one_kernel(cpa.addr(i))
