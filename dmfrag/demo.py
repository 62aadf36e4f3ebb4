"""`make demo`: the emulated machine at work.

Boots an emu.Machine, maps RAM at the direct-map address with 1G, 2M and 4K
pages, runs a small x86-64 program that loads a tagged word through each
mapping and stores through one, then prints what the program read and the
translation the CPU used for each address (page size from the tables, the
physical address from the CPU's own walk), and a #PF it took on purpose.
"""

from __future__ import annotations

from emu import Machine, RunStatus
from emu.builder import PageTableBuilder
from emu.pagetable import PteFlags as F

GiB, MiB = 1 << 30, 1 << 20
PAGE_OFFSET = 0xFFFF888000000000
CODE_VA = 0xFFFFFFFF81000000


def main() -> None:
    m = Machine(4 * GiB)
    print(m)
    b = PageTableBuilder(m, 3 * GiB + 512 * MiB, 3 * GiB + 520 * MiB)
    rw_nx = F.P | F.RW | F.NX
    # Direct map: 0-2M with 4K pages, 2M-1G with 2M pages, 1G-3G with 1G pages;
    # one 4K page inside the 4K range is read-only.
    b.map(PAGE_OFFSET, 0, 2 * MiB, 4096, rw_nx)
    b.map(PAGE_OFFSET + 2 * MiB, 2 * MiB, GiB - 2 * MiB, 2 * MiB, rw_nx)
    b.map(PAGE_OFFSET + GiB, GiB, 2 * GiB, GiB, rw_nx)
    b.map(CODE_VA, 3 * GiB + 530 * MiB, 4096, 4096, F.P)  # kernel text: RO+X
    ro = PAGE_OFFSET + 0x5000
    slot, _ = b.leaf_slot(ro)
    m.ram64[slot] = 0x5000 | F.P | F.NX
    m.cr3 = b.root
    print(f"CR3 = {m.cr3:#x}; {len(b.tables)} table pages built")

    targets = {"4K": PAGE_OFFSET + 0x1000, "2M": PAGE_OFFSET + 700 * MiB + 0x48,
               "1G": PAGE_OFFSET + 2 * GiB + 0x1234560}
    for i, va in enumerate(targets.values()):
        pa = va - PAGE_OFFSET
        m.ram64[pa >> 3] = 0xD1AE0000 + i  # a tag per target
    code = """
        mov rax, [rdi]
        mov rbx, [rsi]
        mov rcx, [rdx]
        mov qword ptr [rsi + 8], rax
        mov qword ptr [r8], rax
        mov r9, 1
    """
    r = m.run(code, at=CODE_VA, on_fault="skip",
              regs={"rdi": targets["4K"], "rsi": targets["2M"], "rdx": targets["1G"], "r8": ro})
    assert r.status is RunStatus.COMPLETED, r
    print(f"\nran {r.insns} instructions at {CODE_VA:#x}: status {r.status.value}")
    for (size, va), reg in zip(targets.items(), ("rax", "rbx", "rcx")):
        walk = m.walk(va)
        print(f"  {reg} = {r.regs[reg]:#x} loaded from {va:#x} -> pa {m.translate(va):#x} "
              f"({size} page, leaf entry {walk.leaf:#018x})")
    stored = int(m.ram64[(targets['2M'] - PAGE_OFFSET + 8) >> 3])
    print(f"  store through the 2M page landed at pa {targets['2M'] - PAGE_OFFSET + 8:#x}: {stored:#x}")
    for f in r.faults:
        print(f"  fault (skipped): {f}")


if __name__ == "__main__":
    main()
