"""Modelled replay: a recorded real kernel's requests, the pfns chosen by
the model (``dmfrag trace replay T --placement model``), and the first
place the choice differs from Linux's (``dmfrag trace diff T``).

The same requests in the same order as the placed replay (:mod:`dmfrag.placed`):

* ``A``: ``alloc_pages`` with the GFP the kernel printed (parsed with
  :func:`guestkernel.gfp.parse_gfp`: its zone and migratetype flags, so the
  model picks the zone and free list Linux picked from) and the order; the
  model's pfn is remembered for Linux's, so that the frees and the CPA
  requests on that memory follow (a handle). A page-table page Linux
  allocated inside a CPA pass (``cpa_pgtable``) is not replayed: the model's
  splits take their own.
* ``F``: the model frees the block it gave for Linux's (a part of it after
  the kernel's ``split_page``: the model splits too); from the model's own
  boot, a free of memory its memblock still holds (the initrd, the init
  sections: ``free_reserved_area``) gives those pages to its buddy
  allocator as Linux did (``reserved_pages_freed``); any other free of
  memory the trace never allocated (before tracing, the bulk allocator) is
  counted and skipped: the model cannot free what it never gave.
* ``C``: direct-map addresses become the model's pages (Linux pfn -> the
  model's pfn of the same allocation; unknown pages keep their pfn: kernel
  image, boot memory); image addresses stay. Requests before boot kprobes
  (no arguments): the model's record makes its own (the IDT, the SMP
  alternatives, the real-mode trampoline, the boot bpf_prog_pack with pages
  the model chooses); a one-page request right after a one-page vmalloc
  allocation is that page made read-only; others are counted in
  ``early_requests_skipped``.
* ``S``: the counters as in the placed replay, and ``"placement":
  {"same_pfn": f, "same_2m_region": f, "allocations": n}`` so far.
* ``D``: with stored states, the comparison of :mod:`dmfrag.truth`, the
  free lists compared in order as well (``order_mismatches``).

With ``--policy``, the model's allocations go through the policy's hooks,
as the kernel's users would send them (:func:`policy_users`): a page a
``secretmem_fault`` allocated is the "secretmem" user's, and a vmalloc page
that a CPA pass changes while it is allocated (module memory, BPF images,
ftrace trampolines, read-only areas with reset perms) the "execmem"
user's; the policy's ``user_gfp`` decides their GFP, so grouping policies
serve them from their pools. (Which vmalloc pages are execmem's is read
from the trace's later CPA passes: the kernel's caller knows it when it
allocates.) Bulk-allocated execmem pages are asked of the policy one page
at a time. A page a policy took out of the direct map itself
(``GFP_UNMAPPED``) has its direct-map state governed by the policy: the
trace's passes on it (secretmem's ``set_direct_map_invalid``, a module's
alias passes, vfree's reset) are not replayed (``policy_skipped_pages``),
and its free goes back through the policy. With ``metrics``, the result
carries ``compare``'s fields (:mod:`dmfrag.metrics`, the oracle of
:mod:`policies.oracle`) for the whole trace.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guestkernel.gfp import parse_gfp
from guestkernel.owner import PageOwner
from guestkernel.page_alloc import UNMOVABLE, AllocationError
from guestkernel.page_alloc.types import order_to_pindex
from guestkernel.vmalloc import vm_area_alloc_pages_bulk

from .placed import (
    PlacedReplayError,
    Replayer,
    direct_pfn,
    gc_paused,
    load_recorded,
    one_page_vmalloc,
)
from .recorder import (
    BULK_PROBES,
    CPA_TABLE_GFPS,
    FREE_MARKERS,
    PCP_MARKERS,
    STACK_MARKERS,
    splits_direct_map_tables,
)

if TYPE_CHECKING:
    from guestkernel.users import ExecmemCache
from .truth import TRACE_START

__all__ = ["ModelledReplay", "TraceDiff", "policy_users", "replay_modelled", "trace_diff"]


@dataclass
class ModelledReplay:
    """The result: one entry per snapshot, and what the replay met."""

    kernel: str
    ram: str
    workload: list[str]
    policy: str
    snapshots: list[dict] = field(default_factory=list)
    events: int = 0
    allocations: int = 0
    same_pfn: int = 0
    same_2m_region: int = 0
    #: Linux's page-table pages inside CPA passes (the model's splits take their own)
    pgtable_allocations_skipped: int = 0
    #: Linux's split tables where the model had made no table to stand for
    #: them: placed as plain allocations (see _Modelled._linux_table)
    pgtable_allocations_placed: int = 0
    untraced_frees: int = 0
    #: from the model's own boot: pages of frees of memblock-reserved memory
    #: (the initrd, the init sections) that the model gave its buddy
    #: allocator as Linux did (free_reserved_area)
    reserved_pages_freed: int = 0
    #: from the model's own boot: pages deferred struct-page init freed in
    #: the trace (deferred_free_range), freed the same way in the model
    deferred_pages_freed: int = 0
    #: pages of bulk allocations (recorded ``B`` events, or in a version-3
    #: trace inferred from their frees: see _infer_bulk), and how many of
    #: them the model put at Linux's pfn
    bulk_pages: int = 0
    bulk_same_pfn: int = 0
    #: from the model's own boot: pages the recording's own ring buffer took
    #: before the trace began (see _Modelled._ring_buffer)
    ring_buffer_pages: int = 0
    #: from the model's own boot: ftrace_init's record pages, taken first
    ftrace_pages: int = 0
    #: from the model's own boot: the other early pages Linux allocated
    #: before the first event (_Modelled._early_untraced)
    early_pages: int = 0
    #: ... of which freed by a free of Linux's at the same pfns (_free_early)
    early_pages_freed: int = 0
    early_requests_skipped: int = 0
    #: pages the policy routed as a user's (secretmem, execmem), and pages
    #: of the trace's CPA passes not replayed because the policy had taken
    #: them out of the direct map itself
    policy_routed_pages: int = 0
    policy_skipped_pages: int = 0
    #: from a boot-time dump: marked untraced bulk calls whose pages no
    #: group (boot dump areas, later frees) matched when they were made
    bulk_calls_unmatched: int = 0
    #: marked untraced bulk calls no group matched that are vmalloc's with
    #: a node (6.1): made as a kernel thread's stack (4 pages; see
    #: _Modelled._untraced_stack), not counted in bulk_calls_unmatched
    bulk_calls_as_stacks: int = 0
    #: marked untraced bulk calls no group matched without a node (6.1's
    #: alloc_pages_bulk_array_mempolicy) that the trace's next allocation
    #: shows took a kernel stack's 4 pages (_Modelled._bulk_size_from_next):
    #: made as bulk_calls_as_stacks are, counted here instead
    bulk_calls_sized: int = 0
    #: 5.10's kernel stacks the recorder's marker shows taken with
    #: mm_page_alloc off (recorder.STACK_MARKERS): made there, 4 pages
    untraced_stacks: int = 0
    #: frees of blocks no event allocated, made from the model's pages at
    #: the same pfns (allocated before the trace: _Modelled._free_dumped);
    #: not in untraced_frees
    untraced_blocks_freed: int = 0
    #: started from a boot-time dump: what was taken from it (see
    #: _Modelled._install_boot_state); None otherwise
    start_state: dict | None = None
    #: compare's fields for the whole trace (with ``metrics``; else None)
    metrics: dict | None = None
    #: with ``metrics``: DirectMap over the trace's events (RunMetrics.samples;
    #: not in the JSON)
    model_metrics_samples: list = field(default_factory=list, repr=False)
    #: the first allocation whose pfn is not Linux's: {"line", "linux_pfn", "model_pfn", ...}
    first_difference: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    #: the model's pfn for each replayed allocation, in trace order (not in the JSON)
    model_pfns: list[int] = field(default_factory=list, repr=False)
    #: the model's pfn for each bulk-allocated page, in trace order (not in the JSON)
    bulk_pfns: list[int] = field(default_factory=list, repr=False)
    #: the model at the end (guestkernel.Kernel; not in the JSON)
    model: object = field(default=None, repr=False)

    @property
    def equal(self) -> bool:
        return self.error is None and all(s["equal"] for s in self.snapshots)

    def placement(self) -> dict:
        n = self.allocations
        return {"same_pfn": self.same_pfn / n if n else 1.0,
                "same_2m_region": self.same_2m_region / n if n else 1.0, "allocations": n}

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "ram": self.ram, "workload": self.workload,
                "placement": "model", "policy": self.policy, "snapshots": self.snapshots,
                "events": self.events, "allocation_placement": self.placement(),
                "pgtable_allocations_skipped": self.pgtable_allocations_skipped,
                "pgtable_allocations_placed": self.pgtable_allocations_placed,
                "untraced_frees": self.untraced_frees,
                "reserved_pages_freed": self.reserved_pages_freed,
                "deferred_pages_freed": self.deferred_pages_freed,
                "bulk": {"pages": self.bulk_pages, "same_pfn": self.bulk_same_pfn,
                         "calls_unmatched": self.bulk_calls_unmatched,
                         "calls_as_stacks": self.bulk_calls_as_stacks,
                         "calls_sized": self.bulk_calls_sized},
                "untraced_stacks": self.untraced_stacks,
                "untraced_blocks_freed": self.untraced_blocks_freed,
                "ring_buffer_pages": self.ring_buffer_pages,
                "ftrace_pages": self.ftrace_pages, "early_pages": self.early_pages,
                "early_pages_freed": self.early_pages_freed,
                "early_requests_skipped": self.early_requests_skipped,
                "policy_routed_pages": self.policy_routed_pages,
                "policy_skipped_pages": self.policy_skipped_pages,
                "first_difference": self.first_difference,
                "start_state": self.start_state,
                "equal": self.equal, "completed": self.error is None, "error": self.error}


class _Modelled(Replayer):
    """The placed replay's event loop with the model choosing pfns."""

    def __init__(self, header: dict, events: list[list], policy: str | None,
                 states: list | None, stop_at_difference: bool = False,
                 start: str | None = None, metrics: bool = False):
        super().__init__(header, events, policy, states)
        self.start = 0
        #: a boot-time dump to start from (the recorder's trace-start)
        self.boot_state = None
        if start is not None:
            from guestkernel import Kernel
            found = [st for st in states or () if st.point == start]
            at = next((i for i, e in enumerate(events) if e[0] == "D" and e[1] == start), None)
            if not found or at is None:
                raise PlacedReplayError(1, f"no stored state and dump event for point "
                                        f"{start!r} (points: "
                                        f"{', '.join(st.point for st in states or ()) or 'none'})")
            self.start = at + 1
            if found[0].point == TRACE_START:
                # a dump taken while the kernel boots: the model boots
                # itself as from no dump, and its free memory becomes
                # Linux's at that point (see _install_boot_state)
                self.boot_state = found[0]
            else:
                # from the real kernel's state at a dump point on: the model
                # has Linux's free lists, tables and counters there
                self.k = Kernel.from_state(found[0], policy=policy or "baseline",
                                           profile=header.get("kernel"))
                self.running_at = -1
                self.direct_end = self.k.pfn_to_virt(0) + (1 << 46)
        #: the model goes through the kernel's boot (its own, or from a
        #: boot-time dump): early calls, deferred init, reserved frees
        self._booting = not self.start or self.boot_state is not None
        self.res = ModelledReplay(self.result.kernel, self.result.ram, self.result.workload,
                                  policy or "baseline", events=len(events))
        self.stop_at_difference = stop_at_difference
        #: the model's early boot calls made (from its own boot: after
        #: deferred struct-page init, see _free_deferred)
        self._early_done = not self._booting
        #: the allocator the trace's requests go to: with no policy hook on
        #: allocation or free, the buddy allocator itself (Kernel.alloc_pages adds
        #: only what placement does not see: zeroing __GFP_ZERO pages in
        #: guest RAM, owners this replay does not set); else the kernel's
        #: entry, which asks the policy first
        k = self.k
        routed = k.policy_overrides_allocations
        self._alloc_pages = k.alloc_pages if routed else k.buddy.alloc_pages
        #: ... and the frees of those pages (no owner set, none unmapped)
        self._free_pages = k.free_pages if routed else k.buddy.free_pages
        #: the F events that free an exact allocation's tail
        #: (_alloc_exact_tails), on kernels that give those pages straight
        #: back to the buddy (KernelVersion.alloc_exact_tail_to_buddy)
        self.exact_tails: set[int] = (_alloc_exact_tails(events, 0)
                                      if k.profile.alloc_exact_tail_to_buddy and not routed
                                      else set())
        #: the F events whose page Linux put straight on the buddy lists
        #: (the recorder's give-back probes: ["F", pfn, order, "buddy"]),
        #: of orders the per-CPU lists hold: its lock was busy (the model
        #: frees those to the buddy too); not the exact tails (to the tail)
        self.buddy_frees: set[int] = set() if routed else {
            j for j, e in enumerate(events)
            if e[0] == "F" and len(e) > 3 and e[3] == "buddy"
            and k.buddy._pcp_allowed[e[2]] and j not in self.exact_tails}
        n = self.k.max_pfn + 1024
        #: Linux pfn -> the model's pfn of the same page (-1: not allocated by
        #: the trace); lists and a bytearray: the hot path indexes them one
        #: page at a time, where numpy's per-call cost dominates
        self.xlate: list[int] = [-1] * n
        #: Linux head pfn -> [model head, order, line, split]
        self.blocks: dict[int, list] = {}
        #: Linux pfn -> the head of its live allocation (for frees of parts)
        self.head_of: list[int] = [-1] * n
        self.skipped_tables: set[int] = set()
        #: the model's early untraced pages still held (_early_untraced)
        self._early_pfns: set[int] = set()
        #: the model's pages now given to the trace's allocations
        self.given = bytearray(n)
        self.gfp_cache: dict[str, int] = {}
        #: the untraced bulk allocations (_infer_bulk): (earliest, deadline,
        #: Linux's pages in array order); each is made before the first
        #: event in its window at which the model's per-CPU list starts with
        #: those pages (the bulk allocator takes the list's head), else
        #: before its first free
        # a version-4 trace records the bulk allocator's calls; a kernel
        # without one (5.10) has none to infer
        recorded_bulk = (header.get("dmfrag_trace", 3) >= 4
                         or not self.k.profile.vmalloc_bulk)
        self.bulk_groups = [] if recorded_bulk else _infer_bulk(
            events, self.start, n, self._free_at_start(states, start))
        if self.boot_state is not None:
            # from a boot-time dump, the bulk allocator's calls before its
            # kprobes (fs_initcall) are untraced even in a version-4 trace:
            # those whose pages are freed later, and those alive at the boot dump
            if recorded_bulk:
                self.bulk_groups = _infer_bulk(events, self.start, n,
                                               self._free_at_start(states, start))
            inferred = {p for _lo, _hi, pages in self.bulk_groups for p in pages}
            self.bulk_groups += [g for g in self._untraced_boot_areas(states or ())
                                 if not inferred.intersection(g[2])]
        self.bulk_done = bytearray(len(self.bulk_groups))
        #: each group's zone (its first page's), for _before_event
        self._group_zone = [self._zone_start(pages[0]) for _lo, _hi, pages in self.bulk_groups]
        self.bulk_before: dict[int, list[int]] = {}
        for g, (lo, hi, _pages) in enumerate(self.bulk_groups):
            for j in range(lo, hi + 1):
                self.bulk_before.setdefault(j, []).append(g)
        #: the end of the span of the boot call made at its marker last
        self._marked_end = -1
        #: the model's table pages made since the current request's span
        #: began, and how many of them Linux's table events stood for
        #: (:meth:`_linux_table`)
        self._span_tables = self.k.pgtable_pages_made
        self._span_matched = 0
        #: boot calls made at their markers (through a boot), and the end
        #: of each one's span (_table_span)
        self._call_span_end: dict[int, int] = {}
        #: the recorder's markers (``U`` events) from the start on, by index
        self._marks = _markers(events, self.start)
        self.early_at: dict[int, object] = (self._early_call_markers()
                                            if self._booting else {})
        #: Linux's pages of the boot's first bpf_prog_pack, where the
        #: recording lists its area (see _boot_pack)
        self._boot_pack_pages: list[int] | None = None
        if self.k.profile.bpf_prog_pack:
            self._boot_pack_pages = next(
                (list(pages) for _va, caller, pages in header.get("module_areas") or ()
                 if caller.startswith("bpf_prog_pack_alloc") and len(pages) == 512), None)
            if self._boot_pack_pages and max(self._boot_pack_pages) >= n:
                self._boot_pack_pages = None
        for j in self.early_at:
            self.bulk_before.setdefault(j, [])
        #: through a boot, with the recorder's marker on the bulk allocator:
        #: where each call before its kprobes was (no B event follows
        #: those); from a boot-time dump each makes the pending group the
        #: model's list gives next, and groups wait for markers instead of
        #: being made as soon as the list starts with their pages; from the
        #: model's own boot (no groups known) a call from vmalloc with a
        #: node is a kernel stack (_untraced_stack)
        self.bulk_markers: set[int] = set()
        if self._booting and header.get("kernel") in BULK_PROBES:
            func = BULK_PROBES[header["kernel"]][0]
            first_b = next((j for j, e in enumerate(events) if e[0] == "B"), len(events))
            # (the marker of the first recorded call is that call's: its B
            # event follows)
            self.bulk_markers = {j for j in range(self.start, first_b)
                                 if events[j][0] == "U" and events[j][1] == func
                                 and events[j + 1][0] != "B"}
            for j in self.bulk_markers:
                self.bulk_before.setdefault(j, [])
        #: where setup_per_cpu_pageset ran (the recorder's marker; None:
        #: not recorded, made before the first event)
        marks = self._marks
        self.pcp_at = next((j for j in marks if events[j][1] == "setup_per_cpu_pageset"),
                           None) if self._booting else None
        if self.pcp_at is None and self._booting:
            self.pcp_at = _pcp_setup_at(events, marks, self.k.profile.pcp_setup_after_idt)
        if self.pcp_at is not None:
            self.bulk_before.setdefault(self.pcp_at, [])
        #: where vmstat's refresh decayed a zone's per-CPU lists (6.7+
        #: decay_pcp_high, the recorder's marker) -> the zone: each refresh
        #: walks every populated zone in order, so the n-th marker of the
        #: trace is zone n modulo their number
        self.decay_at: dict[int, int] = {}
        if PCP_MARKERS.get(header.get("kernel"), ()):
            names = PCP_MARKERS[header["kernel"]]
            nz = len(self.k.buddy.zones)
            # counted from the trace's start, whatever the replay's
            decays = [j for j in (marks if self.start == 0 else _markers(events, 0))
                      if events[j][1] in names]
            for n, j in enumerate(decays):
                if j >= self.start:
                    self.decay_at[j] = n % nz
                    self.bulk_before.setdefault(j, [])
        #: kernel stacks taken with mm_page_alloc off (5.10: STACK_MARKERS);
        #: from a boot-time dump its vmalloc areas give their pages (the
        #: bulk groups) instead
        self.stack_at: set[int] = set()
        if STACK_MARKERS.get(header.get("kernel"), ()) and self.boot_state is None:
            names = STACK_MARKERS[header["kernel"]]
            for j in marks:
                if events[j][1] in names and events[j][2] == _STACK_CALLER \
                        and not _vmalloc_pages_follow(events, j):
                    self.stack_at.add(j)
                    self.bulk_before.setdefault(j, [])
        #: where init_per_zone_wmark_min ran (5.14+: the watermarks and the
        #: per-CPU lists' sizes; see _wmark_min_at); None: right after the
        #: boot's first JIT, as Kernel.boot makes it
        self.wmark_at = _wmark_min_at(events, self.start, marks) if self._booting else None
        if self.wmark_at is not None:
            self.bulk_before.setdefault(self.wmark_at, [])
        #: a batch free (free_pages_bulk: FREE_MARKERS), freed together as
        #: Linux did: each batch free's last F event -> the batch's F events; the
        #: others wait for it (see _free_runs)
        self.free_runs: dict[int, list[int]] = _free_runs(events, self.start, marks)
        self._batched: set[int] = {j for run in self.free_runs.values() for j in run[:-1]}
        #: frees made before the request they sit in split (_frees_before_split)
        self._prefreed: set[int] = set()
        #: vmalloc's GFP (the inferred calls), and one per recorded
        #: migratetype (the bulk probe keeps only the GFP's mobility)
        self._bulk_gfp = parse_gfp("GFP_KERNEL|__GFP_HIGHMEM")
        self._bulk_gfps = (self._bulk_gfp, parse_gfp("GFP_HIGHUSER_MOVABLE"),
                           parse_gfp("GFP_KERNEL|__GFP_RECLAIMABLE"))
        #: the users' allocations a policy routes (policy_users), and the
        #: model's pages the policy took out of the direct map itself
        self.users: dict[int, str] = {}
        self.bulk_users: set[int] = set()
        self.untraced_users: dict[int, list[int]] = {}
        if routed:
            self.users, self.bulk_users, self.untraced_users = policy_users(events)
            self._bulk_before_passes()
        self.unmapped_by_policy: set[int] = set()
        self.oracle = self.metrics = None
        if metrics:
            from policies.oracle import OracleTracker

            from .metrics import RunMetrics
            self.i = self.start
            self.oracle = OracleTracker(k)
            self.metrics = RunMetrics(k, clock=lambda: self.i)
            self.tick = self._tick

    # -- set-up ------------------------------------------------------------------

    @staticmethod
    def _free_at_start(states: list | None, start: str | None):
        """Linux's free pages at the start dump (buddy and per-CPU lists), or
        None from boot (nothing known before the trace's own events)."""
        if start is None:
            return None
        st = next(s for s in states or () if s.point == start)
        pfns = [(p, o) for p, o in zip(st.free_pfn.tolist(), st.free_order.tolist())]
        pfns += [(p, o) for p, o in zip(st.pcp_pfn.tolist(), st.pcp_order.tolist())]
        return pfns

    def _untraced_boot_areas(self, states) -> list[tuple[int, int, list[int]]]:
        """From a boot-time dump with the boot dump stored too: the vmalloc
        areas alive at the boot dump (outside the module area, whose boot
        users the model makes itself) whose pages no event allocated and
        that were free at the start dump: kernel stacks and vmalloc()
        areas whose pages the bulk allocator gave before ``fs_initcall``
        (its kprobes start there) or that the trace did not see taken.
        Each is a group for :meth:`_before_event`, as an inferred bulk call
        is: made when the model's per-CPU list starts with its pages (the
        bulk allocator takes the list's head), else before the first event
        on them or the boot dump."""
        boot = next((st for st in states if st.point == "boot"), None)
        ev = self.events
        end = next((i for i, e in enumerate(ev) if e[0] == "D" and e[1] == "boot"), None)
        if boot is None or end is None:
            return []
        seen = set()
        first_touch: dict[int, int] = {}
        for i, e in enumerate(ev[:end]):
            if e[0] == "A":
                seen.update(range(e[1], e[1] + (1 << e[2])))
            elif e[0] == "B":
                seen.update(e[3])
            if i >= self.start and e[0] in ("A", "F"):
                for p in range(e[1], e[1] + (1 << e[2])):
                    first_touch.setdefault(p, i)
        free0 = self.boot_state.free_mask(self.k.max_pfn)
        lo_mod, hi_mod = self.k.profile.modules_vaddr, self.k.profile.modules_end
        groups = []
        off = 0
        for start, nr in zip(boot.vm_start.tolist(), boot.vm_nr_pages.tolist()):
            pages = boot.vm_pages[off:off + nr].tolist()
            off += nr
            if lo_mod <= start < hi_mod or not pages:
                continue
            if any(p in seen or not (0 <= p < len(free0)) or not free0[p] for p in pages):
                continue
            deadline = min([first_touch.get(p, end) for p in pages] + [end])
            groups.append((self.start, deadline, pages))
        return groups

    def _early_call_markers(self) -> dict[int, object]:
        """Through a boot (the model's own, or from a boot-time dump): the
        start_kernel boot calls the trace marks (the recorder's ``U``
        events: the CPA entry point and its caller), by the index of their
        marker, so that each is made where Linux made it and takes the
        pages it took then: the IDT
        (``idt_setup_apic_and_irq_gates``), the SMP alternatives (the first
        ``free_init_pages``), the real-mode blob (``init_real_mode``,
        ``do_init_real_mode`` or ``set_real_mode_permissions``) and, where
        the kernel has packs, the boot's first bpf_prog_pack
        (``ptp_classifier_init``: its first CPA call, ``bpf_prog_pack_alloc``;
        its pages come from bulk calls just before). Those not found are
        made before the first event, as from the model's own boot (the
        pack after deferred init)."""
        from guestkernel.versions import BootCpaCall as C
        profile = self.k.profile
        want = [c for c in (C.IDT_RO, C.FREE_SMP_ALTERNATIVES, C.REAL_MODE)
                if c in profile.boot_cpa]
        if profile.bpf_prog_pack and C.PTP_CLASSIFIER_BPF in profile.boot_cpa:
            want.append(C.PTP_CLASSIFIER_BPF)
        callers = {C.IDT_RO: ("idt_setup_apic_and_irq_gates",),
                   C.FREE_SMP_ALTERNATIVES: ("free_init_pages",),
                   C.REAL_MODE: ("init_real_mode", "do_init_real_mode",
                                 "set_real_mode_permissions"),
                   C.PTP_CLASSIFIER_BPF: ("bpf_prog_pack_alloc",)}
        ev = self.events

        def before_kprobes(j: int) -> bool:
            # the marker's pass has no arguments (a later call of the same
            # caller, after fs_initcall, is traced in full)
            c = next((c for c in range(j + 1, min(j + 4, len(ev))) if ev[c][0] == "C"), None)
            return c is not None and ev[c][2] is None

        out: dict[int, object] = {}
        for call in want:
            # each call's first marker, wherever it is: 7.2 frees the SMP
            # alternatives after the boot's bpf_prog_pack, not in
            # start_kernel's order
            j = next((j for j in self._marks
                      if len(ev[j]) > 2 and ev[j][2] in callers[call]
                      and j not in out and before_kprobes(j)), None)
            if j is None:
                continue
            span_end = self._table_span(j)
            if call is C.PTP_CLASSIFIER_BPF:
                # the pack's mapping comes first: its page tables, traced
                # just before the pack's first CPA call, are in its span
                while j > self.start and ev[j - 1][0] == "A" and ev[j - 1][2] == 0 \
                        and ev[j - 1][3] in _VMAP_TABLE_GFPS:
                    j -= 1
            self._call_span_end[j] = span_end
            out[j] = call
        return out

    def _early_calls(self, late: bool | None = None) -> None:
        """The record's boot calls before fs_initcall, which the trace has no
        arguments for: those before ``page_alloc_init_late`` (``late``
        False: start_kernel's and the early initcalls'), those after it
        (True: the core initcalls': the boot bpf_prog_pack), or all (None)."""
        from guestkernel.boot import boot_cpa_calls
        from guestkernel.versions import BootCpaCall
        k = self.k
        order = list(k.profile.boot_cpa)
        cut = order.index(BootCpaCall.PAGE_ALLOC_INIT_LATE) \
            if BootCpaCall.PAGE_ALLOC_INIT_LATE in order else len(order)

        marked = set(self.early_at.values())

        def only(call) -> bool:
            if not call.before_fs_initcall or call in marked:
                return False
            if call is BootCpaCall.PTP_CLASSIFIER_BPF and not k.profile.bpf_prog_pack:
                # without packs (5.10) the JIT image is one vmalloc'd page,
                # traced: _early_request replays its set_memory_ro there
                return False
            return late is None or (order.index(call) > cut) == late

        boot_cpa_calls(k.cpa, k.buddy, k.bpf, k.profile, only=only, real_mode=k.real_mode_base,
                       postcore=self.wmark_at is None)

    def _install_boot_state(self) -> None:
        """From a boot-time dump (``trace-start``: the first traced page
        event): the model has booted up to the same moment itself (the
        hand-over, which equals Linux's page for page, and the vmalloc
        space's tables); its free memory now becomes Linux's there, buddy
        lists in list order, per-CPU lists and pageblocks, so that what
        Linux allocated before tracing started (ftrace's records, the ring
        buffer, early slab and per-CPU pages: no event shows them) is
        allocated in the model too, at Linux's pfns; the zones' watermarks
        and per-CPU list sizes are Linux's there. The deferred range
        stays deferred (the trace frees it). A page the model holds for
        itself that Linux has free (one of its tables at another pfn)
        stays the model's: counted in ``start_state["kept_by_model"]``."""
        from guestkernel.from_state import (
            free_lists,
            install_zone_params,
            reserve_module_areas,
            split_as_linux,
        )
        b = self.k.buddy
        st = self.boot_state
        mine = np.flatnonzero(b.page_states() == 2)
        blocks, pcp, pbmt = free_lists(st)
        # the deferred range's pageblocks: deferred init has not set them
        # yet in Linux (their bits read 0); the model's hand-over set them
        # as deferred init will (MOVABLE, or UNMOVABLE where the first page
        # is reserved): those stay
        pbmt = np.array(pbmt, dtype=np.uint8, copy=True)
        order = st.pageblock_order
        for lo, hi in b.deferred:
            pbmt[lo >> order: -(-hi >> order)] = 255
        try:
            counts = b.load_free_lists(blocks, pcp, pbmt)
        except ValueError as exc:
            raise PlacedReplayError(1, f"the {st.point} state's free lists do not fit the "
                                    f"model's machine: {exc}") from None
        # the zones as they were: the boot pageset (high 0, batch 1), no
        # watermarks yet (init_per_zone_wmark_min is an initcall)
        install_zone_params(self.k, st)
        # Linux's 2M module-area areas made before tracing (7.2's execmem
        # ROX cache) keep their addresses: the boot pack's area comes after
        # them, with the page tables that takes, as in Linux (smaller ones,
        # 6.1's ftrace trampoline, have a table the model does not)
        reserve_module_areas(self.k, st, pmd_mapped_only=True)
        # the direct map's 2M pages Linux split while booting before tracing
        # (6.1: its first ftrace trampoline's alias) are split in the model too
        split = split_as_linux(self.k, st)
        states = b.page_states()
        kept = 0
        for pfn in mine.tolist():
            if states[pfn] == 1:
                b.take_page_off_buddy(pfn, 0)
                kept += 1
        self.res.start_state = {"point": st.point, "free_blocks": counts["free_blocks"],
                                "pcp_pages": counts["pcp_pages"],
                                "handed_over": counts["handed_over"], "kept_by_model": kept,
                                "split_as_linux": len(split),
                                "nr_free_pages": b.nr_free() + b.nr_pcp_pages()}

    def _ring_buffer(self) -> None:
        """The recording's own footprint before its first event: the
        tracing ring buffer (``trace_buf_size``), which ``early_trace_init``
        allocates between the buddy hand-over and ``trace_init``, so no
        event shows it (32 MiB by default: most of what Linux has allocated
        before the trace begins). ``__rb_allocate_pages``: per data page
        (``BUF_PAGE_SIZE``: 4080 bytes) a ``kzalloc`` of its ``buffer_page``
        (kmalloc-64: a new slab page every 64) and one GFP_KERNEL page; one
        more for the reader page. The pages stay allocated (the buffer lives
        on); they are counted in ``ring_buffer_pages``."""
        n = ring_buffer_pages(self.header.get("boot_log") or "")
        if not n:
            return
        gfp = parse_gfp("GFP_KERNEL")
        alloc = self._alloc_pages
        taken = 0
        try:
            for i in range(n):
                if i % 64 == 0:
                    alloc(gfp, 0)               # the slab page of the next 64 buffer_pages
                    taken += 1
                alloc(gfp, 0)
                taken += 1
        except AllocationError as exc:
            raise PlacedReplayError(1, f"the model is out of memory for the trace ring "
                                    f"buffer ({n} pages): {exc}") from None
        self.res.ring_buffer_pages = taken

    def _early_untraced(self) -> None:
        """From the model's own boot: the rest of what Linux allocated before
        the trace's first event (early slab, per-CPU and trace-event data),
        as many order-0 UNMOVABLE and RECLAIMABLE pages as the kernel's
        record says (``early_untraced_pages``, read off trace-start dumps),
        on the boot pageset after the ring buffer: with them the model's
        free pages at the first event are Linux's, page for page, on the
        committed boot recordings. On 6.1 and 7.x the recorder's first
        ftrace trampoline comes ``KernelVersion.early_trampoline_at`` pages
        into the UNMOVABLE run (:meth:`_first_trampoline`: on 7.x with the
        execmem ROX cache's first 2M block, which a PMD entry of the image's
        level2_fixmap_pgt maps; the split of its direct-map alias, which
        the dumps show made before tracing). Counted in ``early_pages``."""
        unmovable, reclaimable = self.k.profile.early_untraced_pages

        def take(gfp: str, n: int) -> int:
            try:
                for _ in range(n):
                    self._early_pfns.add(self._alloc_pages(parse_gfp(gfp), 0))
            except AllocationError as exc:
                raise PlacedReplayError(1, f"the model is out of memory for the boot's early "
                                        f"untraced pages ({unmovable} + {reclaimable}): {exc}"
                                        ) from None
            return n

        cache = self.k.execmem.rox_cache
        at = self.k.profile.early_trampoline_at
        taken = 0
        if unmovable and at is not None:
            # early_trace_init starts the recorder's function tracer, whose
            # first trampoline splits its page's direct-map 2M page; its
            # page, tables and the split's table are among the early pages
            taken += take("GFP_KERNEL", at)
            block, held = self._first_trampoline(cache)
            taken += block + held
            # (the pages it holds on the boot the count was read off are
            # among the early pages; on bigger machines its split may hold
            # a table more, as Linux's does: 7.2's dumps at 4G to 16G)
            unmovable -= at + min(held, self.k.profile.early_trampoline_pages)
        taken += take("GFP_KERNEL", unmovable)
        if cache is not None and at is None and unmovable:
            # (a record without the trampoline's place: the block after the run)
            try:
                taken += cache.areas[cache.populate()].size // 4096
            except MemoryError as exc:
                raise PlacedReplayError(1, f"the model is out of memory for the execmem "
                                        f"cache's first block: {exc}") from None
        taken += take("GFP_KERNEL|__GFP_RECLAIMABLE", reclaimable)
        self.res.early_pages = taken

    def _first_trampoline(self, cache: ExecmemCache | None) -> tuple[int, int]:
        """The recorder's first ftrace trampoline, made before tracing
        (``arch_ftrace_update_trampoline`` when early_trace_init starts the
        function tracer). 7.x: the execmem ROX cache's first 2M block
        (``ExecmemCache.populate``), a page of it (``execmem_alloc_rw``: NX,
        then RW, which splits the block's direct-map 2M page: the
        trace-start dumps show it split, every entry read-only), then
        ``set_memory_rox`` (the collapse after it frees the module
        mapping's table, not the alias's). Before (6.1): a page of the
        module area (``module_alloc``, with the area's page table) made
        read-only and executable, which splits its direct-map 2M page too
        (6.1's trace-start dump: the page, 0x69e5 on the 2G boot, read-only
        in a split 0x6800000, as the model's module_alloc places it).
        Returns the pages of the cache's block and the other pages it
        holds (the page, the tables)."""
        buddy = self.k.buddy
        before = buddy.nr_free()
        block = 0
        try:
            if cache is not None:
                block = cache.areas[cache.populate()].size // 4096
                tramp = self.k.execmem.execmem_alloc_rw(4096, text=True, caller="ftrace")
                self.k.cpa.set_memory_rox(tramp, 1)
            else:
                area = self.k.execmem.module_alloc(4096, caller="ftrace")
                self.k.cpa.set_memory_ro(area.addr, 1)
                self.k.cpa.set_memory_x(area.addr, 1)
        except MemoryError as exc:
            raise PlacedReplayError(1, f"the model is out of memory for the recorder's first "
                                    f"ftrace trampoline: {exc}") from None
        return block, before - buddy.nr_free() - block

    def _va(self, va: int) -> int:
        pfn = direct_pfn(va)
        if pfn is None:
            return va
        if pfn < len(self.xlate) and self.xlate[pfn] >= 0:
            pfn = int(self.xlate[pfn])
        return self.k.pfn_to_virt(pfn) | (va & 0xFFF)

    # -- the events ----------------------------------------------------------------

    def _model_alloc(self, i: int, e: list) -> None:
        order = e[2]
        text = e[3] if len(e) > 3 else ""
        gfp = self.gfp_cache.get(text)
        if gfp is None:
            gfp = self.gfp_cache[text] = parse_gfp(text) if isinstance(text, str) else 0
        user = self.users.get(i) if self.users else None
        if user is not None:
            gfp = self.k.user_gfp(user, gfp)
            if order:
                self._model_alloc_pages(i, e, gfp)
                return
        try:
            mpfn = self._alloc_pages(gfp, order)
        except AllocationError as exc:
            raise PlacedReplayError(i + 2, f"the model is out of memory allocating order "
                                    f"{order} ({text}): {exc}") from None
        if user is not None:
            self._routed(mpfn, order, gfp)
        self._placed(i, e, mpfn)

    def _model_alloc_pages(self, i: int, e: list, gfp: int) -> None:
        """A user's high-order vmalloc block (7.x's execmem areas) under a
        policy: vmalloc splits it (``split_page``) and frees it page by
        page, so the policy is asked for its pages one at a time (a choice:
        a policy's pool need not give contiguous blocks back in parts)."""
        pfn, order = e[1], e[2]
        n = 1 << order
        try:
            got = self._alloc_routed(gfp, n)
        except AllocationError as exc:
            raise PlacedReplayError(i + 2, f"the model is out of memory allocating {n} pages "
                                    f"for order {order} ({e[3]}): {exc}") from None
        xl, ho = self.xlate, self.head_of
        for j, m in enumerate(got):
            if pfn + j < len(xl):
                xl[pfn + j] = m
                ho[pfn + j] = pfn
            self.given[m] = 1
        self.blocks[pfn] = [got[0], order, i + 2, True]       # as split already
        self._placed(i, e, got[0], mapped=True)

    def _placed(self, i: int, e: list, mpfn: int, mapped: bool = False) -> None:
        """The model gave ``mpfn`` for the allocation of event ``i``: Linux's
        pages become handles of the model's (unless ``mapped`` already),
        and the placement is counted (same pfn, same 2M region, the first
        difference). One call per allocation: the replay's hot path."""
        pfn = e[1]
        if not mapped:
            order = e[2]
            xl, ho = self.xlate, self.head_of
            if order == 0:
                if pfn < len(xl):
                    xl[pfn] = mpfn
                    ho[pfn] = pfn
                self.given[mpfn] = 1
            else:
                n = 1 << order
                if pfn + n <= len(xl):
                    xl[pfn: pfn + n] = range(mpfn, mpfn + n)
                    ho[pfn: pfn + n] = [pfn] * n
                self.given[mpfn: mpfn + n] = b"\x01" * n
            self.blocks[pfn] = [mpfn, order, i + 2, False]
        r = self.res
        r.allocations += 1
        r.model_pfns.append(mpfn)
        if mpfn == pfn:
            r.same_pfn += 1
        elif r.first_difference is None:
            r.first_difference = self._describe(i, e, mpfn)
            if self.stop_at_difference:
                raise _Stop
        if mpfn >> 9 == pfn >> 9:
            r.same_2m_region += 1

    def _boot_pack(self, i: int) -> bool:
        """The boot's first bpf_prog_pack (``ptp_classifier_init``) at its
        marker, on Linux's pages where the recording lists its area (the
        header's ``module_areas``): pages no event allocated (6.1: the bulk
        allocator's, before its kprobes; the boot-dump groups leave the
        module area out) the model's bulk allocator gives now; traced ones
        (7.2: one order-9 block) are the model's pages for them. The pack is then
        made on those pages (mapped, read-only and executable); the rest of
        the program's load (its own pages, slab) is the trace's. False
        (nothing done) without such an area."""
        if self._boot_pack_pages is None:
            return False
        from guestkernel.boot import postcore_initcalls
        pages, xl = self._boot_pack_pages, self.xlate
        untraced = [p for p in pages if xl[p] < 0]
        if untraced:
            self._bulk_alloc(i, untraced, self._bulk_gfp, 100)
        k = self.k
        vm = k.vmalloc
        source = vm.page_alloc
        vm.page_alloc = _GivenPages(source, [xl[p] for p in pages])
        try:
            k.bpf.new_pack()
        except MemoryError as exc:
            raise PlacedReplayError(i + 2, f"the boot's bpf_prog_pack: {exc}") from None
        finally:
            vm.page_alloc = source
        if self.wmark_at is None:
            postcore_initcalls(k.buddy, k.profile)
        return True

    def _table_span(self, i: int) -> int:
        """The end of the span of a pass before kprobes (no arguments, no
        return event) at or marked at ``i``: its passes and the page-table
        allocations among them, up to the first other event. Linux's split
        tables in it are matched with the model's (:meth:`_linux_table`); the
        recorder's ``cpa_pgtable`` tag after it cannot be trusted (no return
        event ends the pass for it)."""
        ev = self.events
        j = i + 1
        while j < len(ev) and (ev[j][0] == "C" or ev[j][0] == "A" and ev[j][2] == 0
                               and (len(ev[j]) > 5 and ev[j][5] == "cpa_pgtable"
                                    or ev[j][3] in _BOOT_TABLE_GFPS)):
            j += 1
        return j

    def _before_event(self, i: int) -> None:
        """The untraced bulk allocations inferred to fall just before event
        ``i`` (:func:`_infer_bulk`): the model's bulk allocator gives as many
        pages (vmalloc's way: 100 a call, then one at a time), each the
        handle of Linux's page in the same array position; a boot call
        marked there (:meth:`_early_call_markers`)."""
        if i == self.pcp_at:
            self.k.buddy.setup_per_cpu_pageset()
        zone = self.decay_at.get(i)
        if zone is not None:
            buddy = self.k.buddy
            buddy.decay_pcp_high(buddy.zones[zone])
        if i in self.stack_at:
            self._untraced_stack()
            self.res.untraced_stacks += 1
        if i == self.wmark_at:
            from guestkernel.boot import postcore_initcalls
            postcore_initcalls(self.k.buddy, self.k.profile)
        call = self.early_at.get(i)
        if call is not None:
            self._marked_end = self._call_span_end[i]
            self._table_span_start()
            from guestkernel.boot import boot_cpa_calls
            from guestkernel.versions import BootCpaCall
            k = self.k
            if call is not BootCpaCall.PTP_CLASSIFIER_BPF or not self._boot_pack(i):
                boot_cpa_calls(k.cpa, k.buddy, k.bpf, k.profile, only=lambda c: c is call,
                               real_mode=k.real_mode_base, postcore=self.wmark_at is None)
        done, groups = self.bulk_done, self.bulk_groups
        heads: dict[int, int] = {}          # zone start pfn -> the page the list gives next
        if i in self.bulk_markers:
            self._marked_bulk_call(i)
        marked = bool(self.bulk_markers)
        for g in self.bulk_before[i]:
            if done[g]:
                continue
            _lo, deadline, linux_pages = groups[g]
            if i < deadline:
                if marked:
                    continue                    # made at a marker (or its deadline)
                if not self._list_gives(g, heads):
                    continue
            done[g] = 1
            self._bulk_alloc(i, linux_pages, self._bulk_gfp, 100)
            heads.clear()

    def _on_bulk(self, i: int, e: list) -> None:
        """A recorded bulk allocator call: the model's bulk allocator is
        asked for as many pages as Linux's gave."""
        gfp = self._bulk_gfps[e[2]] if 0 <= e[2] < 3 else self._bulk_gfp
        if e[3]:
            self._bulk_alloc(i, e[3], gfp, len(e[3]))

    def _bulk_alloc(self, i: int, linux_pages: list[int], gfp: int, per_call: int) -> None:
        """The model's bulk allocator gives ``len(linux_pages)`` pages,
        ``per_call`` at most a call (vmalloc asks for 100), until a call
        gives fewer, then one ``alloc_pages`` a page; each is the handle of
        Linux's page in the same array position."""
        n = len(linux_pages)
        got: list[int] = []
        try:
            if i in self.bulk_users or (self.untraced_users and self.events[i][0] != "B" and any(
                    p in self.untraced_users for p in linux_pages)):
                # execmem's pages: the policy is asked one page at a time
                got = self._alloc_routed(self.k.user_gfp("execmem", gfp), n)
            else:
                vm_area_alloc_pages_bulk(self.k, got, n, gfp, per_call=per_call)
        except AllocationError as exc:
            raise PlacedReplayError(i + 2, f"the model is out of memory for a bulk allocation "
                                    f"of {n} pages: {exc}") from None
        xl, ho, given = self.xlate, self.head_of, self.given
        for pfn, mpfn in zip(linux_pages, got):
            if pfn < len(xl):
                xl[pfn] = mpfn
                ho[pfn] = pfn
            given[mpfn] = 1
            self.blocks[pfn] = [mpfn, 0, i + 2, False]
        r = self.res
        r.bulk_pfns += got
        r.bulk_pages += n
        r.bulk_same_pfn += sum(1 for p, m in zip(linux_pages, got) if p == m)

    def _bulk_before_passes(self) -> None:
        """An untraced bulk call whose pages a CPA pass changes (module
        memory on a version-3 trace) is made before that pass at the
        latest, so that the policy's pages are the pass's."""
        for g, (lo, hi, pages) in enumerate(self.bulk_groups):
            touches = [t for p in pages for t in self.untraced_users.get(p, ()) if t >= lo]
            if touches and min(touches) < hi:
                self.bulk_groups[g] = (lo, min(touches), pages)

    def _alloc_routed(self, gfp: int, n: int) -> list[int]:
        """``n`` order-0 pages of a user's, asked of the policy one at a
        time; out of memory, those taken are given back and the
        AllocationError propagates."""
        got: list[int] = []
        try:
            for _ in range(n):
                got.append(self._alloc_pages(gfp, 0))
        except AllocationError:
            for m in got:
                self._free_pages(m, 0)
            raise
        for m in got:
            self._routed(m, 0, gfp)
        return got

    def _routed(self, mpfn: int, order: int, gfp: int) -> None:
        from guestkernel.gfp import GFP_UNMAPPED
        self.res.policy_routed_pages += 1 << order
        if gfp & int(GFP_UNMAPPED):
            self.unmapped_by_policy.update(range(mpfn, mpfn + (1 << order)))

    def _tick(self) -> None:
        self.oracle.tick()
        self.metrics.tick()

    def _request(self, i: int, caller: str, args: list) -> None:
        self._table_span_start()
        self._frees_before_split(i)
        if self.unmapped_by_policy and self._policy_pages(args, i, lambda a: super(
                _Modelled, self)._request(i, caller, a)):
            return
        super()._request(i, caller, args)

    def _frees_before_split(self, i: int) -> None:
        """Frees traced inside the request at ``i`` before its split's table
        (an interrupt's, while the request ran: 7.2 at 8G, a vfree's
        set_direct_map_invalid_noflush with a stack and a page freed before
        its table page, which took the freed page): Linux's split allocated
        its table after them, the model's CPA allocates at the request, so
        those frees go first (and are not made again at their events). Only
        when the request's span (its passes and returns) has a split table,
        after the frees; not a batch's frees."""
        ev = self.events
        frees: list[int] = []
        j = i + 1
        while j < len(ev) and ev[j][0] in ("C", "R", "F"):
            if ev[j][0] == "F":
                frees.append(j)
            j += 1
        if not frees or j >= len(ev) or not (
                ev[j][0] == "A" and ev[j][2] == 0 and len(ev[j]) > 5
                and ev[j][5] == "cpa_pgtable"):
            return
        for j in frees:
            if j in self._batched or j in self.free_runs or j in self._prefreed:
                continue
            self._prefreed.add(j)
            self._on_free_now(j, ev[j][1], ev[j][2])

    def _alias(self, i: int, args: list, parent: list | None) -> None:
        if self.unmapped_by_policy and parent is not None and self._policy_pages(
                args, i, lambda a: super(_Modelled, self)._alias(i, a, parent)):
            return
        super()._alias(i, args, parent)

    def _policy_pages(self, args: list, i: int, replay) -> bool:
        """A pass on direct-map pages some of which the policy took out of
        the direct map itself: those pages are left to the policy, the
        others replayed page by page. False when the pass has none."""
        va, npages = args[0], args[1]
        mva = self._va(va)
        base = self.k.pfn_to_virt(0)
        if not base <= mva < self.direct_end:
            return False
        linux0 = direct_pfn(va)
        pages = [(int(self._va(base + ((linux0 + j) << 12)) - base) >> 12)
                 for j in range(npages)]
        mine = [m for m in pages if m in self.unmapped_by_policy]
        if not mine:
            return False
        self.res.policy_skipped_pages += len(mine)
        for j, m in enumerate(pages):
            if m not in self.unmapped_by_policy:
                one = list(args)
                one[0], one[1] = va + (j << 12), 1
                replay(one)
        return True

    def _marked_bulk_call(self, i: int) -> None:
        """An untraced bulk call the recorder marked at ``i``: the pending
        group (of those known from the boot dump and later frees) whose
        pages the model's list gives next; none matching (a call whose
        pages the dumps and frees do not show: freed before the boot dump
        by a path no event shows, or a group already made at its
        deadline), nothing is made and ``bulk_calls_unmatched`` counts it."""
        done, groups = self.bulk_done, self.bulk_groups
        pending = [g for g in range(len(groups)) if not done[g] and groups[g][0] <= i]
        heads: dict[int, int] = {}
        for g in pending:
            if self._list_gives(g, heads):
                done[g] = 1
                self._bulk_alloc(i, groups[g][2], self._bulk_gfp, 100)
                return
        if not self.k.profile.vmalloc_high_order:     # (7.x: a stack is one order-2 block)
            if self.events[i][2] == _NODE_BULK_CALLER:
                self._untraced_stack()
                self.res.bulk_calls_as_stacks += 1
                return
            if self._bulk_size_from_next(i) == THREAD_SIZE >> 12:
                # a stack: rest_init's first threads (kernel_init, kthreadd)
                # get theirs without a node, from the mempolicy bulk call
                self._untraced_stack()
                self.res.bulk_calls_sized += 1
                return
        self.res.bulk_calls_unmatched += 1

    def _bulk_size_from_next(self, i: int) -> int:
        """How many pages an untraced bulk call marked at ``i`` took, read
        off the trace's next allocation when that is an order-0 UNMOVABLE
        page with nothing allocated or freed in between: the bulk call took
        the pages its zone's per-CPU list held ahead of it (the call takes
        the list's pages in order; Linux's next page is where the list
        resumed). 0: not known that way (the next allocation another list's,
        or its page not on the model's list). Only as good as the model's
        list: _marked_bulk_call takes the answer only where it is a kernel
        stack's size (6.1's 2G boot: rest_init's first thread stacks, line
        71, 4 pages; elsewhere the answers are 0, or 3 where the model's
        list had gone its own way). A list holding fewer than a stack's
        pages was refilled inside the call (``rmqueue_bulk``): then 4 when
        a copy of the buddy that gives 4 pages leaves Linux's next page at
        the list's head (6.1's 4G boot and 8G stream, line 70)."""
        ev = self.events
        j = i + 1
        while j < len(ev) and ev[j][0] in ("U", "C", "R", "X", "S", "D"):
            if j in self.bulk_markers:
                return 0                        # another bulk call first
            j += 1
        if j >= len(ev) or ev[j][0] != "A" or ev[j][2] != 0 or ev[j][4] != UNMOVABLE:
            return 0
        pfn = ev[j][1]
        b = self.k.buddy
        if not 0 <= pfn < b.max_pfn:
            return 0
        pindex = order_to_pindex(UNMOVABLE, 0)
        lst = b.page_zone(pfn).pcp.lists[pindex]
        for k, x in enumerate(islice(lst, 100)):
            if x >> 4 == pfn:
                return k
        stack = THREAD_SIZE >> 12
        if len(lst) < stack:
            # The list ran dry inside the call: rmqueue_bulk refilled it
            # (pcp.c: __rmqueue_pcplist). Whether a stack's 4 pages leave
            # Linux's next page at the head is asked of a copy of the buddy
            # (6.1's 4G boot, line 70: 2 pages on the list, 2 of the refill).
            trial = copy.deepcopy(b)
            try:
                trial.alloc_pages_bulk(self._bulk_gfp, stack)
            except AllocationError:
                return 0
            head = trial.page_zone(pfn).pcp.lists[pindex]
            if head and head[0] >> 4 == pfn:
                return stack
        return 0

    def _untraced_stack(self) -> None:
        """A kernel stack no page event shows: an unmatched bulk call from
        vmalloc with a node (6.1's ``alloc_pages_bulk_array_node``, inlined
        in ``__vmalloc_node_range``: at boot the stacks of per-CPU kernel
        threads, ``kthread_create_on_cpu``; every such call of the 6.1 boot
        recordings matched to a known group is a THREAD_SIZE stack, 4
        pages), one without a node the next allocation shows took 4 pages
        (:meth:`_bulk_size_from_next`), or 5.10's marked stack taken while
        the trace events re-registered (``stack_at``, a page at a time:
        5.10 has no bulk allocator). The model gives 4 pages, kept without
        a handle (counted in ``bulk_pages``): Linux's pages are not known,
        and a later free of the same pfns (the thread exiting) frees them
        as pages allocated before the trace (_free_dumped)."""
        got: list[int] = []
        try:
            if self.k.profile.vmalloc_bulk:
                vm_area_alloc_pages_bulk(self.k, got, THREAD_SIZE >> 12, self._bulk_gfp)
            else:                               # 5.10: __vmalloc_area_node, a page at a time
                for _ in range(THREAD_SIZE >> 12):
                    got.append(self._alloc_pages(self._bulk_gfp, 0))
        except AllocationError as exc:
            raise PlacedReplayError(self.i + 2, f"the model is out of memory for an untraced "
                                    f"kernel stack: {exc}") from None
        self.res.bulk_pfns += got
        self.res.bulk_pages += len(got)

    def _list_gives(self, g: int, heads: dict[int, int]) -> bool:
        """Whether the model's list gives bulk group ``g``'s pages next:
        the page its zone's list gives next (kept in ``heads`` by zone,
        until an allocation changes it) is the group's first, and the list
        starts with the rest."""
        pages = self.bulk_groups[g][2]
        zone = self._group_zone[g]
        head = heads.get(zone)
        if head is None:
            head = heads[zone] = self._next_page(pages[0])
        return head == pages[0] and self._pcp_starts_with(pages)

    def _zone_start(self, pfn: int) -> int:
        b = self.k.buddy
        return b.page_zone(pfn).start_pfn if 0 <= pfn < b.max_pfn else -1

    def _next_page(self, pfn: int) -> int:
        """The page the UNMOVABLE order-0 per-CPU list of ``pfn``'s zone
        gives next (its head; the list empty, from a boot-time dump, what
        its refill would give first; else -1): a cheap first test of
        :meth:`_pcp_starts_with`."""
        b = self.k.buddy
        if not 0 <= pfn < b.max_pfn:
            return -1
        zone = b.page_zone(pfn)
        lst = zone.pcp.lists[order_to_pindex(UNMOVABLE, 0)]
        if lst:
            return lst[0] >> 4
        if self.boot_state is None:
            return -1
        for area in zone.free_area:
            heads = area[UNMOVABLE]
            if heads:
                return next(reversed(heads))          # the list's head
        return -1

    def _pcp_starts_with(self, pages: list[int]) -> bool:
        """The model's UNMOVABLE order-0 per-CPU list (of the zone of
        ``pages[0]``) starts with ``pages`` (as far as it goes)."""
        b = self.k.buddy
        if not 0 <= pages[0] < b.max_pfn:
            return False
        zone = b.page_zone(pages[0])
        lst = zone.pcp.lists[order_to_pindex(UNMOVABLE, 0)]
        if not lst:
            if self.boot_state is None:
                return False
            # (from a boot-time dump) an empty list: the call refills it
            # from the buddy, whose smallest UNMOVABLE block gives its head
            # page first (expand keeps the lower half)
            return self._next_page(pages[0]) == pages[0]
        return all(x >> 4 == p for x, p in zip(islice(lst, len(pages)), pages))

    def _model_free_run(self, run: list[int]) -> None:
        """The ``F`` events ``run``: one ``free_pages_bulk`` of order-0
        pages: the model's pages of them, in the same order, to the model's
        ``free_pages_bulk`` (contiguous runs as blocks on 7.x)."""
        ho = self.head_of
        mine: list[int] = []
        for j in run:
            pfn = self.events[j][1]
            head = ho[pfn] if pfn < len(ho) else -1
            if head < 0:
                if not self._booting and pfn not in self._early_pfns and \
                        pfn not in self.skipped_tables and self._claim_dumped_pages(pfn, 0):
                    # allocated before the events (a dump's vmalloc area):
                    # the model's own page at Linux's pfn, freed in the
                    # batch with the rest (its runs as blocks on 7.x)
                    mine.append(pfn)
                    self.res.untraced_blocks_freed += 1
                else:
                    self._model_free(j, pfn, 0)     # booting, early, a table, untraced
                continue
            mine += self._release(pfn, 0, head)[1]
        self.k.free_pages_bulk(mine)

    def _model_free(self, i: int, pfn: int, order: int) -> None:
        if pfn in self.skipped_tables:
            self.skipped_tables.discard(pfn)
            return
        ho = self.head_of
        head = ho[pfn] if pfn < len(ho) else -1
        if head < 0:
            if self._booting and self._free_deferred(pfn, order):
                return
            if self._booting and self._free_reserved(pfn, order):
                return
            if self._early_pfns and self._free_early(pfn, order):
                return
            if self._free_dumped(pfn, order, i in self.buddy_frees):
                # from a dump, or from the model's own boot: a block Linux
                # allocated before its first event (the model's early run
                # holds the same pages: trace-start's free pages are
                # Linux's) that the model holds as order-0 pages of its own
                self.res.untraced_blocks_freed += 1
                return
            self.res.untraced_frees += 1
            return
        if head == pfn and order == 0 and i not in self.buddy_frees:
            blk = self.blocks[head]
            if blk[1] == 0 and not blk[3]:
                # _release of a whole order-0 block (most events), inline
                mhead = blk[0]
                self.given[mhead] = 0
                self.xlate[pfn] = -1
                ho[pfn] = -1
                if self.unmapped_by_policy:
                    self.unmapped_by_policy.discard(mhead)
                del self.blocks[head]
                self._free_pages(mhead, 0)
                return
        whole, pages = self._release(pfn, order, head)
        if i in self.buddy_frees:       # free_one_page: the per-CPU lock was busy
            if whole:
                self.k.buddy.free_pages_ok(pages[0], order)
            else:
                for m in pages:
                    self.k.buddy.free_pages_ok(m, 0)
        elif whole:
            self._free_pages(pages[0], order)
        elif i in self.exact_tails:
            for m in pages:         # make_alloc_exact: __free_pages_ok(FPI_TO_TAIL)
                self.k.buddy.free_pages_ok(m, 0, to_tail=True)
        else:
            for m in pages:
                self._free_pages(m, 0)

    def _release(self, pfn: int, order: int, head: int) -> tuple[bool, list[int]]:
        """Forget the handles of Linux's [pfn, pfn + 2**order), part of the
        block Linux allocated at ``head``: (True, [the model's block]) when it
        is that whole block, else (False, the model's order-0 pages of it),
        the model's block split first as the kernel's ``split_page`` did."""
        n = 1 << order
        xl, ho, given, blocks = self.xlate, self.head_of, self.given, self.blocks
        mhead, horder, _line, split = blocks[head]
        whole = head == pfn and horder == order and not split
        if whole:
            pages = [mhead]
            given[mhead: mhead + n] = bytes(n)
        else:
            if not split:
                self.k.split_pages(mhead, horder)
                blocks[head][3] = True
            pages = [xl[p] for p in range(pfn, pfn + n) if ho[p] == head]
            for m in pages:
                given[m] = 0
        xl[pfn: pfn + n] = [-1] * n
        ho[pfn: pfn + n] = [-1] * n
        if self.unmapped_by_policy:
            for m in pages:
                self.unmapped_by_policy.difference_update(
                    range(m, m + (n if whole else 1)))
        if whole or all(ho[q] != head for q in range(head, head + (1 << horder))):
            del blocks[head]
        return whole, pages

    def _free_deferred(self, pfn: int, order: int) -> bool:
        """From the model's own boot: a free by deferred struct-page init
        (``deferred_free_range``: memory the model's memblock hand-over
        deferred, as Linux's did) frees those pages the same way; once all
        are free, the watermarks are set and the model's early boot calls
        made (page_alloc_init_late comes before the initcalls). False when
        the pages are not deferred in the model."""
        b = self.k.buddy
        end = pfn + (1 << order)
        if not b.deferred or not any(s <= pfn and end <= e for s, e in b.deferred):
            return False
        b.deferred_free_range(pfn, end)
        self.res.deferred_pages_freed += end - pfn
        if not b.deferred:
            self._after_deferred_init()
        return True

    def _after_deferred_init(self) -> None:
        """page_alloc_init_late done (what the trace has not freed of the
        deferred range freed now, the watermarks set), then the boot calls
        that follow it."""
        from guestkernel.boot import page_alloc_init_late
        page_alloc_init_late(self.k.buddy)
        if not self._early_done:
            self._early_done = True
            self._early_calls(late=True)

    def _free_reserved(self, pfn: int, order: int) -> bool:
        """From the model's own boot: a free of memory memblock kept (the
        initrd, the init sections, the kernel image's gaps), which Linux
        gives to the buddy allocator page by page (free_reserved_area):
        the model frees the same pages, still reserved in its memblock too,
        the same way. False when they are not all reserved in the model."""
        b = self.k.buddy
        end = pfn + (1 << order)
        if not 0 <= pfn < end <= b.max_pfn or any(
                b.is_handed_over(p) for p in range(pfn, end)):
            return False
        b.free_reserved_area(pfn, end)
        self.res.reserved_pages_freed += end - pfn
        return True

    def _free_early(self, pfn: int, order: int) -> bool:
        """From the model's own boot: a free of pages Linux allocated before
        the trace's first event (an early slab page, say) where the model
        holds its own early untraced pages (:meth:`_early_untraced`, which
        sit at Linux's pfns on the committed boot recordings): those are
        freed. False unless every page of the block is one of them."""
        pages = range(pfn, pfn + (1 << order))
        early = self._early_pfns
        if not all(p in early for p in pages):
            return False
        if order:
            self.k.buddy.join_allocated(pfn, order)
        early.difference_update(pages)
        self._free_pages(pfn, order)
        self.res.early_pages_freed += 1 << order
        return True

    def _free_dumped(self, pfn: int, order: int, to_buddy: bool = False) -> bool:
        """A free of memory allocated before the trace's events (from a
        dump: the model took it as allocated order-0 pages, Linux's blocks
        unknown; from the model's own boot: pages of its early run, which
        holds Linux's pages at the first event, such as 6.1's order-1 block
        at 0x4870 freed at trace line 7238 of its 2G boot, then the head of
        the order-1 per-CPU list): the pages joined into the block Linux
        frees and freed at the same pfns, when the model has them all
        allocated and its own (no event's, no table); False when it does not
        (a page the dump showed free). ``to_buddy``: Linux's free went
        straight to the buddy lists (the trace's ``buddy`` mark:
        free_one_page, the per-CPU lock busy), as the model's then does."""
        if not self._claim_dumped_pages(pfn, order):
            return False
        if order:
            self.k.buddy.join_allocated(pfn, order)   # the block as Linux frees it: one order-n free
        if to_buddy:
            self.k.buddy.free_pages_ok(pfn, order)
        else:
            self.k.free_pages(pfn, order)
        return True

    def _claim_dumped_pages(self, pfn: int, order: int) -> bool:
        """Whether the model holds ``pfn``'s ``2**order`` pages as pages
        allocated before the trace's events (order-0, no event's, not a
        table), and if so makes them plain pages ready to free: from a dump
        (not booting), the dump's vmalloc pages (``PageOwner.VMALLOC``: an
        area Linux vfrees, ``vm_area_free_pages``) have their owner cleared
        so that the free gives them back. The caller frees them."""
        b = self.k.buddy
        pages = range(pfn, pfn + (1 << order))
        owner = self.k.page_owner
        # (a dump's vmalloc pages are Linux's; from the model's own boot a
        # vmalloc page is the model's own making: its boot pack, a stack)
        owners = (PageOwner.NONE,) if self._booting else (PageOwner.NONE, PageOwner.VMALLOC)
        if not all(0 <= p < b.max_pfn and b.allocated_order(p) == 0 and not self.given[p]
                   and owner[p] in owners for p in pages):
            # free at the dump, the model's for a later allocation, or a page
            # of its own (a page table: its collapses free their own tables)
            return False
        owner[pfn: pfn + (1 << order)] = PageOwner.NONE
        return True

    def _early_request(self, i: int) -> None:
        """Before boot kprobes: only a one-page request right after a
        one-page vmalloc allocation is replayed (that page read-only)."""
        from guestkernel.cpa import CpaError, CpaFlags
        if i >= self._marked_end:        # not the pass of a call made at its marker
            self._marked_end = self._table_span(i)
            self._table_span_start()
        made_by_model, prev, _end, aliases, _marker = self._early_context(i)
        if made_by_model or not one_page_vmalloc(prev, aliases):
            self.res.early_requests_skipped += 1
            return
        pfn = int(self.xlate[prev[1]]) if self.xlate[prev[1]] >= 0 else prev[1]
        try:
            self.k.cpa.change_page_attr_set_clr(self.k.pfn_to_virt(pfn), 1, 0, 1 << 1,
                                                in_flag=CpaFlags.NO_CHECK_ALIAS)
        except (CpaError, MemoryError) as exc:
            raise PlacedReplayError(i + 2, f"early request on pfn {pfn:#x}: {exc}") from None

    def _describe(self, i: int, e: list, mpfn: int) -> dict:
        """The first allocation placed elsewhere than Linux placed it, with
        the model's free lists around it."""
        from guestkernel.gfp import gfp_migratetype_index, parse_gfp
        b = self.k.buddy
        pfn, order = e[1], e[2]
        gfp = parse_gfp(e[3])
        mt = gfp_migratetype_index(gfp)
        zone = b.page_zone(mpfn)
        out = {"line": i + 2, "order": order, "gfp": e[3], "migratetype": b.migratetype_name(mt),
               "user": e[5] if len(e) > 5 else None, "linux_pfn": pfn, "model_pfn": mpfn,
               "zone": zone.name,
               "model_list_head": b.free_list(zone, order, mt)[:4],
               "model_pcp_head": (b.pcp_list(zone, mt, order)[:4]
                                  if order <= 3 else [])}
        # Linux's pfn in the model: free (where), allocated (by which line), or reserved
        if pfn < b.max_pfn:
            blk = b.block_of(pfn)
            where = "reserved in the model (never handed to its buddy)"
            if blk is not None:
                head, o, kind = blk
                if kind == "free":
                    z = b.page_zone(head)
                    for m in range(b.nr_migratetypes):
                        lst = b.free_list(z, o, m)
                        if head in lst:
                            where = (f"free in the model: zone {z.name} order {o} "
                                     f"{b.migratetype_name(m)} position {lst.index(head)}")
                            break
                elif kind == "pcp":
                    where = "free in the model, on its per-CPU list"
                else:
                    owner = next((f"line {v[2]}" for v in self.blocks.values()
                                  if v[0] <= head < v[0] + (1 << v[1])), None)
                    where = ("allocated in the model" + (f" (for the trace's {owner})"
                                                         if owner else " (boot or its own)"))
            out["linux_pfn_in_model"] = where
        return out

    # -- the loop -------------------------------------------------------------------

    def run(self) -> ModelledReplay:
        import time

        from guestkernel.kernel import KernelError
        from guestkernel.page_alloc import BadFreeError
        t0 = time.perf_counter()
        k = self.k
        if self._booting:
            # on the boot pagesets: the end of mem_init (the vmalloc space's
            # top-level tables), then in start_kernel after mm_init
            # ftrace_init and early_trace_init (the ring buffer); the zones'
            # own pagesets come later in start_kernel
            # (setup_per_cpu_pageset), taken here before the first event
            # (when exactly, no event says)
            from guestkernel.boot import defer_watermarks, ftrace_init
            k.buddy.boot_pagesets()
            defer_watermarks(k.buddy, k.profile)
            try:
                k.preallocate_vmalloc_pages()
            except KernelError as exc:
                self.res.error = f"trace line 1: {exc}"
                return self.res
            if self.boot_state is not None:
                self._install_boot_state()
            else:
                try:
                    groups = ftrace_init(k.buddy, k.ftrace_pages)
                except AllocationError as exc:
                    self.res.error = (f"trace line 1: the model is out of memory for "
                                      f"ftrace_init: {exc}")
                    return self.res
                self.res.ftrace_pages = k.ftrace_pages
                # Linux frees parts of what it allocated before tracing
                # (ftrace's record pages of init code among them: 7.2 frees
                # an order-2 block of them): the model's pages there are its
                # own early pages too, order 0, freed as Linux frees them
                # (_free_early)
                for head in groups:
                    order = k.buddy.allocated_order(head)
                    if order:
                        k.buddy.split_allocated(head, order)
                    self._early_pfns.update(range(head, head + (1 << order)))
                self._ring_buffer()
                self._early_untraced()
            if self.pcp_at is None:
                k.buddy.setup_per_cpu_pageset()
            self._early_calls(late=False)
            if not k.buddy.deferred:
                self._after_deferred_init()
            # else at the trace's deferred_init_memmap frees (or its first
            # snapshot): the early calls after page_alloc_init_late
        self.i = self.start
        try:
            with k.tlb.deferred():               # the CPU runs no code in a replay
                self._loop(self.start)
        except _Stop:
            pass
        except PlacedReplayError as exc:
            self.res.error = str(exc)
        except (BadFreeError, KernelError) as exc:     # a bookkeeping fault: say where
            self.res.error = f"trace line {self.i + 2}: {exc}"
        if self.metrics is not None:
            from .results import metric_fields
            self.res.metrics = metric_fields(self)
            self.res.model_metrics_samples = self.metrics.samples
        self.res.seconds = time.perf_counter() - t0
        self.res.model = k
        return self.res

    def _on_alloc(self, i: int, e: list, inner: list | None) -> None:
        if (inner is not None or i < self._marked_end) and e[2] == 0 and (
                len(e) > 5 and e[5] == "cpa_pgtable"
                or (e[3] in CPA_TABLE_GFPS and splits_direct_map_tables(inner[0])
                    if inner is not None else
                    e[3] in _BOOT_TABLE_GFPS or e[3] in _VMAP_TABLE_GFPS)):
            # The table of one of Linux's splits, in a pass with arguments
            # or in the span of one before kprobes (_table_span): tagged by
            # the recorder, else a table's GFP in a pass on the kernel's
            # mappings (traces recorded before 7.2's pagetable_alloc GFP
            # was known have it as "kernel").
            self._linux_table(i, e)
        else:
            self._model_alloc(i, e)

    def _table_span_start(self) -> None:
        """A request's span begins (a pass with arguments, one before
        kprobes, or a boot call made at its marker): the tables the model
        makes from here on are matched with Linux's in the span."""
        self._span_tables = self.k.pgtable_pages_made
        self._span_matched = 0

    def _linux_table(self, i: int, e: list) -> None:
        """A table page Linux allocated for a split, in the span of a
        request (its passes; :meth:`_table_span_start`). The model's CPA
        made its own tables for the same request when its events began: one
        that no Linux table of the span stood for yet is this one (the
        event is skipped, its free too). Otherwise Linux split where the
        model did not: the page is placed as any allocation, so that the
        model's free memory still follows Linux's."""
        if self.k.pgtable_pages_made - self._span_tables > self._span_matched:
            self._span_matched += 1
            self.res.pgtable_allocations_skipped += 1
            self.skipped_tables.add(e[1])
        else:
            self.res.pgtable_allocations_placed += 1
            self._model_alloc(i, e)

    def _on_free(self, i: int, pfn: int, order: int) -> None:
        if i in self._prefreed:
            return                              # made before its request's split
        self._on_free_now(i, pfn, order)

    def _on_free_now(self, i: int, pfn: int, order: int) -> None:
        if i in self._batched:
            return                              # freed with its batch, at its last free
        run = self.free_runs.get(i)
        if run is not None:
            self._model_free_run(run)
            return
        self._model_free(i, pfn, order)

    def _snapshot(self, e: list) -> None:
        if self._booting and not self._early_done:
            self._after_deferred_init()       # a trace without deferred init's frees
        snap = self._snapshot_entry(e)
        snap["placement"] = self.res.placement()
        self.res.snapshots.append(snap)

    def _dump(self, point: str) -> None:
        """A dump point: the model's tables, free pages and free lists (in
        order) beside Linux's."""
        if point not in self.states:
            return
        b = self.k.buddy
        lists = {}
        for z in b.zones:
            for o in range(len(z.free_area)):
                for m in range(len(z.free_area[o])):
                    heads = b.free_list(z, o, m)
                    if heads:
                        lists[(z.name, o, m)] = heads
        self._compare_state(point, b.page_states() == 1, lists)


_UNKNOWN, _ALLOCATED, _FREE = 0, 1, 2
#: a CPA split's table GFP as the boot prints it: gfp_allowed_mask
#: (GFP_BOOT_MASK) strips __GFP_RECLAIM, __GFP_IO and __GFP_FS until the
#: scheduler runs, so 6.1's GFP_KERNEL is "none" and 7.2's
#: GFP_KERNEL|__GFP_ZERO|__GFP_COMP "__GFP_ZERO|__GFP_COMP"
_BOOT_TABLE_GFPS = CPA_TABLE_GFPS | {"__GFP_ZERO|__GFP_COMP", "__GFP_COMP", "__GFP_ZERO"}
#: a kernel page table's GFP (GFP_PGTABLE_KERNEL; 7.2's pagetable_alloc adds
#: __GFP_COMP): the vmalloc mapping's tables
_VMAP_TABLE_GFPS = frozenset(("GFP_KERNEL|__GFP_ZERO", "GFP_KERNEL|__GFP_ZERO|__GFP_COMP"))


class _GivenPages:
    """A page source for the model's vmalloc that hands out pages the
    replay has placed already (Linux's, by handle), in order; anything
    else goes to the real one."""

    def __init__(self, source, pfns: list[int]):
        self._source, self._pfns = source, pfns

    def alloc_pages(self, gfp: int, order: int = 0, **_kw) -> int:
        pfn = self._pfns[0]
        del self._pfns[:1 << order]
        return pfn

    def alloc_pages_bulk(self, gfp: int, nr_pages: int, **_kw) -> list[int]:
        got = self._pfns[:nr_pages]
        del self._pfns[:nr_pages]
        return got

    def __getattr__(self, name: str):
        return getattr(self._source, name)


_TRACE_BUF = re.compile(r"\btrace_buf_size=(\d+)([KkMmGg]?)")
#: BUF_PAGE_SIZE: a ring-buffer page's payload (PAGE_SIZE - its 16-byte header)
_BUF_PAGE_SIZE = 4096 - 16


def ring_buffer_pages(boot_log: str) -> int:
    """Data pages of the tracing ring buffer the recorded kernel's command
    line asked for (``trace_buf_size=``; ``ring_buffer_alloc`` of one CPU:
    at least 2, plus the reader page); 0 without the option."""
    line = next((ln for ln in boot_log.splitlines() if "Command line:" in ln), "")
    m = _TRACE_BUF.search(line)
    if not m:
        return 0
    size = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    return max(-(-size // _BUF_PAGE_SIZE), 2) + 1


def _alloc_exact_tails(events: list[list], start: int) -> set[int]:
    """The F events of ``alloc_pages_exact``'s tails: ``make_alloc_exact``
    splits the block it allocated and frees the pages past the size, one
    by one in order, right away. So: order-0 frees that follow an
    allocation of order 1 or more at once, of its pages from one on to
    its end."""
    out: set[int] = set()
    n = len(events)
    for j in range(start, n - 1):
        e = events[j]
        if e[0] != "A" or e[2] < 1:
            continue
        f = events[j + 1]
        end = e[1] + (1 << e[2])
        if f[0] != "F" or f[2] != 0 or not e[1] < f[1] < end:
            continue
        p, k = f[1], j + 1
        while k < n and events[k][0] == "F" and events[k][2] == 0 and events[k][1] == p:
            p += 1
            k += 1
        if p == end:
            out.update(range(j + 1, k))
    return out


#: the bulk allocator's caller when vmalloc asks for a node's pages (6.1:
#: alloc_pages_bulk_array_node inlined), see _Modelled._untraced_stack
_NODE_BULK_CALLER = "__vmalloc_node_range"
#: x86-64's kernel stacks (no KASAN): 16K
THREAD_SIZE = 16 << 10
#: the caller of a kernel stack's vmalloc (alloc_thread_stack_node and
#: dup_task_struct inlined): see recorder.STACK_MARKERS
_STACK_CALLER = "copy_process"


def _vmalloc_pages_follow(events: list[list], j: int) -> bool:
    """Whether vmalloc'd pages (order-0 ``A`` events for ``vmalloc``)
    follow the marker at ``j`` before the next marker or pass."""
    for k in range(j + 1, len(events)):
        e = events[k]
        if e[0] in ("U", "C", "S", "D"):
            return False
        if e[0] == "A" and e[2] == 0 and len(e) > 5 and e[5] == "vmalloc":
            return True
    return False


def _pcp_setup_at(events: list[list], markers: list[int], after_idt: int | None
                  ) -> int | None:
    """Where ``setup_per_cpu_pageset`` ran in a recording without its
    marker: start_kernel makes it ``after_idt`` allocations after init_IRQ's
    set_memory_ro of the IDT (KernelVersion.pcp_setup_after_idt; the IDT
    split's tables not counted), i.e. before the next one. None: no IDT
    marker, or the count unknown."""
    if after_idt is None:
        return None
    idt = next((j for j in markers if events[j][1] == "set_memory_ro"
                and events[j][2] == "idt_setup_apic_and_irq_gates"), None)
    if idt is None:
        return None
    seen = 0
    for j in range(idt + 1, len(events)):
        e = events[j]
        if e[0] != "A" or len(e) > 5 and e[5] == "cpa_pgtable":
            continue
        if seen == after_idt:
            return j
        seen += 1
    return None


#: the recorder's marker on init_per_zone_wmark_min: its first step
#: (the function itself has no ftrace entry in 6.1's build)
_WMARK_MIN_MARKER = "calculate_min_free_kbytes"


def _wmark_min_at(events: list[list], start: int, markers: list[int] | None = None
                  ) -> int | None:
    """The event before which ``init_per_zone_wmark_min`` ran (the
    postcore initcall that sets the watermarks and, 5.14+, sizes the
    per-CPU lists from them: see guestkernel.boot.postcore_initcalls):
    the recorder's marker; in a recording without it, right after
    ``dma_atomic_pool_init``, the postcore initcall linked before it: after
    the DMA32 pool's block (the first GFP_DMA32 allocation of order 5 or
    more, atomic_pool_size >= 128K) and the vmalloc pages and bulk calls
    of its remap and of audit_init's thread that follow. Checked against
    recordings with the marker: exact on 7.2 (2G, 4G); on 6.1 two order-0
    slab pages early (audit_init's, made before the marker there).
    None: neither is in the trace. ``markers``: the ``U`` events' indices
    from ``start`` on, if known (:func:`_markers`)."""
    for j in (markers if markers is not None else _markers(events, start)):
        if events[j][1] == _WMARK_MIN_MARKER:
            return j
    for j in range(start, len(events)):
        e = events[j]
        if e[0] == "A" and e[2] >= 5 and "GFP_DMA32" in e[3].split("|"):
            j += 1
            while j < len(events) and (events[j][0] == "U" or events[j][0] == "A"
                                       and len(events[j]) > 5 and events[j][5] == "vmalloc"):
                j += 1
            return j if j < len(events) else None
    return None


def _markers(events: list[list], start: int) -> list[int]:
    """The indices of the ``U`` events (the recorder's markers) from ``start``
    on, in order (found by ``list.index`` over the events' kinds: one pass
    in C)."""
    kinds = [e[0] for e in events]
    out: list[int] = []
    i = start
    try:
        while True:
            i = kinds.index("U", i)
            out.append(i)
            i += 1
    except ValueError:
        return out


def _free_runs(events: list[list], start: int, markers: list[int] | None = None
               ) -> dict[int, list[int]]:
    """The batch frees (``U`` events of :data:`FREE_MARKERS`): the order-0
    ``F`` events in a row after each, by the index of the last. Allocations
    among them are an interrupt's, made while the batch prepared its pages
    (a 7.2 vfree: two GFP_NOWAIT pages between the marker and its frees):
    the batch gives its pages back after its last prepare, so after those.
    Frees among them of pages no vmalloc area held (their last
    allocation's user not ``vmalloc`` nor the bulk allocator's: an RCU
    callback's page-table frees in an interrupt, 7.2 at 8G running
    bpftrace) are not the batch's: they go back at their own events, to
    the per-CPU list after the batch gave its pages back, or, while the
    batch held the per-CPU lock, to the buddy (the recorder's give-back
    probe marks those ``buddy``; Linux's next page is then the batch's).
    ``markers``: the ``U`` events' indices from ``start`` on, if known
    (:func:`_markers`)."""
    names = {name for names in FREE_MARKERS.values() for name in names}
    at = [i for i in (markers if markers is not None else _markers(events, start))
          if events[i][1] in names]
    out: dict[int, list[int]] = {}
    if not at:
        return out
    user: dict[int, str] = {}          # pfn -> its last allocation's user, up to k
    k = 0
    n = len(events)
    for i in at:
        while k < i:
            e = events[k]
            if e[0] == "A" and len(e) > 5:
                for p in range(e[1], e[1] + (1 << e[2])):
                    user[p] = e[5]
            elif e[0] == "B":
                for p in e[3]:
                    user[p] = "vmalloc"
            k += 1
        run: list[int] = []
        j = i + 1
        while j < n and (events[j][0] == "F" and events[j][2] == 0 or events[j][0] == "A"
                         or events[j][0] == "U" and events[j][1] not in names):
            # (an interrupt's function markers too: bpf_prog_free from
            # rcu_do_batch between the marker and the batch's frees)
            if events[j][0] == "F" and user.get(events[j][1], "vmalloc") == "vmalloc":
                run.append(j)
            j += 1
        if run:
            out[run[-1]] = run
    return out


def _infer_bulk(events: list[list], start: int, n: int,
                free_at_start: list[tuple[int, int]] | None
                ) -> list[tuple[int, int, list[int]]]:
    """Where the bulk allocator (``alloc_pages_bulk``: no ``mm_page_alloc``
    event) gave pages: a free of an order-0 page that Linux had free (freed
    since, or free at the start dump) is a page some untraced allocation
    took. Such frees in a row (a ``vfree``: the area's pages in their array
    order) are one bulk allocation, made after the last event that freed or
    allocated any of its pages and before the first of those frees. From
    boot (``free_at_start`` None) only pages the trace itself freed are
    known free. Returns [(earliest event index, the first free's index,
    Linux's pages in array order)]."""
    state = bytearray(n)
    if free_at_start is not None:
        state[:] = bytes([_ALLOCATED]) * n
        for pfn, order in free_at_start:
            if pfn + (1 << order) <= n:
                state[pfn: pfn + (1 << order)] = bytes([_FREE]) * (1 << order)
    last = [start - 1] * n
    out: list[tuple[int, int, list[int]]] = []
    group: list[int] = []
    group_start = -1
    in_group: set[int] = set()
    group_at = -1
    prev_untraced = -2

    def close() -> None:
        if group:
            out.append((group_at, group_start, list(group)))
            group.clear()

    for i in range(start, len(events)):
        e = events[i]
        kind = e[0]
        if kind == "A":
            pfn, order = e[1], e[2]
            end = min(pfn + (1 << order), n)
            state[pfn:end] = bytes([_ALLOCATED]) * (end - pfn)
            last[pfn:end] = [i] * (end - pfn)
        elif kind == "B":                   # a recorded bulk call (version 4)
            for pfn in e[3]:
                if pfn < n:
                    state[pfn] = _ALLOCATED
                    last[pfn] = i
        elif kind == "F":
            pfn, order = e[1], e[2]
            if order == 0 and pfn < n and state[pfn] == _FREE:
                if prev_untraced != i - 1 or pfn in in_group:
                    # not in a row, or a page freed twice: another allocation
                    close()
                    in_group.clear()
                    group_at = -1
                    group_start = i
                group.append(pfn)
                in_group.add(pfn)
                group_at = max(group_at, last[pfn] + 1)
                prev_untraced = i
            end = min(pfn + (1 << order), n)
            state[pfn:end] = bytes([_FREE]) * (end - pfn)
            last[pfn:end] = [i] * (end - pfn)
    close()
    return out


def policy_users(events: list[list]) -> tuple[dict[int, str], set[int], dict[int, list[int]]]:
    """Which of the trace's allocations a policy routes as a user's: ``A``
    event index -> "secretmem" (allocated in ``secretmem_fault``) or
    "execmem" (a ``vmalloc`` user's page that a CPA pass changed while it
    was allocated); the ``B`` (bulk) events with such a page; and the
    pfns a pass changed while no traced allocation held them (pages of
    the untraced bulk calls a version-3 trace implies: see _infer_bulk),
    with the indices of those passes."""
    users: dict[int, str] = {}
    bulk: set[int] = set()
    untraced: dict[int, list[int]] = {}
    holder: dict[int, tuple[int, str]] = {}     # pfn -> (event, "A" vmalloc / "B" / "")
    for i, e in enumerate(events):
        kind = e[0]
        if kind == "A":
            user = e[5] if len(e) > 5 else None
            if user == "secretmem":
                users[i] = "secretmem"
            held = (i, "A" if user == "vmalloc" else "")
            for p in range(e[1], e[1] + (1 << e[2])):
                holder[p] = held
        elif kind == "B":
            for p in e[3]:
                holder[p] = (i, "B")
        elif kind == "F":
            for p in range(e[1], e[1] + (1 << e[2])):
                holder.pop(p, None)
        elif kind == "C" and e[2] is not None:
            va, npages = e[2][0], e[2][1]
            first = direct_pfn(va)
            if first is not None:
                for p in range(first, first + npages):
                    h = holder.get(p)
                    if h is None:
                        untraced.setdefault(p, []).append(i)
                    elif h[1] == "B":
                        bulk.add(h[0])
                    elif h[1] == "A":
                        users[h[0]] = "execmem"
    return users, bulk, untraced


class _Stop(Exception):
    """trace diff: the first difference is found."""


def replay_modelled(source: str | Path | list[str], *, policy: str | None = None,
                    kernel: str | None = None, truth: str | Path | list | None = None,
                    start: str | None = None, metrics: bool = False) -> ModelledReplay:
    """Replay a recorded trace with the model's own placement (see the
    module doc); ``truth`` as for :func:`dmfrag.placed.replay_placed`.
    ``start``: a dump point; the model starts from Linux's state there
    (``Kernel.from_state``) and replays the events after it, so that every
    difference is the allocator's own, not the history's. ``metrics``:
    the result carries compare's fields (``ModelledReplay.metrics``)."""
    with gc_paused():
        header, events, states = load_recorded(source, kernel, truth)
        return _Modelled(header, events, policy, states, start=start, metrics=metrics).run()


@dataclass
class TraceDiff:
    """``dmfrag trace diff``: the first allocation the model places
    elsewhere than Linux did (None: every allocation got Linux's pfn)."""

    first: dict | None
    allocations_before: int
    error: str | None = None

    def to_json(self) -> dict:
        return {"first_difference": self.first, "allocations_before": self.allocations_before,
                "error": self.error}


def trace_diff(source: str | Path | list[str], *, policy: str | None = None,
               kernel: str | None = None, start: str | None = None) -> TraceDiff:
    with gc_paused():
        header, events, states = load_recorded(source, kernel)
        rep = _Modelled(header, events, policy, states, stop_at_difference=True, start=start)
        res = rep.run()
    before = res.allocations - (1 if res.first_difference else 0)
    return TraceDiff(res.first_difference, before, res.error)
