"""The kernel's public surface as a Protocol: what policies, the validator,
ptdump and the TLB-cost tools may use of a booted kernel.

:class:`guestkernel.kernel.Kernel` satisfies it. Modules that take a kernel
type it as :class:`KernelApi` instead of importing ``Kernel``, so the
import graph stays a tree (``kernel`` imports them, never the reverse).
"""

from __future__ import annotations

from typing import Protocol

from emu import Machine

from .cpa import Cpa, CpaData
from .e820 import E820Table
from .layout import KernelLayout
from .page_alloc import BuddyAllocator
from .pgtable import KernelPageTables
from .shadow import Shadow
from .tlbflush import TlbFlush
from .users import BpfJit, Execmem, ModuleLoader, Secretmem
from .versions import KernelVersion
from .vmalloc import Vmalloc

__all__ = ["KernelApi"]


class KernelApi(Protocol):
    profile: KernelVersion
    e820: E820Table
    machine: Machine
    pgt: KernelPageTables
    shadow: Shadow
    buddy: BuddyAllocator
    cpa: Cpa
    tlb: TlbFlush
    vmalloc: Vmalloc
    execmem: Execmem
    modules: ModuleLoader
    bpf: BpfJit
    secretmem: Secretmem
    gbpages: bool
    max_pfn: int
    max_pfn_mapped: int
    boot_overcount: list[int]
    boot_direct_pages_count: list[int]
    vmstat_counters: dict[str, int]
    validation_generation: int

    @property
    def layout(self) -> KernelLayout: ...
    @property
    def paging_levels(self) -> int: ...
    @property
    def page_offset(self) -> int: ...
    @property
    def highmap_counted(self) -> list[int]: ...
    @property
    def validator_out_pfn(self) -> int: ...

    def alloc_pages(self, gfp: int, order: int = 0) -> int: ...
    def free_pages(self, pfn: int, order: int = 0) -> None: ...
    def pfn_to_virt(self, pfn: int) -> int: ...
    def lookup_address(self, va: int) -> tuple[int, int] | None: ...
    def set_memory_ro(self, addr: int, numpages: int) -> CpaData: ...
    def set_memory_rw(self, addr: int, numpages: int) -> CpaData: ...
    def set_memory_np(self, addr: int, numpages: int) -> CpaData: ...
    def set_memory_p(self, addr: int, numpages: int) -> CpaData: ...
    def set_direct_map_invalid_noflush(self, pfn: int) -> CpaData: ...
    def set_direct_map_default_noflush(self, pfn: int) -> CpaData: ...
    def flush_tlb_kernel_range(self, start: int, end: int) -> None: ...
    def validator_code_page(self) -> int: ...
    def meminfo(self) -> dict[str, int]: ...
    def vmstat(self) -> dict[str, int]: ...
