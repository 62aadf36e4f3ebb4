"""Ground truth from real kernels' memory (dmfrag.truth): the committed
states (tests/data/truth, recorded with ``realkernel record --truth``:
`make truth-states`), the comparison in the placed replay, and the model
started from them (``Kernel.from_state``, ``dmfrag run --from-dump``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dmfrag.placed import read_trace, replay_placed
from dmfrag.truth import (
    KernelState,
    TruthError,
    compare_free,
    compare_tables,
    find_vmcoreinfo,
    load_states,
    model_tables,
    save_states,
    truth_path,
    vmcoreinfo_from_core,
    walk_tables,
)
from guestkernel import Kernel
from guestkernel.kernel import KernelError
from guestkernel.layout import PAGE_OFFSET

DATA = Path(__file__).parent / "data" / "truth"
#: the recordings with a workload (one state per snapshot); the boot ones
#: (BOOTS) start with a state taken while the kernel boots (trace-start)
TRACES = sorted(p for p in DATA.glob("*.jsonl.gz") if "-boot." not in p.name)
BOOTS = sorted(DATA.glob("*-boot.jsonl.gz"))
KERNEL_OF = {t.name: t.name.split("-")[1] for t in TRACES}


def _states(trace: Path) -> list[KernelState]:
    """The states of the trace's snapshots (a recording made since the
    trace-start dump exists, such as 7.2's modules one, starts with that
    booting state too: the boot tests take it, BOOTS)."""
    return [s for s in load_states(truth_path(trace)) if s.point != "trace-start"]


def test_the_committed_set_covers_the_three_kernels():
    assert sorted(KERNEL_OF.values()) == ["5.10", "6.1", "7.2"]
    for t in TRACES:
        assert truth_path(t).is_file(), t


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_states_agree_with_the_kernels_own_meminfo(trace):
    """What drgn read from the dump is what the kernel printed at the same
    point: DirectMap4k/2M/1G from direct_pages_count, and the buddy lists'
    pages against MemFree (NR_FREE_PAGES, printed a moment after the dump:
    a few pages apart at most)."""
    _header, events = read_trace(trace)
    snaps = {e[1]: e[2] for e in events if e[0] == "S"}
    dumps = [e[1] for e in events if e[0] == "D" and e[1] != "trace-start"]
    states = _states(trace)
    assert [s.point for s in states] == dumps == list(snaps)
    for st in states:
        mi = snaps[st.point]["meminfo"]
        dpc = st.direct_pages_count
        assert mi["DirectMap4k"] == dpc[1] * 4 == st.counters["DirectMap4k"]
        assert mi["DirectMap2M"] == dpc[2] * 2048
        assert abs(mi["MemFree"] // 4 - st.nr_free_listed()) < 256, st.point
        assert st.release.startswith(KERNEL_OF[trace.name])
        assert st.la57 == (KERNEL_OF[trace.name] != "5.10")   # -cpu max: LA57 from 6.1 on
        # the zones' own NR_FREE_PAGES is the lists' total (pcp pages apart)
        listed = {}
        for z, o in zip(st.free_zone.tolist(), st.free_order.tolist()):
            listed[z] = listed.get(z, 0) + (1 << o)
        for i, z in enumerate(st.zones):
            if z["managed"]:
                assert abs(listed.get(i, 0) - z["nr_free"]) < 256, (st.point, z)


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_free_blocks_are_aligned_disjoint_and_in_their_zones(trace):
    for st in _states(trace):
        heads = st.free_pfn.astype(np.int64)
        size = np.left_shift(1, st.free_order.astype(np.int64))
        assert (heads % size == 0).all()
        order = np.argsort(heads)
        assert (heads[order][1:] >= (heads + size)[order][:-1]).all()     # disjoint
        for i, z in enumerate(st.zones):
            sel = st.free_zone == i
            lo, hi = z["start_pfn"], z["start_pfn"] + z["spanned"]
            assert ((heads[sel] >= lo) & (heads[sel] + size[sel] <= hi)).all()
        mask = st.free_mask()
        assert mask.sum() == size.sum() + sum(1 << int(o) for o in st.pcp_order)
        assert not (mask & st.reserved_mask()).any()     # nothing free is PageReserved
        # pageblocks: the types Linux has (Unmovable, Movable, Reclaimable, ...)
        assert set(np.unique(st.pageblock_mt).tolist()) <= {0, 1, 2, 3, 4, 255}


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_page_tables_read_from_the_dump_map_the_direct_map(trace):
    """The direct map's leaves, as read from the tables: each maps its own
    pfn, present, at 4K or 2M (1G pages are not used below 4 GiB here),
    covering RAM; the image mapping is there too. (direct_pages_count is not
    a recount of the leaves: Linux counts some boot ranges twice and the
    image mapping's splits too, see guestkernel.validate.)"""
    for st in _states(trace):
        va, lv, ent = st.pt_va, st.pt_level, st.pt_entry
        direct = (va >= np.uint64(st.page_offset)) & (va < np.uint64(st.page_offset + (1 << 46)))
        leaf = (lv == 1) | (((ent & np.uint64(0x80)) != 0) & (lv <= 3))
        assert ((ent[leaf] & np.uint64(1)) == 1).all()
        assert set(lv[leaf & direct].tolist()) == {1, 2}
        covered = int(np.sum(np.where(lv[leaf & direct] == 1, 1, 512)))
        assert st.max_pfn - 1024 <= covered <= st.max_pfn + 512
        assert (leaf & ~direct & (va >= np.uint64(0xFFFFFFFF80000000))).sum() > 100   # image
        # every leaf maps its own pfn in the direct map
        pfn = (ent & np.uint64(((1 << 52) - 1) & ~0xFFF)) >> np.uint64(12)
        sel = leaf & direct
        rel = (va[sel] - np.uint64(st.page_offset)) >> np.uint64(12)
        assert (pfn[sel] == rel).all()


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_placed_replay_compares_every_dump(trace):
    """Each snapshot carries the state comparison; after the first dump
    (where the model adopts Linux's free set: the allocations before
    tracing began and the bulk allocator's) the free pages agree exactly."""
    r = replay_placed(trace)
    assert r.error is None and r.equal
    assert r.adopted["point"] == "boot" and r.adopted["allocated"] > 1000
    for i, s in enumerate(r.snapshots):
        st = s["state"]
        assert set(st) >= {"pte_mismatches", "free_list_mismatches", "first_mismatch"}
        assert st["page_table_entries"] > 4000
        if i:
            assert st["free_list_mismatches"] == 0, (s["point"], st["first_free_mismatch"])
    j = r.to_json()
    assert j["snapshots"][0]["state"]["free_list_mismatches"] > 0   # before adoption
    json.dumps(j)


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_placed_replay_tables_equal_linux_entry_by_entry(trace):
    """At every dump, every page-table entry of the direct map and the image
    mapping is Linux's: level, pfn and flags (the real-mode trampoline's
    pages below 1 MiB included: set_real_mode_permissions; and on 7.2 the
    execmem ROX cache's read-only alias, filled before tracing begins)."""
    r = replay_placed(trace)
    for s in r.snapshots:
        assert s["state"]["pte_mismatches"] == 0, (s["point"], s["state"]["first_pte_mismatch"])
        assert s["state"]["first_mismatch"] is None or s["state"]["first_mismatch"].startswith(
            "pfn ")                                   # a free-page difference, if any


def test_placed_replay_without_the_real_mode_call_names_its_pages(monkeypatch):
    """Leave set_real_mode_permissions out (as the model did before): the
    comparison finds the trampoline's pages and says what differs."""
    import dataclasses

    from guestkernel import versions
    trace = next(t for t in TRACES if KERNEL_OF[t.name] == "6.1")
    rec = versions.VERSIONS["6.1"]
    monkeypatch.setitem(versions.VERSIONS, "6.1",
                        dataclasses.replace(rec, real_mode=None))
    st = replay_placed(trace).snapshots[0]["state"]
    assert st["pte_mismatches"] == 3
    assert st["first_pte_mismatch"] == ("direct map +0x98000 (pfn 0x98) level 4K: Linux maps "
                                        "pfn 0x98 [GLB NX], model maps pfn 0x98 [RW NX]")


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_model_started_from_each_state_is_that_kernel(trace):
    """Kernel.from_state: the tables are Linux's (no mismatch), the free
    pages and lists too, the counters equal; the validator (the CPU's walk
    of every page against the shadow) and the buddy's invariants hold; and
    a workload runs on it."""
    for st in _states(trace):
        k = Kernel.from_state(st)
        assert k.profile.name == KERNEL_OF[trace.name]
        # the model runs the state's paging mode: Linux's own addresses
        assert k.page_offset == st.page_offset
        assert k.paging_levels == (5 if st.la57 else 4)
        pt = compare_tables((st.pt_va, st.pt_level, st.pt_entry), model_tables(k),
                            real_offset=st.page_offset, model_offset=k.page_offset)
        assert pt["pte_mismatches"] == 0, pt["first"]
        states = k.buddy.page_states()
        fr = compare_free(st, states == 1)
        assert fr["free_list_mismatches"] == 0, fr["first"]
        assert list(k.pgt.direct_pages_count[:4]) == list(st.direct_pages_count[:4])
        assert k.buddy.nr_free() == st.nr_free_listed()
        mi = k.meminfo()
        assert mi["DirectMap4k"] == st.counters["DirectMap4k"]
        for name in ("direct_map_level2_splits", "direct_map_level3_splits"):
            if name in st.counters:
                assert k.vmstat()[name] == st.counters[name]
        # the lists in Linux's order
        zone = {z.name: z for z in k.buddy.zones}
        for zi, o, mt, pfn in list(zip(st.free_zone.tolist(), st.free_order.tolist(),
                                       st.free_mt.tolist(), st.free_pfn.tolist()))[:1]:
            assert next(reversed(zone[st.zones[zi]["name"]].free_area[o][mt])) == pfn
        k.buddy.check()
        k.validate()
    # go on from the last state: a workload, then the validator again
    from dmfrag.workloads import run_workload
    wl = "secretmem:64,vfree-reset:16" if KERNEL_OF[trace.name] != "5.10" else "bpf:32"
    d = run_workload(wl, kernel=k)
    assert next(p["point"] for p in d.points) == "boot"
    assert d.points[0]["meminfo"]["DirectMap4k"] == st.counters["DirectMap4k"]
    assert d.points[0]["meminfo"]["MemFree"] == st.nr_free_listed() * 4
    d.kernel.validate()
    d.kernel.buddy.check()


def test_from_state_names_the_nearest_record_for_an_unknown_kernel():
    st = _states(TRACES[0])[0]
    st.release = "6.6.30-amd64"
    with pytest.raises(KernelError, match=r"no record for Linux 6\.6\.30-amd64; the nearest is "
                                          r"6\.1: pass profile='6\.1'"):
        Kernel.from_state(st)
    k = Kernel.from_state(st, profile="6.1")        # asked for: starts
    assert k.profile.name == "6.1"


def test_from_state_refuses_another_machine():
    st = _states(TRACES[0])[0]
    st.e820 = [[0, 0x9fc00, 1], [0x100000, (1 << 32) - 0x100000, 1]]
    with pytest.raises(KernelError, match="max_pfn"):
        Kernel.from_state(st)


# -- the comparison's own rules, on small made-up tables -----------------------------------

def _tables(entries: dict[tuple[int, int], int]):
    vas = np.array([k[0] for k in entries], dtype=np.uint64)
    lv = np.array([k[1] for k in entries], dtype=np.uint8)
    en = np.array(list(entries.values()), dtype=np.uint64)
    return vas, lv, en


def test_compare_tables_names_va_level_and_flags():
    real_off, model_off = 0xFF11000000000000, PAGE_OFFSET
    rw_nx_g = 0x8000000000000163
    ro_nx_g = 0x8000000000000161
    real = {(real_off + 0x1000, 1): 0x1000 | rw_nx_g, (real_off + 0x2000, 1): 0x2000 | ro_nx_g,
            (real_off, 2): 0x5000 | 0x67}
    model = {(model_off + 0x1000, 1): 0x1000 | (rw_nx_g & ~0x100),     # no G: same
             (model_off + 0x2000, 1): 0x2000 | (rw_nx_g & ~0x100),     # RW: differs
             (model_off, 2): 0x7000 | 0x67}                             # table elsewhere
    out = compare_tables(_tables(real), _tables(model), real_offset=real_off,
                         model_offset=model_off)
    assert out["pte_mismatches"] == 1 and out["table_pfn_mismatches"] == 1
    assert out["first"] == ("direct map +0x2000 (pfn 0x2) level 4K: Linux maps pfn 0x2 "
                            "[GLB NX], model maps pfn 0x2 [RW NX]")
    del model[(model_off + 0x2000, 1)]
    out = compare_tables(_tables(real), _tables(model), real_offset=real_off,
                         model_offset=model_off)
    assert out["first"].endswith("model not present")


def test_compare_free_names_the_list_and_position():
    st = _states(TRACES[0])[-1]
    mask = st.free_mask()
    assert compare_free(st, mask)["free_list_mismatches"] == 0
    i = int(np.flatnonzero(st.free_order == st.free_order.max())[1])
    pfn = int(st.free_pfn[i])
    mask[pfn + 3] = False
    out = compare_free(st, mask)
    assert out["free_list_mismatches"] == 1 and out["linux_only"] == 1
    z, o, mt = int(st.free_zone[i]), int(st.free_order[i]), int(st.free_mt[i])
    same = (st.free_zone == z) & (st.free_order == o) & (st.free_mt == mt)
    pos = int(np.count_nonzero(same[:i]))
    assert out["first"].startswith(f"pfn {pfn + 3:#x}: free in Linux (zone "
                                   f"{st.zones[z]['name']} order {o} ")
    assert f"position {pos}, block {pfn:#x}" in out["first"]


def test_walk_tables_five_levels_sign_extends():
    """A made-up 5-level tree: one P4D, one PUD table with a 1G leaf and a
    PMD table with a 2M leaf and a PTE table."""
    mem = {}

    def table(pa, entries):
        t = np.zeros(512, dtype=np.uint64)
        for i, e in entries.items():
            t[i] = e
        mem[pa] = t
    po = 0xFF11000000000000
    table(0x1000, {(po >> 48) & 511: 0x2000 | 0x67})        # PML5
    table(0x2000, {0: 0x3000 | 0x67})                      # P4D
    table(0x3000, {0: 0x40000000 | 0xE3, 1: 0x4000 | 0x67})  # PUD: 1G leaf, table
    table(0x4000, {0: 0x40000000 | 0xE3, 1: 0x5000 | 0x63})  # PMD
    table(0x5000, {7: 0x40207000 | 0x63})                  # PTE
    va, lv, _en = walk_tables(lambda pa: mem[pa], 0x1000, 5, [(po, po + (2 << 30))])
    got = sorted(zip(va.tolist(), lv.tolist()))
    assert got == [(po, 3), (po, 4), (po + (1 << 30), 2), (po + (1 << 30), 3),
                   (po + (1 << 30) + (1 << 21), 2), (po + (1 << 30) + (1 << 21) + 0x7000, 1)]


def _elf_core(path: Path, phys: bytes) -> None:
    """A minimal ELF64 core: one PT_LOAD of ``phys`` at physical 0."""
    eh = bytearray(64)
    eh[:4] = b"\x7fELF"
    eh[4], eh[5], eh[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", eh, 16, 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 6, 64 + 56, 0, 0, len(phys), len(phys), 4096)
    path.write_bytes(bytes(eh) + ph + phys)


def test_the_vmcoreinfo_note_is_found_in_a_dump(tmp_path):
    desc = b"OSRELEASE=6.1.0-56-amd64\nPAGESIZE=4096\n"
    note = struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\x00\x00" + desc
    phys = bytearray(0x4000)
    phys[0x2000:0x2000 + len(note)] = note
    core = tmp_path / "core"
    _elf_core(core, bytes(phys))
    assert vmcoreinfo_from_core(core, 0x2000) == desc
    assert find_vmcoreinfo(core) == desc
    with pytest.raises(TruthError, match="not VMCOREINFO|no ELF note"):
        vmcoreinfo_from_core(core, 0x1000)
    with pytest.raises(TruthError, match="not in the dump"):
        vmcoreinfo_from_core(core, 0x10000)
    empty = tmp_path / "empty"
    _elf_core(empty, bytes(0x1000))
    assert find_vmcoreinfo(empty) is None


def test_store_round_trip_and_refusals(tmp_path):
    states = _states(TRACES[0])
    out = save_states(tmp_path / "x.truth.npz", states)
    back = load_states(out)
    assert [s.summary() for s in back] == [s.summary() for s in states]
    assert (back[0].free_pfn == states[0].free_pfn).all()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TruthError, match="not a dmfrag truth file"):
        load_states(bad)
    assert truth_path("a/b.jsonl.gz") == Path("a/b.truth.npz")
    assert truth_path("b.jsonl") == Path("b.truth.npz")


# -- the command line --------------------------------------------------------------------------

def _cli(*argv):
    from dmfrag.cli import main
    return main(list(argv))


def test_run_from_a_stored_state(capsys):
    path = truth_path(TRACES[0])
    st = _states(TRACES[0])            # (not trace-start: a booting kernel's)
    assert _cli("run", "--from-dump", str(path), "--point", st[0].point, "--workload",
                "secretmem:32" if KERNEL_OF[TRACES[0].name] != "5.10" else "bpf:16",
                "--json", "--validate") == 0
    res = json.loads(capsys.readouterr().out)
    boot = res["snapshots"][0]
    assert boot["point"] == "boot"
    assert boot["meminfo"]["DirectMap4k"] == st[0].direct_pages_count[1] * 4
    assert boot["meminfo"]["DirectMap2M"] == st[0].direct_pages_count[2] * 2048
    assert boot["meminfo"]["MemFree"] == st[0].nr_free_listed() * 4
    assert "started from a dumped Linux" in res["kernel_reason"]


@pytest.mark.parametrize("extra, msg", [
    (["--from-dump", "/nonexistent.npz"], "no such file"),
    (["--from-dump", "TRUTH", "--vmlinux", "/x"], "--vmlinux is for a core"),
    (["--from-dump", "TRUTH", "--point", "nope"], "--point 'nope'"),
    (["--from-dump", "TRUTH", "--record", "REC"], "--record with --from-dump"),
    (["--vmlinux", "/x"], "go with --from-dump"),
    (["--from-dump", "TRACE"], "needs --vmlinux"),
])
def test_run_from_dump_bad_input_exits_2(extra, msg, tmp_path, capsys):
    sub = {"TRUTH": str(truth_path(TRACES[0])), "TRACE": str(TRACES[0]),
           "REC": str(tmp_path / "r.jsonl")}
    argv = [sub.get(a, a) for a in extra]
    assert _cli("run", "--workload", "bpf:4", *argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_trace_replay_truth_option(tmp_path, capsys):
    assert _cli("trace", "replay", str(TRACES[0]), "--truth", str(tmp_path / "no.npz")) == 2
    assert "no such file" in capsys.readouterr().err
    assert _cli("trace", "replay", str(TRACES[0]), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert all("state" in s for s in out["snapshots"])


def test_record_truth_without_drgn_exits_2_before_any_boot(monkeypatch, tmp_path, capsys):
    from dmfrag import truth

    def no_drgn():
        raise TruthError("reading a kernel dump needs drgn: pip install 'dmfrag[truth]'")
    monkeypatch.setattr(truth, "check_drgn", no_drgn)
    booted = []
    monkeypatch.setattr("dmfrag.recorder.record", lambda *a, **k: booted.append(1))
    assert _cli("realkernel", "record", "--truth", "-o", str(tmp_path / "t.jsonl.gz")) == 2
    assert "needs drgn" in capsys.readouterr().err and not booted


@pytest.mark.parametrize("policy", ["baseline", "pte-mapped-cache", "migrate-unmapped",
                                    "unmapped-alloc", "per-user-caches", "prog-pack",
                                    "cpa-merge", "cpa-collapse"])
def test_every_policy_runs_from_a_dumped_kernel(policy):
    """A policy starts on a real kernel's state and routes a workload; the
    validator holds after it, and secretmem's pages are out of the direct
    map whatever the policy."""
    from dmfrag.workloads import run_workload
    st = next(s for t in TRACES if KERNEL_OF[t.name] == "6.1" for s in _states(t))
    k = Kernel.from_state(st, policy=policy)
    d = run_workload("secretmem:64,bpf:32", kernel=k)
    assert [p["point"] for p in d.points] == ["boot", "secretmem:64", "bpf:32"]
    assert d.points[0]["meminfo"]["DirectMap4k"] == st.counters["DirectMap4k"]
    d.kernel.validate()
    d.kernel.buddy.check()


@pytest.mark.parametrize("trace", BOOTS, ids=lambda p: p.name)
def test_a_state_taken_while_booting_is_told_apart(trace):
    """The trace-start dump (the first traced page event) is a booting
    kernel's: no watermarks, the boot pageset (high 0, batch 1, no pages),
    the deferred range not free yet, no split and no vmalloc area of a
    module. The model cannot run from it (Kernel.from_state says what to
    do instead); the boot state after it is a running kernel's."""
    first, boot = load_states(truth_path(trace))
    assert (first.point, boot.point) == ("trace-start", "boot")
    assert first.booting and not boot.booting
    for z in first.zones:
        if z["managed"]:
            assert z["watermark"] == [0, 0, 0] and z["pcp"][0]["high"] == 0
            assert z["pcp"][0]["batch"] == 1
    assert len(first.pcp_pfn) == 0 and first.modules == [] and first.bpf_packs == []
    assert first.counters.get("direct_map_level2_splits", 0) == 0
    # the deferred range (the last zone but its first pages): free at boot,
    # not at trace-start; most of RAM at 2G, ZONE_NORMAL's at 8G
    assert boot.nr_free_listed() - first.nr_free_listed() > boot.nr_free_listed() // 2
    assert first.trace_entries >= 0
    with pytest.raises(KernelError, match="taken while the kernel booted.*--start trace-start"):
        Kernel.from_state(first)
    k = Kernel.from_state(boot)
    assert k.buddy.nr_free() == boot.nr_free_listed()
