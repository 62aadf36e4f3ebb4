"""emu: an x86-64 machine with real page tables, run by Unicorn.

Hardware only: guest RAM, the CPU with CR3 and 4-level paging, entry
encoding, TLB model, access kernels. It knows nothing of Linux.
"""

from . import pagetable
from .asm import AssemblyError, assemble, disasm
from .machine import (
    CPU_MODELS,
    Fault,
    FaultAction,
    Machine,
    MachineError,
    PageFault,
    RunResult,
    RunStatus,
)
from .pagetable import Access, Level, PfErr, PteFlags

__all__ = [
    "CPU_MODELS",
    "Access",
    "AssemblyError",
    "Fault",
    "FaultAction",
    "Level",
    "Machine",
    "MachineError",
    "PageFault",
    "PfErr",
    "PteFlags",
    "RunResult",
    "RunStatus",
    "assemble",
    "disasm",
    "pagetable",
]
