"""The x86-64 kernel address map (4-level and 5-level paging, no KASLR) and
the kernel image layouts the version records (:mod:`guestkernel.versions`) use.

The module constants (``PAGE_OFFSET``, ``VMALLOC_START``, ...) are 4-level
paging's; a kernel's own map is its :class:`KernelLayout`
(``Kernel.layout``), 5-level (LA57) when booted with ``paging_levels=5``.

Debian's 6.1 build (the reference kernel, ``linux-image-6.1.0-56-amd64``):
its image layout below was read from the ELF program and section headers of
its vmlinux (``readelf -lS`` on the image unpacked from the package's
vmlinuz); ``CONFIG_RANDOMIZE_BASE=y`` makes ``KERNEL_IMAGE_SIZE`` 1 GiB, so
modules start at ``0xffffffffc0000000``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEBIAN_5_10_IMAGE",
    "DEBIAN_6_1_IMAGE",
    "DEBIAN_7_2_IMAGE",
    "LAYOUT_4LEVEL",
    "LAYOUT_5LEVEL",
    "PAGE_OFFSET",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PMD_SIZE",
    "PUD_SIZE",
    "START_KERNEL_MAP",
    "VMALLOC_END",
    "VMALLOC_START",
    "VMEMMAP_START",
    "KernelImage",
    "KernelLayout",
    "layout_for",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SIZE = 1 << 21
PUD_SIZE = 1 << 30

PAGE_OFFSET = 0xFFFF888000000000          # direct map, 64 TB
VMALLOC_START = 0xFFFFC90000000000        # vmalloc/ioremap, 32 TB
VMALLOC_END = VMALLOC_START + (32 << 40) - 1
VMEMMAP_START = 0xFFFFEA0000000000        # struct page array
START_KERNEL_map = START_KERNEL_MAP = 0xFFFFFFFF80000000  # __START_KERNEL_map


@dataclass(frozen=True)
class KernelLayout:
    """Where a kernel puts its regions for one paging mode (arch/x86/include/
    asm/page_64_types.h ``__PAGE_OFFSET_BASE_L4/L5``, pgtable_64_types.h
    ``VMALLOC_START``/``VMEMMAP_START``; Documentation/arch/x86/x86_64/mm.rst).
    With CONFIG_X86_5LEVEL (Debian's builds) the kernel picks the 5-level
    map at boot when the CPU has LA57 (QEMU's ``-cpu max``, Ice Lake and
    Zen 4 servers) and ``no5lvl`` is not given. The kernel image and module
    area sit at the same addresses in both (the top 2 GiB)."""

    paging_levels: int
    page_offset: int        # the direct map
    vmalloc_start: int
    vmalloc_end: int        # inclusive, as the kernel's VMALLOC_END
    vmemmap_start: int
    start_kernel_map: int = START_KERNEL_MAP

    @property
    def direct_map_end(self) -> int:
        """One past the direct map's region (64 TB in 4-level, 32 PB in 5-level)."""
        return self.page_offset + (1 << (46 if self.paging_levels == 4 else 55))

    @property
    def va_mask(self) -> int:
        """Linear-address bits a walk uses (48 or 57)."""
        return (1 << (9 * self.paging_levels + 12)) - 1


LAYOUT_4LEVEL = KernelLayout(4, PAGE_OFFSET, VMALLOC_START, VMALLOC_END, VMEMMAP_START)
#: __PAGE_OFFSET_BASE_L5; VMALLOC_SIZE_TB_L5 12800; VMEMMAP_START_L5
LAYOUT_5LEVEL = KernelLayout(5, 0xFF11000000000000, 0xFFA0000000000000,
                             0xFFA0000000000000 + (12800 << 40) - 1, 0xFFD4000000000000)


def layout_for(paging_levels: int) -> KernelLayout:
    """The layout for 4- or 5-level paging (anything else: ValueError)."""
    if paging_levels == 4:
        return LAYOUT_4LEVEL
    if paging_levels == 5:
        return LAYOUT_5LEVEL
    raise ValueError(f"paging levels must be 4 or 5, not {paging_levels!r}")


@dataclass(frozen=True)
class KernelImage:
    """Section boundaries of the kernel image as virtual addresses in the
    high kernel mapping (``_text`` at ``phys_start + START_KERNEL_MAP``)."""

    phys_start: int
    text: int                    # _text
    etext: int                   # _etext
    start_rodata: int            # __start_rodata
    end_rodata: int              # __end_rodata
    end_rodata_hpage_align: int  # __end_rodata_hpage_align
    sdata: int                   # _sdata
    init_begin: int              # __init_begin
    init_end: int                # __init_end
    smp_locks: int               # __smp_locks (freed by alternatives on UP)
    smp_locks_end: int           # __smp_locks_end
    bss_start: int               # __bss_start
    idt_table: int               # idt_table (made RO by idt_setup_apic_and_irq_gates)
    bss_decrypted_unused: int    # __start_bss_decrypted_unused (freed by free_initmem)
    end_bss_decrypted: int       # __end_bss_decrypted
    end_of_kernel_reserve: int   # __end_of_kernel_reserve (memblock reserves up to here)
    brk_end: int                 # _brk_end (after boot-time brk use)
    end: int                     # _end

    def pa(self, va: int) -> int:
        """``__pa_symbol``: physical address of an image address."""
        return va - self.text + self.phys_start

    def pfn_in_highmap(self, pfn: int) -> bool:
        """``__cpa_pfn_in_highmap``: ``highmap_start_pfn`` (_text) to
        ``highmap_end_pfn`` inclusive, which rounds ``_brk_end`` up to 2M:
        the free pages after the brk, in the image's last 2M page, keep
        their image alias (an RO change on one splits that page)."""
        lo = self.pa(self.text) >> 12
        hi = self.pa(-(-self.brk_end // PMD_SIZE) * PMD_SIZE - 1) >> 12
        return lo <= pfn <= hi


#: Read from the running reference kernel's /proc/kallsyms (nokaslr).
DEBIAN_6_1_IMAGE = KernelImage(
    phys_start=0x1000000,
    text=0xFFFFFFFF81000000,
    etext=0xFFFFFFFF81E01D32,
    start_rodata=0xFFFFFFFF82000000,
    end_rodata=0xFFFFFFFF828EB000,
    end_rodata_hpage_align=0xFFFFFFFF82A00000,
    sdata=0xFFFFFFFF82A00000,
    init_begin=0xFFFFFFFF83044000,
    init_end=0xFFFFFFFF83306000,
    smp_locks=0xFFFFFFFF83306000,
    smp_locks_end=0xFFFFFFFF8330F000,
    bss_start=0xFFFFFFFF83310000,
    idt_table=0xFFFFFFFF83313000,
    bss_decrypted_unused=0xFFFFFFFF84203000,
    end_bss_decrypted=0xFFFFFFFF84400000,   # .bss..decrypted is PMD-aligned
    end_of_kernel_reserve=0xFFFFFFFF84400000,
    brk_end=0xFFFFFFFF84411000,        # the brk used at boot (memblock=debug: reserve_brk)
    end=0xFFFFFFFF84430000,
)

#: Debian's 5.10.223 (linux-image-5.10.0-32-amd64), read from its
#: /proc/kallsyms under QEMU (nokaslr); brk_end from its memblock=debug boot log.
DEBIAN_5_10_IMAGE = KernelImage(
    phys_start=0x1000000,
    text=0xFFFFFFFF81000000,
    etext=0xFFFFFFFF81C01F42,
    start_rodata=0xFFFFFFFF81E00000,
    end_rodata=0xFFFFFFFF82574000,
    end_rodata_hpage_align=0xFFFFFFFF82600000,
    sdata=0xFFFFFFFF82600000,
    init_begin=0xFFFFFFFF82C11000,
    init_end=0xFFFFFFFF82EAE000,
    smp_locks=0xFFFFFFFF82EAE000,
    smp_locks_end=0xFFFFFFFF82EB6000,
    bss_start=0xFFFFFFFF82EB7000,
    idt_table=0xFFFFFFFF82EBA000,
    bss_decrypted_unused=0xFFFFFFFF83E03000,
    end_bss_decrypted=0xFFFFFFFF84000000,
    end_of_kernel_reserve=0xFFFFFFFF84000000,
    brk_end=0xFFFFFFFF8400D000,
    end=0xFFFFFFFF8402C000,
)

#: Debian's 7.2.13 (linux-binary-7.2.13+deb14-amd64), read the same way.
DEBIAN_7_2_IMAGE = KernelImage(
    phys_start=0x1000000,
    text=0xFFFFFFFF81000000,
    etext=0xFFFFFFFF822CA8E0,
    start_rodata=0xFFFFFFFF82400000,
    end_rodata=0xFFFFFFFF83163000,
    end_rodata_hpage_align=0xFFFFFFFF83200000,
    sdata=0xFFFFFFFF83200000,
    init_begin=0xFFFFFFFF839B9000,
    init_end=0xFFFFFFFF83E43000,
    smp_locks=0xFFFFFFFF83E43000,
    smp_locks_end=0xFFFFFFFF83E4F000,
    bss_start=0xFFFFFFFF83E50000,
    idt_table=0xFFFFFFFF83E54000,
    bss_decrypted_unused=0xFFFFFFFF84005000,
    end_bss_decrypted=0xFFFFFFFF84200000,
    end_of_kernel_reserve=0xFFFFFFFF84200000,
    brk_end=0xFFFFFFFF84211000,
    end=0xFFFFFFFF84230000,
)
