"""emu: an x86-64 machine with real page tables, run by Unicorn.

Hardware only: guest RAM, the CPU with CR3 and 4-level paging, entry
encoding, TLB model, access kernels. It knows nothing of Linux.

``Machine(ram_bytes)`` makes its own Unicorn instance; ``attach(uc, ram)``
drives one the caller made (paging on, the same API), so emu works as a
plugin on a user's own Unicorn set-up.
"""

from . import pagetable
from .asm import AssemblyError, assemble, disasm
from .faults import (
    AttachError,
    Fault,
    FaultAction,
    MachineError,
    PageFault,
    RunResult,
    RunStatus,
)
from .machine import CPU_MODELS, Machine, attach
from .pagetable import Access, Level, PfErr, PteFlags

__all__ = [
    "CPU_MODELS",
    "Access",
    "AssemblyError",
    "AttachError",
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
    "attach",
    "disasm",
    "pagetable",
]
