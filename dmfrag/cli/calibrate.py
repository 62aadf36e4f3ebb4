"""``dmfrag calibrate``: boot a real Linux (5.10, 6.1 or 7.2) under QEMU and
the model following that kernel's record on the same memory map, run the same guest workload on both, and compare them
(see :mod:`dmfrag.calibrate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..registry import UnknownWorkload, guest_names, guest_steps, needs_secretmem
from .common import (
    EXIT_OK,
    EXIT_PROBLEM,
    ToolMissing,
    UsageError,
    check_boot,
    check_output_file,
    check_timeout,
)

__all__ = ["add_parser", "main", "parse_guest_workload"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..realkernel import DEFAULT_KERNEL, KERNELS
    p = sub.add_parser("calibrate", help="run a real Linux and the model side by side",
                       description="Boot one of Debian's Linux kernels under QEMU with the "
                                   "given RAM, run the workload, run the same in the model "
                                   "(following that kernel's record), and compare "
                                   "DirectMap4k/2M/1G and the split counters at each point.")
    p.add_argument("--kernel", default=DEFAULT_KERNEL,
                   help=f"the real kernel: {', '.join(sorted(KERNELS))} (default "
                        f"{DEFAULT_KERNEL}); a comma-separated list makes a grid")
    p.add_argument("--ram", default="8G",
                   help="guest RAM, e.g. 2G, 8G (default 8G); a comma-separated list makes "
                        "a grid (each kernel x RAM one real boot, run by the sweep engine)")
    p.add_argument("--workers", type=int, default=None,
                   help="for a grid: parallel boots on this machine (default: its cores)")
    p.add_argument("--scheduler", default=None,
                   help="for a grid: a Dask scheduler address to run the boots on")
    p.add_argument("--workload", default="modules,bpf,secretmem",
                   help="comma-separated steps, run in order, each ending in a snapshot "
                        "named after it: modules, bpf, secretmem (each also takes a "
                        "'-removed'/'-freed' snapshot), age:N (N pipes of 64 KiB, a seeded "
                        "half closed), bpf:N[:K] (N programs of K instructions, held), "
                        "secretmem:N (held), bpftrace[:R] (R runs of 28 programs loaded and "
                        "unloaded), module-churn:N (N loads/removals of the five modules), "
                        "vfree-reset:N (N read-only vmalloc areas with reset perms, a seeded "
                        "half freed, by the project's dmfrag_vfree module built against the "
                        "kernel's headers); default: modules,bpf,secretmem")
    p.add_argument("--json", default="calibrate.json", help="where to write the JSON result")
    p.add_argument("--timeout", type=float, default=240.0, help="kill the guest after this")
    p.add_argument("--install", action="store_true",
                   help="apt-get install missing tools (needs root)")
    p.add_argument("--strict", action="store_true", help="exit 1 if real and model differ")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Inputs (--json's directory, --ram, --timeout, the workloads) are
    checked before QEMU starts: a bad --ram is bad input (2), not a QEMU
    failure (3)."""
    from ..calibrate import calibrate
    from ..realkernel import KERNELS, RealKernelError
    check_output_file(args.json, "--json")
    kernels = [k.strip() for k in args.kernel.split(",") if k.strip()]
    rams = [r.strip() for r in args.ram.split(",") if r.strip()]
    bad = [k for k in kernels if k not in KERNELS]
    if not kernels or bad:
        raise UsageError(f"--kernel {args.kernel!r}: unknown kernel "
                         f"{(bad or [''])[0]!r}; known: {', '.join(sorted(KERNELS))}")
    if not rams:
        raise UsageError("--ram names no size")
    for r in rams:
        check_boot(r)
    check_timeout(args.timeout)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    workloads = {k: parse_guest_workload(args.workload, k) for k in kernels}
    if len(kernels) * len(rams) > 1:
        return _grid(args, kernels, rams, workloads)
    kernel, ram = kernels[0], rams[0]
    workload = workloads[kernel]
    try:
        comp = calibrate(ram, workload, install=args.install, timeout=args.timeout,
                         kernel=kernel)
    except RealKernelError as exc:
        raise ToolMissing(str(exc)) from None
    _print(comp)
    out = Path(args.json)
    out.write_text(comp.to_json())
    print(f"\nwritten: {out}")
    if args.strict and any(r != m for _p, _k, r, m in comp.rows()):
        return EXIT_PROBLEM
    return EXIT_OK


def _print(comp) -> None:
    print(f"Linux {comp.kernel}, RAM {comp.ram}, workload "
          f"{','.join(comp.workload) or '(boot only)'}: real kernel "
          f"{comp.real_seconds:.1f} s, model {comp.model_seconds:.1f} s")
    print(comp.table())
    print("\nKnown differences (not yet modelled):")
    for d in comp.known_differences:
        print(f"  - {d}")


def _grid(args: argparse.Namespace, kernels: list[str], rams: list[str],
          workloads: dict[str, tuple[str, ...]]) -> int:
    """Each kernel x RAM one task of the sweep engine; the JSON file holds
    ``{"version": 1, "cells": [one calibrate JSON per cell]}``."""
    import json

    from ..calibrate import calibrate_task
    from ..sweep import CellError, SchedulerUnreachable, run_tasks
    tasks = [{"kernel": k, "ram": r, "workload": list(workloads[k]), "install": args.install,
              "timeout": args.timeout} for k in kernels for r in rams]
    try:
        comps = run_tasks(calibrate_task, tasks, workers=args.workers,
                          scheduler=args.scheduler)
    except SchedulerUnreachable as exc:
        raise ToolMissing(str(exc)) from None
    except CellError as exc:
        comps, failed = exc.results, exc
    else:
        failed = None
    for comp in comps:
        _print(comp)
        print()
    out = Path(args.json)
    out.write_text(json.dumps({"version": 1, "cells": [json.loads(c.to_json()) for c in comps]},
                              indent=1, sort_keys=True))
    print(f"written: {out} ({len(comps)} of {len(tasks)} cells)")
    if failed is not None:
        raise ToolMissing(f"{failed} (the cells before it are written)")
    if args.strict and any(r != m for c in comps for _p, _k, r, m in c.rows()):
        return EXIT_PROBLEM
    return EXIT_OK


def parse_guest_workload(text: str, kernel: str) -> tuple[str, ...]:
    """--workload for a real guest: known steps, boot only first, no step
    twice, no secretmem on 5.10; else a UsageError naming the problem."""
    workload = tuple(w.strip() for w in text.split(",") if w.strip())
    known = guest_names()
    for w in workload:
        try:
            guest_steps(w)
        except UnknownWorkload as exc:
            if exc.known is None and ":" in w or "model only" in str(exc):
                raise UsageError(str(exc)) from None
            raise UsageError(f"unknown workload {w!r}; known: {', '.join(sorted(known))}, "
                             f"age:N, bpf:N[:K], secretmem:N, bpftrace[:R], module-churn:N, "
                             f"vfree-reset:N") from None
    if "boot" in workload[1:]:
        raise UsageError(f"--workload {text!r}: boot is where every run starts: "
                         f"only first")
    if len(set(workload)) != len(workload):
        raise UsageError(f"--workload {text!r}: a step given twice (each step's "
                         f"snapshot is named after it)")
    if kernel == "5.10" and any(needs_secretmem(w) or w == "secretmem"
                                     for w in workload):
        raise UsageError("Linux 5.10 has no memfd_secret (5.14+): no secretmem step on 5.10")
    return workload
