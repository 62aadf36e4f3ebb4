"""Workload step lists (``age:8000,bpf:2048``): the grammar, the model's
snapshots per step, and the same steps in a real 5.10 guest."""

from __future__ import annotations

import json
import shutil

import pytest

from dmfrag.cli import main
from dmfrag.registry import (
    PIPE_PAGES,
    BadWorkload,
    bpf_jit_bytes,
    guest_steps,
    model_driver,
    parse_steps,
)


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:      # argparse's own usage errors exit 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# -- the grammar ------------------------------------------------------------------------

def test_steps_parse_with_defaults():
    steps = parse_steps("boot,age:8000,bpf:2048,bpf:64:4,bpftrace,secretmem:10,modules,bpf")
    assert [(s.text, s.name, s.args) for s in steps] == [
        ("boot", "boot", ()), ("age:8000", "age", (8000,)), ("bpf:2048", "bpf", (2048, 2)),
        ("bpf:64:4", "bpf", (64, 4)), ("bpftrace", "bpftrace", (5,)),
        ("secretmem:10", "secretmem", (10,)), ("modules", "modules", ()), ("bpf", "bpf", ())]


@pytest.mark.parametrize("spec, says", [
    ("bpf:", "N must be an integer >= 1, not ''"),
    ("bpf:x", "N must be an integer >= 1, not 'x'"),
    ("age:-1", "N must be an integer >= 1, not '-1'"),
    ("age:0", "N must be an integer >= 1, not '0'"),
    ("age", "the form is age:N"),
    ("bpf:1:1", "K must be an integer >= 2"),
    ("bpf:1:2:3", "the form is bpf:N[:K]"),
    ("nope", "unknown workload 'nope'"),
    ("age:3,,bpf:2", "empty step"),
    ("age:3,boot", "only first"),
    ("bpf:4,bpf:4", "given twice"),
])
def test_bad_steps_are_one_clear_error(spec, says):
    with pytest.raises(BadWorkload) as exc:
        parse_steps(spec)
    assert says in str(exc.value) and spec.split(",")[0] in str(exc.value)


@pytest.mark.parametrize("spec", ["bpf:", "bpf:x", "age:-1", "nope", "age:1,nope:3"])
def test_cli_bad_steps_exit_2_before_any_work(capsys, monkeypatch, spec):
    import dmfrag.workloads
    monkeypatch.setattr(dmfrag.workloads, "run_workload",
                        lambda *a, **k: pytest.fail("ran"))
    code, out, err = cli(capsys, "run", "--workload", spec, "--ram", "1G")
    assert code == 2 and out == "" and "argument --workload" in err


def test_calibrate_bad_steps_exit_2_before_qemu(capsys, monkeypatch, tmp_path):
    import dmfrag.calibrate
    monkeypatch.setattr(dmfrag.calibrate, "calibrate", lambda *a, **k: pytest.fail("ran"))
    out = str(tmp_path / "c.json")
    for spec, says in (("bpf:x", "N must be an integer"),
                       ("vfree-reset:20000", "more than 8192 areas would be live"),
                       ("nope", "unknown workload 'nope'"), ("bpf:2,bpf:2", "twice")):
        code, _, err = cli(capsys, "calibrate", "--workload", spec, "--json", out)
        assert code == 2 and says in err, (spec, err)
    code, _, err = cli(capsys, "calibrate", "--kernel", "5.10", "--workload", "secretmem:4",
                       "--json", out)
    assert code == 2 and "no memfd_secret" in err


def test_guest_steps_of_a_step():
    assert guest_steps("age:10") == ("/bin/age 10 1 > /dev/console", "snap age:10")
    assert guest_steps("bpf:3:7") == ("/bin/bpf_load 3 7 bg > /dev/console", "snap bpf:3:7")
    assert guest_steps("bpftrace:1")[-1] == "snap bpftrace:1"
    assert guest_steps("bpf")[-1] == "snap bpf-freed"          # the old step, unchanged
    vfree = guest_steps("vfree-reset:3")
    assert vfree[-1] == "snap vfree-reset:3"
    # loaded once, the two symbols' addresses from kallsyms, then the plan
    assert vfree[1].startswith("[ -d /sys/module/dmfrag_vfree ] || insmod "
                               "/lib/modules/dmfrag_vfree.ko set_memory_ro_addr=0x$(grep ")
    assert "find_vm_area_addr=" in vfree[1]
    assert vfree[2] == "echo '3 1' > /sys/module/dmfrag_vfree/parameters/run"
    churn = guest_steps("module-churn:4")
    assert churn[-1] == "snap module-churn:4" and len(churn) == 5
    assert churn[0].startswith("insmod $(ls /lib/modules/wl/*.ko | sed -n ")


def test_vfree_reset_plan_is_the_modules_splitmix64():
    """The plan is drawn as dmfrag_vfree.c draws it: splitmix64 seeded with
    the guest's seed; its first outputs are splitmix64's published ones."""
    from dmfrag.registry import _splitmix64, vfree_reset_plan
    state, out = _splitmix64(0)
    assert out == 0xE220A8397B1DCDAF                 # splitmix64(0)'s first output
    state, out = _splitmix64(state)
    assert out == 0x6E789E6AA1B965F4
    plan = vfree_reset_plan(256)
    allocs = [a for op, a in plan if op == "alloc"]
    assert len(allocs) == 256 and set(allocs) == {1, 2, 4, 16}
    assert sum(1 for op, _ in plan if op == "free") == 126     # the guest printed frees=126
    assert sum(allocs) == 1471                                  # and pages=1471
    assert vfree_reset_plan(256) == plan and vfree_reset_plan(256, seed=2) != plan
    live = 0
    for op, arg in plan:                       # a free names a live area
        if op == "alloc":
            live += 1
        else:
            assert 0 <= arg < live
            live -= 1
    assert live == 130


def test_vfree_reset_in_the_model_loads_the_module_once_and_makes_the_plans_calls():
    from dmfrag.registry import VFREE_MODULE_LAYOUTS, vfree_reset_plan
    from dmfrag.workloads import run_workload
    d = run_workload("vfree-reset:40,vfree-reset:24", ram="1G", profile="6.1")
    loads = [ln for ln in d.lines if '"load_module"' in ln]
    assert len(loads) == 1 and '"dmfrag_vfree"' in loads[0]
    t, _, _, da, _, _ = VFREE_MODULE_LAYOUTS["6.1"]
    assert f'"text": {t}' in loads[0] and f'"data": {da}' in loads[0]
    plans = vfree_reset_plan(40) + vfree_reset_plan(24)
    assert sum('"vmalloc"' in ln for ln in d.lines) == sum(op == "alloc" for op, _ in plans)
    assert sum('"vfree"' in ln for ln in d.lines) == sum(op == "free" for op, _ in plans)
    assert [p["point"] for p in d.points] == ["boot", "vfree-reset:40", "vfree-reset:24"]
    # each live area read-only, and its direct-map alias too (4K-mapped
    # now); vfree's reset perms left the freed pages' aliases RW again
    k, RW = d.kernel, 1 << 1
    live = [a for a in k.vmalloc.areas.values() if a.caller == "vmalloc"]
    assert len(live) == sum(op == "alloc" for op, _ in plans) - sum(op == "free" for op, _ in plans)
    for area in live:
        for pfn in area.pfns():
            entry, level = k.lookup_address(k.pfn_to_virt(pfn))
            assert level == 1 and not entry & RW, hex(pfn)
    k.validate()


def test_module_churn_is_the_same_plan_in_the_guest_and_the_model():
    from dmfrag.registry import module_churn_plan
    from dmfrag.workloads import run_workload
    plan = module_churn_plan(12)
    assert len(plan) == 12 and plan[0][0] == "load"
    loaded: set[int] = set()
    for op, i in plan:                       # never a module twice, never a missing one
        assert (i not in loaded) if op == "load" else (i in loaded)
        loaded ^= {i}
    lines = guest_steps("module-churn:12")[:-1]
    assert [ln.split()[0] for ln in lines] == ["insmod" if op == "load" else "rmmod"
                                               for op, _ in plan]
    d = run_workload("module-churn:12", ram="2G", profile="7.2")
    calls = [ln for ln in d.lines[1:] if '"load_module"' in ln or '"delete_module"' in ln]
    assert len(calls) == 12
    assert '"name": "bfs"' in "".join(calls) or '"name": "qnx6"' in "".join(calls)


def test_old_names_keep_their_drivers():
    from dmfrag.registry import REGISTRY
    for name in ("boot", "secretmem", "module-churn", "mixed"):
        assert model_driver(name) is REGISTRY[name].model


@pytest.mark.parametrize("kernel, base, one_chunk", [("5.10", 15, None), ("6.1", 16, 14),
                                                     ("7.2", 25, 9)])
def test_jit_rule(kernel, base, one_chunk):
    """The JIT image lengths the guest's bpf_load reads from the three
    kernels (bpf_prog_info.jited_prog_len: 2 instructions take 15, 16 and 25
    bytes, each further r0 = 0 two more: on 6.1 28 bytes at 8 instructions,
    140 at 64, 2060 at 1024), and what the JIT allocates for them: 64-byte
    pack chunks of image + 8-byte header + 16 bytes of illegal instructions
    (one chunk up to 14 instructions on 6.1, 9 on 7.2's longer prologue),
    whole pages of image + header + 128 on 5.10."""
    from dmfrag.registry import bpf_jit_len
    from guestkernel import Kernel
    from guestkernel.versions import get_version
    v = get_version(kernel)
    assert [bpf_jit_len(n, v) for n in (2, 8, 64, 1024)] == [base, base + 12, base + 124,
                                                             base + 2044]
    k = Kernel.boot(ram="2G", profile=kernel, boot_cpa=False)
    if one_chunk is None:
        assert bpf_jit_bytes(2, k) == bpf_jit_bytes(1024, k) == 4096
        assert bpf_jit_bytes(1974, k) == 4096 and bpf_jit_bytes(1975, k) == 8192
    else:
        assert bpf_jit_bytes(one_chunk, k) == 64 and bpf_jit_bytes(one_chunk + 1, k) == 128
        assert bpf_jit_bytes(64, k) == 192
        assert bpf_jit_bytes(2 << 20, k) % 4096 == 0          # beyond a pack: its own pages


# -- the model --------------------------------------------------------------------------

def test_run_snapshots_per_step(capsys):
    code, out, _ = cli(capsys, "run", "--workload", "age:200,bpf:64", "--ram", "2G", "--json")
    assert code == 0
    res = json.loads(out)
    snaps = res["snapshots"]
    assert [s["point"] for s in snaps] == ["boot", "age:200", "bpf:64"]
    boot, age, bpf = (s["meminfo"] for s in snaps)
    # age holds 100 pipes of 16 pages, plus its slab pages (1 per 2 pipes, 1 reclaimable per
    # 5); the freed pipes' pages may stay on the per-CPU lists (not counted free)
    held = (100 * PIPE_PAGES + 100 + 40) * 4
    assert held <= boot["MemFree"] - age["MemFree"] <= held + 100 * PIPE_PAGES * 4
    # no CPA in age: the direct map as booted
    assert age["DirectMap4k"] == boot["DirectMap4k"]
    # 6.1: 64 tiny programs fit in the boot-time bpf_prog_pack: no new page, no split
    # (each keeps a page of its own, from the per-CPU lists: not counted free)
    assert bpf["MemFree"] == age["MemFree"] and bpf["DirectMap4k"] == age["DirectMap4k"]
    assert res["meminfo"] == snaps[-1]["meminfo"] and res["vmstat"] == snaps[-1]["vmstat"]


def test_run_510_bpf_splits_as_computed(capsys):
    """5.10 has no bpf_prog_pack: each program takes a page of its own made
    RO+X, so its direct-map alias splits the 2M pages it falls in."""
    code, out, _ = cli(capsys, "run", "--workload", "bpf:2048", "--ram", "2G", "--kernel",
                       "5.10", "--json")
    assert code == 0
    boot, bpf = json.loads(out)["snapshots"]
    grown = bpf["meminfo"]["DirectMap4k"] - boot["meminfo"]["DirectMap4k"]
    splits = bpf["vmstat"]["direct_map_level2_splits"] - boot["vmstat"]["direct_map_level2_splits"]
    assert splits > 0 and grown == splits * 2048       # each split: one 2M page now 4K
    assert bpf["meminfo"]["DirectMap2M"] == boot["meminfo"]["DirectMap2M"] - grown
    # a page per program (an image of 64 bytes); the per-CPU lists held some of them
    # at boot already (not counted free)
    assert boot["meminfo"]["MemFree"] - bpf["meminfo"]["MemFree"] >= 2048 * 4 - 1024


def test_single_names_have_no_snapshots(capsys):
    code, out, _ = cli(capsys, "run", "--workload", "secretmem", "--ram", "1G", "--scale", "0.1",
                       "--json")
    assert code == 0 and "snapshots" not in json.loads(out)


def test_run_510_refuses_secretmem_steps(capsys):
    code, _, err = cli(capsys, "run", "--workload", "secretmem:4", "--kernel", "5.10")
    assert code == 2 and "no memfd_secret" in err


# -- the real 5.10 ----------------------------------------------------------------------

@pytest.mark.realkernel
def test_real_510_age_then_bpf():
    missing = [t for t in ("qemu-system-x86_64", "busybox", "cpio", "gcc")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}")
    from dmfrag.calibrate import calibrate
    comp = calibrate("8G", ("age:1000", "bpf:256"), kernel="5.10", timeout=120)
    assert list(comp.real) == ["boot", "age:1000", "bpf:256"]
    assert list(comp.model) == ["boot", "age:1000", "bpf:256"]
    assert comp.real["bpf:256"]["meminfo"]["DirectMap4k"] > \
        comp.real["boot"]["meminfo"]["DirectMap4k"]
    # age holds 500 pipes of 64 KiB: about 32 MB fewer free pages in Linux
    assert comp.real["boot"]["meminfo"]["MemFree"] - \
        comp.real["age:1000"]["meminfo"]["MemFree"] > 500 * PIPE_PAGES * 4
    # the comparison carries 5.10's own known differences, not 6.1's
    from dmfrag.calibrate import KNOWN_DIFFERENCES_5_10
    assert comp.known_differences == KNOWN_DIFFERENCES_5_10
    assert json.loads(comp.to_json())["known_differences"] == list(KNOWN_DIFFERENCES_5_10)
