"""x86-64 access kernels: small guest programs that touch memory in known
patterns, written in assembly and run by :meth:`emu.Machine.run`."""

from __future__ import annotations

__all__ = ["random_loads"]


def random_loads(base: int, size: int, count: int, seed: int = 1) -> str:
    """``count`` 8-byte loads at pseudo-random aligned offsets in
    ``[base, base+size)`` (``size`` a power of two). The offsets come from a
    64-bit xorshift generator in registers, so the loop touches no memory but
    its targets. Leaves the XOR of all loaded values in rax."""
    if size & (size - 1) or size < 8:
        raise ValueError(f"size must be a power of two >= 8, not {size:#x}")
    if count <= 0:
        raise ValueError("count must be positive")
    return f"""
        mov r8, {base:#x}
        mov r9, {size - 8:#x}
        mov rcx, {count}
        mov rdx, {seed | 1:#x}
        xor eax, eax
    next:
        mov rbx, rdx
        shl rbx, 13
        xor rdx, rbx
        mov rbx, rdx
        shr rbx, 7
        xor rdx, rbx
        mov rbx, rdx
        shl rbx, 17
        xor rdx, rbx
        mov rbx, rdx
        and rbx, r9
        and rbx, -8
        xor rax, [r8 + rbx]
        dec rcx
        jnz next
    """
