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
    from guestkernel.versions import KernelVersion

__all__ = [
    "MODULES",
    "MODULES_BY_KERNEL",
    "MODULE_LAYOUTS",
    "MODULE_SIZES",
    "REGISTRY",
    "STEP_KINDS",
    "BadWorkload",
    "Calibration",
    "ModelDriver",
    "Recorder",
    "Step",
    "StepKind",
    "UnknownWorkload",
    "Workload",
    "bpf_jit_bytes",
    "bpf_jit_len",
    "calibration",
    "guest_names",
    "guest_steps",
    "is_single",
    "model_driver",
    "model_names",
    "module_churn_plan",
    "module_layout",
    "modules_for",
    "needs_secretmem",
    "parse_steps",
    "run_steps",
    "step_driver",
]


class Recorder(Protocol):
    """What a model driver calls through: :class:`dmfrag.workloads.Driver`
    (executes each call on the kernel and records it in the trace)."""

    kernel: Kernel
    #: what a step keeps for the run's later steps
    step_state: dict[str, object]

    def call(self, op: str, **args: object) -> str | None: ...

    def snap(self, point: str) -> None: ...


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
    #: where a model driver's stream comes from: "synthetic" (invented, and
    #: how it was or was not held to a real kernel), shown by ``run --help``
    provenance: str = ""


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
    _module_churn(d, rng, int(60 * scale))


def _module_churn(d: Recorder, rng: random.Random, n: int) -> None:
    loaded: list[str] = []
    mods = MODULE_SIZES
    for i in range(n):
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
#: The five modules per kernel, in the order the guest loads them (sorted by
#: name, as its shell lists /lib/modules/wl): sysv left Linux in 6.16, so 7.2
#: loads qnx6 instead (a small filesystem with no dependencies either).
MODULES_BY_KERNEL = {"5.10": MODULES, "6.1": MODULES,
                     "7.2": ("bfs", "efs", "minix", "qnx4", "qnx6")}


def modules_for(kernel: str) -> tuple[str, ...]:
    """The modules the ``modules`` workload loads on ``kernel`` (a record
    without its own set uses 6.1's)."""
    return MODULES_BY_KERNEL.get(kernel, MODULES)

# The kernel's own set is in /lib/modules/wl (dmfrag.realkernel), loaded and
# removed in name order.
_MODULES_STEPS = ["for f in $(ls /lib/modules/wl/*.ko); do insmod $f; done", "snap modules",
                  "for f in $(ls /lib/modules/wl/*.ko); do rmmod $(basename $f .ko); done",
                  "snap modules-removed"]
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

BPF_PROGS = 2048     # as many as the guest's `bpf_load 2048`
SECRETMEM_PAGES = 4096


def module_layout(path: str | Path, kernel: str | KernelVersion = "6.1") -> dict[str, int]:
    """The bytes of each module memory type of a .ko as ``kernel`` lays it
    out, which :meth:`ModuleLoader.load_module` page-aligns: text, rodata,
    ro_after_init, data, init_text, init_rodata, init_data.

    ``layout_sections``: each SHF_ALLOC section (``__versions``,
    ``.modinfo`` and the per-CPU section lose SHF_ALLOC at load) goes to
    the first class it fits, in the kernel's order: executable, read-only,
    read-only after init (``.data..ro_after_init`` and the record's
    ``module_ro_after_init_sections``), writable; ``.init*`` sections to
    the init types; each at its ``sh_addralign``. ``layout_symtab``: the
    core symbols (CONFIG_KALLSYMS_ALL: every named symbol defined in a core
    SHF_ALLOC section) as Elf64_Sym, their names and a type byte each
    after the data; the whole symtab, strtab, a ``struct mod_kallsyms``
    (32 bytes) and a type byte per symbol after the init data. Before
    module memory types (6.4) the core and init layouts are page-aligned
    before the symbols are appended (``strict_align``), so those start on a
    page of their own: that page is in ``data`` / ``init_data`` here."""
    from elftools.elf.elffile import ELFFile

    from guestkernel.versions import get_version
    version = get_version(kernel) if isinstance(kernel, str) else kernel
    SHF_WRITE, SHF_ALLOC, SHF_EXEC, RO_AFTER_INIT = 0x1, 0x2, 0x4, 1 << 40
    page = 4096

    def align(x: int, a: int) -> int:
        return -(-x // a) * a if a > 1 else x

    out = {"text": 0, "rodata": 0, "ro_after_init": 0, "data": 0, "init_text": 0,
           "init_rodata": 0, "init_data": 0}
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        secs = list(elf.iter_sections())
        names = [sec.name for sec in secs]
        flags = [sec["sh_flags"] for sec in secs]
        for i, name in enumerate(names):
            if name in ("__versions", ".modinfo", ".data..percpu"):
                flags[i] &= ~SHF_ALLOC
            elif name == ".data..ro_after_init" or name in version.module_ro_after_init_sections:
                flags[i] |= RO_AFTER_INIT
        placed: list[str | None] = [None] * len(secs)
        classes = ((SHF_EXEC | SHF_ALLOC, 0, "text", "init_text"),
                   (SHF_ALLOC, SHF_WRITE, "rodata", "init_rodata"),
                   (RO_AFTER_INIT | SHF_ALLOC, 0, "ro_after_init", None),
                   (SHF_WRITE | SHF_ALLOC, 0, "data", "init_data"),
                   (SHF_ALLOC, 0, "data", "init_data"))
        for init in (False, True):
            for need, refuse, core_type, init_type in classes:
                kind = init_type if init else core_type
                for i, sec in enumerate(secs):
                    if (flags[i] & need) != need or flags[i] & refuse or placed[i] is not None \
                            or names[i].startswith(".init") != init or kind is None:
                        continue
                    out[kind] = align(out[kind], sec["sh_addralign"] or 1) + sec["sh_size"]
                    placed[i] = kind
        symtab = elf.get_section_by_name(".symtab")
        strtab = elf.get_section_by_name(".strtab")
        if symtab is None or strtab is None:
            return out
        if not version.module_mem_types:       # strict_align before the symbols
            out["data"] = align(out["data"], page)
            out["init_data"] = align(out["init_data"], page)
        nsrc, ndst, names_bytes = symtab.num_symbols(), 0, 0
        for i, sym in enumerate(symtab.iter_symbols()):
            sh = sym["st_shndx"]
            core = i == 0 or (isinstance(sh, int) and 0 < sh < len(secs) and sym["st_name"]
                              and flags[sh] & SHF_ALLOC
                              and not (placed[sh] or "").startswith("init"))
            if core:
                ndst += 1
                names_bytes += len(sym.name.encode()) + 1
        out["data"] = align(out["data"], symtab["sh_addralign"] or 1) + ndst * 24 \
            + names_bytes + ndst
        init_data = align(out["init_data"], symtab["sh_addralign"] or 1) + symtab["sh_size"]
        init_data = align(init_data, strtab["sh_addralign"] or 1) + strtab["sh_size"]
        out["init_data"] = align(init_data, 8) + 32 + nsrc
    return out


def cal_modules(k: Kernel, snap: Callable[[str], None], module_path: Callable[[str], Path]
                ) -> None:
    """The package's module files loaded with their actual section sizes,
    then removed."""
    mods = modules_for(k.profile.name)
    for m in mods:
        lay = module_layout(module_path(m), k.profile)
        k.modules.load_module(m, lay["text"], lay["rodata"], lay["ro_after_init"], lay["data"],
                              init_text=lay["init_text"], init_rodata=lay["init_rodata"],
                              init_data=lay["init_data"])
    snap("modules")
    for m in mods:
        k.modules.delete_module(m)
    snap("modules-removed")


def cal_bpf(k: Kernel, snap: Callable[[str], None], module_path: Callable[[str], Path]) -> None:
    """The same number of minimal BPF programs, held, then freed."""
    size = bpf_jit_bytes(2, k)
    progs = [k.bpf.load(size) for _ in range(BPF_PROGS)]
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
             model=wl_boot, provenance="synthetic, not calibrated: 20,000 slab-like pages, 60 % "
             "freed at random, then a real machine's /proc/modules sizes, Ryzen, 5.15"),
    Workload("bpftrace-runs", "bpftrace-like runs: 20 programs of mixed sizes, loaded then freed",
             model=wl_bpftrace_runs, provenance="synthetic, not calibrated; its guest "
             "counterpart is the bpftrace[:R] step"),
    Workload("sockex1", "2048 tiny BPF programs loaded and kept", model=wl_sockex1,
             provenance="synthetic, sized from a real run: the 64-byte image of the bpf step's "
             "2-instruction program, calibrate --workload bpf"),
    Workload("module-churn", "modules of real sizes loaded and removed at random",
             model=wl_module_churn, provenance="synthetic, not calibrated: real module sizes, "
             "the section split assumed"),
    Workload("secretmem", "secretmem pages faulted, some freed (guest: 4096 held, then freed)",
             model=wl_secretmem, guest_steps=tuple(_SECRETMEM_STEPS), calibration=cal_secretmem,
             provenance="synthetic: 1024 faults, half freed; the guest face (4096 held) is "
             "calibrated against Linux: calibrate --workload secretmem"),
    Workload("guest-memfd", "guest_memfd-like pages removed from the direct map and kept",
             model=wl_guest_memfd, provenance="synthetic, not calibrated"),
    Workload("ftrace-kprobes", "instruction pages for ftrace trampolines and kprobes",
             model=wl_ftrace_kprobes, provenance="synthetic, not calibrated"),
    Workload("vfree-reset-perms", "vmalloc areas made read-only, freed with reset perms",
             model=wl_vfree_reset_perms, provenance="synthetic, not calibrated; its guest "
             "counterpart is the vfree-reset:N step"),
    Workload("pagetables", "page-table pages allocated and freed (protected page tables)",
             model=wl_pagetables, provenance="synthetic, not calibrated"),
    Workload("mixed", "all of the model's workloads over page-cache churn filling most of RAM",
             model=wl_mixed, provenance="synthetic, not calibrated: all of the above over "
             "page-cache churn"),
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
    if w is not None and w.model is not None:
        return w.model
    if w is None and isinstance(name, str) and (":" in name or "," in name
                                                or name in STEP_KINDS):
        return step_driver(name)
    if w is not None and (w.calibration is not None or name == "boot"):
        return step_driver(name)
    raise UnknownWorkload(name, model_names())


def guest_steps(name: str) -> tuple[str, ...]:
    """The guest's shell lines for ``name``; unknown names list the guest's."""
    w = REGISTRY.get(name)
    if w is not None and w.guest_steps is not None:
        return w.guest_steps
    if isinstance(name, str) and (":" in name or name in STEP_KINDS or name == "boot"):
        (s,) = parse_steps(name) if "," not in name else (None,)
        if s is not None:
            if s.kind is None:
                return ()                                  # boot: the first snapshot
            if s.kind.guest is None:
                raise UnknownWorkload(f"{name} (model only: no guest counterpart)")
            return (*s.kind.guest(*s.args), f"snap {s.text}")
    raise UnknownWorkload(name, guest_names())


def calibration(name: str) -> Calibration | None:
    """The model counterpart of the guest workload ``name`` (None for a
    diagnostic, which has none); a name the guest cannot run is unknown."""
    w = REGISTRY.get(name)
    if w is None or w.guest_steps is None:
        raise UnknownWorkload(name)
    return w.calibration


# -- step lists: parameterized workloads, run in order, a snapshot after each -----------

#: The five modules' section sizes as :func:`module_layout` reads them from
#: each package (text, rodata, ro_after_init, data, init_text, init_data;
#: none of them has init rodata):
#: what a model run's ``modules`` step loads without the package at hand
#: (calibrate reads the files themselves; 7.2's from linux-modules-7.2.13).
MODULE_LAYOUTS: dict[str, dict[str, tuple[int, int, int, int, int, int]]] = {
    "5.10": {"bfs": (6975, 5051, 0, 5999, 102, 5860), "efs": (5251, 5376, 64, 6125, 114, 4924),
             "minix": (20229, 9672, 208, 7941, 102, 9093),
             "qnx4": (3120, 3627, 0, 5357, 116, 4004),
             "sysv": (19862, 11160, 208, 8269, 141, 9459)},
    "6.1": {"bfs": (6929, 4939, 0, 6108, 97, 9924), "efs": (5163, 5372, 80, 6232, 109, 8873),
            "minix": (21609, 9560, 480, 8092, 97, 13417),
            "qnx4": (3029, 3606, 0, 5576, 111, 8020),
            "sysv": (21099, 10988, 480, 8376, 135, 13604)},
    "7.2": {"bfs": (7905, 5612, 0, 5102, 180, 7030), "efs": (6785, 5780, 64, 6068, 192, 6010),
            "minix": (24945, 12324, 40, 11297, 180, 12260),
            "qnx4": (4145, 3544, 0, 4015, 194, 4769),
            "qnx6": (9393, 6488, 112, 6480, 194, 6574)},
}


def bpf_jit_len(insns: int, version: KernelVersion) -> int:
    """The x86-64 JIT image length of ``bpf_load``'s program of ``insns``
    instructions (``insns - 1`` times ``r0 = 0``, then ``exit``): the
    kernel's 2-instruction image (``KernelVersion.bpf_jit_base_len``, read
    from the guest: 15, 16 and 25 bytes on 5.10, 6.1 and 7.2) plus 2 bytes
    per further ``r0 = 0`` (``emit_mov_imm32`` emits ``xor eax, eax`` for
    an immediate 0), as the guest reads them up to 1024 instructions."""
    return version.bpf_jit_base_len + 2 * (insns - 2)


def bpf_jit_bytes(insns: int, k: Kernel) -> int:
    """What ``k``'s JIT allocates for that program (:meth:`BpfJit.alloc_bytes`:
    64-byte chunks of a ``bpf_prog_pack`` from 5.18 on, whole pages before)."""
    return k.bpf.alloc_bytes(bpf_jit_len(insns, k.profile))


#: one ``bpftrace`` run: (programs, instructions) loaded together, then
#: unloaded (28 programs of mixed sizes, as a bpftrace script's probes)
BPFTRACE_RUN = ((8, 16), (8, 64), (6, 256), (4, 1024), (2, 4096))
#: the seed the guest's ``age`` helper is given (calibrate has no --seed)
AGE_GUEST_SEED = 1
#: pages of one pipe filled with 64 KiB
PIPE_PAGES = 16


class BadWorkload(UnknownWorkload):
    """A workload list that cannot be read (a bad step, a bad number):
    the message says which step and why."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.name, self.known = message, None


@dataclass(frozen=True)
class StepKind:
    """A parameterized step: ``NAME:A[:B]``."""

    name: str
    #: parameter names; those after ``required`` are optional
    params: tuple[str, ...]
    required: int
    defaults: tuple[int, ...]
    summary: str
    #: ``fn(recorder, rng, *args)``: the model's calls (snapshot taken after)
    model: Callable[..., None]
    #: ``fn(*args) -> shell lines`` (the ``snap`` line is added after), or
    #: None: model only
    guest: Callable[..., list[str]] | None = None
    #: smallest value per parameter
    minimum: tuple[int, ...] = (1,)


def st_age(d: Recorder, rng: random.Random, n: int) -> None:
    """``age:N``: N pipes, each filled with 64 KiB (16 order-0 pages of
    ``GFP_HIGHUSER | __GFP_ACCOUNT``: unmovable, as ``pipe_write`` asks),
    then a seeded random half (N // 2) closed, their pages freed. The slab
    the pipes need (pipe_inode_info, the pipe_buffer array, two files:
    ~1.7 KiB unmovable; inode and dentry: ~0.8 KiB reclaimable) is modelled
    as one ``GFP_KERNEL`` page per 2 pipes and one reclaimable page per 5,
    taken as the pipes are created and kept when they close (the freed
    objects leave their slab pages partly used)."""
    pipes = []
    for i in range(n):
        if i % 2 == 0:
            d.call("alloc_pages", gfp="GFP_KERNEL", order=0)
        if i % 5 == 0:
            d.call("alloc_pages", gfp="GFP_KERNEL|GFP_RECLAIMABLE", order=0)
        pipes.append([d.call("alloc_pages", gfp="GFP_HIGHUSER|GFP_ACCOUNT", order=0)
                      for _ in range(PIPE_PAGES)])
    for i in sorted(rng.sample(range(n), n // 2)):
        for h in pipes[i]:
            d.call("free_pages", page=h, order=0)


def st_bpf(d: Recorder, rng: random.Random, n: int, k: int) -> None:
    """``bpf:N[:K]``: N programs of K instructions (default 2) JIT-ed and
    held (image size: :func:`bpf_jit_bytes`)."""
    size = bpf_jit_bytes(k, d.kernel)
    for _ in range(n):
        d.call("bpf_load", size=size)


def st_secretmem(d: Recorder, rng: random.Random, n: int) -> None:
    """``secretmem:N``: N pages of memfd_secret faulted and held."""
    for _ in range(n):
        d.call("secretmem_fault")


def st_bpftrace(d: Recorder, rng: random.Random, runs: int) -> None:
    """``bpftrace[:R]``: R runs (default 5), each loading the programs of
    :data:`BPFTRACE_RUN` together, then unloading them all."""
    for _ in range(runs):
        progs = [d.call("bpf_load", size=bpf_jit_bytes(k, d.kernel))
                 for n, k in BPFTRACE_RUN for _ in range(n)]
        for p in progs:
            d.call("bpf_free", prog=p)


#: the kernel module behind the guest's ``vfree-reset:N`` (dmfrag/guest)
VFREE_MODULE = "dmfrag_vfree"
#: its section sizes per kernel as :func:`module_layout` reads them from the
#: module built against each kernel's headers with the host's gcc 12 (text,
#: rodata, ro_after_init, data, init_text, init_data): the model loads it
#: before the first ``vfree-reset`` step, as the guest's ``insmod`` does.
#: A live test holds these to the built files.
VFREE_MODULE_LAYOUTS: dict[str, tuple[int, int, int, int, int, int]] = {
    "5.10": (795, 830, 0, 70425, 49, 2717), "6.1": (813, 862, 0, 70528, 49, 7034),
    "7.2": (1547, 1056, 0, 68305, 69, 3113)}
#: the areas' sizes in pages, drawn uniformly
VFREE_AREA_PAGES = (1, 2, 4, 16)
#: most areas the module holds at once (its ``live`` array)
VFREE_MAX_LIVE = 8192
_M64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    """One splitmix64 step: (new state, output), as the module draws."""
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def vfree_reset_plan(n: int, seed: int = AGE_GUEST_SEED) -> list[tuple[str, int]]:
    """``vfree-reset:N``'s calls, the same in the guest's module
    (``dmfrag_vfree.c``: splitmix64 seeded with ``seed``) and the model:
    N times ``("alloc", pages)`` (1, 2, 4 or 16), each followed with
    probability 1/2 by ``("free", i)``: the i-th live area (in allocation
    order) vfree'd. Raises :class:`BadWorkload` when more than
    :data:`VFREE_MAX_LIVE` areas would be live at once."""
    state, plan, live = seed & _M64, [], 0
    for _ in range(n):
        state, r = _splitmix64(state)
        plan.append(("alloc", VFREE_AREA_PAGES[r % 4]))
        live += 1
        if live > VFREE_MAX_LIVE:
            raise BadWorkload(f"vfree-reset:{n}: more than {VFREE_MAX_LIVE} areas would be "
                              f"live at once (the guest module's limit)")
        state, r = _splitmix64(state)
        if r % 2 == 0:
            state, r = _splitmix64(state)
            plan.append(("free", r % live))
            live -= 1
    return plan


def _load_laid_out(d: Recorder, name: str, layout: tuple[int, int, int, int, int, int]) -> None:
    """A ``load_module`` call with a layout of :data:`MODULE_LAYOUTS`' shape
    (text, rodata, ro_after_init, data, init_text, init_data)."""
    t, r, a, da, it, idata = layout
    d.call("load_module", name=name, text=t, rodata=r, ro_after_init=a, data=da,
           init_text=it, init_data=idata)


def st_vfree_reset(d: Recorder, rng: random.Random, n: int) -> None:
    """``vfree-reset:N``: the guest module's load (its section sizes from
    :data:`VFREE_MODULE_LAYOUTS`; once per run, as the guest loads it once),
    then :func:`vfree_reset_plan`: N vmalloc areas marked
    VM_FLUSH_RESET_PERMS and made read-only with ``set_memory_ro``, each
    followed with probability 1/2 by the vfree of a live one. Seeded with
    the guest's seed, not the run's, so that both make the same calls."""
    kernel = d.kernel.profile.name
    if VFREE_MODULE not in d.kernel.modules.modules:
        _load_laid_out(d, VFREE_MODULE,
                       VFREE_MODULE_LAYOUTS.get(kernel, VFREE_MODULE_LAYOUTS["6.1"]))
    live = d.step_state.setdefault("vfree_live", [])     # the module's array, across steps
    for op, arg in vfree_reset_plan(n):
        if op == "alloc":
            live.append(d.call("vmalloc", pages=arg, reset_perms=True))
        else:
            d.call("vfree", addr=live.pop(arg))


def module_churn_plan(n: int, seed: int = AGE_GUEST_SEED) -> list[tuple[str, int]]:
    """``module-churn:N``'s N steps over the kernel's five modules
    (:func:`modules_for`, by index in name order), the same in the guest and
    the model: while none is loaded, or with probability 0.6 while one is
    not, load a random unloaded one; else remove a random loaded one. Seeded
    with ``seed`` (the guest's, 1), not with the run's seed, so that the
    guest and the model churn alike; modules loaded at the end stay loaded."""
    rng = random.Random(seed)
    loaded: list[int] = []
    plan = []
    for _ in range(n):
        if loaded and (len(loaded) == 5 or rng.random() < 0.4):
            plan.append(("remove", loaded.pop(rng.randrange(len(loaded)))))
        else:
            i = rng.choice([j for j in range(5) if j not in loaded])
            loaded.append(i)
            plan.append(("load", i))
    return plan


def st_module_churn(d: Recorder, rng: random.Random, n: int) -> None:
    """``module-churn:N``: :func:`module_churn_plan` on the kernel's five
    modules with the package's section sizes (:data:`MODULE_LAYOUTS`; the
    init layout made RO+X and freed at each load)."""
    kernel = d.kernel.profile.name
    lay = MODULE_LAYOUTS.get(kernel, MODULE_LAYOUTS["6.1"])
    mods = modules_for(kernel) if kernel in MODULE_LAYOUTS else MODULES
    for op, i in module_churn_plan(n):
        if op == "load":
            _load_laid_out(d, mods[i], lay[mods[i]])
        else:
            d.call("delete_module", name=mods[i])


def _g_module_churn(n: int) -> list[str]:
    nth = "$(ls /lib/modules/wl/*.ko | sed -n {}p)"
    return [f"insmod {nth.format(i + 1)}" if op == "load"
            else f"rmmod $(basename {nth.format(i + 1)} .ko)" for op, i in module_churn_plan(n)]


def _g_vfree_reset(n: int) -> list[str]:
    vfree_reset_plan(n)                          # refuses what the module cannot hold
    sym = "0x$(grep ' {}$' /proc/kallsyms | cut -d' ' -f1)"
    return ["echo 0 > /proc/sys/kernel/kptr_restrict",
            (f"[ -d /sys/module/{VFREE_MODULE} ] || insmod /lib/modules/{VFREE_MODULE}.ko "
             f"set_memory_ro_addr={sym.format('set_memory_ro')} "
             f"find_vm_area_addr={sym.format('find_vm_area')}"),
            f"echo '{n} {AGE_GUEST_SEED}' > /sys/module/{VFREE_MODULE}/parameters/run",
            "dmesg | grep '@@VFREE' | tail -1 > /dev/console"]


def _g_age(n: int) -> list[str]:
    return [f"/bin/age {n} {AGE_GUEST_SEED} > /dev/console"]


def _g_bpf(n: int, k: int) -> list[str]:
    return [f"/bin/bpf_load {n} {k} bg > /dev/console"]


def _g_secretmem(n: int) -> list[str]:
    return [f"/bin/secretmem {n} bg > /dev/console"]


def _g_bpftrace(runs: int) -> list[str]:
    out = []
    for _ in range(runs):
        pids = []
        for j, (n, k) in enumerate(BPFTRACE_RUN):
            out.append(f"T{j}=$(/bin/bpf_load {n} {k} bg)")
            pids.append(f"$T{j}")
        out.append(f"kill {' '.join(pids)}")
    return [*out, "sleep 1"]


STEP_KINDS: Mapping[str, StepKind] = MappingProxyType({s.name: s for s in (
    StepKind("age", ("N",), 1, (), "N pipes filled with 64 KiB, a seeded half closed",
             st_age, _g_age),
    StepKind("bpf", ("N", "K"), 1, (2,), "N BPF programs of K instructions (default 2), held",
             st_bpf, _g_bpf, minimum=(1, 2)),
    StepKind("secretmem", ("N",), 1, (), "N memfd_secret pages, held", st_secretmem,
             _g_secretmem),
    StepKind("bpftrace", ("R",), 0, (5,),
             "R runs (default 5) of 28 programs of mixed sizes, loaded then unloaded",
             st_bpftrace, _g_bpftrace),
    StepKind("vfree-reset", ("N",), 1, (),
             "N read-only vmalloc areas with reset perms, a seeded half freed",
             st_vfree_reset, _g_vfree_reset),
    StepKind("module-churn", ("N",), 1, (), "N loads/removals of the kernel's five modules",
             st_module_churn, _g_module_churn),
)})


@dataclass(frozen=True)
class Step:
    """One step of a workload list: a parameterized step (``kind``) or a
    registry workload by its bare name (``kind`` None)."""

    #: as written: the snapshot point of a parameterized step
    text: str
    name: str
    args: tuple[int, ...] = ()
    kind: StepKind | None = None


def _bad(spec: str, part: str, why: str) -> BadWorkload:
    return BadWorkload(f"workload {spec!r}: step {part!r}: {why}. Grammar: STEP[,STEP...], "
                       f"STEP one of boot, modules, bpf, secretmem, age:N, bpf:N[:K], "
                       f"secretmem:N, bpftrace[:R], vfree-reset:N, module-churn:N, or a model "
                       f"workload ({', '.join(model_names())})")


def parse_steps(spec: str) -> list[Step]:
    """Read a workload list (``age:8000,bpf:2048``); anything wrong is one
    :class:`BadWorkload` naming the step, before any work."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), str(spec), "empty")
    steps: list[Step] = []
    seen: set[str] = set()
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        if not part:
            raise _bad(spec, part, "empty step")
        name, *vals = part.split(":")
        kind = STEP_KINDS.get(name)
        if not vals and name in REGISTRY and (REGISTRY[name].model or
                                              REGISTRY[name].calibration):
            if name == "boot" and i:
                raise _bad(spec, part, "boot is where every run starts: only first")
            step = Step(part, name)
        elif kind is None:
            raise _bad(spec, part, f"unknown workload {name!r}")
        else:
            if not kind.required <= len(vals) <= len(kind.params):
                want = name + "".join(f":{p}" for p in kind.params[:kind.required]) + "".join(
                    f"[:{p}]" for p in kind.params[kind.required:])
                raise _bad(spec, part, f"the form is {want}")
            args = []
            for j, v in enumerate(vals):
                low = kind.minimum[j] if j < len(kind.minimum) else 1
                if not v.isdigit() or int(v) < low:
                    raise _bad(spec, part, f"{kind.params[j]} must be an integer >= {low}, "
                                           f"not {v!r}")
                args.append(int(v))
            args.extend(kind.defaults[len(args) - kind.required:])
            step = Step(part, name, tuple(args), kind)
        if step.text in seen:
            raise _bad(spec, part, "given twice (each step's snapshot is named after it)")
        seen.add(step.text)
        steps.append(step)
    return steps


def is_single(spec: str) -> bool:
    """One of the model's named workloads, run exactly as it always ran
    (no step list, no snapshots)."""
    w = REGISTRY.get(spec)
    return w is not None and w.model is not None


def _modules_step(d: Recorder, kernel: str) -> None:
    """The guest's ``modules`` step on a model run: the five modules with
    the package's section sizes (:data:`MODULE_LAYOUTS`), the init layout
    made RO+X and freed, then removed; snapshots ``modules``,
    ``modules-removed``."""
    lay = MODULE_LAYOUTS.get(kernel, MODULE_LAYOUTS["6.1"])
    mods = modules_for(kernel) if kernel in MODULE_LAYOUTS else MODULES
    for m in mods:
        _load_laid_out(d, m, lay[m])
    d.snap("modules")
    for m in mods:
        d.call("delete_module", name=m)
    d.snap("modules-removed")


def _held_then_freed(d: Recorder, point: str, n: int, load: str, free: str, arg: str,
                     **args: object) -> None:
    hs = [d.call(load, **args) for _ in range(n)]
    d.snap(point)
    for h in hs:
        d.call(free, **{arg: h})
    d.snap(f"{point}-freed")


def run_steps(d: Recorder, rng: random.Random, scale: float, steps: list[Step]) -> None:
    """Run a step list on the model: snapshot ``boot``, then each step and
    its snapshot(s) (a bare guest workload takes its own two, as in the
    guest; a bare model workload one, named after it)."""
    d.snap("boot")
    for s in steps:
        if s.kind is not None:
            s.kind.model(d, rng, *s.args)
            d.snap(s.text)
        elif s.name == "boot":
            continue
        elif s.name == "modules":
            _modules_step(d, d.kernel.profile.name)
        elif s.name == "bpf":
            _held_then_freed(d, "bpf", BPF_PROGS, "bpf_load", "bpf_free", "prog",
                             size=bpf_jit_bytes(2, d.kernel))
        elif s.name == "secretmem":
            _held_then_freed(d, "secretmem", SECRETMEM_PAGES, "secretmem_fault",
                             "secretmem_free", "page")
        else:
            model_driver(s.name)(d, rng, scale)
            d.snap(s.text)


def step_driver(spec: str) -> ModelDriver:
    """The model driver of a workload list (checked now)."""
    steps = parse_steps(spec)

    def drive(d: Recorder, rng: random.Random, scale: float) -> None:
        run_steps(d, rng, scale, steps)
    return drive


def needs_secretmem(spec: str) -> bool:
    """Whether a workload (list) uses memfd_secret (which 5.10 has not)."""
    if is_single(spec):
        return False          # the model's named workloads run as they always did
    return any(s.name == "secretmem" for s in parse_steps(spec))
