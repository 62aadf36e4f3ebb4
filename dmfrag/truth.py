"""Ground truth from a real kernel's memory (see :mod:`guestkernel.truth`,
which reads it; re-exported here), and the real-kernel harness's capture of
it: :func:`capture_on_pause` dumps the guest at each ``dumpwait`` pause and
reads its state at once."""

from __future__ import annotations

import os
import time
from pathlib import Path

from guestkernel.truth import (
    NO_PAGEBLOCK,
    START_KERNEL_MAP,
    TRUTH_VERSION,
    KernelState,
    TruthError,
    check_drgn,
    compare_free,
    compare_tables,
    extract,
    find_vmcoreinfo,
    load_states,
    model_tables,
    save_states,
    state_bytes,
    truth_path,
    vmcoreinfo_from_core,
    walk_tables,
)

__all__ = [
    "FIRST_EVENT_PROBES",
    "NO_PAGEBLOCK",
    "START_KERNEL_MAP",
    "TRACE_START",
    "TRUTH_VERSION",
    "KernelState",
    "TraceStartCapture",
    "TruthError",
    "capture_on_pause",
    "check_drgn",
    "compare_free",
    "compare_tables",
    "extract",
    "find_vmcoreinfo",
    "kernel_symbols",
    "load_states",
    "model_tables",
    "save_states",
    "state_bytes",
    "truth_path",
    "vmcoreinfo_from_core",
    "walk_tables",
]


#: the dump point of :class:`TraceStartCapture`
TRACE_START = "trace-start"
#: the functions a kmem:mm_page_alloc / mm_page_free event runs when it is
#: enabled (its trace_event_raw_event_* probe, before it writes the entry)
FIRST_EVENT_PROBES = ("trace_event_raw_event_mm_page_alloc",
                      "trace_event_raw_event_mm_page_free")


def kernel_symbols(vmlinux: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The addresses of ``names`` in ``vmlinux``'s symbol table (nokaslr:
    where they run), read once and kept beside it."""
    import json
    vmlinux = Path(vmlinux)
    cache = vmlinux.with_name(vmlinux.name + ".symbols.json")
    known: dict[str, int] = {}
    if cache.exists():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    if all(n in known for n in names):
        return {n: known[n] for n in names}
    from elftools.elf.elffile import ELFFile
    want = set(names)
    with open(vmlinux, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if symtab is None:
            raise TruthError(f"{vmlinux} has no symbol table")
        for sym in symtab.iter_symbols():
            if sym.name in want and sym["st_value"]:
                known[sym.name] = int(sym["st_value"])
    missing = [n for n in names if n not in known]
    if missing:
        raise TruthError(f"{vmlinux.name} has no symbol {', '.join(missing)}")
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, cache)
    return {n: known[n] for n in names}


class TraceStartCapture:
    """The guest's memory at the moment its page-event tracing starts: QEMU
    starts held (``-S``) with a gdbstub; :meth:`on_start` puts breakpoints
    on :data:`FIRST_EVENT_PROBES`, lets the guest boot, and at the first
    hit (the first traced allocation or free) dumps it and lets it go.

    What the dump holds that no event shows: every page Linux allocated
    between the buddy hand-over and ``trace_init`` (the vmalloc space's
    tables, ftrace's records, the ring buffer, early slab and per-CPU
    pages). At an allocation's probe the page is already off the free
    lists (the event is written after ``get_page_from_freelist``); at a
    free's it is not yet on them (``free_pages_prepare`` traces first). So
    the dump comes after the ring buffer's entries so far, plus the
    allocation's own: ``trace_entries`` says so. Its VMCOREINFO note is
    not written yet (``crash_save_vmcoreinfo_init`` is an initcall): the
    state is read at the run's first regular dump, with that dump's note
    (:meth:`finish`)."""

    def __init__(self, work: Path, vmlinux: Path, gdb_socket: Path) -> None:
        self.work, self.vmlinux, self.gdb_socket = Path(work), Path(vmlinux), Path(gdb_socket)
        self.addrs = kernel_symbols(self.vmlinux, FIRST_EVENT_PROBES)
        self.core: Path | None = None
        self.applied = 0
        self.seconds = 0.0

    def on_start(self, open_hmp, deadline: float) -> None:
        from .gdbremote import GdbRemote, GdbRemoteError
        core = self.work / f"core-{time.monotonic_ns()}-{TRACE_START}"
        try:
            with GdbRemote(self.gdb_socket, timeout=max(1.0, deadline - time.monotonic())) as g:
                for addr in self.addrs.values():
                    g.set_breakpoint(addr)
                g.cont(max(1.0, deadline - time.monotonic()))
                rip = g.rip()
                if rip not in self.addrs.values():
                    raise TruthError(f"the guest stopped at {rip:#x}, not at the first page "
                                     f"event's probe")
                t0 = time.perf_counter()
                hmp = open_hmp()
                try:
                    said = hmp(f"dump-guest-memory {core}")
                finally:
                    hmp.close()
                if not core.exists():
                    raise TruthError(f"dump-guest-memory at {TRACE_START!r} wrote nothing: "
                                     f"{said.strip()}")
                self.seconds = time.perf_counter() - t0
                for addr in self.addrs.values():
                    g.clear_breakpoint(addr)
                g.detach()
        except GdbRemoteError as exc:
            core.unlink(missing_ok=True)
            raise TruthError(f"stopping the guest at its first page event: {exc}") from None
        self.core = core
        self.applied = int(rip == self.addrs[FIRST_EVENT_PROBES[0]])

    def finish(self, vmcoreinfo: bytes) -> KernelState | None:
        """The dumped state, read with a later dump's VMCOREINFO text (the
        same boot: the same kernel, addresses and layout); None when no
        dump was taken. The core is deleted."""
        if self.core is None:
            return None
        try:
            state = extract(self.core, self.vmlinux, vmcoreinfo=vmcoreinfo, point=TRACE_START)
        finally:
            self.discard()
        if state.trace_entries >= 0:
            state.trace_entries += self.applied
        return state

    def discard(self) -> None:
        if self.core is not None:
            self.core.unlink(missing_ok=True)
            self.core = None


def capture_on_pause(work: Path, vmlinux: Path, states: list[KernelState],
                     timings: list[dict] | None = None,
                     early: TraceStartCapture | None = None):
    """An ``on_pause`` for :meth:`dmfrag.realkernel.RealKernel.run`: at a
    ``@@PAUSE dump POINT PADDR SIZE`` line, dump the guest (QEMU's
    ``dump-guest-memory``), read its state at once, delete the dump.
    ``early``: a trace-start dump waiting for a VMCOREINFO note, read with
    the first dump's (and put first in ``states``).
    Returns True when it handled the line."""
    def on_pause(hmp, console: str) -> bool:
        line = console.rstrip().rsplit("\n", 1)[-1].strip()
        parts = line.split()
        if len(parts) < 5 or parts[1] != "dump":
            return False
        point, paddr = parts[2], int(parts[3], 16)
        core = Path(work) / f"core-{time.monotonic_ns()}-{point}"
        t0 = time.perf_counter()
        try:
            said = hmp(f"dump-guest-memory {core}")
            if not core.exists():
                raise TruthError(f"dump-guest-memory at {point!r} wrote nothing: {said.strip()}")
            t1 = time.perf_counter()
            size = core.stat().st_size
            note = vmcoreinfo_from_core(core, paddr)
            state = extract(core, vmlinux, vmcoreinfo=note, point=point)
        finally:
            core.unlink(missing_ok=True)
        if early is not None and early.core is not None:
            first = early.finish(note)
            states.append(first)
            if timings is not None:
                timings.append({"point": first.point, "dump_s": early.seconds,
                                "extract_s": first.seconds, "dump_bytes": size})
        states.append(state)
        if timings is not None:
            timings.append({"point": point, "dump_s": t1 - t0, "extract_s": state.seconds,
                            "dump_bytes": size})
        return True
    return on_pause


