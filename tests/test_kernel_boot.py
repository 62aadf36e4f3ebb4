"""Kernel.boot: the direct map as Linux 6.1 builds and counts it, checked in
the model's tables and by the emulated CPU's own walk."""

from __future__ import annotations

from pathlib import Path

import pytest

from emu import PageFault
from emu.pagetable import PfErr
from emu.pagetable import PteFlags as F
from guestkernel import PAGE_OFFSET, E820Error, Kernel, KernelError
from guestkernel.versions import VERSIONS

GiB, MiB = 1 << 30, 1 << 20
DATA = Path(__file__).resolve().parent / "data"
IMG = VERSIONS["6.1"].image


@pytest.fixture(scope="module")
def k8() -> Kernel:
    return Kernel.boot(ram="8G")


def level_at(k: Kernel, pa: int) -> int:
    found = k.lookup_address(PAGE_OFFSET + pa)
    assert found is not None, hex(pa)
    return found[1]


#: Linux 6.1 (Debian 6.1.0-56) booted by QEMU with -m 8G, /proc/meminfo (kB)
LINUX_8G = {"DirectMap4k": 24448, "DirectMap2M": 4169728, "DirectMap1G": 6291456}


def test_meminfo_8g_by_hand(k8):
    """QEMU 8G: RAM [0, 0x9fc00), [1M, 0xbffe0000), [4G, 9G).

    Largest-page rule: 4k = [0,1M) 256 + [1M,2M) 256 + [0xbfe00000,
    0xbffe0000) 480 = 992 pages; 2M = [2M,1G) 511 + [2G,0xbfe00000) 511 =
    1022; 1G = [1G,2G) + [4G,9G) = 6.
    6.1's top-down steps map [9G-2M,9G), then [8.5G,9G-2M), then the rest:
    each step after the first finds the 1G page at 8G already mapped and
    counts it again (phys_pud_init: "if (!after_bootmem) pages++"): 1G = 8.

    Boot CPA calls (as ftrace shows them on the reference kernel):
    * IDT read-only: image-mapping 2M page 0xffffffff83200000 and its alias
      at 0x3200000 split;
    * the first bpf_prog_pack (ptp_classifier_init): 512 order-0 pages,
      two 2M splits;
    * free_initmem: the unused .bss..decrypted (image page 0xffffffff84200000)
      and the init sections (image page 0xffffffff83000000) split;
    * mark_rodata_ro: NX from _etext splits image page 0xffffffff81e00000;
      the freed text/rodata and rodata/data gaps split image page
      0xffffffff82800000 and the aliases at 0x1e00000 and 0x2800000.
    Image-mapping splits count in DirectMap too (virt_addr_valid): 10 splits
    of 2M into 4K in all: 4k = 992 + 10*512, what Linux shows.

    DirectMap4k, the total (the re-count) and the image splits; where the
    pack's pages come from, and so DirectMap2M/1G:
    test_meminfo_8g_equals_linux."""
    mi = k8.meminfo()
    assert mi["DirectMap4k"] == (992 + 10 * 512) * 4 == LINUX_8G["DirectMap4k"]
    # Splits move kB between the lines, the re-count stays: 2 x 1G on top of
    # the 1G leaves the tables held before any split (also Linux's total).
    total = (992 * 4 + 1022 * 2048 + (6 + 2) * 1048576)
    assert sum(mi[key] for key in LINUX_8G) == total == sum(LINUX_8G.values())
    assert k8.boot_overcount == [0, 0, 0, 2, 0]
    # 5 of the 10 splits are image-mapping pages counted in DirectMap.
    assert k8.highmap_counted == [0, 5 * 512, -5, 0, 0]
    assert k8.pgt.recount_direct_map(k8.max_pfn)[1] == 992 + 5 * 512
    # Boot splits are not vmstat events (system_state was SYSTEM_BOOTING).
    assert k8.vmstat()["direct_map_level2_splits"] == 0
    assert k8.vmstat()["direct_map_level3_splits"] == 0


def test_meminfo_8g_equals_linux(k8):
    """Linux splits the 1G page at 4G (the pack's first pages) *and* the top
    one (more of its pages, from the free tail of the per-CPU unit near the
    top of RAM, 0x237a00000: guestkernel.bootmem): DirectMap1G 6 GiB."""
    mi = k8.meminfo()
    assert {key: mi[key] for key in LINUX_8G} == LINUX_8G


def blocks_at_4k(k: Kernel, lo: int, hi: int) -> list[int]:
    """The 2M blocks of [lo, hi) the direct map maps with 4K PTEs."""
    return [pa for pa in range(lo, hi, 2 * MiB) if level_at(k, pa) == 1]


def test_page_sizes_8g_where_linux_puts_the_boot_pack(k8):
    """What Linux's counters imply (the same 4K total, one 1G page fewer, the
    other eight 2M splits the image's): the pack's two 2M splits are one in
    the 1G page at 4G and one in the top 1G page, both split to 2M leaves:
    the top one is the per-CPU unit's 2M block, whose tail memblock freed."""
    assert level_at(k8, 8 * GiB) != 3
    assert blocks_at_4k(k8, 8 * GiB, 9 * GiB) == [0x237A00000]
    assert blocks_at_4k(k8, 4 * GiB, 5 * GiB) == [4 * GiB]


def test_page_sizes_at_chosen_addresses(k8):
    expect = {
        0x0: 1, 0x9F000: 1, 0x100000: 1, 0x1FF000: 1,       # ISA range and [1M,2M): 4K
        0x200000: 2, 0x3FE00000: 2,                          # [2M,1G): 2M
        0x40000000: 3, 0x7FFFF000: 3,                        # [1G,2G): 1G
        0x80000000: 2, 0xBFC00000: 2,                        # [2G,3G) is not all RAM: 2M
        0xBFE00000: 1, 0xBFFDF000: 1,                        # tail below the reserved 128K
        5 * GiB: 3, 7 * GiB + 0x1234000: 3,                  # above 4G: 1G
        0x1E00000: 1, 0x1E02000: 1, 0x2800000: 1, 0x3200000: 1,  # boot protections, IDT
        0x1C00000: 2, 0x2A00000: 2,                          # image alias, not split
    }
    for pa, level in expect.items():
        assert level_at(k8, pa) == level, hex(pa)
    # The boot BPF pack splits the 1G page at 4G (the Normal zone's first
    # free pages) to 2M leaves and some of them to 4K, in Linux too; how
    # many, and the top 1G page, are
    # test_page_sizes_8g_where_linux_puts_the_boot_pack's.
    assert all(level_at(k8, pa) in (1, 2) for pa in range(4 * GiB, 5 * GiB, 2 * MiB))
    assert blocks_at_4k(k8, 4 * GiB, 5 * GiB)
    # The CPU agrees on address and size.
    m = k8.machine
    for pa, level in expect.items():
        assert m.translate(PAGE_OFFSET + pa) == pa
        assert m.walk(PAGE_OFFSET + pa).level == level
    # Holes are not mapped: the reserved 128K below 3G, the PCI hole, beyond RAM.
    assert k8.lookup_address(PAGE_OFFSET + 0xBFFE0000)[0] == 0
    for pa in (0xC0000000, 0xFEE00000, 9 * GiB):
        with pytest.raises(PageFault) as exc:
            m.translate(PAGE_OFFSET + pa)
        assert exc.value.error_code == PfErr(0)


def test_protections_of_the_image_alias(k8):
    m = k8.machine
    text = PAGE_OFFSET + IMG.phys_start                     # kernel text alias: RO, NX
    for access, code in (("w", PfErr.P | PfErr.W), ("x", PfErr.P | PfErr.ID)):
        with pytest.raises(PageFault) as exc:
            m.translate(text, access)
        assert exc.value.error_code == code
    # The freed text/rodata gap is RW again; rodata stays RO.
    gap = PAGE_OFFSET + IMG.pa(0xFFFFFFFF81E02000)
    assert m.translate(gap, "w") == gap - PAGE_OFFSET
    with pytest.raises(PageFault):
        m.translate(PAGE_OFFSET + IMG.pa(IMG.start_rodata), "w")
    # The high kernel mapping: text executable and read-only.
    assert m.translate(IMG.text, "x") == IMG.phys_start
    with pytest.raises(PageFault):
        m.translate(IMG.text, "w")
    entry, level = k8.lookup_address(IMG.text)
    assert level == 2 and entry & F.PS and not entry & (F.RW | F.NX)


@pytest.mark.parametrize("ram, want", [
    # 3G: no RAM above 4G: nothing re-counted; the BPF pack comes from DMA32
    # (pfns 0x4802-0x4a01: 2M pages at 0x4800000 and 0x4a00000): 10 splits.
    # These equal what Linux 6.1 reports for 3G (and 2G, 4G) exactly.
    ("3G", {"DirectMap4k": 24448, "DirectMap2M": 2072576, "DirectMap1G": 1048576}),
    # 4G: the only 1G page above 4G is counted three times (steps 1, 2, 3),
    # then split by the BPF pack as at 8G.
    ("4G", {"DirectMap4k": 24448, "DirectMap2M": 3121152, "DirectMap1G": 3 * 1048576}),
])
def test_other_sizes(ram, want):
    k = Kernel.boot(ram=ram)
    mi = k.meminfo()
    assert {key: mi[key] for key in want} == want


def test_boot_from_a_pasted_boot_log():
    """The real 3.13 machine's e820, booted with the 6.1 rules: every range
    the log printed has that page size (except the 2M pages the boot
    protections split)."""
    text = (DATA / "dmesg-e820-example.log").read_text()
    k = Kernel.boot(e820=text, profile="6.1")
    # What the boot CPA calls split (see test_meminfo_8g_by_hand): the image
    # aliases, the IDT alias, and the BPF pack at the start of the Normal zone.
    split = {0x1E00000, 0x2800000, 0x3200000, 4 * GiB, 4 * GiB + 2 * MiB}
    sizes = {"4k": 1, "2M": 2, "1G": 3}
    import re
    for line in text.splitlines():
        m = re.match(r"\[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] page (\w+)", line)
        if not m:
            continue
        lo, hi, size = int(m.group(1), 16), int(m.group(2), 16) + 1, sizes[m.group(3)]
        for pa in (lo, (lo + hi) // 2 & ~0xFFF, hi - 4096):
            if pa & ~(2 * MiB - 1) in split or not k.e820.is_region_memory(pa, 4096) and size == 1:
                continue
            if size == 3 and pa >> 30 == 4:     # the 1G page at 4G was split by the pack
                size = 2
            assert level_at(k, pa) == size, (line, hex(pa))


def test_bad_boot_input():
    with pytest.raises(E820Error, match="memory size"):
        Kernel.boot(ram="lots")
    with pytest.raises(KernelError, match="unknown kernel profile"):
        Kernel.boot(ram="1G", profile="linux-9.9")
    with pytest.raises(KernelError, match="cannot read the e820 boot log"):
        Kernel.boot(e820=Path("/nonexistent/dmesg.log"))
    with pytest.raises(KernelError, match="not in RAM"):
        Kernel.boot(ram="32M")   # the 6.1 image needs RAM up to 70 MiB
    from guestkernel.policy import PolicyError
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        Kernel.boot(ram="1G", policy="nope")
