"""``dmfrag realkernel record``: boot a real Linux under QEMU with tracing
from the first moment, run a workload, and write what the kernel did (every
page allocation and free, every CPA request, the snapshots) as a gzip'd
version-4 trace (see :mod:`dmfrag.recorder`), for ``dmfrag trace replay
--placement real``.

``dmfrag realkernel dump``: the same boot and workload without tracing (so
without the recorder's own footprint: its ring buffer, ftrace trampolines,
kprobe pages), the guest dumped at each snapshot and its whole state stored
(``X.truth.npz``, :mod:`guestkernel.truth`): where an untraced kernel put
things, for ``Kernel.from_state`` and the model's own runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .calibrate import parse_guest_workload
from .common import (
    EXIT_OK,
    ToolMissing,
    UsageError,
    check_boot,
    check_output_file,
    check_timeout,
    check_truth,
)

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..realkernel import DEFAULT_KERNEL, KERNELS
    p = sub.add_parser("realkernel", help="record a real Linux kernel's events")
    rs = p.add_subparsers(dest="realkernel_cmd", required=True)
    rec = rs.add_parser("record", help="boot a real kernel traced, run a workload, write the trace",
                        description="Boot one of Debian's kernels under QEMU with page "
                                    "allocation/free tracepoints, a function-tracer marker and "
                                    "a kprobe on every CPA pass, run the workload's steps and "
                                    "write the events as a gzip'd JSON Lines trace.")
    _boot_args(rec, DEFAULT_KERNEL, KERNELS)
    rec.add_argument("-o", "--output", required=True,
                     help="the trace file (.jsonl.gz); with --grid, a folder for the traces")
    rec.add_argument("--grid", default=None,
                     help="a TOML file of [[trace]] tables (kernel, ram, workload, "
                          "trace_buf_mb): record them all, each boot one task of the sweep "
                          "engine (--workers, --scheduler)")
    rec.add_argument("--workers", type=int, default=None,
                     help="with --grid: parallel boots on this machine (default: its cores)")
    rec.add_argument("--scheduler", default=None,
                     help="with --grid: a Dask scheduler address to run the boots on")
    rec.add_argument("--trace-buf-mb", type=int, default=32,
                     help="the guest's trace buffer in MiB (trace_buf_size; default 32)")
    rec.add_argument("--truth", action="store_true",
                     help="also dump the guest at each snapshot, read its whole state with "
                          "drgn and the kernel's debug vmlinux (fetched once, about 1 GB) and "
                          "store it beside the trace (X.truth.npz; see dmfrag.truth)")
    rec.set_defaults(func=main)
    dump = rs.add_parser("dump", help="boot a real kernel untraced, dump its state at each "
                                      "snapshot, write the states",
                         description="Boot one of Debian's kernels under QEMU without tracing, "
                                     "run the workload's steps, dump the guest at each "
                                     "snapshot (boot first), read its whole state with drgn "
                                     "and the kernel's debug vmlinux, and write the states "
                                     "(.truth.npz) with the real meminfo/vmstat beside them.")
    _boot_args(dump, DEFAULT_KERNEL, KERNELS)
    dump.add_argument("-o", "--output", required=True, help="the states file (.truth.npz)")
    dump.set_defaults(func=main_dump)
    return p


def _boot_args(p: argparse.ArgumentParser, default_kernel: str, kernels) -> None:
    """The options of a real boot that record and dump share."""
    p.add_argument("--kernel", choices=sorted(kernels), default=default_kernel,
                   help=f"the real kernel (default {default_kernel})")
    p.add_argument("--ram", default="2G", help="guest RAM (default 2G)")
    p.add_argument("--workload", default="",
                   help="comma-separated guest steps, each ending in a snapshot named after "
                        "it (as for calibrate); default: boot only")
    p.add_argument("--timeout", type=float, default=600.0, help="kill the guest after this")
    p.add_argument("--install", action="store_true",
                   help="apt-get install missing tools (needs root)")


def main_dump(args: argparse.Namespace) -> int:
    from guestkernel.truth import save_states

    from ..realkernel import RealKernel, RealKernelError
    from ..truth import TruthError
    if not args.output.endswith(".truth.npz"):
        raise UsageError(f"-o/--output {args.output!r} must end in .truth.npz")
    check_output_file(args.output, "-o/--output")
    check_boot(args.ram)
    check_timeout(args.timeout)
    workload = parse_guest_workload(args.workload, args.kernel)
    check_truth()
    try:
        run = RealKernel(install=args.install, kernel=args.kernel).run(
            args.ram, workload, timeout=args.timeout, truth=True)
    except (RealKernelError, TruthError) as exc:
        raise ToolMissing(str(exc)) from None
    if [s.point for s in run.states] != list(run.snapshots):
        raise ToolMissing(f"the guest took snapshots {list(run.snapshots)} but was dumped at "
                          f"{[s.point for s in run.states]}")
    save_states(Path(args.output), run.states)
    print(f"Linux {args.kernel}, RAM {args.ram}, workload {','.join(workload) or '(boot only)'}"
          f" untraced: {len(run.states)} states ({', '.join(run.snapshots)}) in "
          f"{run.seconds:.1f} s, {Path(args.output).stat().st_size:,} bytes: {args.output}")
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    from ..realkernel import RealKernelError
    from ..recorder import record, write_trace
    from ..truth import TruthError
    if args.grid is not None:
        return _grid(args)
    check_output_file(args.output, "-o/--output")
    check_boot(args.ram)
    if not 1 <= args.trace_buf_mb <= 4096:
        raise UsageError(f"--trace-buf-mb must be 1..4096, not {args.trace_buf_mb}")
    check_timeout(args.timeout)
    workload = parse_guest_workload(args.workload, args.kernel)
    if args.truth:
        check_truth()
    try:
        rec = record(args.kernel, args.ram, workload, trace_buf_mb=args.trace_buf_mb,
                     timeout=args.timeout, install=args.install, truth=args.truth)
    except (RealKernelError, TruthError) as exc:
        raise ToolMissing(str(exc)) from None
    size = write_trace(rec, Path(args.output))
    n = len(rec.events)
    secs = rec.header["recorder"]["seconds"]
    print(f"Linux {args.kernel}, RAM {args.ram}, workload {','.join(workload) or '(boot only)'}: "
          f"{n} events in {secs:.1f} s ({n / secs:,.0f} events/s), {size:,} bytes "
          f"({size / 1e6 / max(n, 1) * 1e6:.2f} MB per million events): {args.output}")
    if rec.states:
        from ..truth import truth_path
        tp = truth_path(args.output)
        dumps = rec.header["truth"]["dumps"]
        print(f"  truth: {len(rec.states)} states ({', '.join(s.point for s in rec.states)}), "
              f"dump {sum(d['dump_s'] for d in dumps):.1f} s, read "
              f"{sum(d['extract_s'] for d in dumps):.1f} s, {tp.stat().st_size:,} bytes: {tp}")
    return EXIT_OK


def _grid(args: argparse.Namespace) -> int:
    """--grid: every recording of the TOML file into the -o folder."""
    from ..recorder import load_record_grid, record_task, trace_name
    from ..sweep import CellError, SchedulerUnreachable, run_tasks
    out = Path(args.output)
    if not out.is_dir():
        raise UsageError(f"-o/--output {args.output!r}: with --grid it must be an existing folder")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    try:
        grid = load_record_grid(args.grid)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.truth:
        check_truth()
    tasks = [{**t, "output": str(out / trace_name(t["kernel"], t["ram"], t["workload"])),
              "timeout": args.timeout, "install": args.install, "truth": args.truth}
             for t in grid]
    try:
        rows = run_tasks(record_task, tasks, workers=args.workers, scheduler=args.scheduler)
    except SchedulerUnreachable as exc:
        raise ToolMissing(str(exc)) from None
    except CellError as exc:
        for r in exc.results:
            print(f"recorded {r['output']}: {r['events']} events, {r['bytes']:,} bytes")
        raise ToolMissing(f"{exc} (the recordings before it are written)") from None
    for r in rows:
        print(f"recorded {r['output']}: {r['events']} events, {r['bytes']:,} bytes, "
              f"{r['seconds']:.1f} s")
    return EXIT_OK
