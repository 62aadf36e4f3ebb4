"""Operand decoding: the virtual address of an access from registers.

Unicorn's memory hooks report physical addresses. Both TLB models decode,
once per RIP, the instruction's memory operand (base, index, scale,
displacement, an absolute RIP-relative address, or an implicit stack
access) and read the registers at hook time, when they still hold the
operand's inputs. :func:`uc_reg` maps capstone's registers to Unicorn's.
"""

from __future__ import annotations

from capstone import CS_AC_READ, CS_AC_WRITE
from capstone.x86 import X86_OP_MEM, X86_REG_INVALID, X86_REG_RIP
from unicorn import x86_const as X

from .. import pagetable as pt
from ..faults import MachineError

__all__ = ["describe", "read_code", "uc_reg"]


def uc_reg(insn, reg: int) -> int:
    if reg == X86_REG_INVALID:
        return 0
    return getattr(X, f"UC_X86_REG_{insn.reg_name(reg).upper()}", 0)


_STACK_WRITE = ("push", "call")
_STACK_READ = ("pop", "ret", "leave")


def read_code(m, rip: int, n: int = 15) -> bytes:
    """Instruction bytes at ``rip`` through the software walk.

    Never ask the CPU here: this runs inside a memory hook, and a
    ``uc_vmem_translate`` there refills QEMU's TLB under the load being
    performed (a use-after-free in load_helper)."""
    out = bytearray()
    va = rip
    while len(out) < n:
        res = m.walk(va, "x")
        if isinstance(res, pt.WalkFault):
            break
        take = min(n - len(out), 4096 - (va & 0xFFF))
        try:
            out += m.phys(res.pa, take).tobytes()
        except MachineError:
            break
        va += take
    return bytes(out)


def describe(insn) -> tuple[tuple[int, int, int, int, int], tuple[int, int, int, int, int]]:
    """(read, write) operand descriptions of one instruction: (kind, base,
    index, scale, disp); kind 0 none, 1 base+index*scale+disp, 2 [rsp]
    (pop), 3 [rsp - size] (push), 4 an absolute address in disp."""
    rd = wr = (0, 0, 0, 0, 0)
    for op in insn.operands:
        if op.type != X86_OP_MEM:
            continue
        m = op.mem
        if m.segment not in (0,) and insn.reg_name(m.segment) in ("fs", "gs"):
            continue   # segment base not modelled: counted as undecoded
        if m.base == X86_REG_RIP:
            desc = (4, 0, 0, 0, (insn.address + insn.size + m.disp) & ((1 << 64) - 1))
        else:
            desc = (1, uc_reg(insn, m.base), uc_reg(insn, m.index), m.scale, m.disp)
        if op.access & CS_AC_READ and rd[0] == 0:
            rd = desc
        if op.access & CS_AC_WRITE and wr[0] == 0:
            wr = desc
    name = insn.mnemonic
    if name.startswith(_STACK_WRITE) and wr[0] == 0:
        wr = (3, 0, 0, 0, 0)
    if name.startswith(_STACK_READ) and rd[0] == 0:
        rd = (2, 0, 0, 0, 0)
    return rd, wr
