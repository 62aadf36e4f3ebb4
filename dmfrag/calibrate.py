"""``dmfrag calibrate``: the real kernel and the model, same memory map, same
workload, side by side.

The real side is :mod:`dmfrag.realkernel`. The model boots from the e820
lines the real kernel printed and runs the same steps (each workload's
model counterpart, declared with its guest steps in :mod:`dmfrag.registry`):
the package's module files loaded with their actual section sizes (read with
pyelftools, laid out as kernel/module/main.c ``layout_sections`` does), the
same number of BPF
programs, the same secretmem pages. Both report DirectMap4k/2M/1G and the
split counters at every snapshot point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from guestkernel import Kernel

from .realkernel import RealKernel, RealRun
from .registry import REGISTRY, calibration, guest_steps, module_layout, parse_steps

__all__ = ["KEYS", "KNOWN_DIFFERENCES", "KNOWN_DIFFERENCES_5_10", "KNOWN_DIFFERENCES_7_2",
           "KNOWN_DIFFERENCES_BY_KERNEL", "VFREE_RESET_DIFFERENCE", "Comparison", "calibrate",
           "calibrate_task", "module_layout", "run_model"]

KEYS = ("DirectMap4k", "DirectMap2M", "DirectMap1G", "direct_map_level2_splits",
        "direct_map_level3_splits")

#: What the model does not yet reproduce, with the cause found so far
#: (ftrace stack traces of every CPA call at boot, and a module walking the
#: reference kernel's direct map and image mapping with lookup_address).
KNOWN_DIFFERENCES = (
    ("Page placement after boot differs above 2G, so module pages fall into other 2M "
     "regions: at 4G the five modules split one 2M page in Linux and none in the model; "
     "at 8G modules +2 real vs +0 model, secretmem +6 vs +8. (At 2G every step of the "
     "module/BPF/secretmem workload equals Linux.) The boot layout above 4 GiB, which "
     "was the first cause, now equals Linux's (guestkernel.bootmem: memblock's per-CPU "
     "unit, hash tables and swiotlb where Linux puts them)."),
    ("6.1 at 16G: Linux's boot has one more 2M split (DirectMap4k 26,496 kB, the model "
     "24,448; every other size seen, 2G to 5G, 8G, 12G, 20G, 24G, 32G and 64G, equal, and "
     "5.10 and 7.2 equal from 2G to 64G). memblock hands the buddy allocator the same "
     "pages as Linux (a memblock=debug boot at 16G, page for page), and deferred "
     "struct-page init frees the rest where Linux's does; what differs is what Linux "
     "allocates between the hand-over and the first bpf_prog_pack (ptp_classifier_init): "
     "about 4,100 requests (kernel stacks, slab, the Mount-cache hashes, page tables) "
     "that the model's untraced boot does not make. Given them, the model places them "
     "as Linux does: the recorded 16G boot (tests/data/truth/linux-6.1-16G-boot) "
     "replayed with the model's own placement gives every allocation Linux's pfn and "
     "the boot's counters Linux's. Making only the two Mount-cache hashes (order 6 at "
     "16G, order 7 at 20G) in the untraced boot leaves 16G as it is and splits one 2M "
     "page too many at 20G: where they land depends on the rest of the stream. A dump "
     "of the untraced boot shows the pack's 512 pages: 389 from the per-CPU unit's free "
     "tail, 104 at 0x100200 and 19 at 0x100800 (its early allocations hold "
     "0x100000-0x1001ff); the model's pack takes 318 at 0x100000 and 194 from the tail, "
     "one 2M region fewer."),
)

#: Per kernel: what the model does not yet reproduce there.
#: 7.x loads a module as one execmem_alloc per memory type (text from the
#: ROX cache), which the model does not yet do
KNOWN_DIFFERENCES_7_2 = (
    ("Modules on 7.x are loaded as Linux loads them (a vmalloc per module memory type, "
     "text from the execmem ROX cache: guestkernel.users.ExecmemCache), and from a dumped "
     "untraced boot the model's five loads split what Linux's did (2G and 8G, "
     "tests/test_module_memory.py); from the model's own boot they land elsewhere (its "
     "boot lacks Linux's early slab and per-CPU allocations). Linux itself differs from "
     "boot to boot: 2 to 4 splits at 2G, 4 or 5 at 8G (the model: 2 and 2)."),
)

#: 5.10 programs' slab pages (bpf_prog_aux and the like) are not modelled
KNOWN_DIFFERENCES_5_10 = (
    ("BPF on 5.10: each program keeps its own page and its JIT image page, and the slab "
     "caches grow at the rates a fresh recording shows (KernelVersion.bpf_load_slab); 2048 "
     "programs grow DirectMap4k by 20.5 MB at 8G against Linux's 22.5 (within 10 %), and "
     "a modelled replay of the recorded stream grows it by Linux's 22.5 exactly: what is "
     "left is when each slab page comes (the model spreads them evenly) and the loader's "
     "own user-space pages. At 2G the model ends at 40,832 kB, Linux at 42,880 or 44,928 "
     "(it differs from boot to boot)."),
)

#: vfree-reset on every kernel (the same cause)
VFREE_RESET_DIFFERENCE = (
    "vfree-reset:N: the guest module makes the plan's calls exactly (the recorded traces "
    "hold every area's set_memory_ro, in order and size), and replayed at Linux's pfns "
    "the model equals Linux; with its own placement the areas' pages spread over fewer 2M "
    "regions. At 2G, 256 areas: Linux 3 splits (6.1), 6 (7.2), DirectMap4k +2 MB (5.10); "
    "the model 1, 3, +0. Cause found so far (the 6.1 recording): once the partly free "
    "UNMOVABLE pageblocks near the top of RAM are used up, Linux takes the pages from the "
    "UNMOVABLE pageblocks its early boot left partly free at 0x8000-0x85ff (first used by "
    "page tables at 0x8170 and 0x8200), which the model's own boot, lacking those early "
    "allocations, does not have: it steals a block elsewhere.")
KNOWN_DIFFERENCES = (*KNOWN_DIFFERENCES, VFREE_RESET_DIFFERENCE)
KNOWN_DIFFERENCES_5_10 = (*KNOWN_DIFFERENCES_5_10, VFREE_RESET_DIFFERENCE)
KNOWN_DIFFERENCES_7_2 = (*KNOWN_DIFFERENCES_7_2, VFREE_RESET_DIFFERENCE)

KNOWN_DIFFERENCES_BY_KERNEL: dict[str, tuple[str, ...]] = {
    "6.1": KNOWN_DIFFERENCES,
    "5.10": KNOWN_DIFFERENCES_5_10,
    "7.2": KNOWN_DIFFERENCES_7_2,
}


def _snap(k: Kernel) -> dict[str, dict[str, int]]:
    return {"meminfo": k.meminfo(), "vmstat": k.vmstat()}


def run_model(e820: str, workload: tuple[str, ...], real: RealKernel | None = None, *,
              kernel: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """Boot the model from ``e820`` (boot-log text) and run the workload:
    each guest workload's model counterpart from the registry (diagnostics
    have none and are skipped; a name the guest cannot run is a ValueError).
    ``kernel`` names the record to follow (default: the one ``real`` ran,
    else what the log's ``Linux version`` line names)."""
    if kernel is None and real is not None:
        kernel = real.spec.name
    k = Kernel.boot(e820=e820, profile=kernel)
    snaps = {"boot": _snap(k)}

    def snap(point: str) -> None:
        snaps[point] = _snap(k)

    module_path = (real or RealKernel()).module_path
    driver = None
    for w in workload:
        guest_steps(w)      # a name the guest cannot run: UnknownWorkload (a ValueError)
        if w in REGISTRY and REGISTRY[w].guest_steps is not None:
            counterpart = calibration(w)
            if counterpart is not None:
                counterpart(k, snap, module_path)
            continue
        # a step of the list grammar (age:N, bpf:N:K, bpftrace, ...): its
        # model face, through a Driver, seeded as the guest's helper is
        import random

        from .registry import AGE_GUEST_SEED, run_steps
        from .workloads import Driver
        if driver is None:
            driver = Driver(k)
        steps = [s for s in parse_steps(w) if s.name != "boot"]
        driver.points.clear()
        run_steps(driver, random.Random(AGE_GUEST_SEED), 1.0, steps)
        for p in driver.points[1:]:                      # [0] is run_steps' own "boot"
            snaps[p["point"]] = {"meminfo": p["meminfo"], "vmstat": p["vmstat"]}
    return snaps


@dataclass
class Comparison:
    ram: str
    workload: tuple[str, ...]
    real: dict[str, dict[str, dict[str, int]]]
    model: dict[str, dict[str, dict[str, int]]]
    real_seconds: float = 0.0
    model_seconds: float = 0.0
    known_differences: tuple[str, ...] = field(default_factory=lambda: KNOWN_DIFFERENCES)
    kernel: str = "6.1"

    def rows(self) -> list[tuple[str, str, int | None, int | None]]:
        out = []
        for point in self.real:
            for key in KEYS:
                src = "meminfo" if key.startswith("DirectMap") else "vmstat"
                r = self.real[point][src].get(key)
                m = self.model.get(point, {}).get(src, {}).get(key)
                out.append((point, key, r, m))
        return out

    def table(self) -> str:
        lines = [f"{'point':<18} {'counter':<26} {'real':>12} {'model':>12} {'diff':>10}"]
        for point, key, r, m in self.rows():
            diff = "" if r is None or m is None else f"{m - r:+d}"
            lines.append(f"{point:<18} {key:<26} {r if r is not None else '-':>12} "
                         f"{m if m is not None else '-':>12} {diff:>10}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({
            "version": 1, "kernel": self.kernel, "ram": self.ram,
            "workload": list(self.workload),
            "real": self.real, "model": self.model,
            "real_seconds": self.real_seconds, "model_seconds": self.model_seconds,
            "known_differences": list(self.known_differences),
        }, indent=1, sort_keys=True)


def calibrate(ram: str, workload: tuple[str, ...], *, install: bool = False,
              timeout: float = 240.0, kernel: str = "6.1") -> Comparison:
    """Run ``kernel`` (5.10, 6.1, 7.2) for real and its record in the model."""
    import time

    rk = RealKernel(install=install, kernel=kernel)
    real: RealRun = rk.run(ram, workload, timeout=timeout)
    t0 = time.perf_counter()
    model = run_model(real.e820_lines(), workload, rk)
    return Comparison(ram, workload, real.snapshots, model, real.seconds,
                      time.perf_counter() - t0, KNOWN_DIFFERENCES_BY_KERNEL[kernel], kernel)


def calibrate_task(task: dict) -> Comparison:
    """One cell of a calibrate grid (a picklable function for the sweep
    engine's executors: each real boot is one task); a failure is a
    CellError naming the cell."""
    from .sweep import CellError
    try:
        return calibrate(task["ram"], tuple(task["workload"]), install=task.get("install", False),
                         timeout=task.get("timeout", 240.0), kernel=task["kernel"])
    except Exception as exc:  # noqa: BLE001 - reported with its cell, never lost in a worker
        raise CellError(f"calibrate kernel={task['kernel']} ram={task['ram']}: "
                        f"{type(exc).__name__}: {exc}", task) from None
