"""Workloads: seeded, deterministic sequences of kernel calls, recorded as a
versioned JSON Lines trace that replays bit for bit.

Every call goes through a :class:`Driver`, which executes it on the kernel
and records it. Calls that return something (a PFN, an address) get a
handle (``"h7"``); later calls name the handle, so a trace replays on any
policy (the pages differ, the calls do not).

Trace format, version 2 (one JSON object per line):

* line 1, the header: ``{"format": "dmfrag-trace", "version": 2, "boot":
  {"ram": "8G"} | {"e820": "<e820 lines>"}, "policy": "...",
  "workload": "...", "seed": N, "scale": F}``. ``e820`` holds the boot
  log's ``BIOS-e820``/``e820:`` lines and its ``Linux version`` line (which
  picks the kernel record), nothing else: a trace is data, it carries the
  map itself and never names a file to read;
* then one line per call: ``{"op": NAME, "args": {...}}`` plus
  ``"ret": "hN"`` when it returns a handle;
* the last line, the trailer: ``{"end": N}``, N the number of call lines.
  A trace cut short at a line boundary has no trailer (or a wrong count)
  and its replay says so, instead of passing for a complete one.

Version 1 (no trailer, ``e820`` the whole boot log) is still read; its
replay warns that completeness cannot be checked.

The workloads themselves (what each one calls) are declared in
:mod:`dmfrag.registry`; this module runs and records them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

from guestkernel import Kernel
from guestkernel import gfp as G

from .registry import MODULE_SIZES, model_driver, model_names

__all__ = ["MODULE_SIZES", "TRACE_VERSION", "WORKLOADS", "Driver", "TraceError", "WorkloadError",
           "e820_lines", "replay", "run_workload", "trace_text"]

TRACE_FORMAT, TRACE_VERSION = "dmfrag-trace", 2
#: versions replay still reads (1: no trailer)
READ_VERSIONS = (1, 2)


class TraceError(ValueError):
    """A malformed trace line: names the line number and the field."""

    def __init__(self, line_no: int, fld: str, message: str):
        super().__init__(f"trace line {line_no}: field {fld!r}: {message}")
        self.line_no, self.field = line_no, fld


class WorkloadError(RuntimeError):
    """A call of a running workload failed for lack of a resource (the guest
    ran out of memory): names the call by its number and what it was doing.
    ``driver`` holds the state reached (the calls before it), so the caller
    can still report it rather than lose the run."""

    def __init__(self, call_no: int, op: str, args: dict, cause: BaseException,
                 driver: Driver):
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        super().__init__(f"call {call_no} ({op}({shown})) failed: "
                         f"{type(cause).__name__}: {cause}")
        self.call_no, self.op, self.cause, self.driver = call_no, op, cause, driver


def e820_lines(log: str) -> str:
    """What of a boot log a trace keeps: the ``BIOS-e820``/``e820:`` lines
    (the map and the kernel's edits of it) and the ``Linux version`` line
    (it picks the kernel record); the rest of a log (command line, device
    names, ...) is not the trace's business."""
    keep = [ln for ln in log.splitlines()
            if "BIOS-e820" in ln or "e820: " in ln or "Linux version" in ln]
    return "".join(ln + "\n" for ln in keep)


# -- the calls --------------------------------------------------------------------

_GFP_NAMES = {"GFP_KERNEL": G.GFP_KERNEL, "GFP_HIGHUSER_MOVABLE": G.GFP_HIGHUSER_MOVABLE,
              "GFP_USER": G.GFP_USER, "GFP_DMA32": G.GFP_DMA32, "GFP_ATOMIC": G.GFP_ATOMIC,
              "GFP_KERNEL|GFP_UNMAPPED": G.GFP_KERNEL | G.GFP_UNMAPPED,
              "GFP_KERNEL|GFP_ZERO": G.GFP_KERNEL | G.GFP_ZERO,
              # pipe_write's buffer pages (GFP_HIGHUSER | __GFP_ACCOUNT: unmovable)
              "GFP_HIGHUSER|GFP_ACCOUNT": G.GFP_HIGHUSER | G.GFP_ACCOUNT,
              # a reclaimable slab's page (dentries, inodes)
              "GFP_KERNEL|GFP_RECLAIMABLE": G.GFP_KERNEL | G.GFP_RECLAIMABLE}


def _op_alloc_pages(k, gfp: str, order: int):
    return k.alloc_pages(int(_GFP_NAMES[gfp]), order)


def _op_free_pages(k, page, order: int):
    k.free_pages(page, order)


def _op_set_memory(k, kind: str, page, numpages: int):
    if kind not in ("ro", "rw", "x", "nx", "np", "p", "rox", "4k"):
        raise ValueError(f"unknown set_memory kind {kind!r}")
    getattr(k, f"set_memory_{kind}")(k.pfn_to_virt(page), numpages)


def _op_load_module(k, name: str, text: int, rodata: int, ro_after_init: int, data: int,
                    init_text: int = 0, init_rodata: int = 0, init_data: int = 0):
    k.modules.load_module(name, text, rodata, ro_after_init, data, init_text=init_text,
                          init_rodata=init_rodata, init_data=init_data)


def _op_module_init(k, text: int, data: int):
    """A module's init layout on its own, as call traces recorded before
    ``load_module`` took the init sizes itself: module_alloc'd, its text
    made RO+X, freed (vfree with reset perms) once init returned."""
    init = k.module_alloc(text + data or 4096)
    tp = -(-text // 4096)
    if tp:
        k.set_memory_ro(init, tp)
        k.set_memory_x(init, tp)
    k.vfree(init)


def _op_delete_module(k, name: str):
    k.modules.delete_module(name)


def _op_bpf_load(k, size: int):
    return k.bpf.load(size).addr


def _op_bpf_free(k, prog):
    k.bpf.free(prog)


def _op_secretmem_fault(k):
    return k.secretmem.fault()


def _op_secretmem_free(k, page):
    k.secretmem.free(page)


def _op_vmalloc(k, pages: int, reset_perms: bool):
    # an area that will change permissions (VM_FLUSH_RESET_PERMS, then
    # set_memory_ro) is a CPA user the 2023 unmapped-alloc design names
    # (vfree): its pages come with the policy's execmem GFP
    gfp = k.user_gfp("execmem", int(G.GFP_KERNEL)) if reset_perms else int(G.GFP_KERNEL)
    area = k.vmalloc.vmalloc_node_range(pages * 4096, caller="vmalloc", gfp=gfp)
    if reset_perms:
        k.vmalloc.set_vm_flush_reset_perms(area.addr)
        k.set_memory_ro(area.addr, pages)
    return area.addr


def _op_vfree(k, addr):
    k.vfree(addr)


def _op_pgtable_alloc(k):
    return k.pgtable_protect.alloc()


def _op_pgtable_free(k, page):
    k.pgtable_protect.free(page)


def _op_insn_page(k):
    return k.alloc_insn_page()


OPS = {name[4:]: fn for name, fn in globals().items() if name.startswith("_op_")}
#: arguments that are handles (resolved through the handle table)
HANDLE_ARGS = {"free_pages": ("page",), "set_memory": ("page",), "bpf_free": ("prog",),
               "secretmem_free": ("page",), "vfree": ("addr",), "pgtable_free": ("page",)}


@dataclass
class Driver:
    kernel: Kernel
    lines: list[str] = field(default_factory=list)
    handles: dict[str, int] = field(default_factory=dict)
    counter: int = 0
    #: every ``sample_every`` calls: (call index, DirectMap4k, 2M, 1G kB,
    #: level-2 splits, level-2 collapses) -- the time series the plots draw
    sample_every: int = 100
    samples: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    oracle: object = None
    #: dmfrag.metrics.RunMetrics of the run (compare's fields)
    metrics: object = None
    #: what a replay noticed but did not stop for (e.g. a version-1 trace)
    warnings: list[str] = field(default_factory=list)
    #: the snapshots a step list took: ``{"point", "meminfo", "vmstat"}``
    points: list[dict] = field(default_factory=list)
    #: what a step keeps for the run's later steps (``vfree-reset``: the
    #: handles of its module's live areas)
    step_state: dict[str, object] = field(default_factory=dict)

    def snap(self, point: str) -> None:
        """A named snapshot (a step list takes one after each step)."""
        self.points.append({"point": point, "meminfo": self.kernel.meminfo(),
                            "vmstat": self.kernel.vmstat()})

    def sample(self) -> None:
        mi, vm = self.kernel.meminfo(), self.kernel.vmstat_counters
        self.samples.append((len(self.lines), mi["DirectMap4k"], mi["DirectMap2M"],
                             mi["DirectMap1G"], vm["direct_map_level2_splits"],
                             vm["direct_map_level2_collapses"]))

    def call(self, op: str, **args):
        """Execute ``op`` and record it; returns the handle name (or None)."""
        real = dict(args)
        for a in HANDLE_ARGS.get(op, ()):
            real[a] = self.handles[args[a]]
        try:
            ret = OPS[op](self.kernel, **real)
        except MemoryError as exc:
            raise WorkloadError(len(self.lines), op, args, exc, self) from exc
        rec = {"op": op, "args": args}
        name = None
        if ret is not None:
            self.counter += 1
            name = f"h{self.counter}"
            self.handles[name] = ret
            rec["ret"] = name
        self.lines.append(json.dumps(rec, sort_keys=True))
        if self.oracle is not None:
            self.oracle.tick()
        if self.metrics is not None:
            self.metrics.tick()
        if len(self.lines) % self.sample_every == 0:
            self.sample()
        return name

    def drop(self, name: str) -> None:
        self.handles.pop(name, None)


# -- the workloads ----------------------------------------------------------------

#: name -> model driver, derived from :data:`dmfrag.registry.REGISTRY` (the
#: one list of workloads); kept for importers of this name.
WORKLOADS = {name: model_driver(name) for name in model_names()}


def run_workload(workload: str, *, ram: str | None = "4G", e820: str | None = None,
                 policy: str = "baseline", seed: int = 1, scale: float = 1.0,
                 kernel: Kernel | None = None, profile: str | None = None,
                 paging_levels: int | None = None) -> Driver:
    """Boot (unless given a kernel) and run one workload; returns the driver
    (kernel, trace lines, handles). ``e820`` is a boot log's text: the run
    boots from its :func:`e820_lines`, which the trace keeps. A call that
    runs out of guest memory raises :class:`WorkloadError` (the driver so
    far in it); a bad name, size or map fails before any work.
    ``paging_levels``: 4 or 5 (None: the kernel record's, see Kernel.boot);
    the trace's header keeps the mode the run had."""
    driver = model_driver(workload)      # an unknown name: ValueError listing the known
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, not {scale!r}")
    if e820 is not None:
        e820 = e820_lines(e820)
    k = kernel or Kernel.boot(ram=None if e820 is not None else ram, e820=e820, policy=policy,
                              profile=profile, paging_levels=paging_levels)
    d = Driver(k)
    from policies.oracle import OracleTracker

    from .metrics import RunMetrics
    d.oracle = OracleTracker(k)
    d.metrics = RunMetrics(k, clock=lambda: len(d.lines) - 1)
    boot = {"e820": e820} if e820 is not None else {"ram": ram}
    d.lines.append(json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION, "boot": boot,
                               "kernel": k.profile.name, "policy": policy, "workload": workload,
                               "seed": seed, "scale": scale,
                               **({"paging_levels": k.requested_paging_levels}
                                  if k.requested_paging_levels is not None else {})},
                              sort_keys=True))
    d.sample()
    driver(d, random.Random(seed), scale)
    d.sample()
    return d


def trace_text(d: Driver, error: BaseException | None = None) -> str:
    """The trace file of a run: its lines and the ``{"end": N}`` trailer;
    a run that stopped early (``error``) says why in the trailer
    (``"error"``), so its replay does not pass for a complete workload."""
    end: dict = {"end": len(d.lines) - 1}
    if error is not None:
        end["error"] = str(error)
    return "".join(ln + "\n" for ln in d.lines) + json.dumps(end, sort_keys=True) + "\n"


def _boot_from_header(head: dict, policy: str | None, kernel: str | None = None) -> Kernel:
    """Boot what a trace header asks for; anything wrong in it is a
    :class:`TraceError` naming the field (the header is input: bad input,
    never a traceback). The header's ``e820`` is text, never a file name."""
    from guestkernel.policy import get_policy
    boot = head.get("boot")
    if not isinstance(boot, dict) or len(set(boot) & {"ram", "e820"}) != 1:
        raise TraceError(1, "boot", "must be {\"ram\": SIZE} or {\"e820\": LINES}")
    if "ram" in boot:
        fld, ram, e820 = "boot.ram", boot["ram"], None
        if isinstance(ram, bool) or not isinstance(ram, (str, int)):
            raise TraceError(1, fld, f"must be a size such as \"2G\", not {ram!r}")
    else:
        fld, ram, e820 = "boot.e820", None, boot["e820"]
        if not isinstance(e820, str):
            raise TraceError(1, fld, f"must be the e820 lines as a string, not {e820!r}")
    pol = policy if policy is not None else head.get("policy", "baseline")
    try:
        get_policy(pol)
    except (ValueError, TypeError) as exc:
        raise TraceError(1, "policy", str(exc)) from None
    from guestkernel.kernel import KernelError
    profile = kernel if kernel is not None else head.get("kernel")
    if profile is not None:
        from guestkernel.versions import VersionError, get_version
        try:
            get_version(profile)
        except (VersionError, TypeError) as exc:
            raise TraceError(1, "kernel", str(exc)) from None
    levels = head.get("paging_levels")      # (none: Kernel.boot's default)
    if levels is not None and (isinstance(levels, bool) or levels not in (4, 5)):
        raise TraceError(1, "paging_levels", f"must be 4 or 5, not {levels!r}")
    try:
        return Kernel.boot(ram=ram, e820=e820, policy=pol, profile=profile,
                           paging_levels=levels)
    except (ValueError, MemoryError, KernelError) as exc:
        raise TraceError(1, fld, str(exc)) from None


def replay(lines, *, policy: str | None = None, kernel: str | None = None
           ) -> tuple[Driver, TraceError | None]:
    """Replay a trace. A bad header is a :class:`TraceError` (raised: there
    is no state yet). A malformed call line, or a missing or wrong trailer,
    stops the replay: the driver (kernel and state up to that line) is
    returned with the error, not lost. A version-1 trace (no trailer) adds a
    warning to ``driver.warnings``."""
    it = iter(enumerate(lines, start=1))
    try:
        no, first = next(it)
    except StopIteration:
        raise TraceError(1, "format", "empty trace") from None
    try:
        head = json.loads(first)
    except ValueError as exc:
        raise TraceError(1, "format", f"not JSON ({exc})") from None
    if not isinstance(head, dict):
        raise TraceError(1, "format", f"the header must be a JSON object, not {first.strip()!r}")
    if head.get("format") != TRACE_FORMAT:
        raise TraceError(1, "format", f"expected {TRACE_FORMAT!r}")
    version = head.get("version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise TraceError(1, "version", f"unsupported version {version!r} (this dmfrag reads "
                                       f"{', '.join(map(str, READ_VERSIONS))})")
    k = _boot_from_header(head, policy, kernel)
    d = Driver(k)
    if version == 1:
        d.warnings.append("version-1 trace: it has no trailer, so a trace cut short cannot be "
                          "told from a complete one")
    d.lines.append(first if policy is None else json.dumps({**head, "policy": policy}, sort_keys=True))
    rename: dict[str, str] = {}
    calls, end_seen, last = 0, None, 1
    for no, line in it:
        if not line.strip():
            continue
        last = no
        try:
            rec = json.loads(line)
        except ValueError as exc:
            return d, TraceError(no, "line", f"not JSON ({exc})")
        if not isinstance(rec, dict):
            return d, TraceError(no, "line", f"must be a JSON object, not {line.strip()!r}")
        if end_seen is not None:
            return d, TraceError(no, "line", f"after the trailer of line {end_seen}")
        if version >= 2 and "end" in rec:
            n = rec["end"]
            if isinstance(n, bool) or not isinstance(n, int) or n != calls:
                return d, TraceError(no, "end", f"the trailer says {n!r} calls, the trace "
                                                f"holds {calls}")
            end_seen = no
            if rec.get("error"):
                d.warnings.append(f"the recorded run stopped after {calls} calls: {rec['error']}")
            continue
        op = rec.get("op")
        if not isinstance(op, str) or op not in OPS:
            return d, TraceError(no, "op", f"unknown op {op!r}")
        args = rec.get("args")
        if not isinstance(args, dict):
            return d, TraceError(no, "args", "must be an object")
        args = dict(args)
        for a in HANDLE_ARGS.get(op, ()):
            h = args.get(a)
            if not isinstance(h, str) or h not in rename:
                return d, TraceError(no, f"args.{a}", f"unknown handle {h!r}")
            args[a] = rename[h]
        try:
            got = d.call(op, **args)
        except TypeError as exc:
            return d, TraceError(no, "args", str(exc))
        except WorkloadError as exc:
            return d, TraceError(no, "op", f"{op} failed: {type(exc.cause).__name__}: "
                                           f"{exc.cause}")
        except (ValueError, KeyError, MemoryError) as exc:
            return d, TraceError(no, "op", f"{op} failed: {exc}")
        calls += 1
        if "ret" in rec:
            if got is None:
                return d, TraceError(no, "ret", f"{op} returns nothing")
            if not isinstance(rec["ret"], str):
                return d, TraceError(no, "ret", f"must be a handle name, not {rec['ret']!r}")
            rename[rec["ret"]] = got
    if version >= 2 and end_seen is None:
        return d, TraceError(last + 1, "end", f"no trailer {{\"end\": N}}: the trace ends after "
                                              f"{calls} calls, cut short")
    return d, None
