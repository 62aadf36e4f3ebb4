"""The boot-time memblock allocations (guestkernel/bootmem.py) against
Linux's own ``memblock=debug`` boot logs of 5.10, 6.1 and 7.2 at 2G and 8G
under QEMU (tests/data/memblock): what memblock holds when the buddy
allocator takes over, page for page, and where each large block went."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from guestkernel import Kernel, KernelError
from guestkernel.bootmem import (
    DEFAULT_INITRD_BYTES,
    HARNESS_CMDLINE,
    alloc_large_system_hash,
    boot_command_line,
    nr_kernel_pages,
    qemu_initrd_range,
)
from guestkernel.e820 import E820Table
from guestkernel.memblock import Memblock, MemblockError
from guestkernel.owner import PageOwner
from guestkernel.page_alloc import MigrateType

MEMBLOCK = Path(__file__).parent / "data" / "memblock"
LOGS = sorted(p.name for p in MEMBLOCK.glob("*.log.gz"))
_RESERVE = re.compile(r"memblock_reserve: \[0x([0-9a-f]+)-0x([0-9a-f]+)\]")
_FREE = re.compile(r"memblock_(?:phys_)?free\w*: \[0x([0-9a-f]+)-0x([0-9a-f]+)\]")
_DUMP = re.compile(r" reserved\[0x[0-9a-f]+\]\s+\[0x([0-9a-f]+)-0x([0-9a-f]+)\]")


def _log(name: str) -> str:
    return gzip.decompress((MEMBLOCK / name).read_bytes()).decode()


def _kernel(name: str) -> str:
    return name.split("-")[1]


def _available(k: Kernel) -> int:
    """Free pages, with those deferred struct-page init has yet to free."""
    return k.buddy.nr_free() + sum(e - s for s, e in k.buddy.deferred)


def _pages(mb: Memblock) -> list[tuple[int, int]]:
    """The page ranges memblock_free_all hands to the buddy allocator."""
    out = []
    for lo, hi in mb.free_ranges():
        lo, hi = -(-lo // 4096), hi // 4096
        if lo < hi:
            out.append((lo, hi))
    return out


def linux_memblock(log: str) -> Memblock:
    """Linux's memblock at "Memory:" (mem_init, after memblock_free_all),
    replayed from the log: the reservations of its first "MEMBLOCK
    configuration" dump (memblock=debug logs only what follows the early
    parameter), then every memblock_reserve and memblock_free line."""
    mb = Memblock(E820Table.from_dmesg(log))
    lines = log.splitlines()
    at = next(i for i, ln in enumerate(lines) if "MEMBLOCK configuration" in ln) + 1
    while "memory" in lines[at] or "reserved" in lines[at]:
        if m := _DUMP.search(lines[at]):
            lo, hi = int(m.group(1), 16), int(m.group(2), 16) + 1
            mb.reserve(lo, hi - lo, "dump")
        at += 1
    for line in lines[at:]:
        if "Memory:" in line:
            break
        if m := _RESERVE.search(line):
            lo, hi = int(m.group(1), 16), int(m.group(2), 16) + 1
            mb.reserve(lo, hi - lo, "log")
        elif m := _FREE.search(line):
            lo, hi = int(m.group(1), 16), int(m.group(2), 16) + 1
            mb.free(lo, hi - lo)
    return mb


def _allocation(log: str, caller: str) -> list[tuple[int, int]]:
    """(base, size) of each memblock allocation made from ``caller``."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if re.search(rf"memblock_\w+: \d+ bytes .* {caller}\+", line):
            m = next(_RESERVE.search(ln) for ln in lines[i + 1:] if _RESERVE.search(ln))
            lo, hi = int(m.group(1), 16), int(m.group(2), 16) + 1
            out.append((lo, hi - lo))
    return out


@pytest.mark.parametrize("name", LOGS)
def test_the_buddy_gets_the_pages_linux_hands_over(name):
    """Every page memblock_free_all frees in Linux the model frees, and no
    other: the initrd, NODE_DATA, the sparse and vmemmap blocks, the
    per-CPU unit and its freed tail, the hash tables, swiotlb, the unused
    brk after the image, and (5.10) the low memory below 1 MiB."""
    log = _log(name)
    k = Kernel.boot(e820=log, profile=_kernel(name), boot_cpa=False)
    linux = _pages(linux_memblock(log))
    assert _pages(k.memblock) == linux
    assert _available(k) == sum(hi - lo for lo, hi in linux)


#: the logs whose "Memory: N K/M K available" line mem_init prints right
#: after preallocate_vmalloc_pages (5.10 at its end, 6.1 in mm_init next to
#: it); 7.2 prints it after deferred struct-page init, past slab and ftrace
_MEMORY_LINE = re.compile(r"Memory: (\d+)K/(\d+)K available")
_PRINTED_AT_MEM_INIT = [n for n in LOGS if not n.startswith("linux-7.2")]


@pytest.mark.parametrize("name", _PRINTED_AT_MEM_INIT)
def test_memory_available_is_linux_s_after_the_vmalloc_tables(name):
    """Linux's "Memory: ...K available" is nr_free_pages() after
    memblock_free_all and preallocate_vmalloc_pages: with the hand-over
    page for page (above), the model's free pages equal it only with the
    vmalloc space's tables taken: 64 PUD pages on 4-level 5.10, 50 P4D
    pages on 5-level 6.1 (12.5 PB / 256 TB)."""
    log = _log(name)
    k = Kernel.boot(e820=log, profile=_kernel(name), boot_cpa=False)
    linux_free = int(_MEMORY_LINE.search(log).group(1)) // 4
    before = k.buddy.nr_free()
    k.buddy.boot_pagesets()
    made = k.preallocate_vmalloc_pages()
    assert made == (64 if _kernel(name) == "5.10" else 50)
    assert before - made == k.buddy.nr_free() == linux_free
    assert k.vmalloc_prealloc_pages == made
    # taken once: a second call finds every entry populated
    assert k.preallocate_vmalloc_pages() == 0 and k.buddy.nr_free() == linux_free


@pytest.mark.parametrize("levels", [4, 5])
def test_the_vmalloc_tables_are_linked_under_each_top_level_entry(levels):
    """Each top-level entry over [VMALLOC_START, VMALLOC_END] links a table
    page that is a page-table page (PageTables counts it), and a vmalloc
    area's mapping reuses it instead of making one at that level."""
    k = Kernel.boot(ram="2G", profile="6.1", paging_levels=levels)
    lay, pgt = k.layout, k.pgt
    top = 12 + 9 * (levels - 1)
    first, last = lay.vmalloc_start >> top & 511, lay.vmalloc_end >> top & 511
    assert last - first + 1 == k.vmalloc_prealloc_pages == (64 if levels == 4 else 50)
    tables = []
    for idx in range(first, last + 1):
        entry = pgt.get(pgt.slot(pgt.root, idx))
        assert entry & 1 and not entry & 0x80, (idx, hex(entry))
        tables.append(entry & 0x000FFFFFFFFFF000)
    assert set(tables) <= pgt.table_pages
    assert {k.page_owner[pa >> 12] for pa in tables} == {PageOwner.PAGE_TABLE}
    # the entries just outside the range stay empty (no table made there)
    assert pgt.get(pgt.slot(pgt.root, first - 1)) == 0
    n = len(pgt.table_pages)
    area = k.vmalloc.vmalloc_node_range(4096)
    # 4-level: a PMD and a PTE table; 5-level: a PUD, a PMD and a PTE table
    assert len(pgt.table_pages) - n == levels - 2
    assert pgt.get(pgt.slot(pgt.root, area.addr >> top & 511)) & 0x000FFFFFFFFFF000 == tables[0]
    k.validate()


def test_the_default_kernel_makes_its_record_machines_count():
    """The default kernel (4-level tables, 6.1's 5-level boot allocations)
    makes the 50 pages 6.1 made there, under the first 50 of its 64
    entries; 5.10 (4-level) makes 64; 3.13 predates them (5.9)."""
    k = Kernel.boot(ram="2G", profile="6.1")
    assert k.paging_levels == 4 and k.linux_paging_levels == 5
    assert k.vmalloc_prealloc_pages == 50
    first = k.layout.vmalloc_start >> 39 & 511
    linked = [i for i in range(first, first + 64) if k.pgt.get(k.pgt.slot(k.pgt.root, i))]
    assert linked == list(range(first, first + 50))
    assert Kernel.boot(ram="2G", profile="5.10").vmalloc_prealloc_pages == 64
    assert Kernel.boot(ram="2G", profile="3.13").vmalloc_prealloc_pages == 0


@pytest.mark.parametrize("name", LOGS)
def test_the_large_boot_blocks_are_where_linux_put_them(name):
    """The 2 MiB per-CPU unit (2M aligned, top-down above 16 MiB: at 8G on
    7.2 it is 0x237a00000, near the top, where the first bpf_prog_pack
    takes pages), with the pages 'percpu: Embedded N pages/cpu' keeps; the
    dentry and inode hash tables; swiotlb's 64 MiB below 4 GiB."""
    log = _log(name)
    k = Kernel.boot(e820=log, profile=_kernel(name), boot_cpa=False)
    placed = k.bootmem.placed
    unit = _allocation(log, "pcpu_fc_alloc")
    assert placed["percpu unit"] == unit and unit[0][1] == 2 << 20
    assert f"Embedded {k.bootmem.percpu_pages} pages/cpu" in log
    hashes = _allocation(log, "alloc_large_system_hash")
    assert placed["Dentry cache hash table"] + placed["Inode-cache hash table"] == hashes[:2]
    swiotlb = [b for b in _allocation(log, r"swiotlb_init\w*") if b[1] == 64 << 20]
    assert [b for b in placed.get("swiotlb", []) if b[1] == 64 << 20] == swiotlb
    assert bool(swiotlb) == name.endswith("8G.log.gz")


@pytest.mark.parametrize("name", LOGS)
def test_hash_table_sizes_are_the_kernels(name):
    """alloc_large_system_hash: the entries each log prints."""
    log = _log(name)
    e820 = E820Table.from_dmesg(log)
    pages = nr_kernel_pages(e820)
    for table, scale in (("Dentry cache", 13), ("Inode-cache", 14)):
        entries = int(re.search(rf"{table} hash table entries: (\d+)", log).group(1))
        assert alloc_large_system_hash(pages, 8, scale) == entries * 8


def test_hash_tables_grow_more_slowly_beyond_64_gib():
    """ADAPT_SCALE: the scale grows by 2 bits each 4x of memory beyond
    64 GiB, so 256 GiB gets 4x the 16 GiB table, not 16x."""
    gib = (1 << 30) // 4096
    small = alloc_large_system_hash(16 * gib, 8, 13)
    assert small == 8 * (1 << 21)                    # 2M entries at 16 GiB
    assert alloc_large_system_hash(64 * gib, 8, 13) == 4 * small
    assert alloc_large_system_hash(256 * gib, 8, 13) == 8 * small


@pytest.mark.parametrize("name", LOGS)
def test_qemu_puts_the_initrd_where_the_logs_show(name):
    """QEMU's loader puts the initrd at the top of the RAM below 4 GiB: the
    project's boot initramfs (620 pages) lands on each log's RAMDISK line,
    at 2G and (below the 3 GiB hole) at 8G."""
    log = _log(name)
    m = re.search(r"RAMDISK: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]", log)
    want = (int(m.group(1), 16), int(m.group(2), 16) + 1)
    e820 = E820Table.from_dmesg(log)
    assert qemu_initrd_range(e820, DEFAULT_INITRD_BYTES) == want
    k = Kernel.boot(ram=name.split("-")[2].split(".")[0], profile=_kernel(name), boot_cpa=False)
    assert k.bootmem.initrd == want
    assert "Freeing initrd memory: 2480K" in log


def test_a_smaller_initrd_moves_the_top_allocations_up():
    """A 1 MiB initramfs instead of the project's: the initrd starts 1.4 MiB
    higher, and NODE_DATA and everything after it follows. A file of
    exactly 256 pages leaves the top page free: QEMU rounds down from the
    last byte below the top, (0x7ffdffff - 1 MiB) & ~0xfff."""
    default = Kernel.boot(ram="2G", profile="6.1", boot_cpa=False)
    small = Kernel.boot(ram="2G", profile="6.1", initrd=1 << 20, boot_cpa=False)
    none = Kernel.boot(ram="2G", profile="6.1", initrd=0, boot_cpa=False)
    assert small.bootmem.initrd == (0x7FEDF000, 0x7FFDF000)
    assert none.bootmem.initrd is None
    node = [k.bootmem.placed["NODE_DATA(0)"][0][0] for k in (default, small, none)]
    assert node == [0x7FD49000, 0x7FEB4000, 0x7FFB5000]
    assert _available(none) - _available(default) == 620


def test_the_command_line_comes_from_the_log_and_sizes_two_copies():
    log = _log("linux-6.1-2G.log.gz")
    line = "console=ttyS0 nokaslr secretmem.enable=1 panic=-1 memblock=debug"
    assert boot_command_line(log) == line
    assert boot_command_line(None) == HARNESS_CMDLINE
    k = Kernel.boot(e820=log, boot_cpa=False)
    assert k.cmdline == line
    assert [s for _b, s in k.bootmem.placed["command line"]] == [len(line) + 1] * 2
    # a 3000-byte command line takes about two more pages from memblock
    long = Kernel.boot(e820=log, boot_cpa=False, cmdline="x" * 3000)
    assert _available(k) - _available(long) in (1, 2)


def test_5_10_keeps_low_memory_free_below_1m():
    """Before 5.13 only the first 64K, the BIOS area and the real-mode blob
    are reserved below 1 MiB: pages 0x10-0x98 go to the buddy allocator."""
    k = Kernel.boot(ram="2G", profile="5.10", boot_cpa=False)
    assert _pages(k.memblock)[0] == (0x10, 0x99)
    k61 = Kernel.boot(ram="2G", profile="6.1", boot_cpa=False)
    assert _pages(k61.memblock)[0][0] == 0x100


@pytest.mark.parametrize("kw, message", [
    ({"initrd": -1}, "initrd size must be >= 0"),
    ({"initrd": 3 << 30}, "does not fit the RAM below 4 GiB"),
    ({"cmdline": 5}, "cmdline must be a str"),
])
def test_bad_boot_inputs_are_one_clear_error(kw, message):
    with pytest.raises(KernelError, match=message):
        Kernel.boot(ram="2G", profile="6.1", **kw)


def test_a_ramdisk_line_outside_ram_is_refused():
    log = _log("linux-6.1-2G.log.gz").replace("RAMDISK: [mem 0x7fd74000-0x7ffdffff]",
                                                "RAMDISK: [mem 0x7ffd0000-0x7fffffff]")
    with pytest.raises(KernelError, match="RAMDISK .* is not in RAM"):
        Kernel.boot(e820=log)


def test_memblock_frees_part_of_a_reservation_and_refuses_what_it_does_not_hold():
    mb = Memblock(E820Table.qemu_pc("1G"))
    mb.reserve(0x200000, 0x200000, "unit")
    mb.free(0x23E000, 0x1C2000)                 # the per-CPU unit's tail
    assert [(r.base, r.end) for r in mb.reserved] == [(0x200000, 0x23E000)]
    before = list(mb.reserved)
    with pytest.raises(MemblockError, match="not a reservation"):
        mb.free(0x230000, 0x20000)              # runs past the reservation
    assert mb.reserved == before


def test_a_reboot_of_the_same_machine_keeps_its_boot_layout():
    """tlbcost's unsplit reference boots the same machine again: the
    initrd range and command line of the pasted log carry over, so every
    boot-time block is where it was."""
    from dmfrag.accesses import unsplit_kernel
    log = _log("linux-7.2-8G.log.gz").replace("memblock=debug", "memblock=debug " + "y" * 900)
    k = Kernel.boot(e820=log, boot_cpa=False)
    again = unsplit_kernel(k)
    assert again.bootmem.initrd == k.bootmem.initrd == (0xBFD74000, 0xBFFE0000)
    assert again.cmdline == k.cmdline and again.bootmem.placed == k.bootmem.placed


def test_the_initrd_is_freed_page_by_page_after_the_boot_pack():
    """populate_rootfs -> free_initrd_mem: x86's free_init_pages on the
    initrd's direct map (NX and RW, what it has: no split), then
    free_reserved_area, one order-0 page at a time through the per-CPU
    list: "Freeing initrd memory: 2480K"."""
    k = Kernel.boot(ram="2G", profile="6.1")
    lo, hi = (x >> 12 for x in k.bootmem.initrd)
    assert hi - lo == 620
    assert all(k.buddy.is_handed_over(p) for p in range(lo, hi))
    # free, but for the page tables the splits of free_initmem and
    # mark_rodata_ro took right after: the per-CPU list's last-freed pages
    states = k.buddy.page_states()
    taken = [p for p in range(lo, hi) if states[p] != 1]
    assert taken == list(range(hi - 6, hi))
    assert all(k.page_owner[p] == PageOwner.PAGE_TABLE for p in taken)
    held = Kernel.boot(ram="2G", profile="6.1", boot_cpa=False)
    assert not any(held.buddy.is_handed_over(p) for p in range(lo, hi))
    k.validate("full")


def test_free_reserved_area_refuses_pages_given_already_and_changes_nothing():
    k = Kernel.boot(ram="2G", profile="6.1", boot_cpa=False)
    lo = k.bootmem.initrd[0] >> 12
    k.buddy.free_reserved_area(lo, lo + 4)
    before = (k.buddy.nr_free(), [list(h) for h in k.buddy._handed])
    with pytest.raises(ValueError, match="given to the buddy already"):
        k.buddy.free_reserved_area(lo + 2, lo + 8)
    assert (k.buddy.nr_free(), [list(h) for h in k.buddy._handed]) == before
    with pytest.raises(ValueError, match="is in no zone|not within"):
        k.buddy.free_reserved_area(k.max_pfn - 1, k.max_pfn + 1)
    k.buddy.check()


def test_own_boot_replay_frees_what_linux_frees_of_boot_memory():
    """From the model's own boot, the trace's frees of memory memblock kept
    go to the model's buddy allocator at the same pfns: the committed 6.1
    recording frees the initrd (620 pages) and, in free_initmem and
    mark_rodata_ro, the unused .bss..decrypted (2036K), the init sections
    (2824K) and the text/rodata and rodata/data gaps (2040K, 1108K): the
    lines "Freeing ... memory" of its boot log."""
    from dmfrag.modelled import replay_modelled
    r = replay_modelled(Path(__file__).parent / "data" / "truth" / "linux-6.1-2G-bpf-64.jsonl.gz")
    assert r.error is None
    assert r.reserved_pages_freed == 620 + (2036 + 2824 + 2040 + 1108) // 4
    assert r.to_json()["reserved_pages_freed"] == r.reserved_pages_freed
    r.model.buddy.check()


def test_a_logged_per_cpu_chunk_size_wins_over_the_record():
    """"percpu: Embedded N pages/cpu" (the recorder keeps the line): the
    unit's tail freed from there; a size the unit cannot hold is refused."""
    log = _log("linux-6.1-2G.log.gz")
    k = Kernel.boot(e820=log.replace("Embedded 62 pages", "Embedded 70 pages"),
                    boot_cpa=False)
    assert k.bootmem.percpu_pages == 70
    unit = k.bootmem.placed["percpu unit"][0][0]
    assert k.memblock.is_reserved(unit + 69 * 4096) and not k.memblock.is_reserved(unit + 70 * 4096)
    with pytest.raises(KernelError, match="per-CPU chunk of 600 pages"):
        Kernel.boot(e820=log.replace("Embedded 62 pages", "Embedded 600 pages"))


# -- deferred struct-page init ---------------------------------------------------------


@pytest.mark.parametrize("kernel, order", [("5.10", 9), ("6.1", 9), ("7.2", 10)])
def test_deferred_memory_comes_to_the_buddy_at_page_alloc_init_late(kernel, order):
    """CONFIG_DEFERRED_STRUCT_PAGE_INIT: memblock_free_all frees the top
    zone's first section only (8G: the Normal zone to 0x108000); ftrace's
    records and the other start_kernel allocations come from there;
    page_alloc_init_late frees the rest (whole pageblocks on 5.10 and 6.1,
    whole MAX_ORDER blocks on 7.2, MOVABLE), and only then are the
    watermarks computed."""
    from guestkernel.boot import first_deferred_pfn, ftrace_init, page_alloc_init_late
    k = Kernel.boot(ram="8G", profile=kernel, boot_cpa=False)
    b = k.buddy
    fdp = first_deferred_pfn(b)
    assert fdp == 0x108000 and b.deferred and b.deferred[0][0] == fdp
    assert not b.watermarks_fixed and b.deferred_free_order == order
    states = b.page_states()
    assert not (states[fdp:] == 1).any()                    # nothing deferred is free yet
    b.boot_pagesets()
    groups = ftrace_init(b, k.ftrace_pages)
    assert all(0x100000 <= g < fdp for g in groups)
    deferred = sum(e - s for s, e in b.deferred)
    free = b.nr_free()
    page_alloc_init_late(b)
    assert not b.deferred and b.watermarks_fixed
    assert b.nr_free() == free + deferred
    assert b.get_pageblock_migratetype(0x200000) == MigrateType.MOVABLE
    b.check()


def test_own_boot_replay_frees_the_deferred_range_where_the_trace_does():
    """From its own boot the modelled replay frees the deferred range at the
    trace's deferred_init_memmap frees (order-9 blocks and single pages on
    6.1), then makes the boot bpf_prog_pack, as page_alloc_init_late comes
    before the core initcalls."""
    from dmfrag.modelled import replay_modelled
    from dmfrag.placed import read_trace
    path = Path(__file__).parent / "data" / "traces" / "linux-6.1-4G-boot.jsonl.gz"
    _h, events = read_trace(path)
    linux = sum(1 << e[2] for e in events if e[0] == "F" and e[1] >= 0x108000
                and e[2] in (0, 9))
    r = replay_modelled(path)
    assert r.error is None and r.equal
    assert 0.9 * linux <= r.deferred_pages_freed <= linux
    assert not r.model.buddy.deferred
    assert r.to_json()["deferred_pages_freed"] == r.deferred_pages_freed
