"""``dmfrag sweep CONFIG.toml``: a grid of workloads x policies x seeds x RAM
sizes (see :mod:`dmfrag.sweep`), written as sweep.json and sweep.csv."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_OK, UsageError, config

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="a grid of workloads x policies x seeds x RAM sizes")
    p.add_argument("config", help="the grid as TOML (see dmfrag.sweep)")
    p.add_argument("--workers", type=int, default=None, help="local processes (default: CPUs)")
    p.add_argument("--scheduler", help="a Dask scheduler address (tcp://...) instead")
    p.add_argument("--out", default="sweep-out", help="directory for sweep.json and sweep.csv")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from ..results import metadata
    from ..sweep import SweepError, cells, load_sweep, run_sweep
    try:
        cfg = load_sweep(args.config)
    except SweepError as exc:
        raise UsageError(str(exc)) from None
    grid = cells(cfg)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("sweep", total=len(grid))
        results = run_sweep(cfg, workers=args.workers, scheduler=args.scheduler,
                            progress=lambda: prog.advance(task))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"results": results, **metadata(config(args))},
                                               sort_keys=True, indent=1))
    import csv
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    print(f"{len(results)} cells: {out / 'sweep.json'}, {out / 'sweep.csv'}")
    return EXIT_OK
