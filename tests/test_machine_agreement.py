"""The software walker, Machine.translate (the CPU's walk) and real guest
loads, stores and fetches agree on random page tables mixing 1G, 2M and 4K
leaves with P, RW, NX and US varied at every level."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu import Machine, PageFault, RunStatus
from emu import pagetable as pt
from emu.pagetable import Access, PfErr
from emu.pagetable import PteFlags as F

RAM = 64 << 20
POOL = (48 << 20, 56 << 20)       # table pages
CODE_PA = 60 << 20                # the probe code page
CODE_VA = pt.canonical(0x1FF << 39) + 0x7FE00000
DATA_SLOTS = (0x110, 0x111)       # PML4 slots the random mappings share
MACHINE = Machine(RAM)


class Tables:
    def __init__(self, m: Machine):
        self.m = m
        self.next = POOL[0]
        m.ram[POOL[0]:POOL[1]] = 0
        self.root = self.alloc()

    def alloc(self) -> int:
        pa, self.next = self.next, self.next + 4096
        return pa

    def set_path(self, va: int, level: int, leaf: int, upper: list[int]) -> None:
        """Install ``leaf`` at ``level`` for ``va``; ``upper`` holds flags for
        the non-leaf entries above it (PML4E first), applied when created."""
        table = self.root
        for i, lvl in enumerate(range(4, level, -1)):
            slot = (table >> 3) + pt.table_index(va, lvl)
            entry = int(self.m.ram64[slot])
            if not entry & F.P or pt.is_leaf(entry, lvl):
                new = self.alloc()
                self.m.ram64[slot] = new | upper[i]
                table = new
            else:
                table = entry & pt.ADDR_MASK
        self.m.ram64[(table >> 3) + pt.table_index(va, level)] = leaf


perm = st.sampled_from([F(0), F.RW, F.NX, F.RW | F.NX, F.US, F.RW | F.US, F.NX | F.US])
mapping = st.fixed_dictionaries({
    "level": st.sampled_from([1, 2, 3]),
    "slot": st.sampled_from(DATA_SLOTS),
    "i3": st.integers(0, 2), "i2": st.integers(0, 2), "i1": st.integers(0, 3),
    "present": st.booleans().map(lambda b: b or False) | st.just(True),
    "leaf_perm": perm,
    "upper": st.lists(st.sampled_from([F.P | F.RW, F.P, F.P | F.RW | F.NX, F.P | F.RW | F.US,
                                       F(0)]), min_size=3, max_size=3),
    "rsvd": st.sampled_from([False] * 5 + [True]),
    "frame": st.integers(0, 15),
})


def build(tables: Tables, spec: dict) -> int:
    level = spec["level"]
    va = pt.canonical(spec["slot"] << 39)
    va += spec["i3"] << 30
    if level <= 2:
        va += spec["i2"] << 21
    if level == 1:
        va += spec["i1"] << 12
    size = pt.level_size(level)
    # Frames inside RAM below the table pool; 1G leaves can only start at 0.
    if level == 3:
        pa = 0
    elif level == 2:
        pa = (spec["frame"] % 16) << 21
    else:
        pa = (1 << 20) + (spec["frame"] << 12)
    flags = int(spec["leaf_perm"]) | (int(F.P) if spec["present"] else 0)
    if level > 1:
        flags |= int(F.PS)
    if spec["rsvd"]:
        flags |= 1 << 44
    tables.set_path(va, level, pa | flags, [int(f) for f in spec["upper"]])
    # Probe inside guest RAM: a 1G leaf at 0 reaches far beyond 64 MiB.
    return va + {1: 0x80, 2: size // 2, 3: 0x123040}[level]


def probe(m: Machine, va: int, access: Access):
    """Execute one access at ``va``; return ('ok', value) or ('fault', Fault)."""
    if access is Access.READ:
        r = m.run("movzx eax, byte ptr [rbx]", at=CODE_VA, regs={"rbx": va})
    elif access is Access.WRITE:
        r = m.run("mov byte ptr [rbx], 0x5a", at=CODE_VA, regs={"rbx": va})
    else:
        r = m.run("jmp rbx", at=CODE_VA, regs={"rbx": va}, max_insns=2)
    if r.status is RunStatus.FAULTED:
        return "fault", r.fault
    return "ok", r


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(mapping, min_size=1, max_size=6), extra=st.integers(0, 2**20))
def test_walker_translate_and_execution_agree(specs, extra):
    m = MACHINE
    tables = Tables(m)
    tables.set_path(CODE_VA, 1, CODE_PA | F.P, [F.P | F.RW] * 3)
    vas = [build(tables, s) for s in specs]
    vas.append(pt.canonical(DATA_SLOTS[0] << 39) + (extra << 12))  # often unmapped
    m.cr3 = tables.root
    for va in vas:
        for access in Access:
            m.flush_tlb()  # agreement is about the tables, not cached translations
            soft = m.walk(va, access)
            if isinstance(soft, pt.WalkResult) and soft.pa >= RAM:
                continue  # beyond guest RAM: tested in test_machine.py
            try:
                cpu = m.translate(va, access)
            except PageFault as exc:
                cpu = exc
            if access is Access.EXEC and isinstance(soft, pt.WalkResult):
                m.ram[soft.pa] = 0xF4  # HLT: a fetch that succeeds stops there
            kind, got = probe(m, va, access)
            if isinstance(soft, pt.WalkFault):
                assert isinstance(cpu, PageFault), (hex(va), access, soft)
                assert cpu.error_code == soft.error_code
                assert kind == "fault", (hex(va), access, soft)
                assert got.vector == 14 and got.cr2 == va and got.access is access
                assert got.error_code == soft.error_code, (hex(va), access, got, soft)
                if access is not Access.EXEC:
                    assert got.rip == CODE_VA
            else:
                assert cpu == soft.pa, (hex(va), access, hex(cpu if isinstance(cpu, int) else 0))
                assert kind == "ok", (hex(va), access, got)
                if access is Access.READ:
                    assert got.regs["rax"] == m.ram[soft.pa]
                elif access is Access.WRITE:
                    assert m.ram[soft.pa] == 0x5A
                else:
                    assert got.status is RunStatus.HALTED and got.insns == 2  # jmp, hlt
                    assert got.rip == va + 1


def test_error_codes_for_each_cause():
    """The CPU's own error codes (not reconstructed) for the causes in SDM 4.7."""
    m = MACHINE
    tables = Tables(m)
    tables.set_path(CODE_VA, 1, CODE_PA | F.P, [F.P | F.RW] * 3)
    base = pt.canonical(DATA_SLOTS[0] << 39)
    tables.set_path(base + 0x1000, 1, 0x100000 | F.P | F.NX, [F.P | F.RW] * 3)
    tables.set_path(base + 0x2000, 1, 0x101000 | F.P | F.RW | (1 << 41), [F.P | F.RW] * 3)
    m.cr3 = tables.root
    expect = [
        (base + 0x3000, Access.READ, 0x00), (base + 0x3000, Access.WRITE, 0x02),
        (base + 0x3000, Access.EXEC, 0x10), (base + 0x1000, Access.WRITE, 0x03),
        (base + 0x1000, Access.EXEC, 0x11), (base + 0x2000, Access.READ, 0x09),
        (base + 0x2000, Access.WRITE, 0x0B),
    ]
    for va, access, code in expect:
        kind, fault = probe(m, va, access)
        assert kind == "fault" and fault.error_code == PfErr(code), (hex(va), access, fault)
        # Consecutive faults stay #PF: the double-fault state was reset.
        assert fault.vector == 14
