"""The workload registry: every named workload ``dmfrag`` knows, and what
each one has.

A workload can have up to three faces, and one entry here holds them all so
that the model, the real-kernel harness, calibration and the command line
agree on names and never drift apart:

* ``model``: a seeded driver of the model's kernel calls (``dmfrag run``,
  ``compare``, ``sweep``, traces), ``fn(recorder, rng, scale)``;
* ``guest_steps``: the shell lines a real Linux guest runs for it
  (:mod:`dmfrag.realkernel`); ``snap NAME`` lines take the snapshots;
* ``calibration``: the model's counterpart of those guest steps (the same
  calls at the same sizes, taking the same snapshots), which
  :mod:`dmfrag.calibrate` compares with the real kernel,
  ``fn(kernel, snap, module_path)``.

Some names have only a model driver (``mixed``), some only guest steps and a
counterpart (``modules``); ``secretmem`` has both, at different sizes (the
model workload frees half of 1024*scale pages in random order, the guest
step holds 4096 and frees them all). Diagnostics (``symbols``, ``ptwalk``,
``trace``) are guest steps with no counterpart: calibration skips them.

This module imports nothing of the kernel model at import time, so the
real-kernel harness can ask it without loading the emulator.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from guestkernel import Kernel

__all__ = [
    "MODULES",
    "MODULE_SIZES",
    "REGISTRY",
    "Calibration",
    "ModelDriver",
    "Recorder",
    "UnknownWorkload",
    "Workload",
    "calibration",
    "guest_names",
    "guest_steps",
    "model_driver",
    "model_names",
    "module_layout",
]


class Recorder(Protocol):
    """What a model driver calls through: :class:`dmfrag.workloads.Driver`
    (executes each call on the kernel and records it in the trace)."""

    kernel: Kernel

    def call(self, op: str, **args: object) -> str | None: ...


#: ``fn(recorder, rng, scale)``: issue the workload's calls, seeded by rng
ModelDriver = Callable[[Recorder, random.Random, float], None]
#: ``fn(kernel, snap, module_path)``: run the guest steps' counterpart on the
#: model, calling ``snap(point)`` where the guest's ``snap point`` line is;
#: ``module_path(name)`` finds a module file of the real kernel's package
Calibration = Callable[["Kernel", Callable[[str], None], Callable[[str], Path]], None]


@dataclass(frozen=True)
class Workload:
    """One named workload and the faces it has (None: it has not that one)."""

    name: str
    summary: str
    model: ModelDriver | None = None
    guest_steps: tuple[str, ...] | None = None
    calibration: Calibration | None = None
    #: a guest-side diagnostic for investigating the model, not a workload
    diagnostic: bool = False


class UnknownWorkload(ValueError):
    """A name the registry has not (for the face asked); the message lists
    the known names when ``known`` is given."""

    def __init__(self, name: str, known: list[str] | None = None):
        msg = f"unknown workload {name!r}"
        super().__init__(msg if known is None else f"{msg}; known: {', '.join(known)}")
        self.name, self.known = name, known


# -- model drivers ------------------------------------------------------------------

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

def wl_boot(d: Recorder, rng: random.Random, scale: float) -> None:
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


def wl_bpftrace_runs(d: Recorder, rng: random.Random, scale: float) -> None:
    for _ in range(max(1, int(5 * scale))):
        progs = [d.call("bpf_load", size=rng.choice([150, 600, 2500, 8000])) for _ in range(20)]
        for p in progs:
            d.call("bpf_free", prog=p)


def wl_sockex1(d: Recorder, rng: random.Random, scale: float) -> None:
    for _ in range(int(2048 * scale)):
        d.call("bpf_load", size=64)


def wl_module_churn(d: Recorder, rng: random.Random, scale: float) -> None:
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


def wl_secretmem(d: Recorder, rng: random.Random, scale: float) -> None:
    pages = [d.call("secretmem_fault") for _ in range(int(1024 * scale))]
    rng.shuffle(pages)
    for p in pages[: len(pages) // 2]:
        d.call("secretmem_free", page=p)


def wl_guest_memfd(d: Recorder, rng: random.Random, scale: float) -> None:
    for _ in range(int(512 * scale)):
        d.call("secretmem_fault")


def wl_ftrace_kprobes(d: Recorder, rng: random.Random, scale: float) -> None:
    for _ in range(int(64 * scale)):
        d.call("insn_page")


def wl_vfree_reset_perms(d: Recorder, rng: random.Random, scale: float) -> None:
    areas = []
    for _ in range(int(80 * scale)):
        areas.append(d.call("vmalloc", pages=rng.choice([1, 2, 4, 16]), reset_perms=True))
        if rng.random() < 0.5:
            d.call("vfree", addr=areas.pop(rng.randrange(len(areas))))


def wl_pagetables(d: Recorder, rng: random.Random, scale: float) -> None:
    held = []
    for _ in range(int(300 * scale)):
        if held and rng.random() < 0.3:
            d.call("pgtable_free", page=held.pop(rng.randrange(len(held))))
        else:
            held.append(d.call("pgtable_alloc"))


def _churn(d: Recorder, rng: random.Random, held: list, n: int) -> None:
    """Page-cache and anonymous churn: movable pages come and go."""
    for _ in range(n):
        if held and rng.random() < 0.47:
            h, o = held.pop(rng.randrange(len(held)))
            d.call("free_pages", page=h, order=o)
        else:
            o = rng.choice([0, 0, 0, 0, 1, 2, 3])
            g = "GFP_HIGHUSER_MOVABLE" if rng.random() < 0.8 else "GFP_KERNEL"
            held.append((d.call("alloc_pages", gfp=g, order=o), o))


def wl_mixed(d: Recorder, rng: random.Random, scale: float) -> None:
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



# -- the real guest's steps -----------------------------------------------------------

#: Modules of the real kernel's package loaded by the `modules` workload
#: (small filesystems with no dependencies, as in linux-6.1-under-qemu.md).
MODULES = ("bfs", "efs", "minix", "qnx4", "sysv")

_MODULES_STEPS = ([f"insmod /lib/modules/{m}.ko" for m in MODULES]
                  + ["snap modules"] + [f"rmmod {m}" for m in MODULES] + ["snap modules-removed"])
_BPF_STEPS = ["/bin/bpf_load 2048 2 hold > /dev/console &", "BPF=$!", "sleep 2", "snap bpf",
              "kill $BPF", "sleep 1", "snap bpf-freed"]
_SECRETMEM_STEPS = ["/bin/secretmem 4096 hold > /dev/console &", "SEC=$!", "sleep 2",
                    "snap secretmem", "kill $SEC", "sleep 1", "snap secretmem-freed"]
_SYMBOLS_STEPS = [
    "echo 0 > /proc/sys/kernel/kptr_restrict", "echo '@@SYMS'",
    ("grep -E ' (_text|_etext|__start_rodata|__end_rodata|__end_rodata_hpage_align|"
     "_sdata|__init_begin|__init_end|__bss_start|__bss_stop|__brk_base|_brk_end|_end|"
     "idt_table|__smp_locks|__smp_locks_end|__split_large_page|split_large_page|"
     "__change_page_attr_set_clr|__change_page_attr|cpa_process_alias|"
     "__end_of_kernel_reserve|__start_ro_after_init|__end_ro_after_init)$' /proc/kallsyms"),
    "echo '@@END'"]
# page sizes of the direct map from a module calling lookup_address
# (DMFRAG_PTWALK_KO names the built module; end_pa is set by the caller).
_PTWALK_STEPS = ["insmod /lib/modules/ptwalk.ko end_pa=$END_PA brk_end_addr=0xffffffff82a2cce0",
                 "dmesg | grep '@@PT' > /dev/console"]
# dump the ftrace buffer (boot with ftrace=... options).
_TRACE_STEPS = ["mount -t tracefs tracefs /sys/kernel/tracing", "echo '@@TRACE'",
                "cat /sys/kernel/tracing/trace", "echo '@@END'"]


# -- their model counterparts (calibration) ---------------------------------------------

BPF_JIT_BYTES = 64   # a 2-instruction program: prologue, body, epilogue in one chunk
BPF_PROGS = 2048     # as many as the guest's `bpf_load 2048`
SECRETMEM_PAGES = 4096


def module_layout(path: str | Path) -> dict[str, int]:
    """Core and init section sizes of a .ko as ``layout_sections`` groups
    them (text, rodata, ro_after_init, data; init text/data apart), each
    category page-aligned (STRICT_MODULE_RWX). ``__versions`` and
    ``.modinfo`` lose SHF_ALLOC at load; the kallsyms tables join core data."""
    from elftools.elf.elffile import ELFFile

    SHF_WRITE, SHF_ALLOC, SHF_EXEC = 0x1, 0x2, 0x4
    out = {"text": 0, "rodata": 0, "ro_after_init": 0, "data": 0, "init_text": 0, "init_data": 0}
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        for sec in elf.iter_sections():
            flags, name, size = sec["sh_flags"], sec.name, sec["sh_size"]
            if name in ("__versions", ".modinfo") or not flags & SHF_ALLOC:
                if name in (".symtab", ".strtab"):
                    out["data"] += size
                continue
            init = name.startswith(".init")
            if flags & SHF_EXEC:
                out["init_text" if init else "text"] += size
            elif name == ".data..ro_after_init":
                out["ro_after_init"] += size
            elif flags & SHF_WRITE:
                out["init_data" if init else "data"] += size
            else:
                out["init_data" if init else "rodata"] += size
    return out


def cal_modules(k: Kernel, snap: Callable[[str], None], module_path: Callable[[str], Path]
                ) -> None:
    """The package's module files loaded with their actual section sizes,
    then removed."""
    for m in MODULES:
        lay = module_layout(module_path(m))
        k.modules.load_module(m, lay["text"], lay["rodata"], lay["ro_after_init"], lay["data"])
        if lay["init_text"] or lay["init_data"]:
            # The init layout: its own module_alloc, RO+X text, freed
            # (vfree with reset perms) once the module's init returned.
            init = k.module_alloc(lay["init_text"] + lay["init_data"] or 4096)
            tp = -(-lay["init_text"] // 4096)
            if tp:
                k.set_memory_ro(init, tp)
                k.set_memory_x(init, tp)
            k.vfree(init)
    snap("modules")
    for m in MODULES:
        k.modules.delete_module(m)
    snap("modules-removed")


def cal_bpf(k: Kernel, snap: Callable[[str], None], module_path: Callable[[str], Path]) -> None:
    """The same number of minimal BPF programs, held, then freed."""
    progs = [k.bpf.load(BPF_JIT_BYTES) for _ in range(BPF_PROGS)]
    snap("bpf")
    for p in progs:
        k.bpf.free(p.addr)
    snap("bpf-freed")


def cal_secretmem(k: Kernel, snap: Callable[[str], None],
                  module_path: Callable[[str], Path]) -> None:
    """The same number of secretmem pages, held, then freed."""
    pages = [k.secretmem.fault() for _ in range(SECRETMEM_PAGES)]
    snap("secretmem")
    for pfn in pages:
        k.secretmem.free(pfn)
    snap("secretmem-freed")


# -- the registry -------------------------------------------------------------------

def _entries(*ws: Workload) -> Mapping[str, Workload]:
    return MappingProxyType({w.name: w for w in ws})


#: Every workload by name. The order is the order names are listed in
#: (model names and guest names each keep theirs): the real-guest workloads
#: first, then the model's, then the diagnostics.
REGISTRY: Mapping[str, Workload] = _entries(
    Workload("modules", "five small filesystem modules of the kernel package loaded, then removed",
             guest_steps=tuple(_MODULES_STEPS), calibration=cal_modules),
    Workload("bpf", "2048 minimal BPF programs loaded and held, then freed",
             guest_steps=tuple(_BPF_STEPS), calibration=cal_bpf),
    Workload("boot", "a distribution's boot: slab churn, then the machine's modules load",
             model=wl_boot),
    Workload("bpftrace-runs", "bpftrace-like runs: 20 programs of mixed sizes, loaded then freed",
             model=wl_bpftrace_runs),
    Workload("sockex1", "2048 tiny BPF programs loaded and kept", model=wl_sockex1),
    Workload("module-churn", "modules of real sizes loaded and removed at random",
             model=wl_module_churn),
    Workload("secretmem", "secretmem pages faulted, some freed (guest: 4096 held, then freed)",
             model=wl_secretmem, guest_steps=tuple(_SECRETMEM_STEPS), calibration=cal_secretmem),
    Workload("guest-memfd", "guest_memfd-like pages removed from the direct map and kept",
             model=wl_guest_memfd),
    Workload("ftrace-kprobes", "instruction pages for ftrace trampolines and kprobes",
             model=wl_ftrace_kprobes),
    Workload("vfree-reset-perms", "vmalloc areas made read-only, freed with reset perms",
             model=wl_vfree_reset_perms),
    Workload("pagetables", "page-table pages allocated and freed (protected page tables)",
             model=wl_pagetables),
    Workload("mixed", "all of the model's workloads over page-cache churn filling most of RAM",
             model=wl_mixed),
    Workload("symbols", "diagnostic: the kernel image's section symbols from /proc/kallsyms",
             guest_steps=tuple(_SYMBOLS_STEPS), diagnostic=True),
    Workload("ptwalk", "diagnostic: the direct map's page sizes walked by a module",
             guest_steps=tuple(_PTWALK_STEPS), diagnostic=True),
    Workload("trace", "diagnostic: the ftrace buffer", guest_steps=tuple(_TRACE_STEPS),
             diagnostic=True),
)


def model_names() -> list[str]:
    """Workloads the model runs (``dmfrag run --workload``), in order."""
    return [w.name for w in REGISTRY.values() if w.model is not None]


def guest_names() -> list[str]:
    """Workloads a real guest runs (``dmfrag calibrate --workload``), in order."""
    return [w.name for w in REGISTRY.values() if w.guest_steps is not None]


def model_driver(name: str) -> ModelDriver:
    """The model driver of ``name``; unknown names list the model's."""
    w = REGISTRY.get(name)
    if w is None or w.model is None:
        raise UnknownWorkload(name, model_names())
    return w.model


def guest_steps(name: str) -> tuple[str, ...]:
    """The guest's shell lines for ``name``; unknown names list the guest's."""
    w = REGISTRY.get(name)
    if w is None or w.guest_steps is None:
        raise UnknownWorkload(name, guest_names())
    return w.guest_steps


def calibration(name: str) -> Calibration | None:
    """The model counterpart of the guest workload ``name`` (None for a
    diagnostic, which has none); a name the guest cannot run is unknown."""
    w = REGISTRY.get(name)
    if w is None or w.guest_steps is None:
        raise UnknownWorkload(name)
    return w.calibration
