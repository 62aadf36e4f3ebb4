"""What every kernel mapping *should* be, kept apart from the page tables.

The validator needs an expectation that does not come from the tables it
checks. :class:`Shadow` records, per page, the attributes that the CPA
*requests* asked for (``mask_set``/``mask_clr`` applied to each page of the
range and of its aliases, with the kernel's static protections), and the
frames that vmalloc and the image mapping put behind each virtual page. It
never looks at how the tables implement them (1G, 2M or 4K leaves, split or
merged), so a policy or CPA bug that changes what a page maps to or allows
shows up as a difference.

Direct map: one ``uint8`` per PFN (numpy). vmalloc/module pages and the
kernel image: dicts keyed by virtual page (their sizes are not set by RAM).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from emu.pagetable import PteFlags as F

from .layout import PAGE_OFFSET, PAGE_SIZE, KernelImage


class CpaRequest(Protocol):
    """What the shadow reads of a CPA request (``cpa.CpaData`` is one)."""

    numpages: int
    mask_set: int
    mask_clr: int
    #: pfns whose direct-map alias the request left alone
    alias_skipped: set[int]

    def addr(self, i: int) -> int: ...

__all__ = ["S_MAPPED", "S_NX", "S_P", "S_RW", "Shadow"]

S_P, S_RW, S_NX, S_PWT, S_PCD, S_PAT, S_MAPPED = 1, 2, 4, 8, 16, 32, 64
_ATTR = S_P | S_RW | S_NX | S_PWT | S_PCD | S_PAT


_TO_SHADOW = ((F.P, S_P), (F.RW, S_RW), (F.NX, S_NX), (F.PWT, S_PWT), (F.PCD, S_PCD),
              (F.PAT, S_PAT))


_TO_SHADOW_INT = tuple((int(flag), bit) for flag, bit in _TO_SHADOW)


def to_shadow(prot: int) -> int:
    """Entry flags (4K format) -> shadow bits."""
    prot = int(prot)
    return sum(bit for flag, bit in _TO_SHADOW_INT if prot & flag)


def _masks(cpa_set: int, cpa_clr: int) -> tuple[int, int]:
    return to_shadow(cpa_set), to_shadow(cpa_clr)


class Shadow:
    """The expectation for ``max_pfn`` pages of RAM, a kernel image and the
    vmalloc space; ``alias_masks_nx``: the kernel's alias rule (see
    :class:`guestkernel.versions.KernelVersion`)."""

    def __init__(self, max_pfn: int, image: KernelImage, alias_masks_nx: bool,
                 page_offset: int = PAGE_OFFSET) -> None:
        self.max_pfn = max_pfn
        #: the direct map's base (4- or 5-level layout)
        self.page_offset = page_offset
        self.img = image
        self.alias_masks_nx = alias_masks_nx
        self.kernel_ro = False
        self.direct = np.zeros(max_pfn, dtype=np.uint8)
        self.vmap: dict[int, tuple[int, int]] = {}      # va page -> (pfn, bits)
        self.image: dict[int, int] = {}                  # high-map va page -> bits
        # Pages changed since the last validation, oldest first (dicts keep
        # insertion order; a re-touched page moves to the end).
        self.touched: dict[int, None] = {}               # direct-map pfns
        self.touched_va: dict[int, None] = {}            # vmalloc/image pages

    # -- boot ---------------------------------------------------------------

    def map_direct(self, start_pfn: int, end_pfn: int, prot: int) -> None:
        self.direct[start_pfn:end_pfn] = S_MAPPED | to_shadow(prot)

    def map_image(self, start: int, end: int, prot: int) -> None:
        bits = to_shadow(prot) | S_MAPPED
        for va in range(start, end, PAGE_SIZE):
            self.image[va] = bits

    # -- vmalloc ------------------------------------------------------------

    def map_vmalloc(self, va: int, pfns: list[int], prot: int) -> None:
        bits = to_shadow(prot) | S_MAPPED
        for i, pfn in enumerate(pfns):
            self.vmap[va + i * PAGE_SIZE] = (pfn, bits)
            self._touch_va(va + i * PAGE_SIZE)

    def unmap_vmalloc(self, va: int, npages: int) -> None:
        for i in range(npages):
            self.vmap.pop(va + i * PAGE_SIZE, None)

    def _touch_va(self, va: int) -> None:
        self.touched_va.pop(va, None)
        self.touched_va[va] = None

    # -- CPA requests -------------------------------------------------------

    def apply(self, cpa: CpaRequest, checkalias: bool, *, kernel_ro: bool) -> None:
        """Record what the request asks of every page it names and of the
        aliases the kernel changes with it (set_memory.c's alias rules);
        ``kernel_ro``: mark_rodata_ro has run."""
        self.kernel_ro = kernel_ro
        sset, sclr = _masks(cpa.mask_set, cpa.mask_clr)
        img = self.img
        for i in range(cpa.numpages):
            va = cpa.addr(i)
            pfn = self._apply_one(va, sset, sclr)
            if not checkalias or pfn is None:
                continue
            po = self.page_offset
            in_direct = po <= va < po + self.max_pfn * PAGE_SIZE
            if not in_direct and 0 <= pfn < self.max_pfn and pfn not in cpa.alias_skipped:
                # (an alias left alone: Cpa._process_alias)
                aclr = sclr & ~S_NX if self.alias_masks_nx else sclr
                self._apply_one(po + pfn * PAGE_SIZE, sset, aclr)
            in_image = img.text <= va < img.brk_end
            if not in_image and img.pfn_in_highmap(pfn):
                self._apply_one(img.text + (pfn << 12) - img.phys_start, sset, sclr)

    def _apply_one(self, va: int, sset: int, sclr: int) -> int | None:
        """Apply to one virtual page; returns its PFN (None if unmapped)."""
        po = self.page_offset
        if po <= va < po + self.max_pfn * PAGE_SIZE:
            pfn = (va - po) >> 12
            old = int(self.direct[pfn])
            if not old & S_MAPPED:
                return None
            new = self._static((old & ~sclr) | sset, va, pfn)
            self.direct[pfn] = new | S_MAPPED
            self.touched.pop(pfn, None)
            self.touched[pfn] = None
            return pfn
        if va in self.vmap:
            pfn, old = self.vmap[va]
            self.vmap[va] = (pfn, self._static((old & ~sclr) | sset, va, pfn) | S_MAPPED)
            self._touch_va(va)
            return pfn
        if va in self.image:
            img = self.img
            pfn = (va - img.text + img.phys_start) >> 12
            self.image[va] = self._static((self.image[va] & ~sclr) | sset, va, pfn) | S_MAPPED
            self._touch_va(va)
            return pfn
        return None

    def _static(self, bits: int, va: int, pfn: int) -> int:
        """static_protections at page granularity: rodata RO by PFN once the
        kernel is read-only; kernel text never NX."""
        if not bits & S_P:
            return bits & _ATTR
        img = self.img
        if self.kernel_ro:
            lo, hi = img.pa(img.start_rodata) >> 12, img.pa(img.end_rodata) >> 12
            if lo <= pfn < hi:
                bits &= ~S_RW
        if img.text <= va < img.etext:
            bits &= ~S_NX
        return bits & _ATTR

    def expected(self, va: int) -> tuple[int, int] | None:
        """(pfn, bits) the model expects at ``va``, or None if unmapped."""
        po = self.page_offset
        if po <= va < po + self.max_pfn * PAGE_SIZE:
            pfn = (va - po) >> 12
            bits = int(self.direct[pfn])
            return (pfn, bits) if bits & S_MAPPED else None
        page = va & ~(PAGE_SIZE - 1)
        if page in self.vmap:
            return self.vmap[page]
        if page in self.image:
            img = self.img
            return (page - img.text + img.phys_start) >> 12, self.image[page]
        return None
