"""Placement fixes of issue 15's second slice, each against the kernel code
it follows: khugepaged's min_free_kbytes, the per-CPU list generations
(5.10's fixed 6 * batch, 6.1's low watermark, 6.7+'s self-sizing lists), the
bulk allocator and vmalloc's use of it, 7.x's contiguous frees, and the
recorder's bulk-allocator events."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dmfrag.modelled import replay_modelled
from dmfrag.placed import read_trace
from dmfrag.recorder import parse_ftrace, splits_direct_map_tables
from dmfrag.truth import load_states
from guestkernel import Kernel
from guestkernel.boot import defer_watermarks
from guestkernel.gfp import GFP_KERNEL, parse_gfp
from guestkernel.page_alloc import BuddyAllocator, PcpScheme, ZoneType
from guestkernel.page_alloc.types import (
    MOVABLE,
    PAGEBLOCK_NR_PAGES,
    PCP_BATCH_SCALE_MAX,
    UNMOVABLE,
    WMARK_LOW,
    order_to_pindex,
)
from guestkernel.versions import get_version

TRUTH = Path(__file__).parent / "data" / "truth"
STATES = {"5.10": "linux-5.10-2G-modules", "6.1": "linux-6.1-2G-bpf-64",
          "7.2": "linux-7.2-2G-modules"}


def _boot_state(kernel: str):
    return next(s for s in load_states(TRUTH / f"{STATES[kernel]}.truth.npz")
                if s.point == "boot")


def _zone(state, name: str) -> dict:
    return next(z for z in state.zones if z["name"] == name)


# -- memmap_init's pageblock types -------------------------------------------------


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_a_pageblock_whose_first_page_is_not_ram_keeps_no_type(kernel):
    """memmap_init marks a pageblock MOVABLE at its first pfn, walking the
    RAM memblock knows; pfn 0 is reserved (trim_bios_range), so the first
    pageblock stays 0, UNMOVABLE, and the DMA zone's free 0x100-0x1ff go on
    its UNMOVABLE lists: Linux's trace-start dumps on all three kernels."""
    from guestkernel.boot import unset_pageblocks
    from guestkernel.e820 import E820Table
    e = E820Table.qemu_pc("2G")
    assert unset_pageblocks(e, e.max_pfn) == [0]
    st = load_states(TRUTH / f"linux-{kernel}-2G-boot.truth.npz")[0]
    assert st.point == "trace-start" and st.pageblock_mt[0] == UNMOVABLE
    free_dma = {(int(p), int(m)) for p, m in zip(st.free_pfn, st.free_mt) if p < 0x200}
    assert (0x100, UNMOVABLE) in free_dma
    b = Kernel.boot(ram="2G", profile=kernel, boot_cpa=False).buddy
    assert b.get_pageblock_migratetype(0x100) == UNMOVABLE
    assert b.get_pageblock_migratetype(0x200) == MOVABLE
    assert 0x100 in b.free_list(b.get_zone(ZoneType.DMA), 8, UNMOVABLE)


# -- min_free_kbytes and the watermarks ------------------------------------------


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_min_free_kbytes_is_khugepageds_as_in_linux(kernel):
    """set_recommended_min_free_kbytes: 2 zones (DMA, DMA32) at 2G:
    512 * 2 * 2 + 512 * 2 * 3 * 3 = 11264 pages = 45056 kB, what all three
    dumped kernels hold (calculate_min_free_kbytes alone gives 5,6xx)."""
    k = Kernel.boot(ram="2G", profile=kernel)
    assert k.buddy.min_free_kbytes == _boot_state(kernel).counters["min_free_kbytes"] == 45056


@pytest.mark.parametrize("kernel", ["6.1", "7.2"])
def test_watermarks_are_linuxs_computed_before_the_init_memory_is_freed(kernel):
    """init_per_zone_wmark_min and khugepaged run at initcalls, after
    memblock_free_all and before free_initmem: the watermarks are computed
    from the managed pages then, and equal the dumped kernel's."""
    k = Kernel.boot(ram="2G", profile=kernel)
    state = _boot_state(kernel)
    for z in k.buddy.zones:
        assert z.watermark == [int(x) for x in _zone(state, z.name)["watermark"]], z.name


def test_khugepaged_raise_is_capped_at_5_percent_of_the_buffer_pages():
    b = BuddyAllocator(0x4000, khugepaged_min_free=True)     # 64 MiB
    b.free_range(0x100, 0x4000)
    off = BuddyAllocator(0x4000)
    off.free_range(0x100, 0x4000)
    assert off.min_free_kbytes == 1015          # isqrt(lowmem_kbytes * 16)
    # nr_free_buffer_pages: managed pages above each zone's high watermark
    # (as calculate_min_free_kbytes set them), 5 % of it
    buffer_pages = sum(z.managed_pages - z.watermark[2] for z in off.zones)
    recommended = PAGEBLOCK_NR_PAGES * 2 * (2 + 9)
    assert b.min_free_kbytes == min(recommended, buffer_pages // 20) * 4 == 3148


# -- the per-CPU list generations -------------------------------------------------


def test_pcp_high_per_kernel_generation_is_what_the_dumps_show():
    """5.10: high = 6 * batch (pageset_set_batch), 0 in the 15 MiB DMA zone
    whose batch rounds to 0; 6.1: the low watermark; 7.2: high_min the low
    watermark, high_max an eighth of the zone, high itself 0 until used."""
    for kernel, scheme in (("5.10", PcpScheme.LEGACY), ("6.1", PcpScheme.FREE_FACTOR),
                           ("7.2", PcpScheme.AUTOTUNE)):
        assert get_version(kernel).pcp_scheme == scheme
    k510 = Kernel.boot(ram="2G", profile="5.10")
    dma32 = k510.buddy.get_zone(ZoneType.DMA32).pcp
    linux = _zone(_boot_state("5.10"), "DMA32")["pcp"][0]
    assert (dma32.high, dma32.batch) == (linux["high"], linux["batch"]) == (378, 63)
    dma = k510.buddy.get_zone(ZoneType.DMA).pcp
    assert (dma.high, dma.batch) == (0, 1)
    k61 = Kernel.boot(ram="2G", profile="6.1")
    z = k61.buddy.get_zone(ZoneType.DMA32)
    assert z.pcp.high == z.watermark[1] == _zone(_boot_state("6.1"), "DMA32")["pcp"][0]["high"]
    k72 = Kernel.boot(ram="2G", profile="7.2")
    z = k72.buddy.get_zone(ZoneType.DMA32)
    linux = _zone(_boot_state("7.2"), "DMA32")["pcp"][0]
    assert z.pcp.high_min == linux["high_min"] == z.watermark[1]
    # high_max is 1/8 of the zone's managed pages at the initcalls: the model
    # keeps ~0.4 % more pages than Linux there (boot reservations), so close
    assert abs(z.pcp.high_max - linux["high_max"]) < linux["high_max"] // 100
    assert z.pcp.high_max == z.managed_pages // 8 or z.pcp.high_max < z.managed_pages // 8


def _autotune_buddy() -> tuple[BuddyAllocator, object]:
    b = BuddyAllocator(0x20000, pcp_scheme=PcpScheme.AUTOTUNE)      # 512 MiB
    b.free_range(0x1000, 0x20000)
    z = b.get_zone(ZoneType.DMA32)
    return b, z


def test_autotune_refills_grow_high_and_scale_with_alloc_factor():
    """nr_pcp_alloc: high clamped into [high_min, high_max] and grown by the
    refill's batch; order-0 refills double (alloc_factor) while allocations
    go on without frees; a free halves alloc_factor."""
    b, z = _autotune_buddy()
    pcp = z.pcp
    batch, high_min = pcp.batch, pcp.high_min
    assert pcp.high == 0 and high_min < pcp.high_max
    gfp = int(GFP_KERNEL)
    b.alloc_pages(gfp, 0)                   # first refill: batch pages, high grows
    assert pcp.high == high_min + batch and pcp.alloc_factor == 1
    assert pcp.count == batch - 1
    for _ in range(batch - 1):              # empty the list
        b.alloc_pages(gfp, 0)
    assert pcp.count == 0
    b.alloc_pages(gfp, 0)                   # second refill: batch << 1
    assert pcp.count == (batch << 1) - 1 and pcp.alloc_factor == 2
    assert pcp.high == high_min + batch + (batch << 1)
    b.free_pages(b.alloc_pages(gfp, 0), 0)
    assert pcp.alloc_factor == 1 and pcp.free_count == 1


def test_autotune_frees_drain_what_was_freed_in_a_row():
    """free_unref_page_commit: free_count counts the pages freed since the
    last allocation (halved by each); past high, nr_pcp_free drains
    clamp(free_count, batch, high - batch), and nr_pcp_high raises high to
    hold free_count + batch."""
    b, z = _autotune_buddy()
    pcp = z.pcp
    gfp = int(GFP_KERNEL)
    held = [b.alloc_pages(gfp, 0) for _ in range(pcp.high_min + 500)]
    pcp.high = pcp.high_min                 # as decay_pcp_high leaves it
    b.drain_pages()
    for p in held:
        b.free_pages(p, 0)
    assert pcp.free_count == min(len(held), pcp.batch << PCP_BATCH_SCALE_MAX)
    assert pcp.count < pcp.high <= pcp.high_max
    assert pcp.high > pcp.high_min          # raised to hold the pages freed in a row
    b.check()


def test_autotune_consecutive_high_order_frees_drain_the_lists():
    """PCPF_PREV_FREE_HIGH_ORDER: a high-order free right after another, with
    free_count past a batch and half of high_min (6.15's threshold, read
    off 7.2's free_frozen_page_commit), frees the lists (free_high) and
    lowers high; below it the lists keep every page."""
    b, z = _autotune_buddy()
    pcp = z.pcp
    gfp = int(GFP_KERNEL)
    blocks = [b.alloc_pages(gfp, 3) for _ in range(80)]
    b.drain_pages()
    threshold = pcp.batch + pcp.high_min // 2
    assert threshold > 8 * 40          # 31 + 890 // 2 at 512 MiB
    for k, p in enumerate(blocks, 1):
        b.free_pages(p, 3)
        if 8 * k <= threshold:
            # (6.7-6.14 freed the lists from free_count >= batch: 4 frees)
            assert pcp.count == 8 * k
    # 80 order-3 frees in a row: past the threshold the lists go back
    assert pcp.count <= pcp.batch + 8
    assert pcp.prev_free_high_order
    b.check()


def test_decay_pcp_high_lowers_high_an_eighth_and_drains_a_batch_at_a_time():
    """6.7+ decay_pcp_high (7.2's, read off its disassembly): high goes an
    eighth of the way down (not below high_min, nor below the count less
    batch << 5), then the count past it is drained batch by batch, each
    batch from the first list (order-0 UNMOVABLE) on, from its tail."""
    b, z = _autotune_buddy()
    pcp = z.pcp
    gfp = int(GFP_KERNEL)
    pages = [b.alloc_pages(gfp, 0) for _ in range(600)]
    b.drain_pages()
    for p in pages:
        b.free_pages(p, 0)
    count, high, batch, high_min = pcp.count, pcp.high, pcp.batch, pcp.high_min
    assert count == 600 and high > high_min
    oldest = [x >> 4 for x in list(pcp.lists[0])[-5:]]
    assert b.decay_pcp_high(z)
    want = max(count - (batch << PCP_BATCH_SCALE_MAX), high - (high >> 3), high_min)
    assert pcp.high == want
    drained = count - pcp.count
    assert drained == max(0, count - want)
    # the tail (the oldest frees) went back first
    if drained:
        assert all(b.block_of(p)[2] == "free" for p in oldest)
    # again and again: high reaches high_min and stays; nothing left to do
    for _ in range(60):
        b.decay_pcp_high(z)
    assert pcp.high == high_min and pcp.count <= high_min
    assert not b.decay_pcp_high(z)
    b.check()
    # before 6.7 there is no such thing
    old = BuddyAllocator(0x20000, pcp_scheme=PcpScheme.FREE_FACTOR)
    old.free_range(0x1000, 0x20000)
    assert not old.decay_pcp_high(old.get_zone(ZoneType.DMA32))


def test_autotune_drains_free_to_the_pageblocks_type_now():
    """6.10+: free_pcppages_bulk frees each page to its pageblock's current
    migratetype, not the one it was put on the list with."""
    b, z = _autotune_buddy()
    gfp = int(GFP_KERNEL)
    pfn = b.alloc_pages(gfp, 0)
    b.free_pages(pfn, 0)
    block = pfn >> 9
    b._pageblock_mt[block] = 1              # MOVABLE from now on (a steal, say)
    b.drain_pages()
    head, order, kind = b.block_of(pfn)
    assert kind == "free"
    assert head in b.free_list(z, order, 1)      # the MOVABLE list
    assert head not in b.free_list(z, order, 0)


# -- the bulk allocator and vmalloc -------------------------------------------------


def test_alloc_pages_bulk_takes_the_per_cpu_list_head_in_order():
    b = BuddyAllocator(0x20000)
    b.free_range(0x1000, 0x20000)
    gfp = int(GFP_KERNEL)
    pages = [b.alloc_pages(gfp, 0) for _ in range(6)]
    for p in pages:
        b.free_pages(p, 0)                  # the list head is now pages[::-1]
    z = b.get_zone(ZoneType.DMA32)
    z.pcp.free_factor = 3
    got = b.alloc_pages_bulk(gfp, 4)
    assert got == pages[::-1][:4]
    assert z.pcp.free_factor == 3           # __rmqueue_pcplist: free_factor untouched
    assert b.alloc_pages_bulk(gfp, 0) == []
    one = b.alloc_pages_bulk(gfp, 1)        # one page: the single-page allocator
    assert one == pages[::-1][4:5] and z.pcp.free_factor == 1
    accounted = b.alloc_pages_bulk(gfp | int(parse_gfp("__GFP_ACCOUNT")), 5)
    assert len(accounted) == 1              # memcg accounting: one page, then the caller's loop
    b.check()


def test_vmalloc_takes_its_pages_from_the_bulk_allocator_from_5_13(monkeypatch):
    """vm_area_alloc_pages: 6.1 asks the bulk allocator, at most 100 pages a
    call; without it (5.10) one alloc_pages a page."""
    calls: list[int] = []
    real = BuddyAllocator.alloc_pages_bulk

    def spy(self, gfp, nr_pages):
        calls.append(nr_pages)
        return real(self, gfp, nr_pages)

    monkeypatch.setattr(BuddyAllocator, "alloc_pages_bulk", spy)
    k = Kernel.boot(ram="1G", profile="6.1")
    calls.clear()
    area = k.vmalloc.vmalloc_node_range(250 * 4096)
    assert calls == [100, 100, 50] and len(area.pages) == 250
    k.vmalloc.vfree(area.addr)
    k.validate()
    single = dataclasses.replace(get_version("6.1"), vmalloc_bulk=False)
    k2 = Kernel.boot(ram="1G", profile=single)
    calls.clear()
    k2.vmalloc.vmalloc_node_range(8 * 4096)
    assert calls == []
    assert not get_version("5.10").vmalloc_bulk and get_version("7.2").vmalloc_bulk


def test_7x_vfree_frees_contiguous_runs_as_blocks():
    """free_pages_bulk / free_prepared_contig_range: 8 contiguous, aligned
    pages are one order-3 free (onto the order-3 per-CPU list); 6.1 frees
    them one by one onto the order-0 list."""
    for kernel, expect_order in (("7.2", 3), ("6.1", 0)):
        k = Kernel.boot(ram="1G", profile=kernel)
        b = k.buddy
        start = b.alloc_pages(int(GFP_KERNEL), 3)
        b.split_allocated(start, 3)
        k.free_pages_bulk(list(range(start, start + 8)))
        assert _on_pcp(b, start, expect_order), kernel
        b.check()
        k.validate()


# -- the recorder's bulk events and the replay ---------------------------------------


def test_parse_ftrace_makes_a_b_event_of_each_bulk_call():
    base = 0xFFD4000000000000
    text = "\n".join([
        " bulk: (__alloc_pages_bulk+0x0/0x6c0) nr=3 gfp=0xcc2",
        f" bulkpage: (__alloc_pages_bulk+0x2fc/0x6c0) page={base + (0x7000 << 6):#x}",
        f" bulkpage: (__alloc_pages_bulk+0x2fc/0x6c0) page={base + (0x7005 << 6):#x}",
        " bulkpage: (__alloc_pages_bulk+0x2fc/0x6c0) page=0x0",
        " mm_page_alloc: page=0 pfn=0x7009 order=0 migratetype=0 gfp_flags=GFP_KERNEL",
        " bulk: (__alloc_pages_bulk+0x0/0x6c0) nr=2 gfp=0xcca",       # movable; no page
        " bulk: (__alloc_pages_bulk+0x0/0x6c0) nr=1 gfp=0xcc2",
        f" bulkpage: (__alloc_pages_bulk+0x2fc/0x6c0) page={0xFFFFEA0000000000 + (5 << 6):#x}",
    ])
    ev = parse_ftrace(text, {})
    assert ev == [["B", 3, 0, [0x7000, 0x7005]], ["A", 0x7009, 0, "GFP_KERNEL", 0, "kernel"],
                  ["B", 1, 0, [5]]]
    from dmfrag.realkernel import RealKernelError
    with pytest.raises(RealKernelError, match="not in a vmemmap"):
        parse_ftrace(" bulk: (f+0x0/0x1) nr=1 gfp=0x0\n bulkpage: (f+0x1/0x1) page=0x1000", {})


def test_split_tables_are_the_kernels_own_mappings_only():
    assert splits_direct_map_tables(0xFF11000001000000)          # LA57 direct map
    assert splits_direct_map_tables(0xFFFF888001000000)          # 4-level direct map
    assert splits_direct_map_tables(0xFFFFFFFF81000000)          # kernel image
    assert splits_direct_map_tables(None)                        # boot, before kprobes
    assert not splits_direct_map_tables(0xFFFFFFFFC0200000)      # module area (execmem)
    assert not splits_direct_map_tables(0xFFFFC90000000000)      # vmalloc


def _on_pcp(buddy, pfn: int, order: int) -> bool:
    """Whether ``pfn`` heads a block on its zone's UNMOVABLE per-CPU list of
    ``order``."""
    lst = buddy.page_zone(pfn).pcp.lists[order_to_pindex(UNMOVABLE, order)]
    return any(x >> 4 == pfn for x in lst)


def _v4(events: list[list], kernel: str = "6.1") -> list[str]:
    header = {"dmfrag_trace": 4, "source": "recorded", "kernel": kernel, "ram": "2G",
              "workload": [], "boot_log": ""}
    events = [*events, ["S", "boot", {"meminfo": {}, "vmstat": {}}]]
    return [json.dumps(header), *(json.dumps(e) for e in events), json.dumps({"end": len(events)})]


def test_modelled_replay_asks_the_models_bulk_allocator_for_a_b_event():
    """Where the model's bulk allocator puts a B event's pages (the per-CPU
    list head), given as Linux's pfns: every page agrees and is freed."""
    first = replay_modelled(_v4([["B", 5, 0, [0x7000 + i for i in range(5)]]]))
    assert first.error is None and first.bulk_pages == 5
    got = first.bulk_pfns
    assert len(got) == 5
    again = replay_modelled(_v4([["B", 5, 0, got], *(["F", p, 0] for p in got)]))
    assert again.error is None and again.bulk_same_pfn == 5
    assert again.untraced_frees == 0
    j = again.to_json()
    assert j["bulk"] == {"pages": 5, "same_pfn": 5, "calls_unmatched": 0, "calls_as_stacks": 0,
                         "calls_sized": 0}


def test_linux_split_tables_are_matched_with_the_models_own():
    """A request before kprobes (no arguments) replayed by the model: the
    table pages Linux allocated in its span stand for the tables the
    model's own split made (skipped, their frees too); those beyond are
    placed as any allocation (Linux split where the model did not), so the
    model's free memory follows Linux's. A second request on the same 2M
    region splits nothing in the model: its table is placed."""
    vm = "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN"

    def request() -> list[list]:
        return [["U", "set_memory_ro", "bpf_int_jit_compile"],
                ["C", "change_page_attr_set_clr", None], ["C", "alias", None]]

    def table(pfn: int) -> list:
        return ["A", pfn, 0, "GFP_KERNEL", 0, "cpa_pgtable"]

    events = [["A", 0x7000, 0, vm, 0, "vmalloc"], *request(),
              table(0x7100), table(0x7101), table(0x7102),
              ["A", 0x7200, 0, "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY", 0, "kernel"],
              ["A", 0x7001, 0, vm, 0, "vmalloc"], *request(), table(0x7103),
              ["F", 0x7100, 0], ["F", 0x7103, 0]]
    r = replay_modelled(_v4(events, kernel="5.10"))
    assert r.error is None and r.early_requests_skipped == 0
    # the model split the first page's 2M region (one table; Linux made
    # three), then nothing for the second page in the same region
    k = r.model
    first, second = r.model_pfns[0], r.model_pfns[4]
    assert first >> 9 == second >> 9
    assert k.lookup_address(k.pfn_to_virt(first))[1] == 1
    assert r.pgtable_allocations_skipped == 1 and r.pgtable_allocations_placed == 3
    # the two pages, the kernel page and the three placed tables
    assert r.allocations == 6 and len(r.model_pfns) == 6
    # both frees are known: the skipped table's (Linux's own) and the placed one's
    assert r.untraced_frees == 0
    r.model.buddy.check()


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_the_boot_jit_is_made_once_on_linux_s_pages(kernel):
    """The boot's first BPF JIT (ptp_classifier_init) is Linux's: without
    packs (5.10) its image is a traced vmalloc page whose set_memory_ro the
    replay makes from its early request, and the model's own boot call is
    not made a second time (it was, splitting a 2M page Linux did not).
    With packs the model makes the pack at the pack's first CPA marker on
    Linux's pages, which the recording lists (6.1: untraced bulk pages, the
    model's bulk allocator gives them; 7.2: a traced order-9 block), and
    the program's own pages are the trace's: no bpf.load (7.2's model took
    a second 2M block for its own pack)."""
    r = replay_modelled(TRUTH / f"linux-{kernel}-2G-boot.jsonl.gz", start="trace-start")
    assert r.error is None and r.equal
    k = r.model
    assert k.bpf.loads == 0
    assert len(k.bpf.packs) == (0 if kernel == "5.10" else 1)
    if kernel != "5.10":
        area = k.vmalloc.areas[k.bpf.packs[0].base]
        assert area.nr_pages == 512
        pfns = area.pfns()
        if kernel == "7.2":
            assert pfns == list(range(pfns[0], pfns[0] + 512)) and pfns[0] % 512 == 0
        else:
            assert r.bulk_pages >= 512


def test_the_module_area_pmd_table_is_the_image_s():
    """level3_kernel_pgt[511] is level2_fixmap_pgt, in the image: the last
    GiB (module area, fixmap) has its PMD table from the start, so the
    first module_alloc takes one PTE table from the buddy, as Linux's boot
    pack takes one (6.1's boot recording: 0x7d9cf, GFP_KERNEL|__GFP_ZERO)."""
    k = Kernel.boot(ram="2G", profile="6.1", boot_cpa=False)
    made = k.pgtable_pages_made
    k.execmem.module_alloc(4096, caller="test")
    assert k.pgtable_pages_made - made == 1


@pytest.mark.parametrize("kernel, early_high", [("6.1", 60), ("7.2", 0)])
def test_the_pcp_lists_are_sized_for_the_boot_until_the_postcore_initcall(kernel, early_high):
    """5.14+: setup_per_zone_wmarks ends with zone_pcp_update, and Linux
    sets no watermarks before init_per_zone_wmark_min (a postcore initcall,
    after the boot's bpf_prog_pack): setup_per_cpu_pageset sizes the lists
    from the managed pages before deferred init (2G: batch 15, so an
    order-3 refill takes 2 blocks, not 7) and no low watermark (6.1: high
    4 * batch; 6.7+: high starts at 0, high_min 4 * batch); the booted
    model has the postcore sizes (batch 63, high from the low watermark),
    as the boot dumps show. 5.10's lists do not follow the watermarks."""
    k = Kernel.boot(ram="2G", profile=kernel, boot_cpa=False)
    b = k.buddy
    b.boot_pagesets()
    defer_watermarks(b, k.profile)
    b.setup_per_cpu_pageset()
    dma32 = next(z for z in b.zones if z.name == "DMA32")
    assert dma32.watermark == [0, 0, 0] and b.min_free_kbytes == 0
    assert dma32.pcp.batch == 15 and dma32.pcp.high == early_high
    booted = next(z for z in Kernel.boot(ram="2G", profile=kernel).buddy.zones
                  if z.name == "DMA32")
    assert booted.pcp.batch == 63 and booted.watermark[WMARK_LOW] > 13000
    old = Kernel.boot(ram="2G", profile="5.10", boot_cpa=False).buddy
    before = [list(z.watermark) for z in old.zones]
    defer_watermarks(old, get_version("5.10"))
    assert [list(z.watermark) for z in old.zones] == before and not old.watermarks_fixed


def test_a_free_pages_bulk_marker_frees_its_run_together_on_7_2():
    """U free_pages_bulk, then its pages' F events: the model's pages of them
    go back through the model's free_pages_bulk (7.2: aligned runs as
    blocks), so the order-3 run lands on the order-3 list as in Linux."""
    events = [["A", 0x7008, 3, "GFP_NOWAIT|__GFP_HIGHMEM|__GFP_IO|__GFP_FS", 0, "vmalloc"],
              ["U", "free_pages_bulk", "vm_area_free_pages"],
              *(["F", 0x7008 + i, 0] for i in range(8))]
    r = replay_modelled(_v4(events, kernel="7.2"))
    assert r.error is None
    assert _on_pcp(r.model.buddy, r.model_pfns[0], 3)
    r.model.buddy.check()


def test_a_5_10_stack_marker_with_no_vmalloc_pages_is_an_untraced_stack():
    """5.10: a kernel stack's vmalloc (the recorder's __vmalloc_node_range
    marker from copy_process) followed by no vmalloc page before the next
    marker took its 4 pages while mm_page_alloc was off (the boot's
    event_trace_enable_again registers each event again, and sleeps): the
    model takes a stack's 4 pages there; a marker its pages follow is an
    ordinary traced stack."""
    vm = "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN|__GFP_ZERO"
    slab = "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY"
    stack = ["U", "__vmalloc_node_range", "copy_process"]
    traced = [stack, *(["A", 0x7000 + i, 0, vm, 0, "vmalloc"] for i in range(4)),
              ["A", 0x7010, 0, slab, 0, "kernel"]]
    untraced = [stack, ["A", 0x7010, 0, slab, 0, "kernel"]]
    a = replay_modelled(_v4(traced, kernel="5.10"))
    b = replay_modelled(_v4(untraced, kernel="5.10"))
    assert a.error is None and b.error is None
    assert a.untraced_stacks == 0 and b.untraced_stacks == 1
    assert b.to_json()["untraced_stacks"] == 1
    # the slab page comes after the stack's 4 pages in both
    assert a.model_pfns[-1] == b.model_pfns[-1]
    # not on kernels whose stacks the bulk allocator's marker shows
    c = replay_modelled(_v4(untraced, kernel="6.1"))
    assert c.untraced_stacks == 0


def test_a_batch_free_waits_for_allocations_among_its_frees():
    """An interrupt's allocations between a free_pages_bulk marker and its
    frees (a 7.2 vfree: two GFP_NOWAIT pages there) come before the batch
    gives its pages back, after its last prepare: the order-1 run goes to
    the order-1 list as a block, and the allocations take other pages.
    (The batch was freed page by page before: both pages at the head of
    the order-0 list, where Linux's next page-table allocations did not
    find them.)"""
    from dmfrag.modelled import _free_runs
    gfp = "GFP_NOWAIT|__GFP_HIGHMEM|__GFP_IO|__GFP_FS"
    events = [["A", 0x7008, 1, gfp, 0, "vmalloc"],
              ["U", "free_pages_bulk", "vm_area_free_pages"],
              ["A", 0x7100, 0, "GFP_NOWAIT", 0, "kernel"],
              ["F", 0x7008, 0],
              ["A", 0x7101, 0, "GFP_NOWAIT", 0, "kernel"],
              ["F", 0x7009, 0],
              ["X", "free_pages_bulk"]]
    assert _free_runs(events, 0) == {5: [3, 5]}
    r = replay_modelled(_v4(events, kernel="7.2"))
    assert r.error is None
    m = r.model_pfns[0]
    assert m not in (r.model_pfns[1], r.model_pfns[2])
    assert _on_pcp(r.model.buddy, m, 1) and not _on_pcp(r.model.buddy, m, 0)
    r.model.buddy.check()


def test_decay_markers_decay_each_zone_in_turn_on_7_2():
    """The recorder marks decay_pcp_high (vmstat's refresh walks every
    populated zone in order): the n-th marker is zone n modulo their
    number, and the model decays that zone's lists there."""
    decay = ["U", "decay_pcp_high", "refresh_cpu_vm_stats"]
    events = [["A", 0x7000, 0, "GFP_KERNEL", 0, "kernel"], decay, decay,
              ["A", 0x7001, 0, "GFP_KERNEL", 0, "kernel"], decay, decay]
    from dmfrag.modelled import _Modelled
    from dmfrag.placed import load_recorded
    header, evs, states = load_recorded(_v4(events, kernel="7.2"), None, None)
    rep = _Modelled(header, evs, None, states)
    names = [z.name for z in rep.k.buddy.zones]
    assert names == ["DMA", "DMA32"]
    assert rep.decay_at == {1: 0, 2: 1, 4: 0, 5: 1}
    calls = []
    buddy = rep.k.buddy
    orig = buddy.decay_pcp_high
    buddy.decay_pcp_high = lambda zone: calls.append(zone.name) or orig(zone)
    r = rep.run()
    assert r.error is None and calls == ["DMA", "DMA32", "DMA", "DMA32"]
    # 6.1 has no decay: its markers (none recorded) mean nothing
    assert _Modelled(*load_recorded(_v4(events), None, None)[:2], None, None).decay_at == {}


def test_a_free_the_recorder_saw_go_to_the_buddy_goes_there_in_the_model():
    """["F", pfn, 0, "buddy"]: Linux put the page straight on the buddy
    lists (its per-CPU lock was busy); the model frees it there too
    (free_one_page: __free_pages_ok's way), not onto its per-CPU list."""
    from dmfrag.modelled import _Modelled
    from dmfrag.placed import load_recorded
    allocs = [["A", 0x7000, 0, "GFP_KERNEL", 0, "kernel"],
              ["A", 0x7001, 0, "GFP_KERNEL", 0, "kernel"]]
    got = replay_modelled(_v4(allocs, kernel="7.2")).model_pfns
    events = [["A", got[0], 0, "GFP_KERNEL", 0, "kernel"],
              ["A", got[1], 0, "GFP_KERNEL", 0, "kernel"],
              ["F", got[0], 0, "buddy"], ["F", got[1], 0]]
    rep = _Modelled(*load_recorded(_v4(events, kernel="7.2"), None, None)[:2], None, None)
    assert rep.buddy_frees == {2}
    b = rep.k.buddy
    straight: list[int] = []
    orig = b.free_pages_ok
    b.free_pages_ok = lambda pfn, order=0, **kw: straight.append(pfn) or orig(pfn, order, **kw)
    r = rep.run()
    assert r.error is None and r.same_pfn == 2
    assert straight == [got[0]]                 # the other through the per-CPU list
    assert b.block_of(got[0])[2] == "free"
    b.check()


# -- the kernel image alias ------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_a_free_page_after_the_brk_keeps_its_image_alias(kernel):
    """__cpa_pfn_in_highmap: highmap_end_pfn rounds _brk_end up to 2M, so a
    page after the brk (free memory in the image's last 2M page) made
    read-only through the direct map also goes read-only in the image
    mapping, splitting that 2M page, as the CPU's walk shows."""
    k = Kernel.boot(ram="2G", profile=kernel)
    img = k.cpa.image
    brk_pfn = img.pa(img.brk_end) >> 12
    end_pfn = img.pa(-(-img.brk_end // (2 << 20)) * (2 << 20)) >> 12
    assert brk_pfn < end_pfn
    pfn = end_pfn - 1                    # the last pfn the image's 2M pages map
    _head, _order, kind = k.buddy.block_of(pfn)
    assert kind == "free"
    k.buddy.take_page_off_buddy(pfn)
    image_va = img.text + ((pfn << 12) - img.phys_start)
    before = k.machine.walk(image_va)
    assert before.level == 2 and before.writable
    splits = k.cpa.vmstat["direct_map_level2_splits"]
    k.cpa.set_memory_ro(k.pfn_to_virt(pfn), 1)
    after = k.machine.walk(image_va)
    assert after.level == 1 and not after.writable and after.pa == pfn << 12
    assert k.machine.walk(k.pfn_to_virt(pfn)).writable is False
    # the direct map's and the image's 2M pages both split (the image split
    # counts too: __virt_addr_valid accepts the image mapping)
    if get_version(kernel).has_vmstat("direct_map_level2_splits"):
        assert k.cpa.vmstat["direct_map_level2_splits"] == splits + 2
    k.validate()


def test_ftrace_init_takes_the_binary_decomposition_of_its_pages():
    """ftrace_allocate_records: each group the largest power of two the
    records left fill; the boot logs say 5.10 144 pages in 2 groups, 6.1
    159 in 6, 7.2 196 in 3 -- the binary decompositions."""
    from guestkernel.boot import ftrace_init, ftrace_pages
    for kernel, pages, groups in (("5.10", 144, 2), ("6.1", 159, 6), ("7.2", 196, 3)):
        assert ftrace_pages(get_version(kernel)) == pages
        assert pages.bit_count() == groups
    log = "[    0.142701] ftrace: allocated 40 pages with 2 groups\n"
    assert ftrace_pages(get_version("6.1"), log) == 40
    b = BuddyAllocator(0x20000)
    b.free_range(0x1000, 0x20000)
    b.boot_pagesets()
    heads = ftrace_init(b, 159)
    orders = [b.allocated_order(h) for h in heads]
    assert orders == [7, 4, 3, 2, 1, 0]
    b.setup_per_cpu_pageset()
    assert b.get_zone(ZoneType.DMA32).pcp.batch > 1
    k = Kernel.boot(ram="2G", profile="6.1")
    assert k.ftrace_pages == 159


def test_boot_pagesets_take_one_page_at_a_time():
    """Before setup_per_cpu_pageset every zone has the boot pageset (high 0,
    batch 1): an allocation leaves nothing on the per-CPU list and a free
    goes straight back to the buddy."""
    b = BuddyAllocator(0x20000)
    b.free_range(0x1000, 0x20000)
    b.boot_pagesets()
    z = b.get_zone(ZoneType.DMA32)
    p = b.alloc_pages(int(GFP_KERNEL), 0)
    assert z.pcp.count == 0
    b.free_pages(p, 0)
    assert z.pcp.count == 0 and b.block_of(p)[2] == "free"
    b.setup_per_cpu_pageset()
    assert z.pcp.high == z.watermark[1] and z.pcp.batch == 31     # 496 MiB zone
    b.check()


def test_own_boot_replay_takes_the_recordings_early_allocations_first():
    """What start_kernel allocates between the buddy hand-over and the first
    event, on the boot pagesets: ftrace_init's record pages (159 on 6.1),
    then the recording's own trace buffer (trace_buf_size=32M, by
    early_trace_init): 8,226 data pages of 4080 bytes (8,225 and the reader
    page) and a kmalloc-64 slab page per 64 of their buffer_pages; then
    the rest of what Linux allocated before its first event (early slab,
    per-CPU and trace-event data: 218 + 2 pages on 6.1, read off the
    trace-start dumps; among them the recorder's first ftrace trampoline,
    its page and tables). From the model's own boot the replay allocates
    them first, which puts the trace's first allocation where Linux's went
    (the committed 6.1 recording: 0x6a4e in both; before the early pages
    were made, 198 pages lower)."""
    from dmfrag.modelled import ring_buffer_pages
    assert ring_buffer_pages("[ 0.0] Command line: console=ttyS0 trace_buf_size=32M") == 8226
    assert ring_buffer_pages("[ 0.0] Command line: trace_buf_size=1k") == 2 + 1
    assert ring_buffer_pages("[ 0.0] Command line: console=ttyS0") == 0
    r = replay_modelled(TRUTH / "linux-6.1-2G-bpf-64.jsonl.gz")
    assert r.ring_buffer_pages == 8226 + 129 and r.ftrace_pages == 159
    assert r.early_pages == 218 + 2 and r.to_json()["early_pages"] == 220
    assert r.model_pfns[0] == 0x6a4e
    assert r.placement()["same_2m_region"] > 0.9
    assert r.to_json()["ring_buffer_pages"] == 8355


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_deferred_pageblocks_with_a_reserved_first_page_stay_unmovable(kernel):
    """CONFIG_DEFERRED_STRUCT_PAGE_INIT: memmap_init stops at the first
    deferred pfn (2G: 0x10000, after the first 128 MiB section of the top
    zone), and deferred_free_range sets MOVABLE only at the pageblock-aligned
    pages it frees, so a pageblock there whose first page is reserved keeps
    migratetype 0 (UNMOVABLE) on 5.10 and 6.1, as their dumps show (the
    2M per-CPU unit's pageblock, with its unused free tail); 7.2's dump has
    them MOVABLE. Every pageblock whose first page is reserved in both the
    model and Linux has Linux's type."""
    from guestkernel.boot import deferred_reserved_pageblocks, first_deferred_pfn
    k = Kernel.boot(ram="2G", profile=kernel)
    assert first_deferred_pfn(k.buddy) == 0x10000
    state = _boot_state(kernel)
    linux_mt = state.pageblock_mt
    linux_res = state.reserved_mask()
    both = [pfn for pfn in deferred_reserved_pageblocks(k.buddy, k.memblock)
            if pfn < len(linux_res) and linux_res[pfn]]
    assert len(both) >= 10
    for pfn in both:
        assert k.buddy.get_pageblock_migratetype(pfn) == linux_mt[pfn >> 9], hex(pfn)
    want = 0 if kernel != "7.2" else 1
    assert {int(linux_mt[pfn >> 9]) for pfn in both} == {want}


# -- init_per_zone_wmark_min where Linux ran it ----------------------------------


def test_init_per_zone_wmark_min_runs_at_its_marker_or_after_the_dma_pools():
    """The postcore initcalls run in link order: dma_atomic_pool_init
    (kernel/dma/pool.c), audit_init, then mm/'s, init_per_zone_wmark_min
    last. The recorder marks its first step (calculate_min_free_kbytes);
    a recording without the marker has it right after the DMA32 pool's
    block and its remap's vmalloc pages. Re-recorded with the marker, 7.2
    shows it exactly there (trace line 2230 of the committed boot)."""
    from dmfrag.modelled import _wmark_min_at
    ev = [["A", 0x100, 6, "GFP_KERNEL|GFP_DMA|__GFP_NOWARN", 0, "kernel"],
          ["A", 0x7040, 6, "GFP_KERNEL|GFP_DMA32|__GFP_NOWARN", 0, "kernel"],
          ["U", "alloc_pages_bulk_noprof", "alloc_pages_bulk_mempolicy_noprof"],
          ["A", 0x7d9d8, 0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_ZERO", 0, "vmalloc"],
          ["A", 0x7d9eb, 0, "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY", 0, "kernel"],
          ["A", 0x7d9ec, 0, "GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY", 0, "kernel"]]
    assert _wmark_min_at(ev, 0) == 4
    marked = ev[:5] + [["U", "calculate_min_free_kbytes", "init_per_zone_wmark_min"]] + ev[5:]
    assert _wmark_min_at(marked, 0) == 5
    assert _wmark_min_at(ev[2:], 0) is None           # no pool, no marker: at the JIT
    _, events = read_trace(TRUTH / "linux-7.2-2G-boot.jsonl.gz")
    assert _wmark_min_at(events, 0) == 2230 - 2      # trace line 2230 (the header is line 1)


def test_the_pcp_lists_keep_their_boot_batch_until_init_per_zone_wmark_min(tmp_path):
    """7.2 from its trace-start dump: Linux's order-2 refills before the
    postcore initcall take 3 blocks (batch 15 >> 2), after it 15; the
    recorder marks its first step (calculate_min_free_kbytes, line 2230 of
    the 2G boot recording). With the marker, and with it taken out (a
    recording made before it: the replay infers the place, after the DMA32
    atomic pool), the model gives every allocation of the boot Linux's pfn."""
    import gzip
    import shutil

    from dmfrag.modelled import trace_diff
    trace = TRUTH / "linux-7.2-2G-boot.jsonl.gz"
    d = trace_diff(trace, start="trace-start")
    assert d.first is None and d.allocations_before > 3000
    lines = gzip.decompress(trace.read_bytes()).decode().splitlines()
    marker = '["U","calculate_min_free_kbytes","init_per_zone_wmark_min"]'
    assert lines[2229] == marker
    older = [ln for ln in lines if ln != marker]
    older[-1] = json.dumps({"end": len(older) - 2})
    (tmp_path / "older.jsonl").write_text("\n".join(older) + "\n")
    shutil.copy(TRUTH / "linux-7.2-2G-boot.truth.npz", tmp_path / "older.truth.npz")
    d = trace_diff(tmp_path / "older.jsonl", start="trace-start")
    assert d.first is None and d.allocations_before == 3199


# -- alloc_pages_exact's tail (7.x) ---------------------------------------------


def test_free_pages_ok_to_tail_bypasses_the_per_cpu_lists():
    """__free_pages_ok(page, 0, FPI_TO_TAIL): an order-0 page straight to
    the buddy, at the free list's tail (where free_pages puts it at the
    per-CPU list's head); a page not allocated is a BadFreeError."""
    from guestkernel.page_alloc import BadFreeError
    b = BuddyAllocator(0x8000)
    b.free_range(0, 0x8000)
    a = b.alloc_pages(GFP_KERNEL, 4)
    b.split_allocated(a, 4)
    b.free_pages_ok(a + 15, 0, to_tail=True)
    zone = b.page_zone(a)
    assert all((e >> 4) != a + 15 for lst in zone.pcp.lists for e in lst)
    d = zone.free_area[0][b.get_pageblock_migratetype(a)]
    assert next(iter(d)) == a + 15                    # the tail (the dict's first)
    b.free_pages(a + 14, 0)
    assert zone.pcp.lists[order_to_pindex(UNMOVABLE, 0)][0] >> 4 == a + 14
    with pytest.raises(BadFreeError):
        b.free_pages_ok(a + 15, 0, to_tail=True)
    b.check()


def test_alloc_pages_exact_tails_are_the_frees_right_after_their_block():
    """make_alloc_exact splits its block and frees the pages past the
    size one by one, at once: those F events, and no others; 6.1's and
    7.2's replays free them to the buddy's tail (their make_alloc_exact
    calls __free_pages_ok), 5.10's to the pcp (__free_pages)."""
    from dmfrag.modelled import _alloc_exact_tails
    ev = [["A", 0x7ae0, 4, "GFP_ATOMIC|__GFP_ZERO", 0, "kernel"],
          ["F", 0x7aec, 0], ["F", 0x7aed, 0], ["F", 0x7aee, 0], ["F", 0x7aef, 0],
          ["A", 0x8000, 2, "GFP_KERNEL", 0, "kernel"],
          ["F", 0x8002, 0],                                  # not to the block's end
          ["A", 0x9000, 1, "GFP_KERNEL", 0, "kernel"], ["F", 0x9000, 1]]
    assert _alloc_exact_tails(ev, 0) == {1, 2, 3, 4}
    assert get_version("7.2").alloc_exact_tail_to_buddy
    assert get_version("6.1").alloc_exact_tail_to_buddy
    assert not get_version("5.10").alloc_exact_tail_to_buddy


# -- 6.15+: claim a fallback pageblock, or steal one block -----------------------


def _movable_full_with_holes(scheme):
    """A 16 MiB zone all allocated MOVABLE but for an order-6 block at 0x40
    and an order-7 at 0x80 (pageblock 0: 192 free pages, the rest movable)
    and an order-4 at 0x200 (pageblock 1)."""
    from guestkernel.page_alloc import AllocationError, FallbackScheme
    b = BuddyAllocator(0x1000, zone_bounds={ZoneType.DMA32: (0, 0x1000)},
                       page_group_by_mobility_disabled=False,
                       fallback_scheme=FallbackScheme[scheme])
    b.free_range(0, 0x1000)
    b.clear_watermarks()
    movable = parse_gfp("GFP_HIGHUSER_MOVABLE")
    with pytest.raises(AllocationError):
        for _ in range(0x1001):
            b.alloc_pages(movable, 0)
    for p in [*range(0x40, 0x100), *range(0x200, 0x210)]:
        b.free_pages_ok(p, 0)
    return b


@pytest.mark.parametrize("scheme, pfn, lists", [
    # 6.1: the largest fallback block's pageblock has its free blocks moved
    # to UNMOVABLE (too few free or alike pages to claim it), then the
    # smallest UNMOVABLE block is split
    ("MOVE_BLOCK", 0x40, {4: {UNMOVABLE: [0x50], MOVABLE: [0x200]},
                          5: {UNMOVABLE: [0x60]}, 7: {UNMOVABLE: [0x80]}}),
    # 6.15+: no pageblock can be claimed, so the smallest fallback block is
    # stolen and split on the MOVABLE lists; pageblock 0 is left alone
    ("CLAIM_OR_STEAL", 0x200, {6: {MOVABLE: [0x40]}, 7: {MOVABLE: [0x80]}}),
])
def test_a_fallback_claims_its_pageblock_or_steals_the_smallest_block(scheme, pfn, lists):
    """An order-4 UNMOVABLE request with no UNMOVABLE memory: Linux up to
    6.9 (steal_suitable_fallback) and 6.15+ (__rmqueue_claim, then
    __rmqueue_steal) take different pages and leave the rest on different
    lists; every pageblock stays MOVABLE in both."""
    b = _movable_full_with_holes(scheme)
    assert b.alloc_pages(GFP_KERNEL, 4) == pfn
    zone = b.zones[0]
    got = {o: {mt: list(d) for mt, d in enumerate(zone.free_area[o]) if d}
           for o in range(len(zone.free_area)) if any(zone.free_area[o])}
    assert got == lists
    assert b.get_pageblock_migratetype(0) == b.get_pageblock_migratetype(0x200) == MOVABLE
    b.check()


def test_7_2_claims_or_steals():
    from guestkernel.page_alloc import FallbackScheme
    assert get_version("7.2").fallback_scheme is FallbackScheme.CLAIM_OR_STEAL
    assert get_version("6.1").fallback_scheme is FallbackScheme.MOVE_BLOCK
    assert Kernel.boot(ram="1G", profile="7.2", boot_cpa=False).buddy._claim_or_steal


def test_an_unmatched_node_bulk_call_is_a_kernel_stack_on_6_1():
    """6.1 from its trace-start dump: a marked bulk call from vmalloc with
    a node (__vmalloc_node_range; at boot the stacks of per-CPU kernel
    threads: every such call matched to a known group is 4 pages) that no
    known group matches takes a 4-page stack (audit_init's kthread at
    trace line 2105: Linux's next page from that list is 0x7d9eb, line
    2106), and the marker of the first recorded call (its B event follows)
    is not an untraced call."""
    r = replay_modelled(TRUTH / "linux-6.1-2G-boot.jsonl.gz", start="trace-start")
    assert r.bulk_calls_as_stacks >= 1 and r.bulk_calls_unmatched == 14
    assert r.placement()["same_pfn"] == 1.0
    assert r.to_json()["bulk"]["calls_as_stacks"] == r.bulk_calls_as_stacks
    from dmfrag.modelled import trace_diff
    d = trace_diff(TRUTH / "linux-6.1-2G-boot.jsonl.gz", start="trace-start")
    assert d.first is None and d.allocations_before == r.placement()["allocations"] > 4000
    seven = replay_modelled(TRUTH / "linux-7.2-2G-boot.jsonl.gz", start="trace-start")
    assert seven.bulk_calls_as_stacks == 0       # 7.x: a stack is one order-2 block


def test_an_untraced_mempolicy_bulk_call_sized_by_the_next_allocation_is_a_stack():
    """6.1 from its own boot: the bulk call marked at trace line 71
    (alloc_pages_bulk_array_mempolicy, before kprobes: no size) is rest_init's
    first thread stack: Linux's next order-0 UNMOVABLE page (line 72,
    0x6a9b) is the fifth on the model's per-CPU list, with nothing in
    between, so the call took 4 pages, a kernel stack's. Made as one (and
    with the order-1 block Linux frees at line 7238, allocated before its
    first event, freed from the model's own pages there), the model places
    every allocation of the boot Linux's way (from line 72 on before, 0.80
    of them); from the trace-start dump, where the dump's vmalloc areas give
    the call's pages, nothing changes."""
    from dmfrag.modelled import trace_diff
    r = replay_modelled(TRUTH / "linux-6.1-2G-boot.jsonl.gz")
    assert r.bulk_calls_sized == 1 and r.to_json()["bulk"]["calls_sized"] == 1
    assert r.untraced_blocks_freed >= 1
    assert r.first_difference is None and r.placement()["same_pfn"] == 1.0
    d = trace_diff(TRUTH / "linux-6.1-2G-boot.jsonl.gz")
    assert d.first is None and d.allocations_before == r.placement()["allocations"]
    ts = replay_modelled(TRUTH / "linux-6.1-2G-boot.jsonl.gz", start="trace-start")
    assert ts.bulk_calls_sized == 0 and ts.first_difference is None


def test_a_stack_whose_bulk_call_refills_the_list_is_sized_on_a_copy():
    """6.1's 4G boot from its own boot: at the bulk call marked at trace
    line 70 (rest_init's first stack) the model's per-CPU list holds two
    pages, 0x1022a0 and 0x1022a1; Linux's next page (line 71) is 0x1022ac,
    on no list yet: the call ran the list dry and rmqueue_bulk refilled it.
    A copy of the buddy asked to give a stack's 4 pages leaves 0x1022ac at
    the head (the refill splits 0x1022a2's order-1 and 0x1022ac's order-2
    blocks in turn), so the call was a stack, and every allocation of the
    boot, and of the 8G stream, gets Linux's pfn (0.92 and 0.991 before)."""
    traces = Path(__file__).parent / "data" / "traces"
    r = replay_modelled(traces / "linux-6.1-4G-boot.jsonl.gz")
    assert r.bulk_calls_sized == 1 and r.first_difference is None
    assert r.placement() == {"allocations": 4016, "same_pfn": 1.0, "same_2m_region": 1.0}
    s = replay_modelled(traces / "linux-6.1-8G-bpf-2048_secretmem-4096.jsonl.gz")
    assert s.bulk_calls_sized == 1 and s.placement()["same_pfn"] == 1.0 and s.equal


def test_a_copy_of_the_buddy_is_independent():
    import copy

    import numpy as np
    b = Kernel.boot(ram="1G", profile="6.1", boot_cpa=False).buddy

    def state(a):
        return (a._state_np.copy(), [z.free_pages for z in a.zones],
                [list(q) for z in a.zones for q in z.pcp.lists])
    st, free, pcp = state(b)
    c = copy.deepcopy(b)
    got = c.alloc_pages_bulk(0xcc0, 70)          # past one pcp batch: a refill
    assert len(got) == 70 and len(set(got)) == 70
    st2, free2, pcp2 = state(b)
    assert np.array_equal(st, st2) and free == free2 and pcp == pcp2
    assert sum(free) - sum(z.free_pages for z in c.zones) > 0      # the refill
    assert all(not c.is_free(p) for p in got) and c._state_np is not b._state_np
    assert b.alloc_pages_bulk(0xcc0, 70) == got  # the original gives the same
    c.check()
    b.check()


@pytest.mark.parametrize("kernel, ram, held", [("7.2", "2G", 1), ("7.2", "8G", 2),
                                               ("6.1", "2G", 3)])
def test_the_recorders_first_trampoline_in_the_models_own_boot(kernel, ram, held):
    """The recorder's first ftrace trampoline (early_trace_init), made by
    the model's own boot: its direct-map 2M page split; the pages it holds
    besides 7.2's execmem cache block (6.1: the module_alloc'd page, the
    module area's page table, the split's table; 7.2: the split's table,
    and from 4G on the module mapping's table too, which the collapse
    after set_memory_rox leaves). Of those, early_trampoline_pages are
    among early_untraced_pages (what it holds on the 2G boot the count was
    read off); a table more on a bigger machine is one early page more,
    as 7.2's trace-start dumps at 4G, 8G and 16G show (274 against 273)."""
    from dmfrag.modelled import _Modelled
    from dmfrag.placed import load_recorded
    header = {"dmfrag_trace": 4, "source": "recorded", "kernel": kernel, "ram": ram,
              "workload": [], "boot_log": ""}
    events = [["S", "boot", {"meminfo": {}, "vmstat": {}}]]
    lines = [json.dumps(header), *(json.dumps(e) for e in events), json.dumps({"end": 1})]
    rep = _Modelled(*load_recorded(lines, None, None)[:2], None, None)
    k = rep.k
    k.buddy.boot_pagesets()
    k.preallocate_vmalloc_pages()
    po = k.page_offset

    def mapped_4k() -> set[int]:
        return {p for p in range(0, k.max_pfn, 512)
                if (f := k.pgt.lookup_slot(po + p * 4096)) is not None and f[1] == 1}
    before = mapped_4k()
    rep._early_untraced()
    cache = k.execmem.rox_cache
    assert (cache is not None) == (kernel == "7.2")
    assert len(mapped_4k() - before) == 1           # one 2M page split
    unmovable, reclaimable = k.profile.early_untraced_pages
    block = 512 if cache is not None else 0
    counted = k.profile.early_trampoline_pages
    assert rep.res.early_pages == unmovable + reclaimable + block + held - counted


def test_a_free_of_an_early_page_frees_the_models_own_early_page():
    """From the model's own boot, its early untraced pages sit at Linux's
    pfns: when 7.2 frees 0x6625 (trace line 1674, a page no event
    allocated), the model frees its own early page there, and the next
    slab page (line 1675) is 0x6625 in both; ftrace's record pages count
    as early pages too (line 5601 frees an order-2 block of them at
    0x4470, inside the model's order-6 group). With them, and the
    recorder's first ftrace trampoline (KernelVersion.early_trampoline_at),
    every allocation of the boot gets Linux's pfn from the model's own boot."""
    from dmfrag.modelled import trace_diff
    r = replay_modelled(TRUTH / "linux-7.2-2G-boot.jsonl.gz")
    assert r.early_pages_freed == 5 and r.to_json()["early_pages_freed"] == 5
    d = trace_diff(TRUTH / "linux-7.2-2G-boot.jsonl.gz")
    assert d.first is None and d.allocations_before > 3000


@pytest.mark.parametrize("kernel, ram, regions", [
    ("5.10", "2G", []), ("6.1", "2G", [0x6800]), ("7.2", "2G", None),
    ("7.2", "8G", [0x100000, 0x102400])])
def test_the_direct_map_is_split_as_linux_s_when_tracing_started(kernel, ram, regions):
    """From a trace-start dump: Linux's 1G and 2M direct-map pages split
    while booting (no split event counts them) that the model's own boot
    maps whole are split, each with Linux's table page, and the model's
    DirectMap4k/2M/1G are then Linux's there (6.1: 0x6800000, the region of
    its first ftrace trampoline's page, whose set_memory_x cleared NX on
    its alias: split before tracing; the model split it at trace line 10939
    before, its table at another pfn). 7.2 at 8G: the trampoline's execmem
    block is at 0x102400000, in the 1G page from 4 GiB: Linux split that 1G
    page (table 0x102223), then the 2M one (table 0x102227)."""
    from guestkernel.from_state import free_lists, split_as_linux
    r = replay_modelled(TRUTH / f"linux-{kernel}-{ram}-boot.jsonl.gz", start="trace-start")
    assert r.start_state["split_as_linux"] == (len(regions) if regions is not None else 1)
    st = next(s for s in load_states(TRUTH / f"linux-{kernel}-{ram}-boot.truth.npz")
              if s.point == "trace-start")
    k = Kernel.boot(ram=ram, profile=kernel, boot_cpa=False)
    k.buddy.load_free_lists(*free_lists(st))
    done = split_as_linux(k, st)
    if regions is not None:
        assert done == regions
    mi = k.meminfo()
    for field in ("DirectMap4k", "DirectMap2M", "DirectMap1G"):
        assert mi[field] == st.counters[field], field
    assert k.vmstat_counters["direct_map_level2_splits"] == 0
    assert k.vmstat_counters["direct_map_level3_splits"] == 0
    if ram == "8G":
        po = k.page_offset
        assert k.pgt.lookup_slot(po + 0x100000000)[1] == 2       # 2M pages now
        assert k.pgt.lookup_slot(po + 0x102400000)[1] == 1
        assert k.lookup_address(po + 0x102400000)[1] == 1
    r.model.validate()                   # the shadow follows the split


@pytest.mark.parametrize("kernel", ["6.1"])
def test_setup_per_cpu_pageset_without_its_marker_is_where_the_marker_is(kernel):
    """A recording without the setup_per_cpu_pageset marker has it
    KernelVersion.pcp_setup_after_idt allocations after the IDT's
    set_memory_ro (its split's tables not counted): the marked boot
    recordings, their marker taken out, give the marker's own place. (Not
    7.2's: its committed recordings put each allocation where its page was
    taken, which moves the count from boot to boot; its 3 is the event
    order of the recordings made before the marker.)"""
    from dmfrag.modelled import _markers, _pcp_setup_at
    _, events = read_trace(TRUTH / f"linux-{kernel}-2G-boot.jsonl.gz")
    at = next(i for i, e in enumerate(events) if e[:2] == ["U", "setup_per_cpu_pageset"])
    bare = events[:at] + events[at + 1:]
    after = get_version(kernel).pcp_setup_after_idt
    assert _pcp_setup_at(bare, _markers(bare, 0), after) == at
    assert _pcp_setup_at(bare, _markers(bare, 0), None) is None
    assert get_version("5.10").pcp_setup_after_idt == 0


def test_frees_of_other_pages_inside_a_batch_are_not_the_batchs():
    """7.2 at 8G running bpftrace: between a vfree's free_pages_bulk marker
    and its return, after the area's one page, page-table pages
    (GFP_KERNEL_ACCOUNT, user kernel: an RCU callback's, in an interrupt)
    are freed. They are not the batch's (its pages are those a vmalloc area
    held: user vmalloc, the bulk allocator's, or unknown): they go back at
    their own events, after the batch. Onto the per-CPU list when the batch
    had given its page back (Linux's next page is then the last of them),
    to the buddy while it held the per-CPU lock (the recorder's "buddy"
    mark; Linux's next page is then the batch's)."""
    from dmfrag.modelled import _free_runs
    pt = "GFP_KERNEL_ACCOUNT|__GFP_ZERO|__GFP_COMP"

    def events(mark: list):
        return [["A", 0x7200, 0, pt, 0, "kernel"],
                ["A", 0x7201, 0, pt, 0, "kernel"],
                ["B", 1, 0, [0x7300]],
                ["U", "free_pages_bulk", "vm_area_free_pages"],
                ["F", 0x7300, 0],
                ["F", 0x7200, 0, *mark],
                ["F", 0x7201, 0, *mark],
                ["X", "free_pages_bulk"],
                ["A", 0x7300, 0, "GFP_KERNEL|__GFP_HIGHMEM|__GFP_NOWARN", 0, "vmalloc"]]
    assert _free_runs(events([]), 0) == {4: [4]}
    to_pcp = replay_modelled(_v4(events([]), kernel="7.2"))
    to_buddy = replay_modelled(_v4(events(["buddy"]), kernel="7.2"))
    assert to_pcp.error is None and to_buddy.error is None
    # the next page: the last page-table page's, or the batch's
    assert to_pcp.model_pfns[-1] == to_pcp.model_pfns[1]
    assert to_buddy.model_pfns[-1] == to_buddy.bulk_pfns[0]
    to_pcp.model.buddy.check()
    to_buddy.model.buddy.check()


@pytest.mark.parametrize("point, freed", [("modules", 83), ("modules-removed", 35)])
def test_a_dumped_vmalloc_area_linux_vfrees_is_freed_from_the_dump(point, freed):
    """7.2 at 8G, modules then bpftrace, from Linux's state at a dump: the
    dumped vmalloc areas' pages (Kernel.from_state owns them as vmalloc
    pages) that Linux then vfrees (free_pages_bulk, a 4-page stack freed as
    one order-2 block) are freed at their pfns, and a dumped block Linux
    freed straight to the buddy (the trace's "buddy" mark) goes to the
    buddy's lists: every later allocation gets Linux's pfn (0.946 and 0.949
    before: the stack's block stayed allocated in the model, the marked
    block went to the per-CPU list)."""
    r = replay_modelled(TRUTH / "8g" / "linux-7.2-8G-modules_bpftrace-6.jsonl.gz", start=point)
    assert r.error is None and r.equal
    assert r.untraced_frees == 0 and r.untraced_blocks_freed == freed
    assert r.first_difference is None and r.placement()["same_pfn"] == 1.0
    r.model.buddy.check()


def test_an_interrupts_markers_inside_a_batch_window_do_not_end_it():
    """7.2 at 8G running bpftrace: RCU callbacks' markers (bpf_prog_free from
    rcu_do_batch) between a vfree's free_pages_bulk marker and its frees:
    the frees are still the batch's, the two-page run an order-1 block, as
    Linux frees it (page by page before: both pages on the order-0 list,
    where Linux's next pages were not)."""
    from dmfrag.modelled import _free_runs
    gfp = "GFP_NOWAIT|__GFP_HIGHMEM|__GFP_IO|__GFP_FS"
    events = [["A", 0x7008, 1, gfp, 0, "vmalloc"],
              ["U", "free_pages_bulk", "vm_area_free_pages"],
              ["U", "bpf_prog_free", "rcu_do_batch"],
              ["U", "bpf_prog_free", "rcu_do_batch"],
              ["F", 0x7008, 0],
              ["F", 0x7009, 0],
              ["X", "free_pages_bulk"]]
    assert _free_runs(events, 0) == {5: [4, 5]}
    r = replay_modelled(_v4(events, kernel="7.2"))
    assert r.error is None
    m = r.model_pfns[0]
    assert _on_pcp(r.model.buddy, m, 1) and not _on_pcp(r.model.buddy, m, 0)


def test_a_free_inside_a_request_before_its_split_table_goes_first():
    """7.2 at 8G: a page freed inside a CPA request (an interrupt's, while a
    vfree's set_direct_map_invalid_noflush ran) before the request's split
    table, which Linux then took for it. The model's CPA allocates its
    table at the request: it makes such frees first, so its table is the
    freed page too (before: the page the list held before the free)."""
    from dmfrag.placed import LA57_DIRECT
    from guestkernel.owner import PageOwner
    va = LA57_DIRECT[0] + (0x30000 << 12)            # a 2M page of the direct map
    events = [["A", 0x7100, 0, "GFP_KERNEL", 0, "kernel"],
              ["C", "change_page_attr_set_clr", [va, 1, 0, 2, 1, 0, 1]],
              ["F", 0x7100, 0],
              ["A", 0x7100, 0, "GFP_KERNEL|__GFP_ZERO", 0, "cpa_pgtable"],
              ["R"]]
    r = replay_modelled(_v4(events, kernel="7.2"))
    assert r.error is None and r.pgtable_allocations_skipped == 1
    assert r.model.page_owner[r.model_pfns[0]] == PageOwner.PAGE_TABLE
    r.model.validate()
