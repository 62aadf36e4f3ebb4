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
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from guestkernel import Kernel
from guestkernel import gfp as G

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


# -- module sizes from the real data ------------------------------------------------

def _module_sizes() -> list[tuple[str, int]]:
    here = Path(__file__).resolve().parent / "data" / "proc-modules-ryzen-5.15.txt"
    out = []
    for line in here.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out.append((parts[0], int(parts[1])))
    return out


MODULE_SIZES = _module_sizes()


def _module_split(size: int) -> tuple[int, int, int, int]:
    """A /proc/modules size split as typical modules are: ~55% text, ~25%
    rodata, ~3% ro_after_init, the rest data (choice: the file gives only
    totals)."""
    text = max(4096, int(size * 0.55))
    rodata = int(size * 0.25)
    roai = int(size * 0.03)
    return text, rodata, roai, max(0, size - text - rodata - roai)


# -- the workloads ----------------------------------------------------------------

def wl_boot(d: Driver, rng: random.Random, scale: float) -> None:
    """A distribution's boot after the kernel's own: slab-like unmovable
    allocations of which most are freed again in random order (their free
    pages end up scattered over many pageblocks, as on a system that has run
    a while), then the machine's modules load (the real /proc/modules sizes
    in dmfrag/data)."""
    slab = []
    for _ in range(int(20000 * scale)):
        slab.append(d.call("alloc_pages", gfp="GFP_KERNEL", order=0))
    rng.shuffle(slab)
    for h in slab[: int(len(slab) * 0.6)]:
        d.call("free_pages", page=h, order=0)
    for i, (name, size) in enumerate(MODULE_SIZES[: max(1, int(len(MODULE_SIZES) * min(1.0, scale)))]):
        t, r, a, da = _module_split(size)
        d.call("load_module", name=f"{name}.boot{i}", text=t, rodata=r, ro_after_init=a, data=da)


def wl_bpftrace_runs(d: Driver, rng: random.Random, scale: float) -> None:
    for _ in range(max(1, int(5 * scale))):
        progs = [d.call("bpf_load", size=rng.choice([150, 600, 2500, 8000])) for _ in range(20)]
        for p in progs:
            d.call("bpf_free", prog=p)


def wl_sockex1(d: Driver, rng: random.Random, scale: float) -> None:
    for _ in range(int(2048 * scale)):
        d.call("bpf_load", size=64)


def wl_module_churn(d: Driver, rng: random.Random, scale: float) -> None:
    loaded: list[str] = []
    mods = MODULE_SIZES
    for i in range(int(60 * scale)):
        if loaded and rng.random() < 0.4:
            d.call("delete_module", name=loaded.pop(rng.randrange(len(loaded))))
        else:
            name, size = mods[rng.randrange(len(mods))]
            uname = f"{name}.{i}"
            t, r, a, da = _module_split(size)
            d.call("load_module", name=uname, text=t, rodata=r, ro_after_init=a, data=da)
            loaded.append(uname)


def wl_secretmem(d: Driver, rng: random.Random, scale: float) -> None:
    pages = [d.call("secretmem_fault") for _ in range(int(1024 * scale))]
    rng.shuffle(pages)
    for p in pages[: len(pages) // 2]:
        d.call("secretmem_free", page=p)


def wl_guest_memfd(d: Driver, rng: random.Random, scale: float) -> None:
    for _ in range(int(512 * scale)):
        d.call("secretmem_fault")


def wl_ftrace_kprobes(d: Driver, rng: random.Random, scale: float) -> None:
    for _ in range(int(64 * scale)):
        d.call("insn_page")


def wl_vfree_reset_perms(d: Driver, rng: random.Random, scale: float) -> None:
    areas = []
    for _ in range(int(80 * scale)):
        areas.append(d.call("vmalloc", pages=rng.choice([1, 2, 4, 16]), reset_perms=True))
        if rng.random() < 0.5:
            d.call("vfree", addr=areas.pop(rng.randrange(len(areas))))


def wl_pagetables(d: Driver, rng: random.Random, scale: float) -> None:
    held = []
    for _ in range(int(300 * scale)):
        if held and rng.random() < 0.3:
            d.call("pgtable_free", page=held.pop(rng.randrange(len(held))))
        else:
            held.append(d.call("pgtable_alloc"))


def _churn(d: Driver, rng: random.Random, held: list, n: int) -> None:
    """Page-cache and anonymous churn: movable pages come and go."""
    for _ in range(n):
        if held and rng.random() < 0.47:
            h, o = held.pop(rng.randrange(len(held)))
            d.call("free_pages", page=h, order=o)
        else:
            o = rng.choice([0, 0, 0, 0, 1, 2, 3])
            g = "GFP_HIGHUSER_MOVABLE" if rng.random() < 0.8 else "GFP_KERNEL"
            held.append((d.call("alloc_pages", gfp=g, order=o), o))


def wl_mixed(d: Driver, rng: random.Random, scale: float) -> None:
    """All of the above interleaved with background page-cache/anon churn that
    grows to fill most of RAM: the condition under which grouping matters."""
    k = d.kernel
    held: list = []
    free_pages = k.buddy.nr_free()
    target = int(free_pages * 0.7)
    steps = [wl_module_churn, wl_bpftrace_runs, wl_secretmem, wl_vfree_reset_perms,
             wl_pagetables, wl_ftrace_kprobes]
    fill_orders = 0
    while fill_orders < target:
        o = 9 if target - fill_orders > 4096 else 0
        held.append((d.call("alloc_pages", gfp="GFP_HIGHUSER_MOVABLE", order=o), o))
        fill_orders += 1 << o
    # punch holes: free a fraction of the fill so that kernel allocations land among them
    rng.shuffle(held)
    for _ in range(len(held) // 3):
        h, o = held.pop()
        d.call("free_pages", page=h, order=o)
    # small kernel and user allocations interleaved: unmovable pages end up
    # spread over many pageblocks, as slab and page tables do on a busy system
    small: list = []
    for _ in range(int(6000 * scale)):
        g = "GFP_KERNEL" if rng.random() < 0.5 else "GFP_HIGHUSER_MOVABLE"
        small.append((d.call("alloc_pages", gfp=g, order=0), 0))
    rng.shuffle(small)
    for _ in range(len(small) // 2):
        h, o = small.pop()
        d.call("free_pages", page=h, order=o)
    held.extend(small)
    for step in steps:
        _churn(d, rng, held, int(400 * scale))
        step(d, rng, scale * 0.5)


WORKLOADS = {
    "boot": wl_boot, "bpftrace-runs": wl_bpftrace_runs, "sockex1": wl_sockex1,
    "module-churn": wl_module_churn, "secretmem": wl_secretmem, "guest-memfd": wl_guest_memfd,
    "ftrace-kprobes": wl_ftrace_kprobes, "vfree-reset-perms": wl_vfree_reset_perms,
    "pagetables": wl_pagetables, "mixed": wl_mixed,
}


def run_workload(workload: str, *, ram: str | None = "4G", e820: str | None = None,
                 policy: str = "baseline", seed: int = 1, scale: float = 1.0,
                 kernel: Kernel | None = None) -> Driver:
    """Boot (unless given a kernel) and run one workload; returns the driver
    (kernel, trace lines, handles)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
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
    WORKLOADS[workload](d, random.Random(seed), scale)
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
