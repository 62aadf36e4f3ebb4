"""The oracle is a bound (docs/oracle.md): no placement goes below it.

The arithmetic on hand-made cases, then the property: random placements
(a test policy that puts each plain request at a random free pfn), every
registered policy, many workloads and seeds; at every kernel call the
split 2M regions of the CPU's own tables are at least the bound, and a
run that merged nothing is at least the tighter no-merge bound.
"""

from __future__ import annotations

import random
from typing import ClassVar

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from guestkernel import Kernel
from guestkernel import gfp as G
from guestkernel.page_alloc import BadFreeError
from guestkernel.policy import ComposedPolicy, Policy, get_policy, policy_names, register_policy
from guestkernel.shadow import S_MAPPED, S_NX, S_P, S_RW
from policies.oracle import OracleTracker, fixed_regions, lower_bound, stream_classes

DEFAULT = S_MAPPED | S_P | S_RW | S_NX
RO = S_MAPPED | S_P | S_NX
RW_X = S_MAPPED | S_P | S_RW           # writable and executable: a class of its own
POLICIES = [p for p in policy_names() if not p.startswith("test-")]


@register_policy
class RandomPlacement(Policy):
    """Each plain request (no zone modifier, no grouping flag) at a random
    free, aligned pfn when one of 16 tries finds one; else the buddy's."""

    name = "test-random-placement"
    defaults: ClassVar[dict[str, object]] = {"seed": 0}
    _SKIP = int(G.GFP_UNMAPPED | G.GFP_PTE_MAPPED | G.GFP_DMA | G.GFP_DMA32)

    def attach(self, kernel) -> None:
        self.rng = random.Random(self.tunables["seed"])

    def alloc_pages(self, kernel, gfp: int, order: int) -> int | None:
        if gfp & self._SKIP:
            return None
        top = kernel.max_pfn >> order
        for _ in range(16):
            pfn = self.rng.randrange(1, top) << order
            try:
                kernel.buddy.take_page_off_buddy(pfn, order)
            except BadFreeError:
                continue
            return pfn
        return None


def test_lower_bound_arithmetic():
    counts = np.zeros(256, dtype=np.int64)
    assert lower_bound(0, 0, np.zeros(256, dtype=np.int64), counts) == 0
    counts[0] = 1                             # a protected page (read-only or absent)
    assert lower_bound(0, 0, np.zeros(256, dtype=np.int64), counts) == 1
    counts[0] = 512                           # one uniform protected region: no split
    assert lower_bound(0, 0, np.zeros(256, dtype=np.int64), counts) == 0
    counts[RW_X], counts[0] = 600, 300        # remainders 88 + 300 share one split region
    assert lower_bound(0, 0, np.zeros(256, dtype=np.int64), counts) == 1
    counts[0] = 500                           # 88 + 500 need two
    assert lower_bound(0, 0, np.zeros(256, dtype=np.int64), counts) == 2
    room = np.zeros(256, dtype=np.int64)
    room[0] = 100                             # a region whose fixed pages are absent takes 100
    assert lower_bound(0, 0, room, counts) == 1
    assert lower_bound(3, 588, np.zeros(256, dtype=np.int64), counts) == 3   # fits the fixed room
    assert lower_bound(3, 587, np.zeros(256, dtype=np.int64), counts) == 4


def test_fixed_regions_count_only_what_no_placement_changes():
    d = np.full(5 * 512, DEFAULT, dtype=np.uint8)
    reserved = np.zeros(5 * 512, dtype=bool)
    # region 0: reserved RO and reserved default pages: split whatever comes
    reserved[:100] = True
    d[:50] = RO
    # region 1: reserved RO pages only, 412 allocator pages: uniform if filled
    # with protected pages
    reserved[512:612] = True
    d[512:612] = RO
    # region 2: a hole's tail (absent, reserved) and allocator pages
    reserved[1024:1100] = True
    d[1024:1100] = 0
    # region 3: allocator pages with a RO page now (placeable: not fixed)
    d[1600] = RO
    # region 4: reserved RO and reserved absent pages: one class (protected)
    reserved[2048:2100] = True
    d[2048:2070] = RO
    d[2070:2100] = 0
    b, room, class_room = fixed_regions(d, reserved)
    assert (b, room) == (1, 412)
    # read-only and absent are one class: regions 1, 2 and 4 can be filled
    assert class_room[0] == 412 + 436 + 460 and class_room.sum() == class_room[0]
    # a kernel that never merges keeps region 3 split too (it is split now)
    b, room, class_room = fixed_regions(d, reserved, np.array([0, 3]))
    assert (b, room) == (2, 412 + 512)
    assert class_room[0] == 412 + 436 + 460


def test_cached_pages_are_not_the_streams():
    """unmapped-alloc holds a 2M chunk out of the direct map for 10
    secret pages; another placement need not: the bound is baseline's."""
    bounds = {}
    for pol in ("baseline", "unmapped-alloc"):
        k = Kernel.boot(ram="1G", policy=pol)
        o = OracleTracker(k)
        before = o.now()
        pages = [k.secretmem.fault() for _ in range(10)]
        o.tick()
        assert len(k.policy.cached_pfns(k)) == (502 if pol == "unmapped-alloc" else 0)
        bounds[pol] = (before, o.now(), o.bound())
        for p in pages:
            k.secretmem.free(p)
    assert bounds["baseline"] == bounds["unmapped-alloc"], bounds


def test_a_stream_beyond_the_room_raises_the_bound():
    """Secret pages are one class (absent): 1,100 of them leave a remainder
    of 76 over two whole regions; with every region of the boot counted
    and its room, the bound moves by exactly what the arithmetic says."""
    k = Kernel.boot(ram="1G")
    o = OracleTracker(k)
    base = o.now()
    pages = [k.secretmem.fault() for _ in range(1100)]
    any_run, no_merge = o.now()
    counts = np.zeros(256, dtype=np.int64)
    counts[0] = 1100
    assert any_run == max(base[0], lower_bound(o.fixed, o.room, o.class_room, counts))
    assert no_merge == lower_bound(o.fixed_nm, o.room_nm, o.class_room_nm, counts)
    assert k.pgt.split_2m_regions(k.max_pfn) >= no_merge >= any_run
    for p in pages:
        k.secretmem.free(p)


WORKLOADS = ["module-churn", "secretmem", "mixed", "boot", "sockex1", "vfree-reset-perms",
             "ftrace-kprobes", "pagetables", "guest-memfd", "bpftrace-runs"]


def _policy(name: str, seed: int, random_first: bool) -> Policy:
    pol = get_policy(name)
    if not random_first:
        return pol
    return ComposedPolicy([RandomPlacement(seed=seed), pol])


@settings(max_examples=24)
@given(workload=st.sampled_from(WORKLOADS), policy=st.sampled_from(POLICIES),
       seed=st.integers(0, 1 << 16), random_first=st.booleans(),
       scale=st.sampled_from([0.05, 0.2, 0.5]))
def test_nothing_goes_below_the_oracle(workload, policy, seed, random_first, scale):
    from dmfrag.results import metric_fields
    from dmfrag.workloads import Driver, model_driver

    k = Kernel.boot(ram="1G", policy=_policy(policy, seed, random_first))
    d = Driver(k)
    d.oracle = OracleTracker(k)
    from dmfrag.metrics import RunMetrics
    d.metrics = RunMetrics(k, clock=lambda: len(d.lines))
    d.lines.append("{}")
    merged = [False]

    def check(_cpa=None):
        # the tracker's scan counts what stream_classes counts over every page
        o = d.oracle
        assert np.array_equal(o.counts(), stream_classes(
            k.shadow.direct[: k.max_pfn], k.policy_cached_pfns(), o._spans, o._fixed_pfns))
        any_run, no_merge = d.oracle.now()
        split = k.pgt.split_2m_regions(k.max_pfn)
        assert split >= any_run, (split, any_run)
        v = k.vmstat_counters
        merged[0] = merged[0] or bool(v["direct_map_level2_collapses"]
                                      + v["direct_map_level3_collapses"])
        if not merged[0]:
            assert split >= no_merge, (split, no_merge)

    k.cpa.add_observer(after=check)
    try:
        model_driver(workload)(d, random.Random(seed), scale)
    except MemoryError:
        pass                          # a random placement may exhaust a small guest
    check()
    m = metric_fields(d)
    assert m["above_oracle"] >= 0, m
    if m["collapses"] == 0:
        assert m["peak_split_2m_regions"] >= m["oracle_no_merge_peak_split_2m_regions"], m


@pytest.mark.parametrize("policy", POLICIES)
def test_cached_count_is_the_cached_pages(policy):
    """The cheap count sampled after every call is the list's length."""
    from dmfrag.workloads import run_workload
    d = run_workload("mixed", ram="1G", policy=policy, scale=0.3, seed=2)
    k = d.kernel
    assert k.policy_cached_count() == len(k.policy_cached_pfns())
    assert d.metrics.row()["cached_pages_end"] == len(k.policy_cached_pfns())
