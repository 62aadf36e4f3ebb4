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


def pointer_chase(nodes: list[int], rounds: int) -> str:
    """Follow a ring of pointers ``rounds`` times. ``nodes`` are the virtual
    addresses of the objects; :func:`link_ring` writes the ring into RAM.
    Ends with the last node's address in rax."""
    if not nodes or rounds <= 0:
        raise ValueError("pointer_chase needs nodes and a positive round count")
    return f"""
        mov rax, {nodes[0]:#x}
        mov rcx, {rounds * len(nodes)}
    chase:
        mov rax, [rax]
        dec rcx
        jnz chase
    """


def link_ring(write_qword, nodes: list[int], translate) -> None:
    """Write node i's pointer to node i+1 (the last to the first) through
    ``translate(va) -> pa`` and ``write_qword(pa, value)``."""
    for i, va in enumerate(nodes):
        write_qword(translate(va), nodes[(i + 1) % len(nodes)])


def stream_copy(table_va: int, npages: int, rounds: int = 1) -> str:
    """Copy ``npages`` pages: the table at ``table_va`` holds (src, dst)
    virtual page addresses, 16 bytes per pair; each page moves with
    ``rep movsq`` (512 quadwords)."""
    if npages <= 0 or rounds <= 0:
        raise ValueError("stream_copy needs pages and rounds")
    return f"""
        mov r9, {rounds}
    again:
        mov r8, {table_va:#x}
        mov r10, {npages}
    page:
        mov rsi, [r8]
        mov rdi, [r8 + 8]
        mov rcx, 512
        rep movsq
        add r8, 16
        dec r10
        jnz page
        dec r9
        jnz again
    """


def fetch_chain_stub(next_va: int | None) -> str:
    """The code planted at the start of each text page for :func:`fetch_chain`:
    jump to the next page; the last page returns."""
    if next_va is None:
        return "ret"
    return f"mov rax, {next_va:#x}\njmp rax"


def fetch_chain(first_va: int, rounds: int) -> str:
    """Call into a chain of text pages (each holding :func:`fetch_chain_stub`)
    ``rounds`` times: instruction fetch across module text. Needs a stack."""
    if rounds <= 0:
        raise ValueError("fetch_chain needs a positive round count")
    return f"""
        mov r9, {rounds}
    top:
        mov rax, {first_va:#x}
        call rax
        dec r9
        jnz top
    """
