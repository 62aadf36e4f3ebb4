"""Workloads: seeded, deterministic sequences of kernel calls, recorded as a
versioned JSON Lines trace that replays bit for bit.

Every call goes through a :class:`Driver`, which executes it on the kernel
and records it. Calls that return something (a PFN, an address) get a
handle (``"h7"``); later calls name the handle, so a trace replays on any
policy (the pages differ, the calls do not).

Trace format, version 1 (one JSON object per line):

* line 1, the header: ``{"format": "dmfrag-trace", "version": 1, "boot":
  {"ram": "8G"} | {"e820": "<boot log text>"}, "policy": "...",
  "workload": "...", "seed": N}``;
* every other line, one call: ``{"op": NAME, "args": {...}}`` plus
  ``"ret": "hN"`` when it returns a handle (``"rets": [...]`` for several).

The workloads themselves (what each one calls) are declared in
:mod:`dmfrag.registry`; this module runs and records them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from guestkernel import Kernel
from guestkernel import gfp as G

from .registry import MODULE_SIZES, model_driver, model_names

__all__ = ["MODULE_SIZES", "WORKLOADS", "Driver", "TraceError", "replay", "run_workload"]

TRACE_FORMAT, TRACE_VERSION = "dmfrag-trace", 1


class TraceError(ValueError):
    """A malformed trace line: names the line number and the field."""

    def __init__(self, line_no: int, fld: str, message: str):
        super().__init__(f"trace line {line_no}: field {fld!r}: {message}")
        self.line_no, self.field = line_no, fld


# -- the calls --------------------------------------------------------------------

_GFP_NAMES = {"GFP_KERNEL": G.GFP_KERNEL, "GFP_HIGHUSER_MOVABLE": G.GFP_HIGHUSER_MOVABLE,
              "GFP_USER": G.GFP_USER, "GFP_DMA32": G.GFP_DMA32, "GFP_ATOMIC": G.GFP_ATOMIC,
              "GFP_KERNEL|GFP_UNMAPPED": G.GFP_KERNEL | G.GFP_UNMAPPED,
              "GFP_KERNEL|GFP_ZERO": G.GFP_KERNEL | G.GFP_ZERO}


def _op_alloc_pages(k, gfp: str, order: int):
    return k.alloc_pages(int(_GFP_NAMES[gfp]), order)


def _op_free_pages(k, page, order: int):
    k.free_pages(page, order)


def _op_set_memory(k, kind: str, page, numpages: int):
    if kind not in ("ro", "rw", "x", "nx", "np", "p", "rox", "4k"):
        raise ValueError(f"unknown set_memory kind {kind!r}")
    getattr(k, f"set_memory_{kind}")(k.pfn_to_virt(page), numpages)


def _op_load_module(k, name: str, text: int, rodata: int, ro_after_init: int, data: int):
    k.modules.load_module(name, text, rodata, ro_after_init, data)


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
    area = k.vmalloc.vmalloc_node_range(pages * 4096)
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
        ret = OPS[op](self.kernel, **real)
        rec = {"op": op, "args": args}
        name = None
        if ret is not None:
            self.counter += 1
            name = f"h{self.counter}"
            self.handles[name] = ret
            rec["ret"] = name
        self.lines.append(json.dumps(rec, sort_keys=True))
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
                 kernel: Kernel | None = None) -> Driver:
    """Boot (unless given a kernel) and run one workload; returns the driver
    (kernel, trace lines, handles)."""
    driver = model_driver(workload)      # an unknown name: ValueError listing the known
    if scale <= 0:
        raise ValueError("scale must be positive")
    k = kernel or Kernel.boot(ram=None if e820 else ram, e820=e820, policy=policy)
    d = Driver(k)
    from policies.oracle import OracleTracker
    d.oracle = OracleTracker(k)
    boot = {"e820": e820} if e820 else {"ram": ram}
    d.lines.append(json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION, "boot": boot,
                               "policy": policy, "workload": workload, "seed": seed,
                               "scale": scale}, sort_keys=True))
    d.sample()
    driver(d, random.Random(seed), scale)
    d.sample()
    return d


def replay(lines, *, policy: str | None = None) -> tuple[Driver, TraceError | None]:
    """Replay a trace. A malformed line stops the replay: the driver (kernel
    and state up to that line) is returned with the error, not lost."""
    it = iter(enumerate(lines, start=1))
    try:
        no, first = next(it)
    except StopIteration:
        raise TraceError(1, "format", "empty trace") from None
    try:
        head = json.loads(first)
    except ValueError as exc:
        raise TraceError(1, "format", f"not JSON ({exc})") from None
    if head.get("format") != TRACE_FORMAT:
        raise TraceError(1, "format", f"expected {TRACE_FORMAT!r}")
    if head.get("version") != TRACE_VERSION:
        raise TraceError(1, "version", f"unsupported version {head.get('version')!r}")
    boot = head.get("boot")
    if not isinstance(boot, dict) or not ("ram" in boot or "e820" in boot):
        raise TraceError(1, "boot", "needs 'ram' or 'e820'")
    k = Kernel.boot(ram=boot.get("ram"), e820=boot.get("e820"),
                    policy=policy or head.get("policy", "baseline"))
    d = Driver(k)
    d.lines.append(first if policy is None else json.dumps({**head, "policy": policy}, sort_keys=True))
    rename: dict[str, str] = {}
    for no, line in it:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            return d, TraceError(no, "line", f"not JSON ({exc})")
        op = rec.get("op")
        if op not in OPS:
            return d, TraceError(no, "op", f"unknown op {op!r}")
        args = rec.get("args")
        if not isinstance(args, dict):
            return d, TraceError(no, "args", "must be an object")
        args = dict(args)
        for a in HANDLE_ARGS.get(op, ()):
            if args.get(a) not in rename:
                return d, TraceError(no, f"args.{a}", f"unknown handle {args.get(a)!r}")
            args[a] = rename[args[a]]
        try:
            got = d.call(op, **args)
        except TypeError as exc:
            return d, TraceError(no, "args", str(exc))
        except (ValueError, KeyError, MemoryError) as exc:
            return d, TraceError(no, "op", f"{op} failed: {exc}")
        if "ret" in rec:
            if got is None:
                return d, TraceError(no, "ret", f"{op} returns nothing")
            rename[rec["ret"]] = got
    return d, None
