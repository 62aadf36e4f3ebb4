"""Access streams replayed as the emulated CPU's own accesses through a
state's tables (dmfrag.accesses, ``dmfrag tlbcost``): the format, known
answers that do not depend on the model's kernel, faults reported rather
than counted, and guest memory left as it was."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from dmfrag.accesses import (
    FETCH,
    LOAD,
    STORE,
    AccessFormatError,
    AccessStream,
    all_4k_kernel,
    figures,
    load_accesses,
    replay,
    save_accesses,
    tlbcost,
    unsplit_kernel,
)
from guestkernel import Kernel


@pytest.fixture(scope="module")
def k():
    return Kernel.boot(ram="1G")


@pytest.fixture(scope="module")
def k4(k):
    return all_4k_kernel(k)


def walks(r) -> int:
    return r.tlb["dtlb_load_misses.walk_completed"] + r.tlb["dtlb_store_misses.walk_completed"]


def test_one_address_repeated_walks_once(k):
    r = replay(k, AccessStream.loads([k.pfn_to_virt(0x20000) + 8] * 5000), tlb="skylake")
    assert r.faults == 0 and r.tlb["data_accesses"] == 5000
    assert walks(r) == 1


def test_pages_within_l1_repeated_walk_once_each(k4):
    """32 4K pages (the L1 DTLB holds 64) read 20 times in turn: 32 walks."""
    pages = [k4.pfn_to_virt(0x18000 + 7 * i) for i in range(32)]
    r = replay(k4, AccessStream.loads(pages * 20), tlb="skylake")
    assert walks(r) == 32 and r.tlb["data_accesses"] == 640


def test_a_cycle_beyond_every_tlb_level_walks_every_time(k4):
    """More 4K pages than the L1 (64) and the STLB (1536) hold, in a cycle,
    with LRU: every access misses every level and walks."""
    pages = [k4.pfn_to_virt(0x10000 + i) for i in range(2048)]
    r = replay(k4, AccessStream.loads(pages * 3), tlb="skylake")
    assert walks(r) == 3 * 2048
    assert r.tlb["dtlb_load_misses.walk_completed_4k"] == 3 * 2048


def test_an_access_across_a_page_walks_both_pages(k4):
    """An 8-byte load at a page's last 4 bytes needs two translations: two
    walks on 4K pages, with the TLB fed and attached to the CPU alike."""
    s = AccessStream.loads([k4.pfn_to_virt(0x18000) + 4092])
    for attach in (False, True):
        r = replay(k4, s, tlb="skylake", attach=attach)
        assert r.faults == 0 and walks(r) == 2, attach
        assert r.tlb["dtlb_load_misses.walk_completed_4k"] == 2


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1 << 30), n=st.integers(20, 3000))
def test_the_fed_tlb_counts_what_the_attached_one_counts(k, k4, seed, n):
    """The replay feeds the TLB model the sequence the CPU ran, in one call
    per chunk; attached to the CPU (a hook per access) it counts the same:
    loads, stores, page-crossing accesses, fetches of the image's text and
    of pages the state does not let run, faulting stores to read-only text,
    on a 2M/1G state and an all-4K one."""
    rng = np.random.default_rng(seed)
    text = k.profile.image.text
    pfns = rng.integers(0x100, k.max_pfn, n).astype(np.uint64)
    va = np.uint64(k.pfn_to_virt(0)) + (pfns << np.uint64(12)) \
        + rng.integers(0, 4096, n).astype(np.uint64)
    kind = rng.integers(0, 3, n).astype(np.uint8)
    fe = kind == FETCH
    va[fe] = np.uint64(text) + (rng.integers(0, 1 << 12, int(fe.sum())).astype(np.uint64)
                                << np.uint64(12))       # text, and beyond it (NX data)
    ro = rng.random(n) < 0.05
    va[ro & (kind == STORE)] = np.uint64(text + 0x2000)  # a store to read-only text: faults
    size = rng.choice(np.array([1, 2, 4, 8], np.uint8), n)
    s = AccessStream(va, kind, size)
    for kern in (k, k4):
        fed = replay(kern, s, tlb="skylake", chunk=512)
        hooked = replay(kern, s, tlb="skylake", chunk=512, attach=True)
        assert fed.faults == hooked.faults
        assert figures(fed) == figures(hooked)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1 << 30), n=st.integers(50, 3000), spread=st.sampled_from([64, 4096, 1 << 17]))
def test_all_4k_never_walks_less_than_unsplit(k, seed, n, spread):
    rng = np.random.default_rng(seed)
    if not _UNSPLIT:
        _UNSPLIT.update(u=unsplit_kernel(k), a=all_4k_kernel(k))
    u, a = _UNSPLIT["u"], _UNSPLIT["a"]
    pfns = 0x8000 + rng.integers(0, spread, n)
    s = AccessStream(np.array([k.pfn_to_virt(int(p)) + int(o) for p, o in
                               zip(pfns, rng.integers(0, 512, n) * 8, strict=True)], np.uint64),
                     rng.integers(0, 2, n).astype(np.uint8), np.full(n, 8, np.uint8))
    ru, ra = replay(u, s, tlb="skylake"), replay(a, s, tlb="skylake")
    assert ru.faults == ra.faults == 0
    assert walks(ra) >= walks(ru)
    assert ra.tlb["est_walk_cycles"] >= ru.tlb["est_walk_cycles"]


_UNSPLIT: dict = {}


def test_stores_and_fetches_leave_memory_as_it_was(k):
    """A store writes back what was there; a fetch's target gets its bytes
    back: the replay changes nothing it runs through."""
    text = k.profile.image.text
    vas = [k.pfn_to_virt(0x28000), text + 0x300000, k.pfn_to_virt(0x28000) + 4092,
           text + 0x310000, k.pfn_to_virt(0x28001)]
    kinds = [STORE, FETCH, STORE, FETCH, LOAD]
    sizes = [8, 8, 4, 8, 2]
    before = k.machine.ram.copy()
    r = replay(k, AccessStream(np.array(vas, np.uint64), np.array(kinds, np.uint8),
                               np.array(sizes, np.uint8)), tlb="skylake")
    assert r.faults == 0
    assert r.tlb["model.loads"] == 1 and r.tlb["model.stores"] == 2
    assert r.tlb["model.fetches"] >= 2           # the two targets (and the replay's own code)
    assert np.array_equal(k.machine.ram, before)


def test_a_translation_the_state_does_not_allow_is_a_fault(k):
    """A store to read-only kernel text, a load from a secret page (out of
    the direct map) and a fetch from the NX direct map are faults, named
    with their index, and the rest of the stream still runs."""
    secret = k.secretmem.fault()
    text = k.profile.image.text
    vas = [text + 0x1000, k.pfn_to_virt(secret), k.pfn_to_virt(0x30000), k.pfn_to_virt(0x30001)]
    s = AccessStream(np.array(vas, np.uint64), np.array([STORE, LOAD, FETCH, LOAD], np.uint8),
                     np.full(4, 8, np.uint8))
    try:
        r = replay(k, s, tlb="skylake")
    finally:
        k.secretmem.free(secret)
    assert r.faults == 3
    assert [f[0] for f in sorted(r.first_faults)] == [0, 1, 2]
    what = {f[0]: f[3] for f in r.first_faults}
    assert "protection violation, write" in what[0]
    assert "not present" in what[1]
    assert r.tlb["model.loads"] == 1                # only the last load completed


def test_the_format(tmp_path, k):
    s = AccessStream(np.array([1 << 63, 2 << 60], np.uint64), np.array([LOAD, FETCH], np.uint8),
                     np.array([4, 8], np.uint8))
    save_accesses(tmp_path / "a.npz", s)
    back = load_accesses(tmp_path / "a.npz")
    assert np.array_equal(back.va, s.va) and np.array_equal(back.kind, s.kind)
    assert np.array_equal(back.size, s.size)
    np.save(tmp_path / "b.npy", np.array([5, 6], np.uint64))
    b = load_accesses(tmp_path / "b.npy")
    assert list(b.kind) == [LOAD, LOAD] and list(b.size) == [8, 8]
    np.savez(tmp_path / "c.npz", va=np.array([1], np.uint64))
    assert list(load_accesses(tmp_path / "c.npz").kind) == [LOAD]


@pytest.mark.parametrize("make, msg", [
    (lambda p: np.save(p / "x.npy", np.array([1, 2], np.int32)), "1-D uint64"),
    (lambda p: np.savez(p / "x.npz", addr=np.array([1], np.uint64)), "no 'va' array"),
    (lambda p: np.savez(p / "x.npz", va=np.array([1], np.uint64), kind=np.array([3], np.uint8)),
     "kind must be 0"),
    (lambda p: np.savez(p / "x.npz", va=np.array([1], np.uint64), size=np.array([3], np.uint8)),
     "size must be 1, 2, 4 or 8"),
    (lambda p: (p / "x.npz").write_text("no"), "not a .npz or .npy"),
])
def test_bad_streams_are_named(tmp_path, make, msg):
    make(tmp_path)
    path = next(tmp_path.glob("x.*"))
    with pytest.raises(AccessFormatError, match=msg):
        load_accesses(path)


def test_tlbcost_on_the_command_line(tmp_path, capsys):
    """Three runs of one stream: the unsplit reference walks least, all 4K
    most, and the state sits between; LA57 direct-map addresses (Linux's
    5-level layout) are the model's direct map."""
    from dmfrag.cli import main
    rng = np.random.default_rng(3)
    la57 = 0xFF11000000000000
    vas = (la57 + (rng.integers(0x10000, 0x70000, 3000).astype(np.uint64) << np.uint64(12)))
    np.save(tmp_path / "a.npy", vas.astype(np.uint64))
    assert main(["tlbcost", "--accesses", str(tmp_path / "a.npy"), "--ram", "2G",
                 "--workload", "secretmem", "--scale", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for run in ("state", "unsplit", "all_4k"):
        assert out[run]["accesses"] == 3000
        assert out[run]["walks_4k"] + out[run]["walks_2m"] + out[run]["walks_1g"] \
            == out[run]["dtlb_walks"]
    assert out["all_4k"]["walks_4k"] == out["all_4k"]["dtlb_walks"] > out["unsplit"]["dtlb_walks"]
    assert out["all_4k"]["faults"] == out["unsplit"]["faults"] == 0
    assert 0.0 <= out["position"] <= 1.0 or out["state"]["faults"]
    assert main(["tlbcost", "--accesses", str(tmp_path / "none.npy")]) == 2
    assert "not a .npz or .npy" in capsys.readouterr().err


def test_tlbcost_of_a_state_is_between_its_references(k):
    rng = np.random.default_rng(5)
    s = AccessStream.loads(k.pfn_to_virt(0) + (rng.integers(0x100, k.max_pfn, 2000)
                                               .astype(np.uint64) << np.uint64(12)))
    out = tlbcost(k, s)
    assert out["unsplit"]["dtlb_walks"] <= out["state"]["dtlb_walks"] \
        <= out["all_4k"]["dtlb_walks"]
    assert 0.0 <= out["position"] <= 1.0


def test_tlbcost_bad_input(tmp_path, capsys):
    from dmfrag.cli import main
    np.save(tmp_path / "e.npy", np.zeros(0, np.uint64))
    np.save(tmp_path / "a.npy", np.array([0xFFFF888000100000], np.uint64))
    assert main(["tlbcost", "--accesses", str(tmp_path / "e.npy")]) == 2
    assert "the stream is empty" in capsys.readouterr().err
    assert main(["tlbcost", "--accesses", str(tmp_path / "a.npy"), "--workload", "boot",
                 "--trace", str(tmp_path / "a.npy")]) == 2
    assert "give one of --workload W, --trace T and --from-dump X, not more" in \
        capsys.readouterr().err
    assert main(["tlbcost", "--accesses", str(tmp_path / "a.npy"), "--point", "boot"]) == 2
    assert "--point and --vmlinux go with --from-dump" in capsys.readouterr().err
    assert main(["tlbcost", "--accesses", str(tmp_path / "a.npy"), "--from-dump",
                 str(tmp_path / "nope.truth.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    # a captured-looking stream with nothing the model maps (vmalloc only)
    np.save(tmp_path / "v.npy", np.array([0xFFA0000000001000], np.uint64))
    assert main(["tlbcost", "--accesses", str(tmp_path / "v.npy"), "--ram", "1G"]) == 2
    assert "nothing to replay" in capsys.readouterr().err
    assert main(["accesses", "info", str(tmp_path / "nope.npz")]) == 2
    assert "not a .npz or .npy access stream" in capsys.readouterr().err
    assert main(["tlbcost", "--accesses", str(tmp_path / "a.npy"), "--tlb", "nope"]) == 2
    assert "unknown TLB preset" in capsys.readouterr().err


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_run_tlb_prices_the_state_with_its_kernels_capture(capsys, kernel):
    """run --tlb: the committed capture of the kernel record's own Linux
    (5.10's in the 4-level layout, 6.1's and 7.2's in the 5-level one) runs
    through the end state and its references; the references fault
    nowhere, all 4K walks at least as often as unsplit, and the ratio is
    the state's walk cycles over unsplit's."""
    from dmfrag.accesses import STREAMS, default_stream
    from dmfrag.cli import main
    assert default_stream(kernel) == STREAMS / f"linux-{kernel}-1G-age-256.npz"
    code = main(["run", "--workload", "vfree-reset-perms", "--ram", "1G", "--scale", "0.2",
                 "--kernel", kernel, "--tlb", "skylake", "--json"])
    t = json.loads(capsys.readouterr().out)["tlb"]
    assert code == 0 and t["accesses"] == f"linux-{kernel}-1G-age-256.npz"
    assert t["stream"]["paging_levels"] == (4 if kernel == "5.10" else 5)
    assert t["stream"]["replayed"] > 50_000 and t["stream"]["regions"]["direct_map"] > 10_000
    assert t["unsplit"]["faults"] == t["all_4k"]["faults"] == 0
    assert t["all_4k"]["dtlb_walks"] > t["unsplit"]["dtlb_walks"] > 0
    assert t["walk_cycles_vs_reference"] == pytest.approx(
        t["state"]["est_walk_cycles"] / t["unsplit"]["est_walk_cycles"])
    assert t["state"]["accesses"] == t["unsplit"]["accesses"] == t["stream"]["replayed"]


def test_run_tlb_with_a_stream_of_ones_own(tmp_path, capsys):
    from dmfrag.cli import main
    k = Kernel.boot(ram="1G")
    np.save(tmp_path / "a.npy", np.array([k.pfn_to_virt(0x20000 + i) for i in range(2000)] * 2,
                                         np.uint64))
    code = main(["run", "--workload", "boot", "--ram", "1G", "--scale", "0.05", "--tlb",
                 "skylake", "--accesses", str(tmp_path / "a.npy"), "--json"])
    t = json.loads(capsys.readouterr().out)["tlb"]
    assert code == 0 and t["accesses"] == str(tmp_path / "a.npy")
    assert t["stream"] == {"paging_levels": 4, "regions": t["stream"]["regions"],
                           "replayed": 4000, "left_out": 0, "relocated": False}
    assert t["paging_levels"] == 4
    # 2000 pages > the L1 (64) and the STLB (1536), in a cycle, LRU: every access walks
    assert t["all_4k"]["walks_4k"] == 4000 and t["unsplit"]["walks_4k"] == 0
    assert main(["run", "--workload", "boot", "--ram", "1G", "--accesses",
                 str(tmp_path / "a.npy")]) == 2
    assert "--accesses goes with --tlb" in capsys.readouterr().err


def test_a_sweep_cell_prices_with_its_kernels_capture():
    """A sweep's tlb: each cell's end state priced as run --tlb prices it
    (the committed capture of the cell's kernel)."""
    from dmfrag.accesses import price
    from dmfrag.sweep import run_cell
    from dmfrag.workloads import run_workload
    cell = {"workload": "vfree-reset-perms", "policy": "baseline", "seed": 1, "ram": "1G",
            "kernel": "7.2", "scale": 0.2, "tlb": "skylake"}
    row = run_cell(cell)
    d = run_workload("vfree-reset-perms", ram="1G", policy="baseline", seed=1, scale=0.2,
                     profile="7.2")
    t = price(d.kernel, "skylake")
    assert t["accesses"] == "linux-7.2-1G-age-256.npz"
    assert row["walk_cycles_vs_reference"] == t["walk_cycles_vs_reference"] >= 1.0
    assert row["tlb_position"] == t["position"]
