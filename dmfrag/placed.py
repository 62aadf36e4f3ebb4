"""Placed replay: a recorded real kernel's trace (version 3 or 4, see
:mod:`dmfrag.recorder`) run on the model, every allocation at the pfn Linux
gave it and every CPA request on the addresses Linux used, so that the
model's DirectMap4k/2M/1G and split counters can be held to Linux's at every
snapshot, placement aside (``dmfrag trace replay T --placement real``).

How each event is replayed:

* ``A`` (allocation): the block is taken off the model's free lists at that
  pfn (``take_page_off_buddy``). A page the model does not have free is a
  bookkeeping error, named with the trace line and the pfn, and the replay
  stops there (the state up to it is kept and reported).
* ``F`` (free): an allocated block is freed; a free page is a page the trace
  never saw allocated (before tracing, or by the bulk allocator: see the
  recorder), counted in ``untraced_frees``; a page never given to the buddy
  (memblock-reserved: the initrd, the init sections) is handed over.
* ``C`` with arguments: a request on a direct-map or kernel-image address is
  the model's ``change_page_attr_set_clr`` with the same range and masks
  (``primary`` 0 is ``CPA_NO_CHECK_ALIAS``), whose alias passes the model
  makes itself; a request on any other address (module, BPF or vmalloc
  memory) is replayed through its alias passes, which name the direct-map
  and image addresses Linux changed. The tables of the model's splits are
  the pages Linux allocated inside the request (between its entry and its
  return), in order; a split that finds none is an error.
* ``C`` without arguments (before boot kprobes exist): the calls the
  kernel's record knows (``BootCpaCall.before_fs_initcall``) run on the model
  before the first event, on pages the trace never touches; a one-page
  request right after a one-page vmalloc allocation (a trampoline or kprobe
  instruction page: ``module_alloc`` then ``set_memory_ro``) is that page
  made read-only; any other is counted in ``early_requests_skipped``.
* ``S``: the model's counters beside Linux's.
* ``D`` (a dump point, ``realkernel record --truth``): with the stored
  states (:mod:`dmfrag.truth`), the model's page tables are compared with
  Linux's entry by entry and its free pages with Linux's free lists as sets
  (``"state"`` in the snapshot of that point). At the first dump the model
  then takes Linux's free set as its own: the pages Linux allocated before
  tracing began or through the bulk allocator (no tracepoint shows either)
  become allocated, and boot-reserved pages Linux had freed become free
  (``adopted``), so later dumps show only what diverged after it.

The system is running (splits count in vmstat) from the end of the last
request on the kernel image before the first snapshot (mark_rodata_ro).
"""

from __future__ import annotations

import gc
import gzip
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from guestkernel.layout import LAYOUT_4LEVEL, LAYOUT_5LEVEL

__all__ = ["COMPARED", "PlacedReplay", "PlacedReplayError", "load_recorded", "read_trace",
           "replay_placed"]

#: meminfo and vmstat fields a snapshot compares
COMPARED_MEMINFO = ("DirectMap4k", "DirectMap2M", "DirectMap1G")
COMPARED_VMSTAT = ("direct_map_level2_splits", "direct_map_level3_splits",
                   "direct_map_level2_collapses", "direct_map_level3_collapses")
COMPARED = COMPARED_MEMINFO + COMPARED_VMSTAT

_IMAGE_START = 0xFFFFFFFF80000000
_IMAGE_END = 0xFFFFFFFFC0000000
#: PAGE_OFFSET with 5-level paging (Debian's 6.1 and 7.2 under ``-cpu max``
#: run with LA57; 5.10 runs 4-level): a recorded direct-map address, in
#: either layout, is moved to the model's direct map (same pfn), the same
#: address when the model runs the trace's paging mode
_LA57_PAGE_OFFSET = LAYOUT_5LEVEL.page_offset
_LA57_DIRECT_END = _LA57_PAGE_OFFSET + (1 << 46)
#: the direct map's range (up to 64 TiB of RAM) per paging mode, nokaslr
DIRECT_MAPS = {5: (_LA57_PAGE_OFFSET, _LA57_DIRECT_END),
               4: (LAYOUT_4LEVEL.page_offset, LAYOUT_4LEVEL.page_offset + (1 << 46))}


def _direct_map_of(va: int) -> tuple[int, int] | None:
    """(paging levels, pfn) of a direct-map address of either layout."""
    for levels, (lo, hi) in DIRECT_MAPS.items():
        if lo <= va < hi:
            return levels, (va - lo) >> 12
    return None


def trace_paging_levels(events: list[list]) -> int | None:
    """The paging mode the recording kernel ran in, from where the first
    direct-map address of its CPA passes sits (5: LA57's ``0xff11...``);
    None when no pass names one."""
    for e in events:
        if e[0] == "C" and e[2]:
            found = _direct_map_of(e[2][0])
            if found is not None:
                return found[0]
    return None


def direct_pfn(va: int) -> int | None:
    """The pfn a direct-map address of either layout maps (None: not one)."""
    found = _direct_map_of(va)
    return None if found is None else found[1]


_POOL = 256
#: the replay's per-page map
_FREE, _TRACED, _RESERVED, _MODEL, _MODEL_FREED, _UNTRACED = 0, 1, 2, 3, 4, 5
_ZEROS = bytes(1 << 10)
_TRACED_PAGES = bytes([_TRACED]) * (1 << 10)
_RW = 1 << 1


class PlacedReplayError(ValueError):
    """A trace event the model's state contradicts (or a malformed trace):
    says the line (1 = the header) and the pfn or address."""

    def __init__(self, line: int, message: str):
        super().__init__(f"trace line {line}: {message}")
        self.line = line


#: callers of early requests the model's record makes itself (the IDT, the
#: SMP alternatives' free_init_pages) or that change only pages below 1 MiB
#: (init_real_mode: set_real_mode_permissions, BootCpaCall.REAL_MODE): the
#: replay places nothing for them
_MODEL_EARLY_CALLERS = frozenset(("idt_setup_apic_and_irq_gates", "free_init_pages",
                                  "init_real_mode", "do_init_real_mode"))
_EVENT_KINDS = frozenset(("A", "B", "F", "C", "R", "S", "U", "X", "D"))
#: the recorded trace versions this reader takes (4 adds "B" events)
TRACE_VERSIONS = (3, 4)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused (as it was after): a trace's
    hundreds of thousands of event lists, and the replay's per-allocation
    records, would otherwise set off collections that walk all of them
    again and again; they make no cycles. A replay runs in one such pause,
    from reading the trace to its result."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loads_many(text: str) -> list:
    """``json.loads`` of the events array, the collector paused (:func:`gc_paused`)."""
    with gc_paused():
        return json.loads(text)


def _read_trace_text(text: str) -> tuple[dict, list[list]] | None:
    """The fast path of :func:`read_trace` for a whole file's text: the
    same header and events as its line-by-line reading, without splitting
    the text into lines and joining them again (the event lines become
    one JSON array by turning their newlines into commas). None (nothing
    decided) unless the text is ASCII without carriage returns (where
    ``splitlines`` splits at newlines only) and parses cleanly with a
    right trailer: the caller then reads it line by line, naming what is
    wrong."""
    if not text.isascii() or "\r" in text:
        return None
    a = text.find("\n")
    if a < 0:
        return None
    body = text[a + 1:].removesuffix("\n")
    b = body.rfind("\n")
    trailer_line = body[b + 1:]
    if not trailer_line.startswith("{"):
        return None
    try:
        header = json.loads(text[:a])
        events = _loads_many("[" + body[:max(b, 0)].replace("\n", ",") + "]")
        trailer = json.loads(trailer_line)
    except json.JSONDecodeError:
        return None
    kinds = _EVENT_KINDS
    if (isinstance(header, dict) and header.get("dmfrag_trace") in TRACE_VERSIONS
            and isinstance(trailer, dict) and trailer.get("end") == len(events)
            and all(e.__class__ is list and e and e[0] in kinds for e in events)):
        return header, events
    return None


def read_trace(source: str | Path | list[str]) -> tuple[dict, list[list]]:
    """A recorded (version 3 or 4) trace's header and events (from a path, gzip'd or not, or
    from its lines); a missing or wrong trailer is an error."""
    if isinstance(source, (str, Path)) and not (isinstance(source, str) and "\n" in source):
        raw = Path(source).read_bytes()
        text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
        found = _read_trace_text(text)
        if found is not None:
            return found
        lines = text.splitlines()
    elif isinstance(source, str):
        lines = source.splitlines()
    else:
        lines = list(source)
    if not lines:
        raise PlacedReplayError(1, "empty trace")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise PlacedReplayError(1, f"the header is not JSON ({exc.msg})") from None
    if not isinstance(header, dict) or header.get("dmfrag_trace") not in TRACE_VERSIONS:
        raise PlacedReplayError(1, "not a recorded trace: its header has no "
                                "\"dmfrag_trace\": 3 or 4")
    # The fast path: the event lines in one parse; anything odd about them
    # (a bad line, a trailer missing or wrong) goes the line-by-line way,
    # which names the line.
    kinds = _EVENT_KINDS
    if len(lines) >= 2 and lines[-1].startswith("{"):
        try:
            events = _loads_many("[" + ",".join(lines[1:-1]) + "]")
            trailer = json.loads(lines[-1])
        except json.JSONDecodeError:
            events = None
        if (events is not None and isinstance(trailer, dict)
                and trailer.get("end") == len(events)
                and all(e.__class__ is list and e and e[0] in kinds for e in events)):
            return header, events
    events = []
    for n, line in enumerate(lines[1:], 2):
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlacedReplayError(n, f"not JSON ({exc.msg})") from None
        if isinstance(e, dict):
            if e.get("end") != len(events) or n != len(lines):
                raise PlacedReplayError(n, f"the trailer says {e.get('end')!r} events, the "
                                        f"trace has {len(events)} (cut short or edited)")
            return header, events
        if not isinstance(e, list) or not e or e[0] not in kinds:
            raise PlacedReplayError(n, f"not an event: {line[:80]!r}")
        events.append(e)
    raise PlacedReplayError(len(lines), "no trailer ({\"end\": N}): the trace is cut short")


@dataclass
class PlacedReplay:
    """The result: one entry per snapshot, and what the replay met."""

    kernel: str
    ram: str
    workload: list[str]
    snapshots: list[dict] = field(default_factory=list)
    events: int = 0
    untraced_frees: int = 0
    early_requests_skipped: int = 0
    #: tables Linux allocated inside a CPA pass that the model's splits did not take
    missed_splits: int = 0
    first_missed_split: str | None = None
    #: splits the model made where Linux allocated no table (it had split there before)
    unmatched_splits: int = 0
    first_unmatched_split: str | None = None
    #: pages Linux allocated that the model's boot kept reserved (memblock)
    reserved_differences: int = 0
    first_reserved_difference: str | None = None
    #: at the first dump: pages made allocated (Linux had them, untraced) and
    #: free (the model's boot kept them); None without stored states
    adopted: dict | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return self.error is None and all(s["equal"] for s in self.snapshots)

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "ram": self.ram, "workload": self.workload,
                "placement": "real", "snapshots": self.snapshots, "events": self.events,
                "untraced_frees": self.untraced_frees,
                "early_requests_skipped": self.early_requests_skipped,
                "missed_splits": self.missed_splits,
                "first_missed_split": self.first_missed_split,
                "unmatched_splits": self.unmatched_splits,
                "first_unmatched_split": self.first_unmatched_split,
                "reserved_differences": self.reserved_differences,
                "first_reserved_difference": self.first_reserved_difference,
                **({"adopted": self.adopted} if self.adopted is not None else {}),
                "equal": self.equal, "completed": self.error is None, "error": self.error}


def _counters(meminfo: dict, vmstat: dict) -> dict[str, int]:
    out = {k: int(meminfo[k]) for k in COMPARED_MEMINFO if k in meminfo}
    out.update({k: int(vmstat[k]) for k in COMPARED_VMSTAT if k in vmstat})
    return out


class _Replayer:
    #: event index -> work to do before that event (``_before_event``); the
    #: modelled replay's inferred bulk allocations
    bulk_before: ClassVar[dict[int, list]] = {}

    #: called at the end of each CPA pass and at each snapshot (the
    #: modelled replay's metrics and oracle, when asked for)
    tick: Callable[[], None] | None = None

    def _before_event(self, i: int) -> None:
        """Work the replay does before event ``i`` (see ``bulk_before``)."""

    def __init__(self, header: dict, events: list[list], policy: str | None,
                 states: list | None = None):
        from guestkernel import Kernel
        self.header, self.events = header, events
        kernel = header.get("kernel")
        try:
            # the model runs the paging mode the recording kernel ran in
            # (Linux's own addresses, its walks' depth)
            self.k = Kernel.boot(e820=header.get("boot_log") or None,
                                 ram=header.get("ram"), profile=kernel,
                                 policy=policy or "baseline", boot_cpa=False,
                                 paging_levels=trace_paging_levels(events))
        except Exception as exc:  # noqa: BLE001 - a header the model cannot boot
            raise PlacedReplayError(1, f"the model cannot boot this trace's machine: {exc}"
                                    ) from None
        self.consumed = bytearray(len(events))
        self.result = PlacedReplay(kernel, header.get("ram"), list(header.get("workload", [])),
                                   events=len(events))
        # the whole direct-map range (64 TiB with 4-level paging): an address
        # in it beyond max_pfn is the model's to refuse (not mapped)
        self.direct_end = self.k.pfn_to_virt(0) + (1 << 46)
        self.running_at = self._running_index()
        self.span_end = -1               # the last event of the request being replayed
        self.pool: list[int] = []
        #: module-area vmalloc areas alive at the end, their pfns (recorder)
        self.areas = sorted(header.get("module_areas") or [], key=lambda a: a[0])
        self.areas_used: set[int] = set()
        #: per page of those areas, the trace's (index, "A"/"F") events
        self._area_touches: dict[int, list[tuple[int, str]]] | None = None
        self.table_cursor = 0
        #: the real kernel's states by point (dmfrag.truth), and their comparisons
        self.states = {st.point: st for st in states or ()}
        self.compared: dict[str, dict] = {}

    # -- set-up ----------------------------------------------------------------

    def _running_index(self) -> int:
        """The index after which the system runs: the end of the last request
        on the kernel image before the first snapshot."""
        ev = self.events
        first_snap = next((i for i, e in enumerate(ev) if e[0] == "S"), len(ev))
        last = -1
        for i in range(first_snap):
            e = ev[i]
            if e[0] == "C" and e[1] != "alias" and e[2] and _IMAGE_START <= e[2][0] < _IMAGE_END:
                last = i
        if last < 0:
            return first_snap - 1
        return self._span_end(last)

    def _span_end(self, i: int) -> int:
        """The index of the ``R`` closing the request at ``i`` (which has
        arguments), counting nested passes; where the return probe missed
        (5.10's kretprobes lose most returns here), the event before the
        next request or snapshot."""
        depth = 0
        ev = self.events
        for j in range(i, len(ev)):
            e = ev[j]
            if j > i and (e[0] == "S" or (e[0] == "C" and e[1] != "alias")):
                return j - 1
            if e[0] == "C" and e[2] is not None:
                depth += 1
            elif e[0] == "R":
                depth -= 1
                if depth == 0:
                    return j
        return len(ev) - 1

    def _early_calls(self) -> None:
        """The record's boot calls before fs_initcall that the model makes
        itself (see _model_early_call), on pages the trace never touches
        (their own pages are Linux's: traced as plain allocations); then the
        per-page map of the replay, from the model's buddy at that point."""
        import numpy as np

        from guestkernel.boot import boot_cpa_calls
        k, buddy = self.k, self.k.buddy
        # deferred struct-page init came before these calls in Linux
        # (page_alloc_init_late, then the initcalls); its frees in the trace
        # are then frees of pages the model has free already
        buddy.page_alloc_init_late()
        touched = np.zeros(k.max_pfn + 1024, dtype=bool)
        for e in self.events:
            if e[0] in ("A", "F"):
                touched[e[1]: e[1] + (1 << e[2])] = True
        self.touched = touched
        buddy.drain_pages()
        held = []                      # free blocks holding a touched page, set aside
        for zone in buddy.zones:
            for order in range(len(zone.free_area)):
                for mt in range(len(zone.free_area[order])):
                    for head in buddy.free_list(zone, order, mt):
                        if touched[head: head + (1 << order)].any():
                            held.append((head, order))
        for head, order in held:
            buddy.take_page_off_buddy(head, order)
        try:
            # the end of mem_init: the vmalloc space's top-level tables
            # (untraced in Linux, which made them before tracing started)
            k.preallocate_vmalloc_pages()
            boot_cpa_calls(k.cpa, buddy, k.bpf, k.profile, only=self._model_early_call,
                           real_mode=k.real_mode_base)
            self._execmem_cache()
        finally:
            for head, order in held:
                buddy.free_pages(head, order)
            buddy.drain_pages()
        states = buddy.page_states()
        own = np.full(k.max_pfn, _RESERVED, dtype=np.uint8)
        own[states == 1] = _FREE
        own[states == 2] = _MODEL
        self.own = bytearray(own.tobytes())

    def _execmem_cache(self) -> None:
        """7.x's execmem ROX cache is filled before tracing begins (no event
        shows it): a 2M area of the module space, its direct-map alias
        read-only (one 2M page, no split). With the recorder's module areas,
        the first ``execmem_alloc`` area of 512 contiguous, 2M-aligned pages
        is that cache: its alias made read-only here, as Linux has it when
        the trace starts (the requests after it that make a page writable
        then split it as Linux's did)."""
        if not self.k.profile.execmem_rox_cache:
            return
        for va, caller, pfns in self.areas:
            if not caller.startswith("execmem_alloc") or len(pfns) != 512:
                continue
            first = pfns[0]
            if first % 512 or pfns != list(range(first, first + 512)):
                continue
            self.k.cpa.set_memory_ro(self.k.pfn_to_virt(first), 512)
            return

    def _model_early_call(self, call) -> bool:
        """Which early boot calls the model makes itself: those on the image
        (their addresses are the record's), and the first BPF JIT where it is
        a 2M bpf_prog_pack (its pages come from the bulk allocator: not in
        the trace). Without packs (5.10) the JIT image is one vmalloc'd page,
        traced: the one-page rule of _early_request replays it."""
        from guestkernel.versions import BootCpaCall
        if not call.before_fs_initcall:
            return False
        if call is BootCpaCall.PTP_CLASSIFIER_BPF:
            # a trace with the module areas' pages has the pack's own
            return bool(self.k.profile.bpf_prog_pack) and not self.areas
        return True

    # -- the events ------------------------------------------------------------

    def _va(self, va: int) -> int:
        """A recorded address in the model's layout (see DIRECT_MAPS)."""
        pfn = direct_pfn(va)
        return va if pfn is None else self.k.pfn_to_virt(pfn) | (va & 0xFFF)

    def _next_table(self) -> int:
        """The next page Linux allocated inside the request being replayed."""
        ev = self.events
        j = max(self.table_cursor, self.pos + 1)
        while j <= self.span_end:
            e = ev[j]
            if e[0] == "A" and e[2] == 0 and not self.consumed[j]:
                self.consumed[j] = 1
                self.table_cursor = j + 1
                self._alloc(j, e[1], 0)
                return e[1]
            j += 1
        # The model splits where Linux did not (an earlier split the model
        # lacks, typically in the early window): a finding, not bookkeeping.
        # The table comes from a pool of pages the trace never touches.
        if not self.pool:
            raise PlacedReplayError(self.pos + 2, "the model split a large page here but Linux "
                                    "allocated no page-table page inside this request, and the "
                                    "pool of untouched pages for such tables is empty")
        if self.result.unmatched_splits == 0:
            self.result.first_unmatched_split = f"line {self.pos + 2}"
        self.result.unmatched_splits += 1
        pfn = self.pool.pop()
        self.own[pfn] = _MODEL
        return pfn

    def _pages(self, i: int, what: str, pfn: int, order: int) -> int:
        """The block's page count; a block beyond max_pfn stops the replay."""
        n = 1 << order
        if pfn + n > len(self.own):
            raise PlacedReplayError(i + 2, f"{what} of pfn {pfn:#x} order {order}: beyond "
                                    f"max_pfn {len(self.own):#x}")
        return n

    def _alloc(self, i: int, pfn: int, order: int) -> None:
        n = self._pages(i, "allocation", pfn, order)
        own = self.own
        if own[pfn: pfn + n] == _ZEROS[:n]:
            own[pfn: pfn + n] = _TRACED_PAGES[:n]
            return
        seg = own[pfn: pfn + n]
        busy = [j for j, v in enumerate(seg) if v in (_TRACED, _MODEL, _MODEL_FREED, _UNTRACED)]
        if busy:
            p = pfn + busy[0]
            what = {_TRACED: "allocated by an earlier event of the trace",
                    _UNTRACED: "allocated in Linux's memory dump, untraced"}.get(
                seg[busy[0]], "held by the model (its own boot-time page)")
            raise PlacedReplayError(i + 2, f"allocation of pfn {pfn:#x} order {order}: page "
                                    f"{p:#x} is not free: {what}")
        # Linux had these pages free at the hand-over where the model's
        # memblock kept them: a boot-reservation difference, not a bookkeeping
        # error; counted, the first named.
        reserved = [pfn + j for j, v in enumerate(seg) if v == _RESERVED]
        if self.result.reserved_differences == 0:
            self.result.first_reserved_difference = f"line {i + 2}: pfn {reserved[0]:#x}"
        self.result.reserved_differences += len(reserved)
        own[pfn: pfn + n] = _TRACED_PAGES[:n]

    def _free(self, i: int, pfn: int, order: int) -> None:
        n = self._pages(i, "free", pfn, order)
        own = self.own
        if own[pfn: pfn + n] == _TRACED_PAGES[:n]:
            own[pfn: pfn + n] = _ZEROS[:n]
            return
        seg = own[pfn: pfn + n]
        if _FREE in seg:
            # pages the trace never saw allocated: before tracing, or by the
            # bulk allocator (see dmfrag.recorder)
            self.result.untraced_frees += 1
        if _MODEL in seg:
            raise PlacedReplayError(i + 2, f"free of pfn {pfn:#x} order {order}: the model holds "
                                    f"page {pfn + seg.index(_MODEL):#x} for its own boot-time "
                                    f"calls")
        own[pfn: pfn + n] = _ZEROS[:n]      # traced, reserved (handed over) or freed by the model

    def _table_freed(self, pfn: int) -> None:
        """A table page the model's collapse freed: Linux's free follows."""
        self.own[pfn] = _MODEL_FREED

    def _request(self, i: int, caller: str, args: list) -> None:
        from guestkernel.cpa import CpaError, CpaFlags
        va, npages, mset, mclr, flags, force_split, primary = args
        va = self._va(va)
        direct = self.k.pfn_to_virt(0) <= va < self.direct_end
        image = _IMAGE_START <= va < _IMAGE_END
        self.span_end = self._span_end(i)
        self.table_cursor = i + 1
        self.pos = i
        if not (direct or image):
            return                 # its alias passes (replayed one by one) carry the change
        # primary 0, or (newer kernels) CPA_NO_CHECK_ALIAS in the flags: no alias pass
        alias = primary and not flags & CpaFlags.NO_CHECK_ALIAS
        in_flag = CpaFlags(0) if alias else CpaFlags.NO_CHECK_ALIAS
        try:
            self.k.cpa.change_page_attr_set_clr(va, npages, mset, mclr,
                                                force_split=bool(force_split), in_flag=in_flag)
        except (CpaError, MemoryError) as exc:
            raise PlacedReplayError(i + 2, f"CPA request {caller} va={va:#x} numpages={npages}: "
                                    f"{exc}") from None

    def _alias(self, i: int, args: list, parent: list | None) -> None:
        """An alias pass of a request on module/BPF/vmalloc memory."""
        from guestkernel.cpa import CpaError, CpaFlags
        if parent is None:
            return
        pva = self._va(parent[0])
        if self.k.pfn_to_virt(0) <= pva < self.direct_end or _IMAGE_START <= pva < _IMAGE_END:
            return                 # the model made this pass itself
        va, npages, mset, mclr, _flags, force_split, _primary = args
        va = self._va(va)
        self.pos = i
        try:
            self.k.cpa.change_page_attr_set_clr(va, npages, mset, mclr,
                                                force_split=bool(force_split),
                                                in_flag=CpaFlags.NO_CHECK_ALIAS)
        except (CpaError, MemoryError) as exc:
            raise PlacedReplayError(i + 2, f"alias pass va={va:#x} numpages={npages}: {exc}"
                                    ) from None

    def _early_request(self, i: int) -> None:
        """A request before kprobes (no arguments): its pages are found
        either as a one-page vmalloc allocation right before it, or among
        the module-area vmalloc areas the recorder translated at the end of
        the run (the first unused one, in address order, with as many pages
        as the request has alias passes: the first bpf_prog_pack, whose
        pages the bulk allocator gave untraced). Such a request is replayed
        as what module memory gets before kprobes exist, read-only
        (set_memory_ro; set_memory_x has no alias pass): RW cleared on each
        page's direct-map alias. Any other is counted as skipped."""
        made_by_model, prev, end, aliases, marker = self._early_context(i)
        if made_by_model:
            self.result.early_requests_skipped += 1
            return
        pfns = None
        if _one_page_vmalloc(prev, aliases):
            pfns = [prev[1]]
            for n, area in enumerate(self.areas):
                if n not in self.areas_used and area[2] == pfns:
                    self.areas_used.add(n)
                    break
        elif aliases:
            # the first unused area of that size, one the marker's caller
            # allocated (vmallocinfo names it: bpf_prog_pack_alloc+0x...)
            # before any other
            fits = [n for n, area in enumerate(self.areas)
                    if n not in self.areas_used and len(area[2]) == aliases
                    and not self._allocated_after(i, area[2])]
            if marker is not None:
                fits.sort(key=lambda n: not self.areas[n][1].startswith(marker[2] + "+"))
            if fits:
                self.areas_used.add(fits[0])
                pfns = list(self.areas[fits[0]][2])
        if pfns is None:
            self.result.early_requests_skipped += 1
            return
        from guestkernel.cpa import CpaError, CpaFlags
        self.span_end, self.table_cursor, self.pos = end - 1, i + 1, i
        for pfn in pfns:
            if self.own[pfn] == _FREE:        # the bulk allocator's page: allocated here
                self.own[pfn] = _TRACED
            try:
                self.k.cpa.change_page_attr_set_clr(self.k.pfn_to_virt(pfn), 1, 0, _RW,
                                                    in_flag=CpaFlags.NO_CHECK_ALIAS)
            except (CpaError, MemoryError) as exc:
                raise PlacedReplayError(i + 2, f"early request on pfn {pfn:#x}: {exc}") from None

    def _allocated_after(self, i: int, pfns: list[int]) -> bool:
        """Whether the trace allocates one of ``pfns`` after event ``i``
        before freeing it: that page was free at ``i``, so an area holding
        it (a module loaded later, whose area is alive at the end) is not
        the one an early request at ``i`` changed."""
        touches = self._area_touches
        if touches is None:
            wanted = {p for area in self.areas for p in area[2]}
            touches = self._area_touches = {p: [] for p in wanted}
            for j, e in enumerate(self.events):
                kind = e[0]
                if kind == "A" or kind == "F":
                    for p in range(e[1], e[1] + (1 << e[2])):
                        if p in touches:
                            touches[p].append((j, kind))
                elif kind == "B":
                    for p in e[3]:
                        if p in touches:
                            touches[p].append((j, "A"))
        for p in pfns:
            later = [kind for j, kind in touches.get(p, ()) if j > i]
            if later and later[0] == "A":
                return True
        return False

    def _early_context(self, i: int) -> tuple[bool, list | None, int, int, list | None]:
        """What a request before kprobes (no arguments) at ``i`` is, from
        the events around it: (made by the model's record itself or an NX
        change: nothing to place; the event before it that is not a U marker;
        the index after its last alias pass; its alias passes; the U marker
        naming its entry point and caller, or None)."""
        ev = self.events
        # the CPA entry point and its caller (the recorder's U marker just before)
        j = i - 1
        while j >= 0 and ev[j][0] == "A":
            j -= 1
        marker = ev[j] if j >= 0 and ev[j][0] == "U" and len(ev[j]) > 2 else None
        # made by the model's record itself (or below 1 MiB: init_real_mode),
        # or an NX change (its alias passes change nothing): nothing to place
        made = marker is not None and (marker[2] in _MODEL_EARLY_CALLERS
                                       or marker[1] in ("set_memory_x", "set_memory_nx"))
        prev = next((ev[k] for k in range(i - 1, -1, -1) if ev[k][0] != "U"), None)
        end = i + 1
        aliases = 0
        while end < len(ev) and not (ev[end][0] == "C" and ev[end][1] != "alias") \
                and ev[end][0] != "S":
            aliases += ev[end][0] == "C"
            end += 1
        return made, prev, end, aliases, marker

    def run(self) -> PlacedReplay:
        k = self.k
        self._early_calls()
        k.pgtable_pfn_source = self._next_table
        k.pgtable_free_sink = self._table_freed
        # a pool of pages the trace never touches, for tables of splits the
        # model makes where Linux made none (see _next_table): the lowest
        # free pages of the zone GFP_KERNEL takes from first, which are the
        # pages Linux's untraced early allocations (ftrace's records, the
        # trace ring buffer, slab) took before the first event
        touched, own = self.touched, self.own
        zone = max((z for z in k.buddy.zones if z.spanned_pages), key=lambda z: z.start_pfn)
        found: list[int] = []
        for p in range(zone.start_pfn, zone.end_pfn):
            if not touched[p] and own[p] == _FREE:
                found.append(p)
                if len(found) == _POOL:
                    break
        self.pool = found[::-1]                  # pop() takes the lowest first
        self.pos = 0
        try:
            with k.tlb.deferred():               # the CPU runs no code in a replay
                self._loop()
        except PlacedReplayError as exc:
            self.result.error = str(exc)
        finally:
            k.pgtable_pfn_source = None
            k.pgtable_free_sink = None
        return self.result

    def _loop(self, start: int = 0) -> None:
        """The events from ``start`` on, each to its handler (the kinds a
        modelled replay handles otherwise are ``_on_alloc``, ``_on_free``,
        ``_early_request``, ``_snapshot`` and ``_dump``)."""
        k = self.k
        stack: list[list | None] = []        # the arguments of the passes open
        top: list | None = None
        before = self.bulk_before
        events = self.events
        on_alloc, on_free = self._on_alloc, self._on_free
        for i in range(start, len(events)):
            self.i = i
            if before and i in before:
                self._before_event(i)
            e = events[i]
            kind = e[0]
            if kind == "A":
                on_alloc(i, e, stack[-1] if stack else None)
            elif kind == "F":
                on_free(i, e[1], e[2])
            elif kind == "B":
                self._on_bulk(i, e)
            elif kind == "C":
                args = e[2]
                if args is None:
                    if e[1] != "alias":
                        self._early_request(i)
                elif e[1] == "alias" and stack:
                    self._alias(i, args, top)
                    stack.append(args)
                else:
                    top = args
                    self._request(i, e[1], args)
                    stack.append(args)
            elif kind == "R":
                if stack:
                    stack.pop()
                if self.tick is not None:
                    self.tick()
            elif kind == "S":
                self._snapshot(e)
                if self.tick is not None:
                    self.tick()
            elif kind == "D":
                self._dump(e[1])
            if i == self.running_at:
                k.enter_running()

    def _on_alloc(self, i: int, e: list, inner: list | None) -> None:
        """An ``A`` event; ``inner``: the arguments of the innermost CPA
        pass open (None outside requests)."""
        if self.consumed[i]:
            return
        if len(e) > 5 and e[5] == "cpa_pgtable" and e[2] == 0:
            # a table Linux allocated inside a CPA pass that the model did
            # not take: Linux split, the model not
            if self.result.missed_splits == 0:
                self.result.first_missed_split = f"line {i + 2}"
            self.result.missed_splits += 1
        self._alloc(i, e[1], e[2])

    def _on_free(self, i: int, pfn: int, order: int) -> None:
        self._free(i, pfn, order)

    def _on_bulk(self, i: int, e: list) -> None:
        """A bulk allocator call: each of its pages taken at Linux's pfn."""
        for pfn in e[3]:
            self._alloc(i, pfn, 0)

    def _snapshot(self, e: list) -> None:
        self.result.snapshots.append(self._snapshot_entry(e))

    def _snapshot_entry(self, e: list) -> dict:
        """A snapshot: Linux's counters beside the model's, and the state
        comparison of the dump just before it, if any."""
        real = e[2] if len(e) > 2 and isinstance(e[2], dict) else {}
        r = _counters(real.get("meminfo", {}), real.get("vmstat", {}))
        m = _counters(self.k.meminfo(), self.k.vmstat())
        m = {key: v for key, v in m.items() if key in r}
        snap = {"point": e[1], "real": r, "model": m, "equal": r == m}
        if e[1] in self.compared:
            snap["state"] = self.compared.pop(e[1])
        return snap

    def _compare_state(self, point: str, model_free, model_lists: dict | None = None
                       ) -> object | None:
        """The model beside the real kernel's state at a dump point
        (dmfrag.truth), kept for the snapshot of that point; the state, or
        None without one. ``model_free``: a bool per pfn; ``model_lists``:
        the model's free lists (the order is compared too)."""
        from .truth import compare_free, compare_tables, model_tables
        st = self.states.get(point)
        if st is None:
            return None
        pt = compare_tables((st.pt_va, st.pt_level, st.pt_entry), model_tables(self.k),
                            real_offset=st.page_offset, model_offset=self.k.page_offset)
        fr = compare_free(st, model_free, model_lists)
        self.compared[point] = {
            "pte_mismatches": pt["pte_mismatches"],
            "free_list_mismatches": fr["free_list_mismatches"],
            **({"order_mismatches": fr["order_mismatches"]} if model_lists is not None else {}),
            "first_mismatch": pt["first"] or fr["first"],
            "table_pfn_mismatches": pt["table_pfn_mismatches"],
            "page_table_entries": pt["entries"],
            "free_linux_only": fr["linux_only"], "free_model_only": fr["model_only"],
            "first_pte_mismatch": pt["first"], "first_free_mismatch": fr["first"]}
        return st

    def _dump(self, point: str) -> None:
        """A dump point: the model's tables and free pages beside Linux's
        (dmfrag.truth); at the first of a running kernel, adopt Linux's
        free set."""
        import numpy as np
        own = np.frombuffer(self.own, dtype=np.uint8)
        st = self._compare_state(point, own == _FREE)
        if st is None:
            return
        if self.result.adopted is None and not st.booting:
            # (a state taken while booting, trace-start, is compared only:
            # the deferred range and the bulk allocator's untraced pages
            # before fs_initcall are not yet what the boot dump shows)
            n = min(len(own), st.max_pfn)
            real_free = st.free_mask(n)
            seg = np.frombuffer(self.own, dtype=np.uint8, count=n).copy()
            taken = (seg == _FREE) & ~real_free
            freed = (seg == _RESERVED) & real_free
            seg[taken] = _UNTRACED
            seg[freed] = _FREE
            self.own[:n] = seg.tobytes()
            self.result.adopted = {"point": point, "allocated": int(taken.sum()),
                                   "freed": int(freed.sum())}


def _one_page_vmalloc(prev: list | None, aliases: int) -> bool:
    """An early request with one alias pass right after a one-page vmalloc
    allocation (a trampoline or kprobe instruction page): that page."""
    return bool(prev and prev[0] == "A" and prev[2] == 0 and "__GFP_HIGHMEM" in prev[3]
                and aliases == 1)


#: what dmfrag.modelled shares (the same event loop, the model choosing the pfns)
Replayer = _Replayer
snapshot_counters = _counters
LA57_DIRECT = (_LA57_PAGE_OFFSET, _LA57_DIRECT_END)
one_page_vmalloc = _one_page_vmalloc


def load_recorded(source: str | Path | list[str], kernel: str | None = None,
                  truth: str | Path | list | None = None) -> tuple[dict, list[list], list | None]:
    """A recorded trace's header (``kernel`` overriding its record), events,
    and the real kernel's states at its dump points: ``truth`` (a
    ``.truth.npz`` or a list of states), by default the file beside a trace
    file when there is one (:func:`dmfrag.truth.truth_path`), else None."""
    header, events = read_trace(source)
    if kernel is not None:
        header = {**header, "kernel": kernel}
    if truth is None and isinstance(source, (str, Path)):
        from .truth import truth_path
        if truth_path(source).exists():
            truth = truth_path(source)
    if isinstance(truth, (str, Path)):
        from .truth import load_states
        return header, events, load_states(truth)
    return header, events, (list(truth) if truth is not None else None)


def replay_placed(source: str | Path | list[str], *, policy: str | None = None,
                  kernel: str | None = None, truth: str | Path | list | None = None
                  ) -> PlacedReplay:
    """Replay a recorded trace with Linux's placement (see the module doc);
    ``kernel`` overrides the header's kernel record. ``truth``: the real
    kernel's states at the trace's dump points (a ``.truth.npz`` or a list
    of :class:`dmfrag.truth.KernelState`); by default the file beside a
    trace file (:func:`dmfrag.truth.truth_path`) when there is one."""
    import time
    with gc_paused():
        header, events, states = load_recorded(source, kernel, truth)
        t0 = time.perf_counter()
        res = _Replayer(header, events, policy, states).run()
        res.seconds = time.perf_counter() - t0
    return res
