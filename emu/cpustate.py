"""The emulated CPU's control state: paging on, and QEMU's exception state.

Unicorn hands an exception to its interrupt hook and never delivers it
through the guest IDT, so the error code the CPU computed is not pushed
anywhere, and QEMU's double-fault tracking (``old_exception``) is never
reset: the next #PF would be promoted to #DF. Both live in the CPU state
that ``uc_context_save`` copies, at offsets Unicorn does not publish.
:class:`ExceptionState` finds them from faults whose error codes are known
(raised by the machine in its own service pages) and fails loudly if the
layout of this Unicorn build differs. It works on any x86-64 ``Uc``, the
machine's own or one a user attached.
"""

from __future__ import annotations

import ctypes

import numpy as np
from unicorn import Uc
from unicorn import x86_const as X
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from .faults import MachineError

__all__ = [
    "CR0_PE",
    "CR0_PG",
    "CR0_WP",
    "CR4_LA57",
    "CR4_PAE",
    "CR4_PGE",
    "EFER_LMA",
    "EFER_LME",
    "EFER_NXE",
    "MAXPHYADDR",
    "MSR_EFER",
    "ExceptionState",
    "context_words",
    "enable_paging",
    "flush_cpu_tlb",
]

#: Physical-address width of the emulated CPUs (QEMU's TCG default).
MAXPHYADDR = 40

# Control-register bits (SDM 2.5).
CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR4_PAE, CR4_PGE, CR4_LA57 = 1 << 5, 1 << 7, 1 << 12
MSR_EFER = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


def enable_paging(uc: Uc, root: int, levels: int = 4) -> None:
    """Long mode with 4-level paging (5-level with ``levels=5``: CR4.LA57),
    NX and global pages, CR0.WP set; CR3 = ``root``."""
    uc.reg_write(X.UC_X86_REG_CR3, root)
    la57 = CR4_LA57 if levels == 5 else 0
    uc.reg_write(X.UC_X86_REG_CR4, (uc.reg_read(X.UC_X86_REG_CR4) & ~CR4_LA57)
                 | CR4_PAE | CR4_PGE | la57)
    uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, EFER_LME | EFER_LMA | EFER_NXE))
    uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | CR0_PE | CR0_PG | CR0_WP)


def flush_cpu_tlb(uc: Uc) -> None:
    """Drop every translation QEMU caches, global ones included (the
    binding has no wrapper for UC_CTL_TLB_FLUSH)."""
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)


def context_words(uc: Uc) -> np.ndarray:
    """The CPU state ``uc_context_save`` copies, as int32 words."""
    ctx = uc.context_save()
    return np.frombuffer(ctypes.string_at(ctx.context, ctx.size), np.int32).copy()


class ExceptionState:
    """Where the #PF error code and ``old_exception`` sit in a saved context."""

    def __init__(self, uc: Uc, err_off: int, old_exc_off: int):
        self._uc = uc
        self.err_off = err_off
        self.old_exc_off = old_exc_off

    @classmethod
    def locate(cls, uc: Uc, clean: np.ndarray, snapshots: list[np.ndarray],
               expected: list[int]) -> ExceptionState:
        """From the context before any fault (``clean``) and one snapshot per
        #PF raised with error code ``expected[i]``: the error code is the
        word equal to every expected code, ``old_exception`` the word that
        was -1 and is 14 after each #PF."""
        snaps = np.stack(snapshots)
        want = np.array(expected, np.int32)[:, None]
        err_at = np.flatnonzero((snaps == want).all(axis=0))
        old_at = np.flatnonzero((clean == -1) & (snaps == 14).all(axis=0))
        if len(err_at) != 1 or len(old_at) != 1:
            raise MachineError(
                "cannot locate the #PF error code and old_exception in Unicorn's saved CPU "
                f"state (candidates: {len(err_at)}, {len(old_at)}); this Unicorn build's "
                "layout differs from 2.1.x")
        return cls(uc, int(err_at[0]) * 4, int(old_at[0]) * 4)

    def error_code(self) -> int:
        """The error code of the exception the CPU just raised."""
        ctx = self._uc.context_save()
        return ctypes.c_int32.from_address(ctx.context.value + self.err_off).value

    def reset(self) -> None:
        """Do what delivering the exception would: old_exception = -1, so the
        next fault is not taken for a fault during delivery (#DF)."""
        ctx = self._uc.context_save()
        ctypes.c_int32.from_address(ctx.context.value + self.old_exc_off).value = -1
        self._uc.context_restore(ctx)
