"""Record what a real Linux kernel did: every page allocation and free and
every change_page_attr call, in order, with the meminfo/vmstat snapshots at
their points, as a version-4 trace (``dmfrag realkernel record``).

How the guest is traced (all from the kernel command line, so tracing runs
from early boot, before any workload):

* ``trace_event=kmem:mm_page_alloc,kmem:mm_page_free``: each allocation
  (pfn, order, GFP as the kernel prints it, migratetype) and each free, from
  ``trace_init()`` in ``start_kernel`` on;
* ``ftrace=function ftrace_filter=__change_page_attr_set_clr``: a marker at
  the entry of every CPA pass, from ``early_trace_init`` on. Its caller says
  whether it is a request (``<-change_page_attr_set_clr``,
  ``<-__set_pages_np`` ...) or an alias pass nested in one
  (``<-__change_page_attr_set_clr``);
* ``kprobe_event=``: the same entry with its ``struct cpa_data`` (the
  address, numpages, mask_set, mask_clr, flags, force_split, primary), and a
  return probe, so the pages a pass allocates (the tables of its splits) are
  known. Boot kprobe events start at ``fs_initcall``: the few CPA calls
  before that (the IDT, the SMP alternatives, the first BPF JIT on kernels
  that JIT one while booting) have markers but no arguments; the replay
  takes those from the kernel's record (:mod:`guestkernel.versions`).
* on 6.1 and 7.2, two kprobes on the bulk allocator (``alloc_pages_bulk``,
  which vmalloc takes its order-0 pages from and which calls no
  ``mm_page_alloc``): its entry (pages asked for, GFP) and the instruction
  after each per-CPU list take (the page: :data:`BULK_PROBES`); and a
  function-tracer marker on it (``["U", function, caller]``), which,
  unlike the kprobes, runs from early boot: where each call before
  ``fs_initcall`` was, whose pages no event shows;
* each ``snap NAME`` of the workload writes ``dmfrag_snap NAME`` to
  ``trace_marker`` before it reads /proc/meminfo and /proc/vmstat.

Tracing stops before the buffer is read (reading allocates pages, which
would be traced: an endless stream); the buffer goes gzip'd to the guest's
second serial port, a file on the host. A buffer that overflowed (events
lost) is an error naming the option to raise.

What no tracepoint shows, said here and in the trace header:

* allocations before ``trace_init`` (between the buddy hand-over in
  ``mm_init`` and tracing: early slab, per-CPU and ring-buffer pages). Their
  pages show up when freed, as frees of pages the trace never allocated;
* the bulk allocator before ``fs_initcall`` (boot kprobes start there);
  after it, its pages are ``B`` events. Version-3 traces (recorded before
  the bulk probes) have none: their bulk pages show only when freed.

Trace format version 4 (JSON Lines, gzip'd; version 3 is the same without
``B`` events): a header object, one JSON array per event, a trailer
``{"end": N}``. Events:

* ``["A", pfn, order, gfp, migratetype, user]``: an allocation (``gfp`` as
  printed; ``user`` one of :data:`USERS`, see :func:`_user`);
* ``["B", nr_pages, migratetype, [pfn, ...]]``: one bulk allocator call
  that took pages off the per-CPU list: how many pages it was asked for,
  the migratetype of its GFP, and the order-0 pages it gave, in the order
  it gave them (the caller's array order);
* ``["F", pfn, order]``: a free; ``["F", pfn, order, "buddy"]`` (on
  kernels with :data:`RELEASE_PROBES`) when the page went straight to the
  buddy lists, not onto a per-CPU list;
* ``["C", caller, args]``: a CPA pass begins; ``caller`` is ``"alias"`` for
  a pass nested in another, else the function that asked; ``args`` is
  ``null`` before kprobes run, else ``[va, numpages, mask_set, mask_clr,
  flags, force_split, primary]``;
* ``["R"]``: the pass with arguments that began last has returned;
* ``["U", function, caller]``: a user's entry point was called (module
  load and free, BPF program load and free, a secretmem fault:
  :data:`USER_MARKERS`), a CPA entry point (:data:`CPA_MARKERS`), a boot
  step that changes placement (:data:`BOOT_MARKERS`), or a
  batch free (:data:`FREE_MARKERS`: the ``F`` events right after it are
  its pages), with the function that called it;
* ``["X", function]``: it returned (``secretmem_fault``; on 7.2 also
  ``free_pages_bulk``);
* ``["S", point, {"meminfo": {...}, "vmstat": {...}}]``: a snapshot.

The header's ``module_areas`` lists the module area's vmalloc areas alive
when the workload ended, with their pages: QEMU's monitor translates each
page (``gva2gpa``) while the machine is stopped after ``/proc/vmallocinfo``
is read. It is how the replay knows where the bulk allocator put the first
bpf_prog_pack and the ftrace trampolines, which boot makes read-only before
kprobes exist.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from guestkernel.layout import LAYOUT_5LEVEL, START_KERNEL_MAP, VMEMMAP_START
from guestkernel.page_alloc.types import MAX_ORDER, MIGRATE_PCPTYPES, PAGE_ALLOC_COSTLY_ORDER

from .placed import direct_pfn
from .realkernel import DEFAULT_KERNEL, RealKernel, RealKernelError
from .truth import TRACE_START

__all__ = [
    "BULK_PROBES",
    "CPA_MARKERS",
    "CPA_TABLE_GFPS",
    "FREE_MARKERS",
    "PCP_MARKERS",
    "RELEASE_PROBES",
    "RETPROBE_INSTANCES",
    "STACK_MARKERS",
    "TAKE_PROBES",
    "TRACE_VERSION",
    "USERS",
    "USER_MARKERS",
    "Recording",
    "load_record_grid",
    "parse_ftrace",
    "record",
    "record_task",
    "splits_direct_map_tables",
    "trace_name",
    "write_trace",
]

TRACE_VERSION = 4

#: Where the bulk allocator hands out each page, per kernel: (function,
#: offset, register holding the struct page). ``alloc_pages_bulk`` calls no
#: ``mm_page_alloc``; a kprobe at the instruction right after its per-CPU
#: list take (``__rmqueue_pcplist``: inlined in 6.1, a call in 7.2) sees
#: the page. Read off the disassembly of each pinned package's debug
#: vmlinux (``objdump -d -l``): 6.1's ``__alloc_pages_bulk+0x2fc`` tests
#: %r14 (page = the pcp list entry - 8, page_alloc.c 5575 ``if
#: (unlikely(!page))``); 7.2's ``alloc_pages_bulk_noprof+0x339`` tests %rax
#: after ``call __rmqueue_pcplist``. 5.10 has no bulk allocator.
BULK_PROBES = {
    "6.1": ("__alloc_pages_bulk", 0x2FC, "%r14"),
    "7.2": ("alloc_pages_bulk_noprof", 0x339, "%ax"),
}
#: Kernels that can be preempted between taking a page off the free lists
#: and its ``mm_page_alloc`` (fired at the end of
#: ``__alloc_frozen_pages_noprof``, after ``prep_new_page`` zeroes it):
#: Debian's 7.2 is ``PREEMPT_LAZY`` (5.10 and 6.1 are
#: ``PREEMPT_VOLUNTARY``: no preemption point in between). There a task
#: preempted in that window lets others allocate first, and its event comes
#: after theirs: the trace order is not the order pages left the free lists
#: (7.2's 2G boot: the percpu chunk's order-4 vmalloc page, taken before a
#: slab refill, traced 58 events after it). These kernels are recorded with
#: the moment of each take: a kprobe right after ``get_page_from_freelist``'s
#: call of ``__rmqueue_pcplist`` (the per-CPU list's page, the per-CPU lock
#: still held: preemption is off; (function, offset, register) as in
#: :data:`BULK_PROBES`, read off 7.2's disassembly: ``+0x330`` is the
#: ``mov %rbx,%rdi`` before ``_raw_spin_unlock``, the page in %rax;
#: ``__rmqueue_pcplist`` itself is notrace: no return probe) and the
#: ``mm_page_alloc_zone_locked`` and ``mm_page_alloc_extfrag`` tracepoints
#: (under the zone lock: a page leaving the buddy lists, the claim of a
#: whole pageblock included; not a refill's pages, whose take is the per-CPU
#: one: ``percpu_refill``, or for a claim an order and type the per-CPU lists
#: hold). :func:`parse_ftrace` moves each ``A`` event to its take
#: (:func:`_retime`). Before kprobes run (``fs_initcall``) the
#: per-CPU takes are not seen: those allocations keep their event's place.
TAKE_PROBES = {"7.2": ("get_page_from_freelist", 0x330, "%ax")}
#: The same kernels' give-backs: ``mm_page_free`` fires in
#: ``free_pages_prepare``, before the page goes on a list, so a task
#: preempted in between gives it back after others allocated (7.2's 2G boot:
#: five order-0 frees of a process's exit traced before the allocations that
#: came ahead of them). Probed in ``free_frozen_page_commit`` (onto the
#: per-CPU list, its lock held: the page, third argument) and
#: ``free_one_page`` (to the buddy: the pfn, third argument), each at the
#: instruction after its ``call __fentry__`` (+5; neither touches %rdx
#: first): a breakpoint kprobe, whose handler runs with interrupts off.
#: One on the function's entry is an ftrace callback, run with interrupts
#: on, and a kprobe hit in an interrupt meanwhile is missed (another
#: kprobe's handler is running): a softirq freeing a process's page tables
#: while the per-CPU take's handler ran (its lock held, so they went to
#: the buddy) lost all their give-backs. (name, function, offset,
#: argument, register.)
RELEASE_PROBES = {"7.2": (("pcpfree", "free_frozen_page_commit", 5, "page", "%dx"),
                          ("buddyfree", "free_one_page", 5, "pfn", "%dx"))}
#: The kernel command line's part that keeps every kprobe a breakpoint
#: (``debug.kprobes-optimization``; applied by ``do_sysctl_args`` just
#: before init runs): an optimized kprobe (a jump to a detour buffer) runs
#: its handler with interrupts on, so kprobes hit in an interrupt then are
#: missed. Before init, the kprobes registered at ``fs_initcall`` may be
#: optimized: the misses there are counted (``recorder.kprobe_misses``).
NO_KPROBE_OPTIMIZATION = "sysctl.debug.kprobes-optimization=0"
#: vmemmap (struct page array) bases under nokaslr: 5-level paging (the
#: guests under ``-cpu max``) and 4-level; a struct page is 64 bytes
_VMEMMAP_BASES = (LAYOUT_5LEVEL.vmemmap_start, VMEMMAP_START)
_STRUCT_PAGE_SHIFT = 6

#: ``struct cpa_data`` offsets (arch/x86/mm/pat/set_memory.c) per kernel,
#: read from each kernel's source: vaddr (a pointer to the address) at 0,
#: mask_set 16, mask_clr 24, numpages 32, flags 56, the bit fields 60
#: (force_split is bit 0). 7.2's source package is not on the archive (only
#: its binaries are): its layout was checked by dumping the structure's 11
#: words from a kprobe and matching known requests (the alias passes of
#: free_init_pages: pfn at 48, CPA_FLUSHTLB in flags, the masks and
#: numpages where 6.1 has them); its bit fields have one more bit (3) set on
#: every request, and its requests enter with primary=1, the alias check
#: being CPA_NO_CHECK_ALIAS in flags (newer set_memory.c).
CPA_DATA_LAYOUT = {
    "5.10": {"vaddr": 0, "mask_set": 16, "mask_clr": 24, "numpages": 32, "flags": 56,
             "bits": 60},
    "6.1": {"vaddr": 0, "mask_set": 16, "mask_clr": 24, "numpages": 32, "flags": 56,
            "bits": 60},
    "7.2": {"vaddr": 0, "mask_set": 16, "mask_clr": 24, "numpages": 32, "flags": 56,
            "bits": 60},
}
#: the kernel command line's tracing part (kprobe_event writes commas for spaces)
_KPROBE = ("p:dmfrag/cpa,__change_page_attr_set_clr,va=+0(+{vaddr}(%di)):x64,"
           "np=+{numpages}(%di):u64,set=+{mask_set}(%di):x64,clr=+{mask_clr}(%di):x64,"
           "fl=+{flags}(%di):u32,fs=+{bits}(%di):u8,prim=%si:s32;"
           "r{RETPROBE_INSTANCES}:dmfrag/cpar,__change_page_attr_set_clr,ret=$retval:s32")
_TRACING = "/sys/kernel/tracing"
_PROLOGUE = f"mount -t tracefs tracefs {_TRACING}"
_EPILOGUE = f"""echo 0 > {_TRACING}/tracing_on
echo 1 > /proc/sys/kernel/kptr_restrict
echo "@@VMALLOCINFO"
cat /proc/vmallocinfo
echo "@@END"
echo "@@PAUSE"
sleep 1
echo "@@TRACESTATS"
cat {_TRACING}/per_cpu/cpu0/stats
echo "@@END"
echo "@@KPROBEPROFILE"
cat {_TRACING}/kprobe_profile
echo "@@END"
echo nocontext-info > {_TRACING}/trace_options
stty -F /dev/ttyS1 raw -echo
gzip -1 -c {_TRACING}/trace > /dev/ttyS1
sleep 1"""


@dataclass
class Recording:
    """A parsed recording: the header, the events, and what it took."""

    header: dict
    events: list[list] = field(default_factory=list)
    #: the real kernel's state at each dump point (``truth``): dmfrag.truth.KernelState
    states: list = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e[0]] = out.get(e[0], 0) + 1
        return out


_ALLOC = re.compile(r"mm_page_alloc: page=\S+ pfn=(0x[0-9a-f]+|\d+) order=(\d+) "
                    r"migratetype=(-?\d+) gfp_flags=(\S+)")
_FREE = re.compile(r"mm_page_free: page=\S+ pfn=(0x[0-9a-f]+|\d+) order=(\d+)")
_FUNC = re.compile(r"^\s*([A-Za-z_][\w.]*) <-(\S+)")
_XRET = re.compile(r"(\w+)_ret: \(")
_CPA = re.compile(r"cpa: \(\S+\) va=(0x[0-9a-f]+) np=(\d+) set=(0x[0-9a-f]+) "
                  r"clr=(0x[0-9a-f]+) fl=(\d+) fs=(\d+) prim=(-?\d+)")
_CPAR = re.compile(r"cpar: \(")
_BULK = re.compile(r"\bbulk: \(\S+\) nr=(-?\d+) gfp=(0x[0-9a-f]+)")
_BULKPAGE = re.compile(r"\bbulkpage: \(\S+\) page=(0x[0-9a-f]+)")
_TAKE = re.compile(r"\bpcptake: \(.*\) page=(0x[0-9a-f]+)")
_GIVE_PCP = re.compile(r"\bpcpfree: \(.*\) page=(0x[0-9a-f]+)")
_GIVE_BUDDY = re.compile(r"\bbuddyfree: \(.*\) pfn=(0x[0-9a-f]+|\d+)")
_TAKE_BUDDY = re.compile(r"mm_page_alloc_zone_locked: page=\S+ pfn=(0x[0-9a-f]+|\d+) "
                         r"order=\d+ migratetype=\d+ percpu_refill=(\d)")
_TAKE_CLAIM = re.compile(r"mm_page_alloc_extfrag: page=\S+ pfn=(0x[0-9a-f]+|\d+) "
                         r"alloc_order=(\d+) .*pageblock_order=(\d+) alloc_migratetype=(\d+)")
_MARK = re.compile(r"tracing_mark_write: dmfrag_snap (\S+)")
_DUMP = re.compile(r"tracing_mark_write: dmfrag_dump (\S+)")


def _page_to_pfn(page: int, line: int) -> int:
    """A ``struct page *`` (vmemmap, nokaslr) as its pfn."""
    for base in _VMEMMAP_BASES:
        if base <= page < base + (1 << 46):
            return (page - base) >> _STRUCT_PAGE_SHIFT
    raise RealKernelError(f"trace line {line}: allocator page {page:#x} is not in a "
                          f"vmemmap this recorder knows (nokaslr, 4- or 5-level paging)")


def parse_ftrace(text: str, snapshots: dict[str, dict],
                 entries: list[int] | None = None, stats: dict | None = None) -> list[list]:
    """The trace buffer's text (``nocontext-info``) as version-3 events.

    A kprobe line (``cpa:``) comes just before the function tracer's line of
    the same call: the two become one ``C`` event. Unknown lines are an
    error (a format this parser does not know would lose events).
    ``entries``: filled with each event's index in the ring buffer (one
    entry per line; a kprobe and its function-tracer line are two)."""
    events: list[list] = []
    pending: list | None = None          # kprobe arguments waiting for their marker
    bulk: list | None = None             # the bulk allocator call its pages belong to
    entry = -1
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        if entries is not None:          # the events of the line before: its entry
            entries.extend([entry] * (len(events) - len(entries)))
        entry += 1
        if m := _TAKE.search(line):
            page = int(m.group(1), 16)
            if page:                             # NULL: the refill found nothing
                events.append(["T", _page_to_pfn(page, n)])
            continue
        if m := _GIVE_PCP.search(line):
            events.append(["G", _page_to_pfn(int(m.group(1), 16), n), "pcp"])
            continue
        if m := _GIVE_BUDDY.search(line):
            events.append(["G", int(m.group(1), 0), "buddy"])
            continue
        if m := _TAKE_BUDDY.search(line):
            if m.group(2) == "0":               # a refill's page: its take comes later
                events.append(["T", int(m.group(1), 0)])
            continue
        if m := _TAKE_CLAIM.search(line):
            order, mt = int(m.group(2)), int(m.group(4))
            # pcp_allowed_order and a per-CPU list type: a refill's claim
            if not ((order <= PAGE_ALLOC_COSTLY_ORDER or order == int(m.group(3)))
                    and mt < MIGRATE_PCPTYPES):
                events.append(["T", int(m.group(1), 0)])
            continue
        if m := _BULKPAGE.search(line):
            page = int(m.group(1), 16)
            if page and bulk is not None:
                if not bulk[3]:
                    events.append(bulk)          # a call that gave pages: its event
                bulk[3].append(_page_to_pfn(page, n))
            continue
        if m := _BULK.search(line):
            gfp = int(m.group(2), 16)
            # ___GFP_MOVABLE 0x08, ___GFP_RECLAIMABLE 0x10 (the same bits in 5.10-7.2)
            mt = 1 if gfp & 0x08 else 2 if gfp & 0x10 else 0
            bulk = ["B", int(m.group(1)), mt, []]
            continue
        if m := _ALLOC.search(line):
            events.append(["A", int(m.group(1), 0), int(m.group(2)), m.group(4),
                           int(m.group(3))])
        elif m := _FREE.search(line):
            events.append(["F", int(m.group(1), 0), int(m.group(2))])
        elif m := _CPA.search(line):
            if pending is not None:
                raise RealKernelError(f"trace line {n}: a cpa kprobe with no function-tracer "
                                      f"line after the previous one")
            pending = [int(m.group(1), 16), int(m.group(2)), int(m.group(3), 16),
                       int(m.group(4), 16), int(m.group(5)), int(m.group(6)) & 1,
                       int(m.group(7))]
        elif (m := _FUNC.search(line)) and m.group(1) == "__change_page_attr_set_clr":
            caller = m.group(2)
            kind = "alias" if caller == "__change_page_attr_set_clr" else caller
            events.append(["C", kind, pending])
            pending = None
        elif _CPAR.search(line):
            events.append(["R"])
        elif m := _XRET.search(line):
            events.append(["X", m.group(1)])
        elif m := _FUNC.search(line):
            events.append(["U", m.group(1), m.group(2)])
        elif m := _MARK.search(line):
            name = m.group(1)
            events.append(["S", name, snapshots.get(name, {})])
        elif m := _DUMP.search(line):
            events.append(["D", m.group(1)])
        else:
            raise RealKernelError(f"trace line {n}: not a line the recorder knows: {line[:200]!r}")
    if pending is not None:
        raise RealKernelError("the trace ends with a cpa kprobe and no function-tracer line")
    if entries is not None:
        entries.extend([entry] * (len(events) - len(entries)))
    _attribute_users(events)
    allocs, frees = _retime(events, entries)
    if stats is not None:
        stats["retimed"] = allocs
        stats["retimed_frees"] = frees
    return events


def _retime(events: list[list], entries: list[int] | None = None) -> tuple[int, int]:
    """Put each allocation and free where the page left or came back to
    the free lists (see :data:`TAKE_PROBES`):

    * an ``A`` event moves back to the last take (``T`` event) of its pfn
      since that pfn's last event, if it has one;
    * an ``F`` event moves forward to the next give-back (``G`` event) of
      its pfn, if one comes before the next event of any of its pages:
      ``mm_page_free`` fires in ``free_pages_prepare``, before the page goes
      on a list, and a task preempted in between gives it back later. The
      frees of a ``free_pages_bulk`` batch (between its ``U`` and ``X``
      events) stay as they are: they go back after all the batch's
      prepares, as blocks.

    Not every give-back is seen: a kprobe hit while another kprobe's
    handler runs is missed (``recorder.kprobe_misses``; 7.2 recordings
    made with handlers run with interrupts on: a softirq freed a process's
    page tables while the per-CPU take's handler ran, and all their
    give-backs were missed). So an event of any
    page of a held free's block (a take, an allocation or free of a block
    holding it) leaves the free where its event was, and an allocation
    whose take comes before the place a free of its pages went keeps its
    own place: no move puts a page's allocation before its free.

    A free whose page went straight to the buddy lists (``free_one_page``:
    an order the per-CPU lists do not hold, ``alloc_pages_exact``'s tail, or
    the per-CPU list's lock taken, as by a task the freeing interrupt
    stopped) gets a fourth element, ``"buddy"``; so does one among a batch's
    frees, which keeps its place (7.2 at 8G running bpftrace: an RCU
    callback's page-table frees inside a vfree's window, while the batch
    held the per-CPU lock).

    The ``T`` and ``G`` events are dropped (a bulk call's takes: its ``B``
    event has the pages; a refill's pages: their own take comes later; the
    give-backs of frees no event shows). ``entries`` (the ring-buffer index
    of each event) moves with them: a page counts as taken before a dump
    when its take was. Returns how many allocations and frees moved. The
    user of each allocation is named before (:func:`_attribute_users`),
    from where its event was."""
    if not any(e[0] in ("T", "G") for e in events):
        return 0, 0
    batch_frees = {name for names in FREE_MARKERS.values() for name in names}
    out: list = []
    out_entries: list[int] = []
    take_at: dict[int, int] = {}        # pfn -> the index in out of its last take
    held: dict[int, tuple[int, int]] = {}   # head pfn -> (index in out of its free, order)
    given: dict[int, int] = {}          # pfn -> the index in out of its free moved to a give-back
    #: a batch's frees (their places kept): pfn -> index in out, for the
    #: "buddy" mark of one whose give-back went to the buddy (an
    #: interrupt's free while the batch held the per-CPU lock)
    batch_held: dict[int, int] = {}
    moved_allocs = moved_frees = 0
    in_batch = False

    def flush(pfn: int) -> int:
        # a held free stays where its event was; returns that index (-1: none)
        h = held.pop(pfn, None)
        if h is None:
            return -1
        out[h[0]] = out[h[0]][1]
        return h[0]

    def flush_range(pfn: int, order: int) -> int:
        # every held free of a block overlapping [pfn, pfn + 2**order): an
        # event of those pages means their give-back was not seen (a
        # missed kprobe), so no later give-back can be theirs; returns the
        # latest index a free stays at (-1: none)
        last = -1
        if batch_held:       # a batch's free, its give-back not seen: no later one is its
            n = 1 << order
            for p in ([q for q in batch_held if pfn <= q < pfn + n] if n > 64
                      else range(pfn, pfn + n)):
                batch_held.pop(p, None)
        if held:
            n = 1 << order
            if n <= 64:
                for p in range(pfn, pfn + n):
                    last = max(last, flush(p))
            else:
                for p in [p for p in held if pfn <= p < pfn + n]:
                    last = max(last, flush(p))
            for k in range(order + 1, MAX_ORDER):
                head = pfn & ~((1 << k) - 1)
                h = held.get(head)
                if h is not None and h[1] >= k:
                    last = max(last, flush(head))
        return last

    for k, e in enumerate(events):
        kind = e[0]
        entry = entries[k] if entries is not None else 0
        if kind == "T":
            flush_range(e[1], 0)
            take_at[e[1]] = len(out)
            out.append(None)
            out_entries.append(entry)
            continue
        if kind == "G":
            b = batch_held.pop(e[1], None)
            if b is not None:
                if e[2] == "buddy" and out[b] is not None:
                    out[b] = [*out[b], "buddy"]
                continue
            h = held.pop(e[1], None)
            if h is not None:
                j, order = h
                f = out[j][1]
                if e[2] == "buddy":
                    f = [*f, "buddy"]
                out[j] = None
                moved_frees += any(isinstance(x, list) for x in out[j + 1:])
                for p in range(e[1], e[1] + (1 << order)):
                    given[p] = len(out)
                out.append(f)
                out_entries.append(entry)
            continue
        if kind == "A":
            pages = range(e[1], e[1] + (1 << e[2]))
            last = flush_range(e[1], e[2])
            j = take_at.pop(e[1], None)
            if given:
                # a free moved to a give-back after the take (the take or
                # the give-back belongs to a life of the page whose other
                # event is missing): the allocation keeps its place
                after = max((given.pop(p, -1) for p in pages), default=-1)
                last = max(last, after)
            if j is not None and last < j:
                out[j] = e
                moved_allocs += any(isinstance(x, list) for x in out[j + 1:])
                continue
        elif kind == "F":
            flush_range(e[1], e[2])
            take_at.pop(e[1], None)
            if not in_batch:
                held[e[1]] = (len(out), e[2])
                out.append(("held", e))
                out_entries.append(entry)
                continue
            batch_held[e[1]] = len(out)
        elif kind == "B":
            for p in e[3]:
                flush_range(p, 0)
                take_at.pop(p, None)
                given.pop(p, None)
        elif kind == "U" and e[1] in batch_frees:
            in_batch = True
        elif kind == "X" and e[1] in batch_frees:
            in_batch = False
        out.append(e)
        out_entries.append(entry)
    for pfn in list(held):
        flush(pfn)
    keep = [i for i, e in enumerate(out) if e is not None]
    events[:] = [out[i] for i in keep]
    if entries is not None:
        entries[:] = [out_entries[i] for i in keep]
    return moved_allocs, moved_frees


def place_dumps(events: list[list], entries: list[int], states: list) -> int:
    """Move each ``D`` event to where its dump really was: the dumped ring
    buffer held ``trace_entries`` entries, so the dump came after exactly
    the events of those entries (the marker is written a moment before the
    machine stops: the console line it prints allocates, and must count as
    before the dump). Returns how many moved."""
    moved = 0
    for st in states:
        cut = getattr(st, "trace_entries", -1)
        if cut < 0:
            continue
        at = next((i for i, e in enumerate(events) if e[0] == "D" and e[1] == st.point), None)
        if at is None:
            continue
        d = events.pop(at)
        entries.pop(at)
        pos = next((i for i, x in enumerate(entries) if x >= cut), len(events))
        events.insert(pos, d)
        entries.insert(pos, cut)
        moved += pos != at
    return moved


#: functions whose entry the function tracer marks (besides the CPA pass):
#: the users a policy routes (``U`` events); ``secretmem_fault`` also has a
#: return probe (``X``): the pages allocated in between are secretmem's
USER_MARKERS = ("load_module", "free_module", "bpf_prog_load", "bpf_prog_free",
                "secretmem_fault")
#: the CPA entry points whose callers the function tracer marks too (``U``
#: events with the caller): who asked, before kprobes give arguments
CPA_MARKERS = ("set_memory_ro", "set_memory_rw", "set_memory_x", "set_memory_nx",
               "set_memory_rox", "set_memory_np", "set_memory_4k")


#: start_kernel's steps that change how pages are placed and that no page
#: event shows: ``setup_per_cpu_pageset`` (the zones' own per-CPU lists
#: replace the boot pageset: order-0 allocations come in batches from
#: then on) and ``init_per_zone_wmark_min`` (a postcore initcall: the
#: watermarks, and on 5.14+ the per-CPU lists' batch and high sized from
#: them). ftrace traces __init functions while booting (4.16+: their
#: records are freed with the init memory), so the markers are there.
BOOT_MARKERS = ("setup_per_cpu_pageset", "calculate_min_free_kbytes")


#: markers of the time-driven per-CPU list work, per kernel: 6.7+'s
#: ``decay_pcp_high`` (vmstat_update, about once a second, walks every
#: populated zone in order and lowers its per-CPU lists' ``high``, draining
#: what is past it): when it ran, no page event shows; the model decays its
#: own lists there
PCP_MARKERS = {"7.2": ("decay_pcp_high",)}


#: markers of kernel stacks that no page event may show, per kernel: the
#: boot's ``event_trace_enable_again`` (an early initcall) unregisters and
#: registers each boot trace event again, and registering sleeps: a kernel
#: thread created meanwhile (kthreadd making a workqueue worker) takes its
#: stack's pages with ``mm_page_alloc`` off (a 5.10 2G boot: 4 pages between
#: ``tracepoint_probe_register`` and the next event). 5.10 vmallocs each page
#: (its stack: ``__vmalloc_node_range`` from ``copy_process``): a marker
#: with no vmalloc page after it is such a stack (the modelled replay makes
#: one there). 6.1 and 7.2 take a stack's pages from the bulk allocator,
#: whose marker says as much (BULK_PROBES).
STACK_MARKERS = {"5.10": ("__vmalloc_node_range",)}

#: instances of each return probe (``rN:``; a hit with none free is a
#: miss): 5.10's default (10 on one CPU) missed 1,841 of the 1,855
#: ``__change_page_attr_set_clr`` returns of its 2G boot, for a reason not
#: looked into (an alias pass nests in its request: 2 or 3 calls in
#: flight); 64 missed none, and 6.1 and 7.2 miss none with either
RETPROBE_INSTANCES = 64


#: markers of the frees that give pages back together, per kernel: 7.x's
#: ``free_pages_bulk`` (vfree) frees each contiguous run as aligned blocks;
#: the ``F`` events after its ``U`` event, in a row, are its pages, up to
#: its return (an ``X`` event: a return probe; without it, in recordings
#: before it, a free right after the batch counted as the batch's: 7.2's
#: 2G boot, 8 order-0 slab pages freed one by one after a kernel stack's 4)
FREE_MARKERS = {"7.2": ("free_pages_bulk",)}


def _attribute_users(events: list[list]) -> None:
    """Append to each ``A`` event the user it was for (see USERS)."""
    vas: list[int] = []     # the addresses of the passes with arguments open (closed by R)
    early = False           # after an argument-less request marker, its tables
    secret = False
    for e in events:
        kind = e[0]
        if kind == "A":
            in_cpa = early or bool(vas) and splits_direct_map_tables(vas[-1])
            e.append(_user(e, in_cpa, secret))
            continue
        if kind in ("B", "T", "G"):  # bulk pages, takes, give-backs: not a request's tables
            continue
        if kind == "C":
            if e[2] is not None:
                vas.append(e[2][0])
                early = False
            else:
                early = True
        elif kind == "R":
            if vas:
                vas.pop()
            early = False
        else:
            early = False
            if kind == "U" and e[1] == "secretmem_fault":
                secret = True
            elif kind == "X" and e[1] == "secretmem_fault":
                secret = False


#: the GFP a CPA split's table page is allocated with: 5.10/6.1
#: ``alloc_pages(GFP_KERNEL, 0)`` (``none`` before the boot GFP mask
#: lifts); 7.2 ``pagetable_alloc`` (``__GFP_COMP``, zeroed)
CPA_TABLE_GFPS = frozenset(("GFP_KERNEL", "none", "GFP_KERNEL|__GFP_COMP",
                            "GFP_KERNEL|__GFP_ZERO|__GFP_COMP"))

#: the module area (MODULES_VADDR .. MODULES_END: module, BPF and execmem memory)
_MODULES_VADDR, _MODULES_END = 0xFFFFFFFFC0000000, 0xFFFFFFFFFF000000


def splits_direct_map_tables(va: int | None) -> bool:
    """Whether a CPA pass on ``va`` splits the kernel's own mappings (the
    direct map or the kernel image), whose tables the model allocates
    itself: a table page Linux allocated in such a pass is the model's
    split's. A pass on module, BPF or vmalloc memory (7.2 splits its
    execmem cache's 2M vmalloc mappings) allocates tables the model does
    not model: those stay ordinary allocations. None: a pass before kprobes
    gave arguments (boot time: the kernel's own mappings)."""
    if va is None:
        return True
    if direct_pfn(va) is not None:          # the direct map, 4- or 5-level
        return True
    return START_KERNEL_MAP <= va < _MODULES_VADDR


#: the users of the ``A`` events' last field
USERS = ("cpa_pgtable", "secretmem", "vmalloc", "movable", "reclaimable", "kernel")


def _user(e: list, in_cpa: bool, in_secretmem: bool) -> str:
    """What an allocation was for, from where it happened and its GFP:

    * ``cpa_pgtable``: an order-0 page with a table's GFP
      (:data:`CPA_TABLE_GFPS`) inside a CPA pass on the direct map or the
      kernel image (:func:`splits_direct_map_tables`): the table of a split;
    * ``secretmem``: inside ``secretmem_fault``;
    * ``vmalloc``: ``__GFP_HIGHMEM`` without ``__GFP_MOVABLE`` (vmalloc's and
      module_alloc's pages when not bulk-allocated, BPF images, stacks);
    * ``movable``: ``__GFP_MOVABLE`` (anonymous memory and the page cache);
    * ``reclaimable``: ``__GFP_RECLAIMABLE`` (reclaimable slab: dentries, inodes);
    * ``kernel``: any other unmovable allocation (slab, page tables of
      processes, kernel buffers)."""
    gfp = e[3]
    flags = set(gfp.split("|"))
    if in_cpa and e[2] == 0 and gfp in CPA_TABLE_GFPS:
        return "cpa_pgtable"
    if in_secretmem:
        return "secretmem"
    if "__GFP_MOVABLE" in flags or "GFP_HIGHUSER_MOVABLE" in flags:
        return "movable"
    if "__GFP_HIGHMEM" in flags:
        return "vmalloc"
    if "__GFP_RECLAIMABLE" in flags:
        return "reclaimable"
    return "kernel"


#: boot-log lines the model reads (e820 map, where the initrd is, the command
#: line, the kernel version): the trace header keeps them
_BOOT_LINES = re.compile(r"e820|RAMDISK:|Command line:|Linux version|ftrace: allocat|"
                         r"percpu: Embedded")


def record(kernel: str = DEFAULT_KERNEL, ram: str = "2G", workload: tuple[str, ...] = (),
           *, trace_buf_mb: int = 32, timeout: float = 600.0, install: bool = False,
           cache: Path | None = None, truth: bool = False) -> Recording:
    """Boot the real ``kernel`` with tracing from the first moment, run the
    workload's steps, and return what it did as a :class:`Recording`.
    ``truth``: also dump the guest at each snapshot point and read its
    whole state (:mod:`dmfrag.truth`, needs drgn and the kernel's debug
    vmlinux, fetched once): the recording's ``states``; the trace gets a
    ``D`` event where each dump was taken. The first is ``trace-start``,
    taken at the first traced page event: what Linux allocated before its
    tracing started, which no event shows."""
    layout = CPA_DATA_LAYOUT.get(kernel)
    if layout is None:
        raise RealKernelError(
            f"recording the {kernel} kernel is not supported yet: its struct cpa_data layout "
            f"(the CPA kprobe's arguments) is not verified; kernels that record: "
            f"{', '.join(CPA_DATA_LAYOUT)}")
    rk = RealKernel(cache, install=install, kernel=kernel)
    markers = ",".join(("__change_page_attr_set_clr", *USER_MARKERS, *CPA_MARKERS,
                        *BOOT_MARKERS, *FREE_MARKERS.get(kernel, ()),
                        *PCP_MARKERS.get(kernel, ()), *STACK_MARKERS.get(kernel, ()),
                        *((BULK_PROBES[kernel][0],) if kernel in BULK_PROBES else ())))
    kprobes = _KPROBE.format(RETPROBE_INSTANCES=RETPROBE_INSTANCES, **layout)
    r = f"r{RETPROBE_INSTANCES}"
    if kernel != "5.10":                      # memfd_secret is 5.14+
        kprobes += f";{r}:dmfrag/secretmem_fault_ret,secretmem_fault"
    for func in FREE_MARKERS.get(kernel, ()):
        kprobes += f";{r}:dmfrag/{func}_ret,{func}"
    if kernel in BULK_PROBES:
        func, off, reg = BULK_PROBES[kernel]
        kprobes += (f";p:dmfrag/bulk,{func},nr=%cx:s32,gfp=%di:x32"
                    f";p:dmfrag/bulkpage,{func}+{off:#x},page={reg}:x64")
    tracepoints = "kmem:mm_page_alloc,kmem:mm_page_free"
    if kernel in TAKE_PROBES:
        func, off, reg = TAKE_PROBES[kernel]
        kprobes += f";p:dmfrag/pcptake,{func}+{off:#x},page={reg}:x64"
        for name, func, off, arg, reg in RELEASE_PROBES.get(kernel, ()):
            kprobes += f";p:dmfrag/{name},{func}+{off},{arg}={reg}:x64"
        tracepoints += ",kmem:mm_page_alloc_zone_locked,kmem:mm_page_alloc_extfrag"
    append = (f"ftrace=function ftrace_filter={markers} "
              f"trace_event={tracepoints} "
              f"trace_buf_size={int(trace_buf_mb)}M {NO_KPROBE_OPTIMIZATION} "
              f"kprobe_event={kprobes}")
    areas: list[list] = []
    if truth:
        from .truth import check_drgn
        check_drgn()
    with tempfile.TemporaryDirectory(prefix="dmfrag-record-") as tmp:
        out = Path(tmp) / "ttyS1"
        t0 = time.monotonic()
        run = rk.run(ram, workload, append=append, timeout=timeout, prologue=_PROLOGUE,
                     epilogue=_EPILOGUE, serial_file=out, truth=truth, trace_start=truth,
                     on_pause=lambda hmp, console: areas.extend(_module_area_pfns(hmp, console)))
        seconds = time.monotonic() - t0
        raw = out.read_bytes() if out.exists() else b""
    stats = _stats(run.console)
    lost = stats.get("overrun", 0) + stats.get("dropped events", 0)
    if lost:
        raise RealKernelError(f"the trace buffer overflowed: {lost} events lost; record again "
                              f"with a larger buffer (trace_buf_mb, now {trace_buf_mb})")
    try:
        text = gzip.GzipFile(fileobj=io.BytesIO(raw)).read().decode()
    except (OSError, EOFError) as exc:
        raise RealKernelError(f"the trace from the guest's second serial port is cut short or "
                              f"corrupt ({len(raw)} bytes: {exc})") from None
    entries: list[int] = []
    parsed: dict = {}
    events = parse_ftrace(text, run.snapshots, entries, parsed)
    if any(st.point == TRACE_START for st in run.states):
        # no marker says where the first dump was: place_dumps puts it by
        # its ring-buffer count
        events.insert(0, ["D", TRACE_START])
        entries.insert(0, 0)
    place_dumps(events, entries, run.states)
    boot = "".join(line + "\n" for line in run.boot_log.splitlines() if _BOOT_LINES.search(line))
    header = {"dmfrag_trace": TRACE_VERSION, "source": "recorded", "kernel": kernel,
              "ram": ram, "workload": list(workload), "boot_log": boot,
              "recorder": {"seconds": round(seconds, 2), "events": len(events),
                           "buffer_entries": stats.get("entries", 0),
                           "retimed": parsed["retimed"],
                           "retimed_frees": parsed["retimed_frees"],
                           "kprobe_misses": _kprobe_misses(run.console),
                           "trace_buf_mb": int(trace_buf_mb)},
              "module_areas": areas}
    if truth:
        header["truth"] = {"points": [st.point for st in run.states], "dumps": run.dumps}
    return Recording(header, events, run.states)


_VMALLOCINFO = re.compile(r"^(0x[0-9a-f]+)-0x[0-9a-f]+\s+\d+\s+(\S+).*\bpages=(\d+)")


def _module_area_pfns(hmp, console: str) -> list[list]:
    """The pages behind every vmalloc area of the module area at the end of
    the run (``/proc/vmallocinfo``, each page translated by QEMU's monitor,
    ``gva2gpa``): ``[va, caller, [pfn, ...]]``. What the bulk allocator gave
    (no tracepoint shows it) is known this way for what is still alive, the
    first bpf_prog_pack of boot included."""
    section = _console_section(console, "VMALLOCINFO")
    if section is None:
        raise RealKernelError("the guest printed no /proc/vmallocinfo")
    out = []
    for line in section.splitlines():
        v = _VMALLOCINFO.match(line.strip())
        if v is None:
            continue
        va, caller, pages = int(v.group(1), 16), v.group(2), int(v.group(3))
        if not _MODULES_VADDR <= va < _MODULES_END:
            continue
        pfns = []
        for i in range(pages):
            reply = hmp(f"gva2gpa {va + i * 4096:#x}")
            g = re.search(r"gpa:\s*(0x[0-9a-f]+)", reply)
            if g is None:
                raise RealKernelError(f"QEMU's monitor could not translate {va + i * 4096:#x}: "
                                      f"{reply.strip()[:200]}")
            pfns.append(int(g.group(1), 16) >> 12)
        out.append([va, caller, pfns])
    return out


def _console_section(console: str, name: str) -> str | None:
    """What the guest printed between ``@@NAME`` and the next ``@@END``
    (see _EPILOGUE); None when it printed no such section."""
    m = re.search(rf"@@{name}\s*\n(.*?)@@END", console.replace("\r", ""), re.DOTALL)
    return m.group(1) if m else None


def _kprobe_misses(console: str) -> dict[str, int]:
    """The kprobes that missed hits (``kprobe_profile``: name, hits,
    misses), by name; {} when none did. A miss is a hit while another
    kprobe's handler ran (one in an interrupt then): its event is not in
    the trace."""
    out: dict[str, int] = {}
    for line in (_console_section(console, "KPROBEPROFILE") or "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit() and int(parts[2]):
            out[parts[0]] = int(parts[2])
    return out


def _stats(console: str) -> dict[str, int]:
    out: dict[str, int] = {}
    section = _console_section(console, "TRACESTATS")
    if section is None:
        raise RealKernelError("the guest printed no trace buffer statistics")
    for line in section.splitlines():
        k, _, v = line.partition(":")
        try:
            out[k.strip()] = int(float(v.strip()))
        except ValueError:
            pass
    return out


def write_trace(rec: Recording, path: Path) -> int:
    """Write a recording as a gzip'd version-3 trace; returns its size in
    bytes. Its states (``record(truth=True)``) go beside it, in
    :func:`dmfrag.truth.truth_path` (``X.jsonl.gz`` -> ``X.truth.npz``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt", compresslevel=9) as fh:
        fh.write(json.dumps(rec.header, sort_keys=True) + "\n")
        for e in rec.events:
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")
        fh.write(json.dumps({"end": len(rec.events)}) + "\n")
    if rec.states:
        from .truth import save_states, truth_path
        save_states(truth_path(path), rec.states)
    tmp.replace(path)
    return path.stat().st_size


def trace_name(kernel: str, ram: str, workload: tuple[str, ...] | list[str]) -> str:
    """The file name of a recording in a grid's folder (as the reference set
    in tests/data/traces is named): ``linux-6.1-8G-bpf-2048_secretmem-4096.jsonl.gz``."""
    steps = "_".join(workload) or "boot"
    return f"linux-{kernel}-{ram}-{steps.replace(':', '-')}.jsonl.gz"


def load_record_grid(path: str | Path) -> list[dict]:
    """A grid of recordings (TOML: one ``[[trace]]`` table per recording,
    with ``kernel``, ``ram``, ``workload`` (a comma-separated string, "" for
    boot only) and optional ``trace_buf_mb``); each entry checked before any
    boot (kernel known, RAM readable, steps known to the guest)."""
    import tomllib

    from guestkernel.boot import BootError, e820__memory_setup

    from .realkernel import KERNELS
    from .registry import UnknownWorkload, guest_steps
    try:
        cfg = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the grid {str(path)!r}: {exc}") from None
    entries = cfg.get("trace")
    if set(cfg) != {"trace"} or not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a record grid is a list of [[trace]] tables, and only that")
    out = []
    for i, e in enumerate(entries, 1):
        where = f"{path}: trace {i}"
        if not isinstance(e, dict) or set(e) - {"kernel", "ram", "workload", "trace_buf_mb"}:
            raise ValueError(f"{where}: keys are kernel, ram, workload, trace_buf_mb")
        kernel, ram = e.get("kernel"), e.get("ram")
        if kernel not in KERNELS:
            raise ValueError(f"{where}: unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
        try:
            e820__memory_setup(None, ram)
        except (ValueError, BootError, TypeError) as exc:
            raise ValueError(f"{where}: ram {ram!r}: {exc}") from None
        wl = tuple(w.strip() for w in str(e.get("workload", "")).split(",") if w.strip())
        for w in wl:
            try:
                guest_steps(w)
            except UnknownWorkload as exc:
                raise ValueError(f"{where}: {exc}") from None
        buf = e.get("trace_buf_mb", 32)
        if isinstance(buf, bool) or not isinstance(buf, int) or not 1 <= buf <= 4096:
            raise ValueError(f"{where}: trace_buf_mb must be 1..4096, not {buf!r}")
        out.append({"kernel": kernel, "ram": ram, "workload": list(wl), "trace_buf_mb": buf})
    return out


def record_task(task: dict) -> dict:
    """One recording of a grid (a picklable function for the sweep engine's
    executors): boots, records, writes ``task["output"]``, returns a summary
    row; a failure is a CellError naming the recording."""
    from .sweep import CellError
    wl = tuple(task["workload"])
    try:
        rec = record(task["kernel"], task["ram"], wl, trace_buf_mb=task.get("trace_buf_mb", 32),
                     timeout=task.get("timeout", 600.0), install=task.get("install", False),
                     truth=task.get("truth", False))
        size = write_trace(rec, Path(task["output"]))
    except Exception as exc:  # noqa: BLE001 - reported with its task, never lost in a worker
        raise CellError(f"recording kernel={task['kernel']} ram={task['ram']} workload="
                        f"{','.join(wl) or 'boot'}: {type(exc).__name__}: {exc}", task) from None
    return {"kernel": task["kernel"], "ram": task["ram"], "workload": list(wl),
            "output": str(task["output"]), "events": len(rec.events), "bytes": size,
            "seconds": rec.header["recorder"]["seconds"]}
