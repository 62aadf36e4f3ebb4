"""The real kernel's accesses captured under QEMU (dmfrag.capture, ``dmfrag
accesses record``) and what the replay makes of a captured stream: Linux's
regions told apart, fetches whose patches would overlap kept apart, the
plugin and the guest's marker built; live, a boot and a workload captured
and the workload's stream replayed on the state it ran on with no fault."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from dmfrag.accesses import (
    FETCH,
    LOAD,
    REGIONS,
    STORE,
    AccessStream,
    layout_of,
    modelled_part,
    region_counts,
    replay,
)
from dmfrag.capture import (
    CaptureError,
    _read_output,
    build_marker,
    build_plugin,
    load_capture,
    save_capture,
    truth_path_of,
)
from guestkernel import Kernel

gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="module")
def k():
    return Kernel.boot(ram="1G")


@gcc
def test_the_plugin_builds_and_declares_api_version_1(tmp_path):
    """Built against no QEMU header: it exports qemu_plugin_install and
    qemu_plugin_version = 1 (QEMU 7.2's API) and needs only qemu_plugin_*
    functions from its host (each resolved when QEMU loads it)."""
    so = build_plugin(tmp_path)
    assert build_plugin(tmp_path) == so                   # built once per source
    lib = ctypes.CDLL(str(so), mode=os.RTLD_LAZY)
    assert ctypes.c_int.in_dll(lib, "qemu_plugin_version").value == 1
    assert lib.qemu_plugin_install
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                               text=True, check=True).stdout.split()
    host = {u for u in undefined if u.startswith("qemu_plugin")}
    assert host >= {"qemu_plugin_register_vcpu_mem_cb", "qemu_plugin_register_vcpu_tb_trans_cb",
                    "qemu_plugin_register_atexit_cb"}
    assert all("@GLIBC" in u or u in ("U", "w")
               or u.startswith(("qemu_plugin", "_ITM", "__gmon", "__cxa")) for u in undefined)


@gcc
def test_the_marker_is_tiny_and_runs_anywhere(tmp_path):
    """accmark is static and carries no C library (the initramfs stays the
    plain one but for it); without the plugin its marker is a no-op."""
    exe = build_marker(tmp_path)
    assert exe.stat().st_size < 16384
    assert subprocess.run([str(exe), "on"], check=False).returncode == 0
    assert subprocess.run([str(exe), "off"], check=False).returncode == 0
    assert subprocess.run([str(exe), "sideways"], check=False).returncode == 2
    code = exe.read_bytes()
    assert code.count(bytes.fromhex("0f1f8400444d4631")) == 1
    assert code.count(bytes.fromhex("0f1f8400444d4630")) == 1


def _write_output(prefix, va, kind_raw, win, txt):
    np.asarray(va, np.uint64).tofile(f"{prefix}.va")
    np.asarray(kind_raw, np.uint8).tofile(f"{prefix}.kind")
    np.asarray(win, np.uint64).tofile(f"{prefix}.win")
    (prefix.parent / f"{prefix.name}.txt").write_text(txt)


def test_the_plugins_files_are_read_and_checked(tmp_path):
    """kind's low bits are the access kind, bits 4-5 log2 of its size; the
    counts and the marks come from the text file; files that disagree with
    it are an error, not a stream."""
    p = tmp_path / "acc"
    _write_output(p, [0xFF11000000001000, 0xFFFFFFFF81000000, 0xFF11000000002000],
                  [0 | 3 << 4, 2 | 3 << 4, 1 | 2 << 4], [0],
                  "coalesced 9\nseen 3\nkept 3\nwindows 1\nwindow 4\nsample 1\nlimit 8\n"
                  "decimations 0\nmarks_on 1\nmarks_off 1\nmark on 0\nmark off 3\n")
    s, win, counts = _read_output(p)
    assert s.kind.tolist() == [LOAD, FETCH, STORE] and s.size.tolist() == [8, 8, 4]
    assert win.tolist() == [0] and counts["coalesced"] == 9
    assert counts["marks"] == [["on", 0], ["off", 3]]
    _write_output(p, [1, 2], [0, 0], [0], "seen 3\nkept 3\nwindows 1\n")
    with pytest.raises(CaptureError, match="disagree"):
        _read_output(p)
    with pytest.raises(CaptureError, match="no output"):
        _read_output(tmp_path / "nothing")


def test_a_captured_file_round_trips(tmp_path):
    from dmfrag.capture import Capture
    s = AccessStream(np.array([0xFF11000000001000, 0xFFFFFFFF81000000], np.uint64),
                     np.array([1, 2], np.uint8), np.array([4, 8], np.uint8))
    out = tmp_path / "a.npz"
    assert save_capture(out, Capture(s, np.array([0, 4], np.uint64), {"kernel": "6.1"})) is None
    back = load_capture(out)
    assert back.meta == {"kernel": "6.1"} and back.window_index.tolist() == [0, 4]
    assert back.stream.va.tolist() == s.va.tolist() and back.stream.size.tolist() == [4, 8]
    assert truth_path_of(out).name == "a.truth.npz"


def test_a_capture_is_cut_at_its_marks():
    """intervals() pairs the on/off marks; step(i) keeps the windows wholly
    inside the i-th (a window straddling a snapshot belongs to neither)."""
    from dmfrag.capture import Capture
    va = np.arange(10, dtype=np.uint64) + np.uint64(0xFF11000000000000)
    cap = Capture(AccessStream.loads(va), np.array([0, 2, 3, 5, 9], np.uint64),
                  {"window": 2, "seen": 20,
                   "marks": [["on", 0], ["off", 7], ["on", 7], ["off", 20]]})
    assert cap.intervals() == [(0, 7), (7, 20)]
    # windows at 0-1, 4-5, 6-7 (straddles 7), 10-11, 18-19
    assert cap.step(0).va.tolist() == va[[0, 1, 2, 3]].tolist()
    assert cap.step(1).va.tolist() == va[[6, 7, 8, 9]].tolist()


def test_linux_regions_and_the_modelled_part(k):
    """A 5-level stream: its direct-map addresses move to the model's
    PAGE_OFFSET, the image stays, vmalloc/vmemmap are left out and counted."""
    va = np.array([0xFF11000000000000 + 0x5000000 + 8,       # direct map, pfn 0x5000
                   0xFFFFFFFF81000040,                      # image text
                   0xFFA0000000001000,                      # vmalloc (a stack)
                   0xFFD4000000000040,                      # vmemmap
                   0xFF11000000000000 + 0x6000000], np.uint64)
    assert layout_of(va) == 5
    assert layout_of(va - np.uint64(0)) == 5
    assert layout_of(np.array([0x1000], np.uint64)) is None
    assert region_counts(va, 5) == {"direct_map": 2, "vmalloc": 1, "vmemmap": 1,
                                    "kernel_image": 1, "modules": 0, "other": 0}
    s = AccessStream(va, np.array([LOAD, FETCH, STORE, LOAD, STORE], np.uint8),
                     np.full(5, 8, np.uint8))
    sub, part = modelled_part(k, s)
    assert part["replayed"] == 3 and part["left_out"] == 2 and part["paging_levels"] == 5
    assert sub.va.tolist() == [k.pfn_to_virt(0x5000) + 8, 0xFFFFFFFF81000040,
                               k.pfn_to_virt(0x6000)]
    assert sub.kind.tolist() == [LOAD, FETCH, STORE]
    # a 4-level stream is already in the model's layout
    four = np.array([k.pfn_to_virt(0x5000), REGIONS[4]["vmalloc"][0]], np.uint64)
    assert layout_of(four) == 4
    sub, part = modelled_part(k, AccessStream.loads(four))
    assert sub.va.tolist() == [k.pfn_to_virt(0x5000)] and part["left_out"] == 1


def test_fetches_whose_patches_would_overlap_run_apart(k):
    """Fetch targets 1 and 2 bytes apart (blocks that start inside another's
    3-byte patch) and one at the very start of the text (where the replay's
    own code could sit) all run: every fetch is counted, nothing faults,
    memory is as it was."""
    text = k.profile.image.text
    targets = [text, text + 0x4000, text + 0x4001, text + 0x4003, text + 0x4002, text]
    s = AccessStream(np.array(targets * 50, np.uint64), np.full(len(targets) * 50, FETCH,
                                                                np.uint8),
                     np.full(len(targets) * 50, 8, np.uint8))
    before = k.machine.ram.copy()
    r = replay(k, s, tlb="skylake")
    assert r.faults == 0, r.first_faults
    assert r.tlb["model.fetches"] >= len(s)
    assert np.array_equal(k.machine.ram, before)


# -- live: QEMU ------------------------------------------------------------------

def _need_qemu():
    missing = [t for t in ("qemu-system-x86_64", "busybox", "cpio", "gcc")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install qemu-system-x86 "
                    "busybox-static cpio gcc (make test does it as root)")


def _check_windows(cap):
    m = cap.meta
    win = cap.window_index.astype(np.int64)
    assert m["kept"] == len(cap.stream) <= m["limit"]
    assert len(win) == m["windows"] and (np.diff(win) > 0).all()
    assert (win % m["sample"] == 0).all()
    assert m["sample"] & (m["sample"] - 1) == 0                 # a power of two
    # the kept windows span the capture: the last is within one keep-step of its end
    last = (m["seen"] - 1) // m["window"]
    assert win[0] == 0 and last - win[-1] < m["sample"]
    assert m["seen"] >= m["kept"]


@pytest.mark.realkernel
def test_live_boot_capture():
    """6.1 at 2G, the boot captured (1M accesses kept): a 5-level layout,
    the direct map and the image both touched, fetches in the image's text,
    windows spread evenly over the boot, the init's marker turning it off."""
    from dmfrag.capture import record_accesses
    _need_qemu()
    cap = record_accesses("6.1", "2G", ("boot",), limit=1 << 20, window=16384,
                          measure_slowdown=False)
    m = cap.meta
    _check_windows(cap)
    assert m["paging_levels"] == 5 and m["captured"] == "boot"
    assert m["seen"] > 50_000_000 and m["sample"] >= 32
    assert m["regions"]["direct_map"] > 10_000 and m["regions"]["kernel_image"] > 100_000
    assert m["marks"] == [["off", m["seen"]]]
    s = cap.stream
    fetch = s.va[s.kind == FETCH]
    lo, hi = REGIONS[5]["kernel_image"]
    assert ((fetch >= np.uint64(lo)) & (fetch < np.uint64(hi))).mean() > 0.99
    assert set(np.unique(s.size[s.kind != FETCH]).tolist()) <= {1, 2, 4, 8}


@pytest.mark.realkernel
def test_live_workload_capture_replays_on_its_own_state_without_a_fault(tmp_path):
    """age:32 on 6.1 at 2G captured with the guest dumped at each snapshot:
    replayed on the boot state it ran from, no access faults (every page it
    touched is mapped there as it was), and all 4K walks at least as often
    as no split at all."""
    pytest.importorskip("drgn")
    from dmfrag.accesses import tlbcost
    from dmfrag.capture import record_accesses
    _need_qemu()
    cap = record_accesses("6.1", "2G", ("age:32",), limit=1 << 18, window=8192, truth=True,
                          measure_slowdown=False)
    _check_windows(cap)
    m = cap.meta
    assert m["captured"] == "steps" and m["workload"] == ["age:32"]
    assert [p for p, _ in m["marks"]] == ["on", "off"]              # on for the step only
    assert len(cap.step(0)) == len(cap.stream)
    assert m["coalesced"] > m["seen"]             # a pipe's 64 KiB copies, byte by byte in TCG
    out = tmp_path / "a.npz"
    assert save_capture(out, cap) == truth_path_of(out)
    assert [s.point for s in cap.states] == ["boot", "age:32"]
    k = Kernel.from_state(cap.states[0], profile="6.1")
    res = tlbcost(k, load_capture(out).stream)
    assert res["stream"]["paging_levels"] == 5 and res["stream"]["replayed"] > 10_000
    assert res["state"]["faults"] == 0, res["first_faults"]
    assert res["all_4k"]["dtlb_walks"] >= res["unsplit"]["dtlb_walks"] > 0
    assert res["state"]["accesses"] == res["stream"]["replayed"]
    json.dumps(res)


@pytest.mark.parametrize("argv, msg", [
    (["-o", "a.txt"], "must end in .npz"),
    (["-o", "a.npz", "--limit", "5"], "--limit (5) must hold at least two windows of 65536"),
    (["-o", "a.npz", "--window", "0"], "--window must be at least 1"),
    (["-o", "a.npz", "--limit", str(1 << 31)], "at most 1,073,741,824 accesses"),
    (["-o", "a.npz", "--workload", "nope"], "unknown workload 'nope'"),
    (["-o", "a.npz", "--timeout", "0"], "--timeout must be a finite number of seconds"),
    (["-o", "/nonexistent/a.npz"], "-o/--output"),
])
def test_accesses_record_bad_input_boots_nothing(capsys, tmp_path, monkeypatch, argv, msg):
    """Every option is checked before a guest boots (exit 2, one line)."""
    import dmfrag.capture
    from dmfrag.cli import main

    def boom(*a, **k):
        raise AssertionError("booted")
    monkeypatch.setattr(dmfrag.capture, "record_accesses", boom)
    monkeypatch.chdir(tmp_path)
    assert main(["accesses", "record", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_accesses_info_names_what_a_capture_holds(tmp_path, capsys):
    from dmfrag.accesses import default_stream
    from dmfrag.cli import main
    assert main(["accesses", "info", str(default_stream("7.2")), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["paging_levels"] == 5 and out["meta"]["kernel"] == "7.2"
    assert out["accesses"] == out["meta"]["kept"] == sum(out["kinds"].values())
    assert sum(out["regions"].values()) == out["accesses"]
    assert out["meta"]["workload"] == ["age:256"] and out["meta"]["coalesced"] > 0
