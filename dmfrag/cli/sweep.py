"""``dmfrag sweep CONFIG.toml``: a grid of workloads x policies x seeds x RAM
sizes (see :mod:`dmfrag.sweep`), written as sweep.json and sweep.csv."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_OK, EXIT_PROBLEM, ToolMissing, UsageError, check_output_dir, config

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="a grid of workloads x policies x seeds x RAM sizes")
    p.add_argument("config", help="the grid as TOML (see dmfrag.sweep)")
    p.add_argument("--workers", type=int, default=None, help="local processes (default: CPUs)")
    p.add_argument("--scheduler", help="a Dask scheduler address (tcp://...) instead")
    p.add_argument("--out", default="sweep-out", help="directory for sweep.json and sweep.csv")
    p.epilog = ("Every cell is checked before any runs. A cell that fails stops the sweep; the "
                "finished cells are written (with completed: false and the error) and the exit "
                "code is 1. An unreachable --scheduler is exit 3 after a few seconds.")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from ..results import metadata
    from ..sweep import (
        CellError,
        SchedulerUnreachable,
        SweepError,
        cells,
        load_sweep,
        run_sweep,
    )
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file, not a directory")
    try:
        cfg = load_sweep(args.config)
    except SweepError as exc:
        raise UsageError(str(exc)) from None
    check_output_dir(args.out, "--out")
    grid = cells(cfg)
    error = None
    with Progress(transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("sweep", total=len(grid))
        try:
            results = run_sweep(cfg, workers=args.workers, scheduler=args.scheduler,
                                progress=lambda: prog.advance(task))
        except SchedulerUnreachable as exc:
            raise ToolMissing(str(exc)) from None
        except CellError as exc:
            results, error = exc.results, str(exc)
    doc = {"results": results, **metadata(config(args))}
    if error is not None:
        doc.update(completed=False, error=error)
    else:
        doc.update(completed=True, error=None)
    (out / "sweep.json").write_text(json.dumps(doc, sort_keys=True, indent=1))
    import csv
    with open(out / "sweep.csv", "w", newline="") as fh:
        if results:
            w = csv.DictWriter(fh, fieldnames=list(results[0]))
            w.writeheader()
            w.writerows(results)
    print(f"{len(results)} cells: {out / 'sweep.json'}, {out / 'sweep.csv'}")
    if error is not None:
        print(f"dmfrag sweep: {error} ({len(results)} of {len(grid)} cells finished before it, "
              f"written)", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK
