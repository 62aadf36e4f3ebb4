"""What a run of guest code reports: exceptions, faults and run results.

These types are shared by :class:`emu.Machine` and its callers; they hold no
machine state, so they live apart from the machine that produces them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .pagetable import Access, PfErr

__all__ = [
    "VECTORS",
    "AttachError",
    "Fault",
    "FaultAction",
    "FaultHandler",
    "MachineError",
    "PageFault",
    "RunResult",
    "RunStatus",
    "describe_error_code",
]

#: Exception vectors by name, for messages.
VECTORS = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 17: "#AC"}


class MachineError(RuntimeError):
    """The machine cannot do what was asked (its state is unchanged)."""


class AttachError(ValueError):
    """:func:`emu.attach` was given a Unicorn instance or a RAM buffer it
    cannot drive (raised before anything of the Unicorn instance changes)."""


def describe_error_code(code: PfErr) -> str:
    """A #PF error code in words: cause, access kind and privilege."""
    if code & PfErr.RSVD:
        cause = "reserved bit set"
    elif code & PfErr.P:
        cause = "protection violation"
    else:
        cause = "not present"
    kind = "fetch" if code & PfErr.ID else ("write" if code & PfErr.W else "read")
    return f"{cause}, {kind}, {'user' if code & PfErr.U else 'supervisor'}"


class PageFault(Exception):
    """#PF: ``va`` cannot be accessed as ``access``; ``error_code`` as the CPU pushes it."""

    def __init__(self, va: int, access: str | Access, error_code: int):
        self.va = va
        self.access = Access.parse(access)
        self.error_code = PfErr(error_code)
        super().__init__(
            f"#PF at {va:#x} on {self.access.name.lower()} "
            f"(error code {int(error_code):#x}: {describe_error_code(self.error_code)})")


class RunStatus(enum.Enum):
    COMPLETED = "completed"   # reached the end of the code (or the `until` address)
    HALTED = "halted"         # executed HLT
    FAULTED = "faulted"       # stopped at a fault (see RunResult.faults)
    MAX_INSNS = "max_insns"   # the instruction budget ran out (a guest that never stops)
    MAX_FAULTS = "max_faults"  # a fault handler kept resuming into faults


@dataclass(frozen=True)
class Fault:
    """An exception raised by guest code."""

    vector: int                  # 14 for #PF
    rip: int                     # the faulting instruction (it did not complete)
    insn: str                    # its disassembly, or '?' if its bytes are unreadable
    cr2: int | None = None       # #PF only: the faulting linear address
    access: Access | None = None  # #PF only
    error_code: PfErr | None = None  # #PF only: the CPU's own error code

    @property
    def name(self) -> str:
        return VECTORS.get(self.vector, f"vector {self.vector}")

    def __str__(self) -> str:
        if self.vector == 14:
            return (f"#PF at rip {self.rip:#x} ({self.insn}): cr2 {self.cr2:#x}, "
                    f"{self.access.name.lower()}, error code {int(self.error_code):#x} "
                    f"({describe_error_code(self.error_code)})")
        return f"{self.name} at rip {self.rip:#x} ({self.insn})"


#: What a fault handler tells run() to do next.
class FaultAction(enum.Enum):
    STOP = "stop"      # end the run with status FAULTED
    RETRY = "retry"    # re-execute the faulting instruction (the handler fixed the tables)
    SKIP = "skip"      # continue after the faulting instruction


@dataclass
class RunResult:
    status: RunStatus
    insns: int | None                  # instructions completed (None if not counted)
    faults: list[Fault] = field(default_factory=list)
    regs: dict[str, int] = field(default_factory=dict)
    tlb: object | None = None          # TLB statistics when a TLB model was attached

    @property
    def rip(self) -> int:
        return self.regs["rip"]

    @property
    def fault(self) -> Fault | None:
        return self.faults[-1] if self.faults else None


FaultHandler = Callable[[Fault], "FaultAction | str | None"]
