"""The direct map's page sizes as Linux chooses them at boot, from e820."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guestkernel.e820 import E820Error, E820Table, E820Type, parse_size
from guestkernel.memory_mapping import init_mem_mapping, split_mem_range
from guestkernel.versions import STEP_RULES

# A copy of ../shared/data/dmesg-e820-example.log (a real 3.13 boot log).
DATA = Path(__file__).resolve().parent / "data"
GiB, MiB = 1 << 30, 1 << 20


def example_log() -> str:
    return (DATA / "dmesg-e820-example.log").read_text()


def test_e820_from_a_real_boot_log():
    t = E820Table.from_dmesg(example_log())
    # BIOS map, then: page 0 made reserved, 0xa0000-0xfffff removed.
    assert t.ram_ranges() == [(0x1000, 0x9F000), (0x100000, 0xCFE80000),
                              (0x100000000, 0x230000000)]
    assert t.max_pfn == 0x230000
    assert t.entries[0].type is E820Type.RESERVED and t.entries[0].end == 0x1000
    # "e820: remove ... usable" drops only RAM: the reserved BIOS area stays.
    assert [str(e) for e in t.entries[2:4]] == [
        "[mem 0x000000000009f000-0x000000000009ffff] reserved",
        "[mem 0x00000000000e4000-0x00000000000fffff] reserved"]


def test_page_sizes_equal_what_linux_3_13_printed():
    """The log's own ``[mem A-B] page 4k|2M|1G`` lines, in order, from its e820
    map, with 3.13's step growth (STEP_SIZE_SHIFT 5)."""
    text = example_log()
    want = [line.strip() for line in text.splitlines()
            if re.match(r"\s*\[mem 0x[0-9a-f]+-0x[0-9a-f]+\] page", line)]
    t = E820Table.from_dmesg(text)
    got = [str(r) for call in init_mem_mapping(t, step_rule=STEP_RULES["3.9"]) for r in call]
    assert got == want


def test_split_mem_range_by_hand():
    # RAM [1M, 3G+512M) with a hole at [0.9M, 1M): derivation as Linux's
    # split_mem_range: 4K head to 2M, 2M to 1G, 1G for [1G, 3G), 2M tail.
    t = E820Table.qemu_pc("4G")   # RAM [1M, 3G-128K) and [4G, 5G)
    pieces = split_mem_range(0x100000, 3 * GiB - 128 * 1024, t)
    assert [(r.start, r.end, r.label) for r in pieces] == [
        (0x100000, 0x200000, "4k"),            # [0, 2M) holds the ISA hole
        (0x200000, 1 * GiB, "2M"),
        (1 * GiB, 2 * GiB, "1G"),              # [2G, 3G) is not all RAM: 2M
        (2 * GiB, 3 * GiB - 2 * MiB, "2M"),
        (3 * GiB - 2 * MiB, 3 * GiB - 128 * 1024, "4k"),
    ]
    assert [r.label for r in split_mem_range(4 * GiB, 5 * GiB, t)] == ["1G"]
    assert [r.label for r in split_mem_range(4 * GiB, 5 * GiB, t, gbpages=False)] == ["2M"]


def test_qemu_layout_matches_the_reference_kernel_maps():
    t = E820Table.qemu_pc("8G")
    assert t.ram_ranges() == [(0x1000, 0x9F000), (0x100000, 0xBFFE0000), (4 * GiB, 9 * GiB)]
    assert E820Table.qemu_pc("2G").ram_ranges()[-1] == (0x100000, 2 * GiB - 128 * 1024)


@pytest.mark.parametrize("bad, match", [("8Q", "memory size"), ("0G", "positive"), ("", "memory size")])
def test_bad_sizes(bad, match):
    with pytest.raises(E820Error, match=match):
        parse_size(bad)


def test_bad_boot_logs():
    with pytest.raises(E820Error, match="no 'BIOS-e820"):
        E820Table.from_dmesg("Linux version 6.1\nnothing here\n")
    with pytest.raises(E820Error, match="line 2: unknown e820 type 'bogus'"):
        E820Table.from_dmesg("BIOS-e820: [mem 0x0-0xfff] usable\n"
                             "BIOS-e820: [mem 0x1000-0x1fff] bogus\n")
    with pytest.raises(E820Error, match="no usable RAM"):
        E820Table.from_dmesg("BIOS-e820: [mem 0x0-0xfff] reserved\n")
    with pytest.raises(E820Error, match="before its start"):
        E820Table.from_dmesg("BIOS-e820: [mem 0x2000-0x1fff] usable\n")


@pytest.mark.parametrize("ram, want_kb", [
    # The largest-page rule for QEMU's 8G map (linux-6.1-under-qemu.md):
    # 4k = [0,1M) ISA call (1024) + [1M,2M) (1024) + [0xbfe00000,0xbffe0000)
    # (1920); 1G = [1G,2G) + [4G,9G); 2M = the rest of RAM.
    ("8G", {"4k": 3968, "2M": 2093056, "1G": 6291456}),
    # 2G: RAM [1M, 2G-128K): no 1G block is all RAM.
    ("2G", {"4k": 1024 + 1024 + 1920, "2M": (2 << 20) - 4096, "1G": 0}),  # 2M: [2M, 2G-2M)
])
def test_mapped_sizes_for_qemu_layouts(ram, want_kb):
    calls = init_mem_mapping(E820Table.qemu_pc(ram))
    got = {"4k": 0, "2M": 0, "1G": 0}
    for call in calls:
        for r in call:
            got[r.label] += (r.end - r.start) // 1024
    assert got == want_kb


def test_top_down_steps_of_6_1():
    # 8G QEMU: first the top 2M block, then a step of 512M below it (the step
    # grew <<8 once 2M were mapped), then everything below in one step.
    calls = init_mem_mapping(E820Table.qemu_pc("8G"))
    spans = [(c[0].start, c[-1].end) for c in calls]
    assert spans[:3] == [(0, 0x100000), (9 * GiB - 2 * MiB, 9 * GiB),
                         (8 * GiB + 512 * MiB, 9 * GiB - 2 * MiB)]
    assert spans[3:] == [(0x100000, 0xBFFE0000), (4 * GiB, 8 * GiB + 512 * MiB)]
