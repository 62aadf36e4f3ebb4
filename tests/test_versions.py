"""Kernel versions as records: the boot log picks the record, the record
decides the behaviour, and the model's boot log equals the kernel's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guestkernel import Kernel
from guestkernel.kernel import KernelError
from guestkernel.versions import (
    STEP_RULES,
    VERSIONS,
    get_version,
    nearest_version,
    step_rule_for,
    version_from_boot_log,
)

DATA = Path(__file__).parent / "data"
_LOGGED = re.compile(r"^(init_memory_mapping: \[mem .*\]|\[mem 0x[0-9a-f]+-0x[0-9a-f]+\] page "
                     r"(4k|2M|1G)|Using GB pages for direct mapping)$")


def test_a_3_13_boot_log_picks_the_3_x_rule_and_its_boot_log_equals_the_kernels():
    text = (DATA / "dmesg-e820-example.log").read_text()
    k = Kernel.boot(e820=text)
    assert k.profile.name == "3.13"
    assert k.profile.step_rule is STEP_RULES["3.9"]
    assert "Linux 3.13" in k.profile_reason and "3.13 record" in k.profile_reason
    logged = [line for line in text.splitlines() if _LOGGED.match(line)]
    assert len(logged) == 17
    assert k.boot_log == logged
    # The same log booted with 6.1's rule steps differently: the first
    # 2M-stepped ranges differ from what 3.13 printed.
    k61 = Kernel.boot(e820=text, profile="6.1")
    assert k61.profile_reason == "kernel 6.1 (asked for)"
    assert [x for x in k61.boot_log if "page" in x] != [x for x in logged if "page" in x]


def test_qemu_layout_boot_log_lines_name_every_range_mapped():
    k = Kernel.boot(ram="2G")
    assert k.profile.name == "6.1" and k.profile_reason == "kernel 6.1 (default)"
    pages = [line for line in k.boot_log if " page " in line]
    # Every line is in the kernel's format, and together they cover RAM once.
    spans = []
    for line in pages:
        m = re.match(r"\[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] page (4k|2M|1G)$", line)
        assert m, line
        spans.append((int(m.group(1), 16), int(m.group(2), 16) + 1))
    # The ISA range whole, then exactly the RAM above 1 MiB, nothing twice.
    ram_above_1m = sum(hi - max(lo, 1 << 20) for lo, hi in k.e820.ram_ranges() if hi > 1 << 20)
    assert sum(hi - lo for lo, hi in spans) == (1 << 20) + ram_above_1m
    ordered = sorted(spans)
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))
    assert k.boot_log[0] == "Using GB pages for direct mapping"
    assert k.boot_log[1] == "init_memory_mapping: [mem 0x00000000-0x000fffff]"


@pytest.mark.parametrize(("release", "want"), [
    ((3, 13), "3.13"), ((3, 16), "3.13"), ((2, 6), "3.13"),
    ((4, 19), "5.10"), ((5, 10), "5.10"), ((5, 15), "5.10"),
    ((6, 1), "6.1"), ((6, 6), "6.1"), ((7, 2), "7.2"), ((8, 0), "7.2"),
])
def test_nearest_record_follows_the_step_rule_in_force(release, want):
    assert nearest_version(release).name == want
    assert nearest_version(release).step_rule is step_rule_for(release)


def test_boot_log_without_a_version_line_and_unknown_profiles():
    assert version_from_boot_log("BIOS-e820: [mem 0x0-0xfff] usable\n") is None
    got = version_from_boot_log("Linux version 4.19.0-20-amd64 (debian-kernel@...)\n")
    assert got is not None and got[0].name == "5.10" and "nearest" in got[1]
    with pytest.raises(KernelError, match="unknown kernel profile 'linux-9.9'; known: 3.13, 5.10"):
        Kernel.boot(ram="1G", profile="linux-9.9")
    assert get_version("debian-6.1") is VERSIONS["6.1"]


def test_records_answer_what_differs():
    v510, v61, v72 = VERSIONS["5.10"], VERSIONS["6.1"], VERSIONS["7.2"]
    assert not v510.bpf_prog_pack and v61.bpf_prog_pack and v72.bpf_prog_pack
    assert not v510.has_vmstat("direct_map_level2_splits")
    assert v61.has_vmstat("direct_map_level2_splits")
    assert not v61.has_vmstat("direct_map_level2_collapses")
    assert v72.has_vmstat("direct_map_level2_collapses") and v72.collapse_after_rox
    assert "bpf" in v72.set_memory_rox_users and not v61.set_memory_rox_users


def test_5_10_jits_without_packs():
    """5.10 (no bpf_prog_pack) gives each BPF program its own module_alloc."""
    k = Kernel.boot(ram="2G", profile="5.10")
    assert not k.bpf.use_pack and k.bpf.packs == []
    progs = [k.bpf.load(64) for _ in range(4)]
    assert len({p.addr >> 12 for p in progs}) == 4       # a page each
    k61 = Kernel.boot(ram="2G", profile="6.1")
    progs = [k61.bpf.load(64) for _ in range(4)]
    assert len({p.addr >> 21 for p in progs}) == 1       # one pack
    k.validate("full")


@pytest.mark.parametrize(("profile", "collapses"), [("6.1", 0), ("7.2", 1)])
def test_set_memory_rox_collapses_only_where_the_kernel_does(profile, collapses):
    """A 2M direct-map page split by one RO page, then all 512 pages made
    RO+X with set_memory_rox: 7.2 (6.15's cpa_collapse_large_pages) maps it
    with one 2M entry again; 6.1 leaves 512 PTEs."""
    k = Kernel.boot(ram="2G", profile=profile)
    pfn = k.alloc_pages(0, 9)
    va = k.pfn_to_virt(pfn)
    k.set_memory_ro(va + 4096, 1)
    assert k.lookup_address(va)[1] == 1
    k.set_memory_rox(va, 512)
    assert k.vmstat()["direct_map_level2_collapses"] == collapses
    assert k.lookup_address(va)[1] == (2 if collapses else 1)
    k.validate("full")


#: Boot /proc/meminfo of Debian's kernels under QEMU TCG (-cpu max, nokaslr,
#: a busybox initramfs), measured on this project's machines (kB).
REAL_BOOT = {
    ("5.10", "3G"): (22400, 2074624, 1048576),
    ("5.10", "8G"): (22400, 3123200, 7340032),
    ("7.2", "3G"): (22400, 2074624, 1048576),
    ("7.2", "8G"): (22400, 3123200, 7340032),
}


def _boot_meminfo(profile: str, ram: str) -> tuple[int, int, int]:
    mi = Kernel.boot(ram=ram, profile=profile).meminfo()
    return mi["DirectMap4k"], mi["DirectMap2M"], mi["DirectMap1G"]


@pytest.mark.parametrize("ram", ["3G", "8G"])
def test_5_10_boot_meminfo_equals_linux_5_10(ram):
    assert _boot_meminfo("5.10", ram) == REAL_BOOT[("5.10", ram)]


@pytest.mark.parametrize("ram", ["3G", "8G"])
def test_7_2_boot_meminfo_equals_linux_7_2(ram):
    """7.2's vmalloc takes high orders: its first bpf_prog_pack is one 2M
    block, whose direct-map alias set_memory_rox splits once (6.1's pack,
    512 order-0 pages across two 2M blocks, splits two); the 6.15 collapse
    walks the request's own (module) range, so the alias stays split."""
    assert _boot_meminfo("7.2", ram) == REAL_BOOT[("7.2", ram)]


def test_a_real_7_2_boot_log_boots_the_7_2_record_on_its_own_map():
    """Debian 7.2.13's own boot log (QEMU -m 8G): its e820 table in the new
    format ('System RAM', 'device reserved', gap lines, the reserved range at
    0xfd00000000) and its edits, which name the types the same way, give
    QEMU's 8G map, and its Linux version line picks the 7.2 record."""
    k = Kernel.boot(e820=DATA / "dmesg-7.2-e820.log")
    assert k.profile.name == "7.2" and "exact" in k.profile_reason
    assert k.e820.ram_ranges() == Kernel.boot(ram="8G", profile="7.2").e820.ram_ranges()
    assert k.e820.ram_ranges()[0] == (4096, 0x9F000)        # page 0 reserved by the edit


@pytest.mark.parametrize("policy", ["baseline", "migrate-unmapped", "unmapped-alloc",
                                    "per-user-caches"])
def test_7_2_high_order_vmalloc_under_grouping_policies(policy):
    """7.2's vmalloc splits high-order blocks into pages; a policy's blocks
    (GFP_UNMAPPED execmem) are tracked by their order, so those requests stay
    order-0: a module loads and unloads cleanly under every grouping policy
    (a split policy block was once refused at vfree as a bad free)."""
    k = Kernel.boot(ram="2G", profile="7.2", policy=policy)
    mod = k.modules.load_module("m", text=3 << 20, data=1 << 20)
    if policy == "baseline":   # data: its own vmalloc, one 1M block split into pages
        pfns = k.vmalloc.areas[mod.mem["data"]].pfns()
        assert pfns == list(range(pfns[0], pfns[0] + 256)) and pfns[0] % 256 == 0
        # text: the ROX cache, 2M areas (3M rounded up to two)
        (cache,) = k.execmem.rox_cache.areas.values()
        assert cache.size == 4 << 20 and cache.page_order == 9
    k.modules.delete_module("m")
    k.validate("full")
