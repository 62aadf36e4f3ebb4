"""emu.Machine: construction, CR3, cached translations, run() behaviour, bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from emu import (
    AssemblyError,
    FaultAction,
    Machine,
    MachineError,
    PageFault,
    RunStatus,
)
from emu.builder import PageTableBuilder
from emu.pagetable import Access, PfErr
from emu.pagetable import PteFlags as F

DM = 0xFFFF888000000000          # where these tests map RAM
CODE = 0xFFFFFFFF81000000        # an executable 4K page
RW_NX = F.P | F.RW | F.NX


@pytest.fixture()
def m() -> Machine:
    """16 MiB: 0-8M mapped RW+NX with 4K pages at DM, a code page at CODE."""
    m = Machine(16 << 20)
    b = PageTableBuilder(m, 12 << 20, 16 << 20)
    b.map(DM, 0, 8 << 20, 4096, RW_NX)
    b.map(CODE, 10 << 20, 4096, 4096, F.P)
    m.cr3 = b.root
    m.builder = b
    return m


def pte_slot(m: Machine, va: int) -> int:
    """Index in m.ram64 of the 4K PTE mapping va."""
    slot, level = m.builder.leaf_slot(va)
    assert level == 1
    return slot


def load(m: Machine, va: int) -> int:
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": va})
    assert r.status is RunStatus.COMPLETED, r
    return r.regs["rax"]


def test_ram_is_a_zero_copy_view(m):
    m.ram[0x5008:0x5010] = list(b"ABCDEFGH")
    assert load(m, DM + 0x5008) == int.from_bytes(b"ABCDEFGH", "little")
    r = m.run("mov qword ptr [rbx], rcx", at=CODE, regs={"rbx": DM + 0x6000, "rcx": 0x1122334455667788})
    assert r.status is RunStatus.COMPLETED
    assert int(m.ram64[0x6000 // 8]) == 0x1122334455667788


def test_initial_state_is_long_mode_with_paging(m):
    from unicorn import x86_const as X
    assert m.uc.reg_read(X.UC_X86_REG_CR0) & 0x80010001 == 0x80010001     # PG WP PE
    assert m.uc.reg_read(X.UC_X86_REG_CR4) & 0xA0 == 0xA0                 # PAE PGE
    assert m.uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080) & 0xD00 == 0xD00   # LME LMA NXE


def test_fresh_machine_maps_nothing():
    m = Machine(1 << 20)
    assert m.cr3 >= m.ram_bytes  # the machine's own empty PML4, outside RAM
    with pytest.raises(PageFault) as exc:
        m.translate(0xFFFF888000000000)
    assert exc.value.error_code == PfErr(0)


def test_stale_translation_until_invlpg(m):
    m.ram[0x7000] = 0x11
    m.ram[0x9000] = 0x99
    assert load(m, DM + 0x7000) == 0x11
    slot = pte_slot(m, DM + 0x7000)
    m.ram64[slot] = 0x9000 | RW_NX              # remap without a flush
    assert load(m, DM + 0x7000) & 0xFF == 0x11  # the CPU still uses the old one
    assert m.translate(DM + 0x7000) == 0x7000   # so does its translation
    assert m.walk(DM + 0x7000).pa == 0x9000     # the tables say otherwise
    m.invlpg(DM + 0x8000)                       # another page: no effect
    assert load(m, DM + 0x7000) & 0xFF == 0x11
    m.invlpg(DM + 0x7000)
    assert load(m, DM + 0x7000) & 0xFF == 0x99
    assert m.stats["invlpg"] == 2 and m.stats["invlpg_full_fallback"] == 0


def test_stale_unmap_until_flush(m):
    assert load(m, DM + 0x3000) == 0
    m.ram64[pte_slot(m, DM + 0x3000)] = 0       # unmap without a flush
    assert load(m, DM + 0x3000) == 0            # stale: still readable
    m.flush_tlb()
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": DM + 0x3000})
    assert r.status is RunStatus.FAULTED
    assert (r.fault.cr2, r.fault.error_code) == (DM + 0x3000, PfErr(0))


def test_cr3_load_drops_translations(m):
    m.ram[0x4000] = 0x44
    assert load(m, DM + 0x4000) == 0x44
    m.ram64[pte_slot(m, DM + 0x4000)] = 0x9000 | RW_NX
    m.ram[0x9000] = 0x99
    m.cr3 = m.cr3
    assert load(m, DM + 0x4000) & 0xFF == 0x99


def test_invlpg_leaves_no_trace_of_its_stub(m):
    m.invlpg(DM)
    stub_va = 0xFFFF800000000000   # the slot borrowed for the stub
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": stub_va + 0xFF8})
    assert r.status is RunStatus.FAULTED and r.fault.error_code == PfErr(0)
    pml4 = m.ram64[m.cr3 >> 3: (m.cr3 >> 3) + 512]
    assert int(pml4[0x100]) == 0


def test_run_faults_skip_retry_and_budget(m):
    ro = DM + 0x2000
    m.ram64[pte_slot(m, ro)] = 0x2000 | F.P | F.NX
    m.flush_tlb()
    code = "mov rax, [rbx]\nmov [rbx], rax\nmov [rbx], rax\nmov rcx, 7"
    r = m.run(code, at=CODE, regs={"rbx": ro})
    assert r.status is RunStatus.FAULTED and r.insns == 1
    f = r.fault
    assert (f.cr2, f.rip, f.error_code) == (ro, CODE + 3, PfErr.P | PfErr.W)
    assert f.insn == "mov qword ptr [rbx], rax"
    r = m.run(code, at=CODE, regs={"rbx": ro}, on_fault="skip")
    assert r.status is RunStatus.COMPLETED and len(r.faults) == 2 and r.regs["rcx"] == 7
    assert r.insns == 2

    def fix(fault):
        m.ram64[pte_slot(m, fault.cr2)] |= int(F.RW)
        m.invlpg(fault.cr2)
        return FaultAction.RETRY
    r = m.run(code, at=CODE, regs={"rbx": ro}, on_fault=fix)
    assert r.status is RunStatus.COMPLETED and len(r.faults) == 1 and r.insns == 4


def test_never_ending_guest_stops_at_budget(m):
    r = m.run("again: jmp again", at=CODE, max_insns=5000)
    assert r.status is RunStatus.MAX_INSNS and r.insns == 5000


def test_handler_that_never_fixes_is_bounded(m):
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": DM + (9 << 20)},
              on_fault=lambda f: "retry", max_faults=10)
    assert r.status is RunStatus.MAX_FAULTS and len(r.faults) == 10


def test_exception_in_callback_is_reraised_and_machine_stays_usable(m):
    def boom(fault):
        raise KeyError("handler bug")
    with pytest.raises(KeyError, match="handler bug"):
        m.run("mov rax, [rbx]", at=CODE, regs={"rbx": DM + (9 << 20)}, on_fault=boom)
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": DM + (9 << 20)})
    assert r.fault.vector == 14          # not promoted to #DF
    assert load(m, DM) == 0


def test_other_exceptions(m):
    r = m.run("ud2", at=CODE)
    assert (r.status, r.fault.vector, r.fault.name) == (RunStatus.FAULTED, 6, "#UD")
    r = m.run("xor ecx, ecx\ndiv rcx", at=CODE)
    assert (r.fault.vector, r.fault.rip) == (0, CODE + 2)
    r = m.run("mov rax, [rbx]", at=CODE, regs={"rbx": 1 << 63})   # non-canonical
    assert r.fault.vector == 13
    r = m.run("mov rax, 5\nhlt\nmov rax, 6", at=CODE)
    assert r.status is RunStatus.HALTED and r.regs["rax"] == 5 and r.insns == 2


def test_access_beyond_ram_is_a_clear_error(m):
    m.builder.map(DM + (1 << 30), 1 << 30, 1 << 30, 1 << 30, RW_NX)  # 1G past 16M RAM
    with pytest.raises(MachineError, match="outside guest RAM"):
        m.run("mov rax, [rbx]", at=CODE, regs={"rbx": DM + (1 << 30) + (64 << 20)})
    assert load(m, DM) == 0


@pytest.mark.parametrize("size, match", [
    (4095, "multiple of 4 KiB"), (0, "multiple of 4 KiB"), (-4096, "multiple of 4 KiB"),
    (1 << 41, "40 bits"),
])
def test_bad_ram_size(size, match):
    with pytest.raises(ValueError, match=match):
        Machine(size)


def test_ram_the_host_cannot_reserve():
    # Within the CPU's reach but beyond what this process may reserve: lower
    # the address-space limit in a child so that the failure is certain.
    script = textwrap.dedent("""
        import resource
        from emu import Machine
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        try:
            Machine(64 << 30)
        except ValueError as e:
            print("ERR", e)
        m = Machine(16 << 20)   # the process is still fine
        print("OK", m.ram_bytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "ERR cannot reserve" in out.stdout and "ENOMEM" in out.stdout
    assert "OK 16777216" in out.stdout


def test_bad_cpu_and_types():
    with pytest.raises(ValueError, match="unknown cpu 'pentium9'"):
        Machine(1 << 20, cpu="pentium9")
    with pytest.raises(TypeError):
        Machine("1G")


def test_bad_cr3_leaves_state(m):
    before = m.cr3
    for bad in (0x1234, m.ram_bytes, -4096, 1 << 45):
        with pytest.raises(ValueError, match="CR3"):
            m.cr3 = bad
    assert m.cr3 == before and load(m, DM) == 0


def test_bad_assembly_names_the_line(m):
    with pytest.raises(AssemblyError, match=r"line 2: 'movv rax, 1'"):
        m.run("nop\nmovv rax, 1\nnop", at=CODE)
    with pytest.raises(AssemblyError, match=r"line 3: .*undefined symbol 'nowhere'"):
        m.run("top: nop\njmp top\njmp nowhere", at=CODE)
    assert load(m, DM) == 0


def test_code_must_go_to_mapped_executable_pages(m):
    before = m.ram[0:4096].copy()
    with pytest.raises(MachineError, match="not mapped executable"):
        m.run("nop", at=DM)                       # NX
    with pytest.raises(MachineError, match="not mapped executable"):
        m.run("nop", at=DM + (9 << 20))           # not present
    with pytest.raises(MachineError, match="not mapped executable"):
        m.run(b"\x90" * 8, at=CODE + 4092)        # runs off the code page
    assert (m.ram[0:4096] == before).all()
    assert int(m.ram[(10 << 20) + 4092]) == 0     # nothing half-written


def test_bad_registers(m):
    with pytest.raises(ValueError, match="unknown or unsettable register 'rzz'"):
        m.run("nop", at=CODE, regs={"rzz": 1})
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        m.run("nop", at=CODE, regs={"rax": 1 << 64})


def test_translate_many_matches_translate(m):
    import numpy as np
    vas = np.array([DM, DM + 0x1234, DM + (9 << 20), CODE], dtype=np.uint64)
    pas, ok = m.translate_many(vas, "r")
    assert ok.tolist() == [True, True, False, True]
    assert pas[:2].tolist() == [0, 0x1234] and int(pas[3]) == 10 << 20
    with pytest.raises(PageFault):
        m.translate(DM + (9 << 20))


def test_256_gib_guest_costs_only_touched_pages():
    script = textwrap.dedent("""
        from emu import Machine
        from emu.builder import PageTableBuilder
        from emu.pagetable import PteFlags as F
        GiB = 1 << 30
        m = Machine(256 * GiB)
        b = PageTableBuilder(m, 255 * GiB, 255 * GiB + (1 << 20))
        b.map(0xFFFF888000000000, 0, 256 * GiB, GiB, F.P | F.RW | F.NX)   # all of RAM, 1G pages
        b.map(0xFFFFFFFF81000000, 200 * GiB, 4096, 4096, F.P)
        m.cr3 = b.root
        code = "mov rax, [rbx]\\nmov [rcx], rax\\nmov rdx, [rcx]"
        src = 0xFFFF888000000000 + 100 * GiB
        dst = 0xFFFF888000000000 + 250 * GiB + 0x123000
        m.ram[100 * GiB] = 0x5A
        r = m.run(code, at=0xFFFFFFFF81000000, regs={"rbx": src, "rcx": dst})
        assert r.status.value == "completed" and r.regs["rdx"] == 0x5A, r
        assert m.translate(dst) == 250 * GiB + 0x123000
        # VmHWM: this process's own peak (ru_maxrss also counts the memory
        # of the pytest process it was forked from, before its exec).
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(int(hwm.split()[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 300, f"max RSS {out.stdout.strip()} MiB"


# -- an instruction fetch that crosses into an unmapped page ------------------
# QEMU translates a block of instructions before running any of them; a
# fetch fault while translating a later instruction must not undo the
# instructions before it (they retire on a real CPU).

MOV_RCX_IMM64 = bytes.fromhex("48b9") + (0x1122334455667788).to_bytes(8, "little")  # 10 bytes
PAGE_END = CODE + 0x1000          # CODE's next page is not mapped


@pytest.mark.parametrize("first, stored", [("mov qword ptr [rbx], rax", 0xDEADBEEF),
                                           ("mov rdx, qword ptr [rbx]", None)])
@pytest.mark.parametrize("mode", ["stop", "skip", "retry"])
def test_straddling_fetch_fault_after_a_memory_access(m, first, stored, mode):
    from emu.asm import assemble
    head = assemble(first, 0)
    cut = 4                                   # bytes of the straddler in CODE's page
    at = PAGE_END - cut - len(head)
    straddler = PAGE_END - cut
    m.ram64[0x5000 // 8] = 0x77
    fixes = []

    def fix(fault):                           # map the next page, retry the fetch
        fixes.append(fault)
        m.builder.map(PAGE_END, (10 << 20) + 0x1000, 0x1000, 0x1000, F.P)
        m.ram[(10 << 20) + 0x1000: (10 << 20) + 0x1000 + 10 - cut] = list(MOV_RCX_IMM64[cut:])
        return FaultAction.RETRY

    on_fault = fix if mode == "retry" else mode
    r = m.run(head + MOV_RCX_IMM64[:cut], at=at, until=PAGE_END + 10 - cut,
              regs={"rbx": DM + 0x5000, "rax": 0xDEADBEEF, "rdx": 0, "rcx": 0},
              on_fault=on_fault)
    f = r.faults[0]
    assert (f.vector, f.rip, f.cr2, f.access, f.error_code) == (
        14, straddler, PAGE_END, Access.EXEC, PfErr.ID)
    if stored is not None:                    # the store retired before the fetch fault
        assert int(m.ram64[0x5000 // 8]) == stored
    else:                                     # so did the load
        assert r.regs["rdx"] == 0x77
    if mode == "retry":
        assert fixes == [f]
        assert r.status is RunStatus.COMPLETED and r.insns == 2
        assert r.regs["rcx"] == 0x1122334455667788
    else:
        # The straddler cannot be decoded, so it cannot be skipped: the run
        # stops at it in both modes, with what ran before it kept.
        assert r.status is RunStatus.FAULTED and r.faults == [f]
        assert r.insns == 1 and r.rip == straddler


def test_fetch_fault_at_the_start_of_the_next_page(m):
    """The same with an instruction that starts exactly on the unmapped page."""
    from emu.asm import assemble
    code = assemble("nop", 0) * 3 + assemble("mov qword ptr [rbx], rax", 0)
    at = PAGE_END - len(code)
    r = m.run(code, at=at, until=PAGE_END + 1, regs={"rbx": DM + 0x5000, "rax": 5})
    assert r.status is RunStatus.FAULTED and r.insns == 4 and r.rip == PAGE_END
    assert (r.fault.rip, r.fault.cr2, r.fault.error_code) == (PAGE_END, PAGE_END, PfErr.ID)
    assert int(m.ram64[0x5000 // 8]) == 5


def test_blocks_split_at_a_fetch_fault_leave_no_early_exit(m):
    """The block run up to the straddler must not stop there again when a
    loop comes back through it after the handler mapped the next page."""
    from emu.asm import assemble
    body = assemble("inc rdx\nmov qword ptr [rbx], rdx", 0)
    cut = 4
    at = PAGE_END - cut - len(body)
    tail = MOV_RCX_IMM64[cut:] + assemble(f"cmp rdx, 5\njne {at:#x}", PAGE_END + 10 - cut)
    seen = []

    def fix(fault):
        seen.append(fault.rip)
        m.builder.map(PAGE_END, (10 << 20) + 0x1000, 0x1000, 0x1000, F.P)
        m.ram[(10 << 20) + 0x1000: (10 << 20) + 0x1000 + len(tail)] = list(tail)
        return FaultAction.RETRY

    r = m.run(body + MOV_RCX_IMM64[:cut], at=at, until=PAGE_END + len(tail),
              regs={"rbx": DM + 0x5000, "rdx": 0}, on_fault=fix)
    assert seen == [PAGE_END - cut]
    assert r.status is RunStatus.COMPLETED and r.regs["rdx"] == 5 and r.insns == 25
    assert int(m.ram64[0x5000 // 8]) == 5


@pytest.mark.parametrize("count_insns", [True, False])
def test_a_fault_before_the_straddler_comes_first(m, count_insns):
    """A store that faults ahead of an unfetchable instruction is the fault
    the CPU takes; skipping it leads on to the fetch fault."""
    from emu.asm import assemble
    ro = DM + 0x2000
    m.ram64[pte_slot(m, ro)] = 0x2000 | F.P | F.NX
    m.flush_tlb()
    head = assemble("inc rcx\nmov qword ptr [rbx], rax", 0)
    at = PAGE_END - 4 - len(head)
    code = head + MOV_RCX_IMM64[:4]
    r = m.run(code, at=at, regs={"rbx": ro, "rcx": 0}, count_insns=count_insns)
    assert r.status is RunStatus.FAULTED and r.regs["rcx"] == 1 and r.rip == at + 3
    assert (r.fault.rip, r.fault.cr2, r.fault.error_code) == (at + 3, ro, PfErr.P | PfErr.W)
    assert r.insns == (1 if count_insns else None)
    # Reading the store's bytes (they end at the unmapped page) must not
    # change what the fault reports, nor the CPU's CR2.
    from unicorn import x86_const as X
    assert m.uc.reg_read(X.UC_X86_REG_CR2) == ro
    r = m.run(code, at=at, regs={"rbx": ro, "rcx": 0}, on_fault="skip", count_insns=count_insns)
    assert r.status is RunStatus.FAULTED and r.rip == PAGE_END - 4
    assert [(f.rip, f.access) for f in r.faults] == [(at + 3, Access.WRITE),
                                                     (PAGE_END - 4, Access.EXEC)]
    assert r.insns == (1 if count_insns else None)
