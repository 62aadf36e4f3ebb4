"""``dmfrag sweep CONFIG.toml``: a grid of workloads x policies x seeds x RAM
sizes, run in parallel on a local process pool (default) or on a Dask
cluster (``scheduler`` address), with the same results either way.

Config (TOML)::

    workloads = ["mixed", "secretmem"]
    policies = ["baseline", "migrate-unmapped"]   # or "all"
    seeds = [1, 2]
    ram = ["2G", "4G"]
    scale = 0.5          # optional
    tlb = "skylake"      # optional: also price each cell in TLB misses
"""

from __future__ import annotations

import itertools
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

__all__ = ["SweepError", "cells", "load_sweep", "run_cell", "run_sweep"]


class SweepError(ValueError):
    """A malformed sweep config: says which key and why."""


def load_sweep(path: str | Path) -> dict:
    try:
        cfg = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SweepError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: malformed TOML: {exc}") from None
    from guestkernel.policy import policy_names

    from .registry import model_names
    known = {"workloads", "policies", "seeds", "ram", "scale", "tlb"}
    if set(cfg) - known:
        raise SweepError(f"unknown keys {sorted(set(cfg) - known)}; known: {sorted(known)}")
    for key in ("workloads", "policies", "seeds", "ram"):
        if key not in cfg:
            raise SweepError(f"missing key {key!r}")
    if cfg["policies"] == "all":
        cfg["policies"] = [p for p in policy_names() if not p.startswith("test-")]
    for key in ("workloads", "policies", "seeds", "ram"):
        if not isinstance(cfg[key], list) or not cfg[key]:
            raise SweepError(f"{key!r} must be a non-empty list")
    models = model_names()
    bad = [w for w in cfg["workloads"] if w not in models]
    if bad:
        raise SweepError(f"unknown workload {bad[0]!r}")
    names = set(policy_names())
    bad = [p for p in cfg["policies"] for part in p.split("+") if part not in names]
    if bad:
        raise SweepError(f"unknown policy {bad[0]!r}")
    if cfg.get("tlb") is not None:
        from emu.tlb import TlbConfigError, preset
        try:
            preset(cfg["tlb"])
        except TlbConfigError as exc:
            raise SweepError(str(exc)) from None
    return cfg


def cells(cfg: dict) -> list[dict]:
    return [{"workload": w, "policy": p, "seed": s, "ram": r, "scale": cfg.get("scale", 1.0),
             "tlb": cfg.get("tlb")}
            for w, p, s, r in itertools.product(cfg["workloads"], cfg["policies"], cfg["seeds"],
                                                cfg["ram"])]


def run_cell(cell: dict) -> dict:
    """One grid cell (a pure function: picklable for pools and Dask)."""
    from .results import sweep_row
    from .workloads import run_workload
    d = run_workload(cell["workload"], ram=cell["ram"], policy=cell["policy"], seed=cell["seed"],
                     scale=cell["scale"])
    return sweep_row(cell, d)


def run_sweep(cfg: dict, *, workers: int | None = None, scheduler: str | None = None,
              progress=None) -> list[dict]:
    """Results in grid order, whichever executor ran them."""
    grid = cells(cfg)
    if scheduler:
        from distributed import Client
        with Client(scheduler) as client:
            futures = client.map(run_cell, grid, pure=False)
            results = client.gather(futures)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for r in pool.map(run_cell, grid):
                results.append(r)
                if progress:
                    progress()
    return list(results)
