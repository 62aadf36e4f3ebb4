"""x86-64 access kernels: small guest programs that touch memory in known
patterns, written in assembly and run by :meth:`emu.Machine.run`."""

from __future__ import annotations

__all__ = ["random_loads"]


def random_loads(base: int, size: int, count: int, seed: int = 1) -> str:
    """``count`` 8-byte loads at pseudo-random aligned offsets in
    ``[base, base+size)`` (``size`` a power of two). The offsets come from a
    64-bit linear congruential generator (Knuth's MMIX constants) held in a
    register, high bits used, so the loop touches no memory but its
    targets: seven instructions per load. Leaves the XOR of all loaded
    values in rax."""
    if size & (size - 1) or size < 8:
        raise ValueError(f"size must be a power of two >= 8, not {size:#x}")
    if count <= 0:
        raise ValueError("count must be positive")
    shift = 64 - (size.bit_length() - 1)
    return f"""
        mov r8, {base:#x}
        mov r10, 6364136223846793005
        mov r11, 1442695040888963407
        mov rcx, {count}
        mov rdx, {seed:#x}
        xor eax, eax
    next:
        imul rdx, r10
        add rdx, r11
        mov rbx, rdx
        shr rbx, {shift}
        and rbx, -8
        xor rax, [r8 + rbx]
        dec rcx
        jnz next
    """
