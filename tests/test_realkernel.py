"""The model against real Linux kernels booted under QEMU (6.1 first; 5.10
and 7.2 at the end).

These boot Debian's kernel package (downloaded once into the cache) and
need qemu-system-x86, busybox-static and cpio: `make test` installs them
when run as root; elsewhere the tests skip, naming what to install.
"""

from __future__ import annotations

import shutil

import pytest

from dmfrag.calibrate import (
    KNOWN_DIFFERENCES,
    KNOWN_DIFFERENCES_5_10,
    VFREE_RESET_DIFFERENCE,
    run_model,
)
from dmfrag.realkernel import RealKernel, RealKernelError
from guestkernel import E820Table

pytestmark = pytest.mark.realkernel

#: 6.1's boots (issue 15's goal: every size from 2G to 64G on QEMU's layout;
#: 5G, 12G, 20G and 24G were seen equal too). Above half the host's memory
#: QEMU maps the guest's RAM without a reservation (realkernel._unreserved_ram)
SIZES = ("2G", "3G", "4G", "8G", "16G", "32G", "64G")
#: 5.10's and 7.2's (the goal: 2G, 4G, 8G, 16G; 32G and 64G were seen equal)
OTHER_SIZES = ("2G", "4G", "8G", "16G")
DIRECT = ("DirectMap4k", "DirectMap2M", "DirectMap1G")


@pytest.fixture(scope="module")
def rk() -> RealKernel:
    missing = [t for t in ("qemu-system-x86_64", "busybox", "cpio") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install qemu-system-x86 "
                    "busybox-static cpio (make test does it as root)")
    return RealKernel()


@pytest.fixture(scope="module")
def boots(rk):
    try:
        return {ram: rk.run(ram, ()) for ram in SIZES}
    except RealKernelError as exc:
        pytest.fail(str(exc))


WORKLOAD = ("modules", "bpf", "secretmem")


@pytest.fixture(scope="module")
def workload_run(rk):
    return rk.run("8G", WORKLOAD)


@pytest.fixture(scope="module")
def workload_run_2g(rk):
    return rk.run("2G", WORKLOAD)


def test_workload_equals_real_at_every_step_on_2g(rk, workload_run_2g):
    """2G guest: the five modules of the package (real section sizes), 2048
    BPF programs, 4096 secretmem pages: DirectMap4k/2M/1G and both split
    counters equal Linux's after every step."""
    real = workload_run_2g
    model = run_model(real.e820_lines(), WORKLOAD, rk)
    assert list(model) == list(real.snapshots)

    def differences(run) -> list[tuple[str, str]]:
        out = []
        for point in run.snapshots:
            out += [(point, key) for key in DIRECT
                    if model[point]["meminfo"][key] != run.meminfo(point)[key]]
            out += [(point, key) for key in ("direct_map_level2_splits",
                                             "direct_map_level3_splits")
                    if model[point]["vmstat"][key] != run.vmstat(point)[key]]
        return out

    diff = differences(real)
    if diff and all(point.startswith("secretmem") for point, _key in diff):
        # Linux itself is not deterministic here: once in a few boots the
        # secretmem pages land so that one 2M page fewer is split (DirectMap4k
        # 40832 instead of 42880 kB; seen since the initramfs grew). The
        # model must equal a real run: boot once more.
        diff = differences(rk.run("2G", WORKLOAD))
    assert not diff, diff


@pytest.mark.parametrize("ram", SIZES)
def test_real_memory_map_is_the_modelled_qemu_layout(boots, ram):
    real = E820Table.from_dmesg(boots[ram].e820_lines())
    model = E820Table.qemu_pc(ram)
    assert real.ram_ranges() == model.ram_ranges()
    # every entry (the AMD HyperTransport hole below 1 TiB too) and the
    # firmware's own count: they size boot-time allocations (bootmem)
    assert real.entries == model.entries
    assert real.firmware_entries == model.firmware_entries


@pytest.mark.parametrize("ram", SIZES)
def test_direct_map_total_equals_real(boots, ram):
    """Splits move kB between the DirectMap lines but keep their sum: the sum
    pins the boot-time mapping and 6.1's re-counting of large pages (above
    4G: 1 GiB more than the RAM mapped at 4G, 2 GiB more from 6G)."""
    real = boots[ram].meminfo("boot")
    model = run_model(boots[ram].e820_lines(), ())["boot"]["meminfo"]
    assert sum(model[k] for k in DIRECT) == sum(real[k] for k in DIRECT)


def test_direct_map_1g_equals_real_up_to_4g(boots):
    for ram in ("2G", "4G"):
        model = run_model(boots[ram].e820_lines(), ())["boot"]["meminfo"]
        assert model["DirectMap1G"] == boots[ram].meminfo("boot")["DirectMap1G"]


@pytest.mark.parametrize("ram", [
    "2G", "3G", "4G", "8G",
    pytest.param("16G", marks=pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[1])),
])
def test_boot_meminfo_equals_real(boots, ram):
    real = boots[ram].meminfo("boot")
    model = run_model(boots[ram].e820_lines(), ())["boot"]["meminfo"]
    assert {k: model[k] for k in DIRECT} == {k: real[k] for k in DIRECT}


def test_workload_steps(rk, workload_run):
    """Per step: the BPF programs split nothing (bpf_prog_pack), secretmem's
    splits stay after its pages are freed, DirectMap totals are kept."""
    real = workload_run
    model = run_model(real.e820_lines(), ("modules", "bpf", "secretmem"), rk)
    assert list(model) == list(real.snapshots)
    for point in real.snapshots:
        assert (sum(model[point]["meminfo"][k] for k in DIRECT)
                == sum(real.meminfo(point)[k] for k in DIRECT)), point
    for run in (real.snapshots, model):
        s = {p: run[p]["vmstat"]["direct_map_level2_splits"] for p in run}
        assert s["bpf"] == s["modules-removed"] == s["modules"]
        assert s["secretmem-freed"] == s["secretmem"] > s["bpf-freed"]
        assert all(run[p]["vmstat"]["direct_map_level3_splits"] == 0 for p in run)


@pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES[0])
def test_workload_split_counts_equal_real(rk, workload_run):
    real = workload_run
    model = run_model(real.e820_lines(), ("modules", "bpf", "secretmem"), rk)
    for point in real.snapshots:
        assert (model[point]["vmstat"]["direct_map_level2_splits"]
                == real.vmstat(point)["direct_map_level2_splits"]), point


def test_a_guest_larger_than_half_the_host_gets_unreserved_ram(monkeypatch):
    """A 64G guest on a 24G machine: QEMU's default RAM mapping is refused
    by the host's overcommit heuristic ("cannot set up guest memory"); the
    harness then backs it with a memory backend without a reservation."""
    from dmfrag.realkernel import _unreserved_ram
    host = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 << 18}     # 24 GiB
    monkeypatch.setattr("os.sysconf", lambda name: host[name])
    assert _unreserved_ram("2G") == _unreserved_ram("12G") == []
    assert _unreserved_ram("64G") == [
        "-object", f"memory-backend-ram,id=pc.ram,size={64 << 30},reserve=off",
        "-machine", "memory-backend=pc.ram"]
    assert _unreserved_ram("13G")[0] == "-object"
    assert _unreserved_ram("abc") == []       # QEMU's own error names the size


def test_missing_tools_and_bad_workload_are_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RealKernelError, match="apt-get install .*qemu-system-x86"):
        RealKernel(tmp_path).check_tools()
    monkeypatch.undo()
    with pytest.raises(RealKernelError, match="unknown workload 'nope'"):
        RealKernel(tmp_path).build_initramfs(("nope",), tmp_path / "i.gz")


# -- the other kernels: 5.10 (bullseye) and 7.2 (sid) ---------------------------------


@pytest.fixture(scope="module")
def other_boots(rk):
    """Each other kernel booted at each of OTHER_SIZES (downloaded once: the
    package pinned, its SHA256 checked against apt's metadata for its
    suite)."""
    try:
        return {(kern, ram): RealKernel(kernel=kern).run(ram, ())
                for kern in ("5.10", "7.2") for ram in OTHER_SIZES}
    except RealKernelError as exc:
        pytest.fail(str(exc))


@pytest.mark.parametrize("ram", OTHER_SIZES)
@pytest.mark.parametrize("kern", ["5.10", "7.2"])
def test_other_kernels_boot_meminfo_equals_the_model_on_their_record(other_boots, kern, ram):
    """The model boots from the e820 map the real kernel printed (7.2's in
    its new 'System RAM' format), follows the kernel's own record, and its
    DirectMap4k/2M/1G equal that kernel's."""
    real = other_boots[kern, ram]
    assert real.kernel == kern
    assert f"Linux version {kern}" in real.boot_log
    model = run_model(real.e820_lines(), (), kernel=kern)["boot"]["meminfo"]
    assert {k: model[k] for k in DIRECT} == {k: real.meminfo("boot")[k] for k in DIRECT}


@pytest.mark.parametrize("kern", ["5.10", "6.1", "7.2"])
def test_jit_image_lengths_are_the_records(rk, kern):
    """bpf_load prints its first program's bpf_prog_info.jited_prog_len: the
    model's JIT length rule (KernelVersion.bpf_jit_base_len, 2 bytes per
    further r0 = 0) is what each kernel's x86-64 JIT emits."""
    import re

    from dmfrag.registry import bpf_jit_len
    from guestkernel.versions import get_version
    run = RealKernel(kernel=kern).run("2G", ("bpf:1:2", "bpf:1:9", "bpf:1:64"))
    seen = {int(n): int(b) for n, b in re.findall(
        r"programs of (\d+) instructions loaded \(JIT image (\d+) bytes\)", run.console)}
    assert seen == {n: bpf_jit_len(n, get_version(kern)) for n in (2, 9, 64)}


@pytest.mark.parametrize("kern", ["6.1"])
def test_modules_from_a_dumped_boot_split_what_linux_splits(rk, kern):
    """4G, untraced, dumped at each snapshot: the model started from the
    boot's state loads the five modules (MODULE_LAYOUTS) and removes them;
    its split counter and DirectMap4k are Linux's within one 2M split
    either way: what Linux allocates between the snapshots besides the
    modules' memory (insmod, the module structures' slab, kworkers) is not
    modelled and moves from one boot to the next (Linux's own count does:
    7.2 at 2G splits 2 to 4 in identical boots). Seen: 6.1 equal in every
    run (2G, 4G, 8G); 7.2 equal, one short or one over. The committed dumps
    (tests/test_module_memory.py) hold the exact equality. Live on 6.1 only
    (80 s a kernel): 7.2's modules are recorded and dumped live in
    tests/test_recorded.py, and its committed dumps are checked exactly."""
    from dmfrag.registry import MODULE_LAYOUTS, modules_for
    from guestkernel import Kernel
    pytest.importorskip("drgn")
    real = RealKernel(kernel=kern).run("4G", ("modules",), truth=True)
    st = {s.point: s for s in real.states}
    k = Kernel.from_state(st["boot"], profile=kern)
    for m in modules_for(kern):
        t, r, a, d, it, idata = MODULE_LAYOUTS[kern][m]
        k.modules.load_module(m, t, r, a, d, init_text=it, init_data=idata)
    for point in ("modules", "modules-removed"):
        if point == "modules-removed":
            for m in modules_for(kern):
                k.modules.delete_module(m)
        short = real.vmstat(point)["direct_map_level2_splits"] \
            - k.vmstat()["direct_map_level2_splits"]
        assert short in (-1, 0, 1), point
        assert real.meminfo(point)["DirectMap4k"] - k.meminfo()["DirectMap4k"] == 2048 * short
    k.validate()


@pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENCES_5_10[0])
def test_5_10_bpf_programs_spread_as_linuxs_do(rk):
    """5.10 at 2G, 2048 two-instruction programs: DirectMap4k equals Linux's."""
    real = RealKernel(kernel="5.10").run("2G", ("bpf",))
    model = run_model(real.e820_lines(), ("bpf",), kernel="5.10")
    assert model["bpf"]["meminfo"]["DirectMap4k"] == real.meminfo("bpf")["DirectMap4k"]


@pytest.mark.parametrize("kern", ["5.10", "6.1", "7.2"])
def test_vfree_reset_module_runs_the_models_plan(rk, kern):
    """The guest module behind vfree-reset:N, built against the kernel's own
    headers: its section sizes are what the model loads
    (VFREE_MODULE_LAYOUTS), it loads, and in two steps it runs the plan the
    model runs (it prints its counts), keeping its live areas between them."""
    import re

    from dmfrag.registry import VFREE_MODULE, VFREE_MODULE_LAYOUTS, module_layout, vfree_reset_plan
    real = RealKernel(kernel=kern)
    lay = module_layout(real.helper_module(VFREE_MODULE), kern)
    assert lay["init_rodata"] == 0
    assert tuple(lay[k] for k in ("text", "rodata", "ro_after_init", "data", "init_text",
                                  "init_data")) == VFREE_MODULE_LAYOUTS[kern]
    run = real.run("2G", ("vfree-reset:64", "vfree-reset:32"))
    seen = {int(m[0]): tuple(map(int, m[1:])) for m in re.findall(
        r"@@VFREE n=(\d+) seed=1 allocs=(\d+) frees=(\d+) pages=(\d+) live=(\d+)", run.console)}
    live = 0
    for n in (64, 32):
        plan = vfree_reset_plan(n)
        allocs = [a for op, a in plan if op == "alloc"]
        frees = sum(op == "free" for op, _ in plan)
        live += len(allocs) - frees
        assert seen[n] == (n, frees, sum(allocs), live), n
    assert [p for p in run.snapshots] == ["boot", "vfree-reset:64", "vfree-reset:32"]


@pytest.mark.xfail(strict=True, reason=VFREE_RESET_DIFFERENCE)
def test_vfree_reset_splits_what_linux_splits(rk):
    """6.1 at 2G, 256 read-only vmalloc areas, a seeded half freed: the
    split counter equals Linux's."""
    real = rk.run("2G", ("vfree-reset:256",))
    model = run_model(real.e820_lines(), ("vfree-reset:256",), kernel="6.1")
    assert (model["vfree-reset:256"]["vmstat"]["direct_map_level2_splits"]
            == real.vmstat("vfree-reset:256")["direct_map_level2_splits"])
