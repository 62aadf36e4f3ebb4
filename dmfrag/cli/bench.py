"""``dmfrag bench``: run every bench/ script of a source checkout with
``--json`` and gather their figures (a failing script's record says why)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .common import EXIT_OK, UsageError

__all__ = ["add_parser", "main"]

#: bench/ next to the package (dmfrag/cli/bench.py -> the checkout's root)
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="gather every bench/ script's figures")
    p.add_argument("--only", help="comma-separated script names (e.g. tlb,emu_bench)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    scripts = sorted(BENCH_DIR.glob("*.py")) if BENCH_DIR.is_dir() else []
    if not scripts:
        raise UsageError("no bench/ scripts next to the package (run from a source checkout)")
    figures = {}
    for script in scripts:
        if args.only and script.stem not in args.only.split(","):
            continue
        r = subprocess.run([sys.executable, str(script), "--json"], capture_output=True,
                           text=True, check=False)
        figures[script.stem] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                                else {"error": r.stderr.strip()[-500:]})
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        for name, fig in figures.items():
            print(f"{name}:")
            for key, val in fig.items():
                print(f"  {key:<32} {val:.4g}" if isinstance(val, float) else f"  {key:<32} {val}")
    return EXIT_OK
