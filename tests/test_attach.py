"""emu.attach: emu as a plugin on a Unicorn instance and RAM buffer the user made.

The test plays the user: it creates its own Uc and buffer, maps it, attaches,
builds tables, writes code and runs it with its own ``uc.emu_start``.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import mmap

import numpy as np
import pytest
from unicorn import (
    UC_ARCH_ARM,
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INTR,
    UC_MODE_32,
    UC_MODE_64,
    UC_MODE_ARM,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as X

import emu
from emu import AttachError, PageFault, RunStatus
from emu.asm import assemble
from emu.builder import PageTableBuilder
from emu.pagetable import PfErr
from emu.pagetable import PteFlags as F
from emu.tlb import PyTlb, TlbModel

MiB = 1 << 20
RAM = 16 * MiB
DM = 0xFFFF888000000000          # RAM mapped RW+NX with 4K pages
CODE = 0xFFFFFFFF81000000        # one executable 4K page
CODE_OFF = 10 * MiB              # its offset in RAM
DATA_OFF = 1 * MiB               # where the loads read
POOL = (12 * MiB, 16 * MiB)      # table pages (offsets in RAM)
N = 10                           # distinct 4K pages loaded


def host_address(buf) -> int:
    if isinstance(buf, np.ndarray):
        return buf.ctypes.data
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def make_buffer(kind: str):
    if kind == "mmap":
        return mmap.mmap(-1, RAM)
    if kind == "bytearray":
        return bytearray(RAM)
    return np.zeros(RAM // 8, np.uint64)


def user_uc(buf, base: int = 0) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(base, RAM, UC_PROT_ALL, host_address(buf))
    return uc


def setup(kind: str, base: int = 0):
    """What a user does: a Uc, a buffer, attach, tables, code, data."""
    buf = make_buffer(kind)
    uc = user_uc(buf, base)
    m = emu.attach(uc, buf, base=base)
    b = PageTableBuilder(m, base + POOL[0], base + POOL[1])
    b.map(DM, base, 8 * MiB, 4096, F.P | F.RW | F.NX)
    b.map(CODE, base + CODE_OFF, 4096, 4096, F.P)
    m.cr3 = b.root
    code = assemble("\n".join(f"mov rax, [rbx + {i * 4096}]\nadd rcx, rax" for i in range(N)),
                    CODE)
    raw = memoryview(buf).cast("B")
    raw[CODE_OFF: CODE_OFF + len(code)] = code
    for i in range(N):
        at = DATA_OFF + i * 4096
        raw[at: at + 8] = (i + 1).to_bytes(8, "little")
    return uc, m, buf, code


def user_run(uc: Uc, code: bytes) -> int:
    uc.reg_write(X.UC_X86_REG_RBX, DM + DATA_OFF)
    uc.reg_write(X.UC_X86_REG_RCX, 0)
    uc.emu_start(CODE, CODE + len(code))
    return uc.reg_read(X.UC_X86_REG_RCX)


@pytest.mark.parametrize("kind", ["mmap", "bytearray", "numpy"])
def test_the_users_own_emu_start_runs_with_paging(kind):
    uc, m, buf, code = setup(kind)
    assert user_run(uc, code) == N * (N + 1) // 2
    assert m.translate(DM + DATA_OFF + 5) == DATA_OFF + 5
    assert m.translate(CODE, "x") == CODE_OFF
    with pytest.raises(PageFault) as exc:
        m.translate(CODE, "w")
    assert exc.value.error_code == PfErr.P | PfErr.W
    # m.ram is the user's buffer, zero-copy, both ways.
    m.ram64[DATA_OFF // 8] = 0x1234
    assert memoryview(buf).cast("B")[DATA_OFF: DATA_OFF + 2].tobytes() == b"\x34\x12"
    assert m.read_virt(DM + DATA_OFF, 2) == b"\x34\x12"
    # The machine's own services work on the user's Uc.
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": DM + DATA_OFF})
    assert r.status is RunStatus.COMPLETED and r.regs["rax"] == 0x1234
    m.invlpg(DM + DATA_OFF)
    m.flush_tlb()
    assert m.stats["invlpg"] == 1 and m.stats["invlpg_full_fallback"] == 0
    assert m.walk(DM + DATA_OFF).pa == DATA_OFF


@pytest.mark.parametrize("cls", [TlbModel, PyTlb])
def test_the_tlb_model_counts_the_users_own_run(cls):
    uc, m, _buf, code = setup("mmap")
    m.tlb = cls("skylake")
    assert user_run(uc, code) == N * (N + 1) // 2
    c = m.tlb.raw_counters()
    # N distinct 4K pages, each loaded once: N loads, N L1 misses, N walks;
    # one block on one code page: one fetch, one ITLB walk.
    assert (c["loads"], c["l1_miss_load"], c["walk_load"], c["walk_4k_load"]) == (N, N, N, N)
    assert (c["stores"], c["fetches"], c["walk_fetch"], c["walk_4k_fetch"]) == (0, 1, 1, 1)
    assert c["undecoded"] == 0 and c["walk_faults"] == 0
    # The walk into the data pages shares its PML4E/PDPTE/PDE after the
    # first: 4 entries, then 1 (PDE cache hit) each; the code walk reads 4.
    assert c["walk_mem_refs"] == 4 + (N - 1) * 1 + 4
    s = m.tlb.counters()
    assert s == m.tlb.stats()
    assert s["dtlb_load_misses.walk_completed"] == N
    assert s["dtlb_load_misses.walk_completed_4k"] == N
    assert s["itlb_misses.walk_completed"] == 1
    # A second run hits in the L1 DTLB everywhere.
    m.tlb.reset_counters()
    user_run(uc, code)
    c = m.tlb.raw_counters()
    assert (c["loads"], c["walk_load"], c["l1_miss_load"]) == (N, 0, 0)
    # m.invlpg reaches the model; the stub run itself is not counted.
    m.tlb.reset_counters()
    m.invlpg(DM + DATA_OFF)
    assert m.tlb.raw_counters()["fetches"] == 0
    user_run(uc, code)
    assert m.tlb.raw_counters()["walk_load"] == 1
    # Detached: the user's runs are no longer counted.
    t, m.tlb = m.tlb, None
    t.reset_counters()
    user_run(uc, code)
    assert t.raw_counters()["loads"] == 0


def test_dropping_the_machine_unhooks_the_model():
    """The user keeps only the Uc: the model's native hooks, which point
    into the model's memory, go with the machine."""
    uc, m, _buf, code = setup("bytearray")
    m.tlb = TlbModel("skylake")
    del m
    gc.collect()
    assert user_run(uc, code) == N * (N + 1) // 2


def test_one_model_observes_one_machine():
    _uc, m1, _buf1, _code = setup("bytearray")
    _uc2, m2, _buf2, _code2 = setup("mmap")
    t = TlbModel("skylake")
    m1.tlb = t
    with pytest.raises(ValueError, match="another machine"):
        m2.tlb = t
    assert m2.tlb is None
    m1.tlb = None
    m2.tlb = t
    assert m2.tlb is t


def test_the_c_model_and_the_python_twin_agree_on_a_user_run():
    runs = []
    for cls in (TlbModel, PyTlb):
        uc, m, _buf, code = setup("bytearray")
        m.tlb = cls("skylake")
        user_run(uc, code)
        m.run("mov rax, [rbx]\nmov [rbx + 8], rax", at=CODE, regs={"rbx": DM + 3 * MiB})
        runs.append(m.tlb.raw_counters())
    assert runs[0] == runs[1]


def test_ram_at_a_physical_base_other_than_zero():
    base = 256 * MiB
    uc, m, _buf, code = setup("numpy", base=base)
    assert m.ram_base == base and m.ram_bytes == RAM
    assert user_run(uc, code) == N * (N + 1) // 2
    assert m.translate(DM + DATA_OFF) == base + DATA_OFF
    assert m.walk(DM + DATA_OFF).pa == base + DATA_OFF
    assert m.phys(base + DATA_OFF, 8).view(np.uint64)[0] == 1
    m.tlb = TlbModel("skylake")
    user_run(uc, code)
    c = m.tlb.raw_counters()
    assert (c["walk_load"], c["walk_faults"], c["walk_mem_refs"]) == (N, 0, 4 + N - 1 + 4)
    with pytest.raises(ValueError, match="inside guest RAM"):
        m.cr3 = 0


def test_the_users_code_hook_still_fires():
    uc, m, _buf, code = setup("mmap")
    seen: list[int] = []
    uc.hook_add(UC_HOOK_CODE, lambda _uc, address, _size, _ud: seen.append(address),
                begin=CODE, end=CODE + 4095)
    m.tlb = TlbModel("skylake")
    user_run(uc, code)
    assert len(seen) == 2 * N and seen[0] == CODE
    seen.clear()
    r = m.run("nop\nnop", at=CODE)
    assert r.status is RunStatus.COMPLETED and seen == [CODE, CODE + 1]


def test_the_machines_hook_api():
    uc, m, _buf, code = setup("bytearray")
    seen: list[int] = []
    h = m.hook_add(UC_HOOK_CODE, lambda _uc, address, _size, ud: seen.append(ud),
                   user_data=7)
    user_run(uc, code)
    assert seen == [7] * (2 * N)
    m.hook_del(h)
    user_run(uc, code)
    assert len(seen) == 2 * N


def test_a_fault_in_the_users_run():
    uc, m, buf, _code = setup("mmap")
    load = assemble("mov rax, [rbx]", CODE)
    memoryview(buf).cast("B")[CODE_OFF: CODE_OFF + len(load)] = load
    uc.ctl_flush_tb()
    unmapped = 0xFFFF880000000000
    uc.reg_write(X.UC_X86_REG_RBX, unmapped)
    # No hook of the user's: plain Unicorn behaviour.
    with pytest.raises(UcError):
        uc.emu_start(CODE, CODE + len(load))
    # The machine's next run still sees a #PF, not a #DF.
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": unmapped})
    assert r.fault.vector == 14 and r.fault.cr2 == unmapped
    # A user's interrupt hook gets the CPU's error code from take_fault.
    faults = []

    def on_intr(u, intno, _ud):
        faults.append(m.take_fault(intno))
        u.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    for _ in range(3):
        uc.emu_start(CODE, CODE + len(load))
    assert [(f.vector, f.cr2, f.error_code) for f in faults] == [(14, unmapped, PfErr(0))] * 3


def test_the_service_pages_avoid_the_users_regions():
    buf = mmap.mmap(-1, RAM)
    uc = user_uc(buf)
    top = (1 << 40) - MiB
    uc.mem_map(top, MiB)                    # the user took the top of the space
    m = emu.attach(uc, buf)
    assert m.service_base + 32 * 1024 <= top
    regions = sorted(uc.mem_regions())
    for (_b0, e0, _), (b1, _e1, _) in itertools.pairwise(regions):
        assert e0 < b1


def test_machine_is_a_uc_made_and_attached():
    m = emu.Machine(RAM)
    assert m.service_base == (1 << 40) - 32 * 1024
    assert m.ram_base == 0 and m.cpu == "skylake-server"
    # The machine's memory lives as long as its Uc.
    uc = m.uc
    del m
    gc.collect()
    assert uc.mem_read(0, 4) == b"\0\0\0\0"


# -- errors -----------------------------------------------------------------

def regions_and_cr3(uc: Uc):
    return sorted(uc.mem_regions()), uc.reg_read(X.UC_X86_REG_CR3), uc.reg_read(X.UC_X86_REG_CR0)


def test_a_32_bit_uc_is_refused():
    buf = bytearray(RAM)
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map_ptr(0, RAM, UC_PROT_ALL, host_address(buf))
    before = sorted(uc.mem_regions())
    with pytest.raises(AttachError, match="x86-64"):
        emu.attach(uc, buf)
    assert sorted(uc.mem_regions()) == before


def test_an_arm_uc_is_refused():
    with pytest.raises(AttachError, match="x86-64"):
        emu.attach(Uc(UC_ARCH_ARM, UC_MODE_ARM), bytearray(RAM))


def test_an_unmapped_buffer_is_refused():
    buf = bytearray(RAM)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    before = regions_and_cr3(uc)
    with pytest.raises(AttachError, match="not mapped"):
        emu.attach(uc, buf)
    assert regions_and_cr3(uc) == before
    # Mapped, but at another base than the one given.
    uc.mem_map_ptr(0, RAM, UC_PROT_ALL, host_address(buf))
    before = regions_and_cr3(uc)
    with pytest.raises(AttachError, match="not mapped"):
        emu.attach(uc, buf, base=64 * MiB)
    assert regions_and_cr3(uc) == before


def test_a_buffer_other_than_the_mapped_one_is_refused():
    mapped, other = bytearray(RAM), bytearray(RAM)
    uc = user_uc(mapped)
    before = regions_and_cr3(uc)
    with pytest.raises(AttachError, match="not the memory"):
        emu.attach(uc, other)
    assert regions_and_cr3(uc) == before
    assert other == bytearray(RAM) and mapped == bytearray(RAM)


@pytest.mark.parametrize("buf", [bytes(RAM), mmap.mmap(-1, RAM, prot=mmap.PROT_READ)],
                         ids=["bytes", "readonly-mmap"])
def test_a_read_only_buffer_is_refused(buf):
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    with pytest.raises(AttachError, match="read-only"):
        emu.attach(uc, buf)
    assert list(uc.mem_regions()) == []


def test_bad_arguments_are_value_errors():
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    cases = [(object(), bytearray(4096), 0), (uc, bytearray(100), 0), (uc, [0] * 4096, 0),
             (uc, bytearray(4096), 123)]
    for who, ram, base in cases:
        with pytest.raises(ValueError):
            emu.attach(who, ram, base=base)
