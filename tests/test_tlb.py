"""The TLB model: analytic counts, fills equal to the CPU's translation,
invalidation, true virtual addresses, and the C and Python paths agreeing."""

from __future__ import annotations

import json

import pytest

from emu import Machine
from emu.builder import PageTableBuilder
from emu.kernels import random_loads
from emu.pagetable import PteFlags as F
from emu.tlb import PRESETS, PyTlb, TlbConfigError, TlbModel, load_config, preset

GiB, MiB = 1 << 30, 1 << 20
V4K = 0xFFFF888000000000      # 64 MiB mapped with 4K pages
V2M = 0xFFFF889000000000      # 512 MiB mapped with 2M pages
V1G = 0xFFFF88A000000000      # 1 GiB mapped with one 1G page
CODE = 0xFFFFFFFF81000000
RW_NX = F.P | F.RW | F.NX


@pytest.fixture(scope="module")
def m() -> Machine:
    m = Machine(2 * GiB)
    b = PageTableBuilder(m, GiB + 512 * MiB, 2 * GiB)
    b.map(V4K, 0, 64 * MiB, 4096, RW_NX)
    b.map(V2M, 0, 512 * MiB, 2 * MiB, RW_NX)
    b.map(V1G, 0, GiB, GiB, RW_NX | F.G)
    b.map(CODE, GiB + 256 * MiB, 2 * MiB, 4096, F.P)
    m.cr3 = b.root
    return m


def model(m, cls=TlbModel, cfg="skylake"):
    t = cls(cfg)
    t.prime(m)
    return t


def sweep(t, base, stride, n, passes=2, kind=0):
    for _ in range(passes):
        for i in range(n):
            t.access(base + i * stride, kind)


@pytest.mark.parametrize("cls", [TlbModel, PyTlb])
def test_reach_of_the_l1_dtlb(m, cls):
    # 64 4K pages fill the 64-entry, 4-way L1 DTLB exactly (16 sets x 4):
    # the second pass hits everywhere.
    t = model(m, cls)
    sweep(t, V4K, 4096, 64)
    c = t.raw_counters()
    assert (c["loads"], c["walk_load"], c["walk_4k_load"], c["l1_miss_load"]) == (128, 64, 64, 64)
    # 80 pages: each set gets 5 in a cyclic order, LRU misses every time in
    # L1, and the 1536-entry STLB serves the second pass.
    t = model(m, cls)
    sweep(t, V4K, 4096, 80)
    c = t.raw_counters()
    assert (c["walk_load"], c["l1_miss_load"], c["stlb_hit_load"]) == (80, 160, 80)


@pytest.mark.parametrize("cls", [TlbModel, PyTlb])
def test_2m_strides_and_a_1g_sweep(m, cls):
    t = model(m, cls)
    sweep(t, V2M, 2 * MiB, 32)                 # the 32-entry 2M DTLB holds them all
    c = t.raw_counters()
    assert (c["walk_load"], c["walk_2m_load"], c["l1_miss_load"]) == (32, 32, 32)
    assert c["walk_mem_refs"] == 3 + 31 * 1    # PML4E, PDPTE, PDE; then PDPTE cache hits
    t = model(m, cls)
    sweep(t, V1G, 4096 * 25, 10000, passes=1)  # one 1G page serves the whole sweep
    c = t.raw_counters()
    assert (c["walk_load"], c["walk_1g_load"], c["loads"]) == (1, 1, 10000)


def test_fills_equal_the_cpus_translation(m):
    t = TlbModel("skylake")
    m.tlb = t
    try:
        m.flush_tlb()
        m.run(random_loads(V4K, 64 * MiB, 3000, seed=3), at=CODE, count_insns=False,
              max_insns=None)
        m.run(random_loads(V2M, 512 * MiB, 500, seed=5), at=CODE, count_insns=False,
              max_insns=None)
    finally:
        m.tlb = None
    checked = 0
    for name in ("dtlb_4k", "dtlb_2m", "stlb"):
        for vpn, level in t.entries(name):
            va = (vpn << (12 + 9 * (level - 1))) & ((1 << 64) - 1)
            walk = m.walk(va)
            assert walk.level == level, (name, hex(va))
            assert m.translate(va) == walk.pa
            checked += 1
    assert checked > 100


def test_two_virtual_addresses_of_one_frame_are_two_entries(m):
    """pa 0x200000 is mapped at V2M+2M (inside a 2M page) and at V4K+2M (a
    4K page): the guest touches both, the model holds one 2M and one 4K
    entry -- it is keyed by virtual address, not by the physical one the
    memory hook reports."""
    m.tlb = TlbModel("skylake")
    try:
        m.flush_tlb()
        r = m.run("mov rax, [rbx]\nmov rcx, [rdx]", at=CODE, count_insns=False,
                  regs={"rbx": V2M + 2 * MiB + 8, "rdx": V4K + 2 * MiB + 8})
        t = m.tlb
    finally:
        m.tlb = None
    assert r.regs["rax"] == r.regs["rcx"]          # the same frame
    assert (V2M + 2 * MiB) >> 21 in [v for v, lv in t.entries("dtlb_2m")]
    assert (V4K + 2 * MiB) >> 12 in [v for v, lv in t.entries("dtlb_4k")]
    c = t.raw_counters()
    assert (c["walk_2m_load"], c["walk_4k_load"]) == (1, 1)


def test_invalidation(m):
    t = model(m)
    t.access(V2M + 5 * 4096)
    t.access(V4K)
    t.access(V1G + 12345)                          # global (G set on the 1G leaf)
    t.invlpg(V2M + 2 * MiB - 8)                    # inside the 2M page: dropped
    t.access(V2M)
    assert t.raw_counters()["walk_2m_load"] == 2
    t.load_cr3(m.cr3)                              # non-global entries go
    t.access(V4K)
    t.access(V1G)
    c = t.raw_counters()
    assert (c["walk_4k_load"], c["walk_1g_load"]) == (2, 1)
    t.flush_all()
    t.access(V1G)
    assert t.raw_counters()["walk_1g_load"] == 2


def test_a_faulting_walk_fills_nothing(m):
    t = model(m)
    t.access(V4K + 128 * MiB)                      # not mapped
    t.access(V4K + 128 * MiB)
    c = t.raw_counters()
    assert (c["walk_load"], c["walk_faults"]) == (2, 2)


def test_c_and_python_paths_agree_on_a_run(m):
    prog = (random_loads(V4K, 16 * MiB, 2000, seed=11)
            + f"\nmov rdx, {V4K + 3 * MiB:#x}\npush rax\npop rbx\nmov rcx, [rip + 0x100]\n"
            "mov [rdx + 4094], rax\nmovsq\n")
    got = []
    for cls in (TlbModel, PyTlb):
        m.tlb = cls("skylake")
        try:
            m.flush_tlb()
            r = m.run(prog, at=CODE, count_insns=False, max_insns=None,
                      regs={"rsp": V4K + MiB, "rsi": V4K + 0x1FFC, "rdi": V4K + 0x5FFC})
            assert r.status.value == "completed", r.fault
            got.append(m.tlb.raw_counters())
        finally:
            m.tlb = None
    assert got[0] == got[1]
    # stores: push, the page-crossing store (2 pages), movsq's store (2 pages)
    assert got[0]["stores"] == 5 and got[0]["undecoded"] == 0
    assert got[0]["loads"] == 2000 + 1 + 1 + 2              # pop, rip-relative, movsq x2


def test_presets_and_geometry_errors(tmp_path):
    assert set(PRESETS) == {"skylake", "golden-cove", "zen4"}
    with pytest.raises(TlbConfigError, match="unknown TLB preset 'k6'"):
        preset("k6")
    with pytest.raises(TlbConfigError, match="not divisible by 5 ways"):
        TlbModel(load_config(_write(tmp_path, "bad.json", {"l1d": [
            {"name": "d", "entries": 64, "ways": 5, "levels": [1, 2, 3]}]})))
    toml = tmp_path / "mine.toml"
    toml.write_text('base = "zen4"\nreplacement = "random"\n'
                    '[[stlb]]\nname = "l2"\nentries = 2048\nways = 16\nlevels = [1, 2, 3]\n')
    cfg = load_config(toml)
    assert cfg.replacement == "random" and cfg.stlb[0].entries == 2048
    assert cfg.l1d == PRESETS["zen4"].l1d
    with pytest.raises(TlbConfigError, match="unknown keys"):
        load_config(_write(tmp_path, "x.json", {"l3": []}))


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_split_pages_cost_a_4k_walk_each_where_the_reference_holds_2m():
    """Pages of a 2M region that CPA split cost a 4K walk each time the
    set exceeds the TLB's reach; on the unsplit reference the same frames
    sit in 2M pages (a stream of loads over 8 MiB, twice, replayed as the
    CPU's own: dmfrag.accesses)."""
    import numpy as np

    from dmfrag.accesses import AccessStream, replay, unsplit_kernel
    from guestkernel import Kernel
    k = Kernel.boot(ram="2G")
    pfns = list(range(0x40000, 0x40000 + 2048))          # 8 MiB: four 2M regions at 1 GiB
    for p in pfns[::512]:
        k.set_memory_4k(k.pfn_to_virt(p), 1)            # split each region
    s = AccessStream.loads(np.array([k.pfn_to_virt(p) for p in pfns] * 2, np.uint64))
    st, ref = replay(k, s, tlb="skylake").tlb, replay(unsplit_kernel(k), s, tlb="skylake").tlb
    assert st["data_accesses"] == ref["data_accesses"] == 2 * 2048
    # Split: 2048 pages > the 1536-entry STLB: every access walks, 4K.
    assert (st["dtlb_load_misses.walk_completed_4k"],
            st["dtlb_load_misses.walk_completed_2m_4m"]) == (4096, 0)
    # Reference: a 2G guest has no 1G page; the frames sit in four 2M pages:
    # four 2M walks, then hits.
    assert (ref["dtlb_load_misses.walk_completed_4k"], ref["dtlb_load_misses.walk_completed_2m_4m"],
            ref["dtlb_load_misses.walk_completed_1g"]) == (0, 4, 0)
    assert st["est_walk_cycles"] > 100 * ref["est_walk_cycles"]


def test_instruction_fetch_across_module_text():
    from emu.asm import assemble
    from guestkernel import Kernel
    k = Kernel.boot(ram="2G")
    pages = 40
    mod = k.modules.load_module("big", text=pages * 4096)
    vas = [mod.base + i * 4096 for i in range(pages)]
    for i, va in enumerate(vas):
        stub = assemble(kernels_stub(vas[i + 1] if i + 1 < pages else None), va)
        pa = k.machine.translate(va, "x")
        k.machine.ram[pa: pa + len(stub)] = list(stub)
    from emu.kernels import fetch_chain
    code = k.validator_code_page()
    k.machine.tlb = TlbModel("skylake")
    r = k.machine.run(fetch_chain(vas[0], 3), at=code, count_insns=False, max_insns=None,
                      regs={"rsp": k.pfn_to_virt(k.validator_out_pfn) + 4096})
    c = k.machine.tlb.raw_counters()
    k.machine.tlb = None
    assert r.status.value == "completed", r.fault
    # 40 text pages + the code page: one ITLB walk each on the first round,
    # then the 128-entry 4K ITLB holds them all.
    assert c["walk_4k_fetch"] == pages + 1
    assert c["fetches"] >= 3 * pages


def kernels_stub(next_va):
    from emu.kernels import fetch_chain_stub
    return fetch_chain_stub(next_va)
