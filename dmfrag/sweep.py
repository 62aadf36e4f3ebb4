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
    kernels = ["6.1", "5.10"]   # optional (default ["6.1"]): the kernel records to follow

Every cell is checked when the config is loaded (names, sizes, the RAM
limit, the scale), before any runs: a typo in the last cell does not cost
the hours of the first ones. A cell that fails while running (out of guest
memory) stops the sweep; the finished cells are kept (:class:`CellError`
carries them).
"""

from __future__ import annotations

import itertools
import math
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

__all__ = ["SCHEDULER_TIMEOUT", "CellError", "SchedulerUnreachable", "SweepError", "cells",
           "load_sweep", "run_cell", "run_sweep", "run_tasks"]

#: seconds to wait for a Dask scheduler before giving up (Dask's own default
#: is 30 s, long enough to look like a hang)
SCHEDULER_TIMEOUT = 5.0


class SweepError(ValueError):
    """A malformed sweep config: says which key and why."""


class SchedulerUnreachable(RuntimeError):
    """The Dask scheduler did not answer within :data:`SCHEDULER_TIMEOUT`."""


class CellError(RuntimeError):
    """A cell failed while running. ``results`` holds the rows of the cells
    before it (grid order), finished and kept; ``cell`` the failing one."""

    def __init__(self, message: str, cell: dict | None = None, results: list | None = None):
        super().__init__(message)
        self.cell, self.results = cell, list(results or [])

    def __reduce__(self):   # picklable across process pools and Dask
        return (CellError, (str(self), self.cell, self.results))


def _check_cells(cfg: dict) -> None:
    """Each value of the grid checked as the run would use it."""
    from guestkernel.boot import BootError, e820__memory_setup
    for key in ("workloads", "policies"):
        bad = [v for v in cfg[key] if not isinstance(v, str)]
        if bad:
            raise SweepError(f"{key!r}: every entry must be a string, not {bad[0]!r}")
    bad = [v for v in cfg["seeds"] if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise SweepError(f"'seeds': every entry must be an integer, not {bad[0]!r}")
    for ram in cfg["ram"]:
        if not isinstance(ram, str):
            raise SweepError(f"'ram': every entry must be a size string such as \"2G\", "
                             f"not {ram!r}")
        try:
            e820__memory_setup(None, ram)
        except (ValueError, BootError) as exc:
            raise SweepError(f"'ram' {ram!r}: {exc}") from None
    scale = cfg.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise SweepError(f"'scale' must be a finite number above 0, not {scale!r}")
    tlb = cfg.get("tlb")
    if tlb is not None and not isinstance(tlb, str):
        raise SweepError(f"'tlb' must be a preset name, not {tlb!r}")
    from guestkernel.versions import VERSIONS
    kernels = cfg.get("kernels", ["6.1"])
    if not isinstance(kernels, list) or not kernels:
        raise SweepError("'kernels' must be a non-empty list")
    bad = [v for v in kernels if v not in VERSIONS]
    if bad:
        raise SweepError(f"'kernels': unknown kernel {bad[0]!r}; known: {', '.join(VERSIONS)}")


def load_sweep(path: str | Path) -> dict:
    """The config, every cell checked (see the module's docstring)."""
    try:
        cfg = tomllib.loads(Path(path).read_text())
    except IsADirectoryError:
        raise SweepError(f"cannot read {str(path)!r}: it is a directory") from None
    except OSError as exc:
        raise SweepError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SweepError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: malformed TOML: {exc}") from None
    from guestkernel.policy import policy_names

    from .registry import model_names
    known = {"workloads", "policies", "seeds", "ram", "scale", "tlb", "kernels"}
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
    _check_cells(cfg)
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
    return [{"workload": w, "policy": p, "seed": s, "ram": r, "kernel": kern,
             "scale": cfg.get("scale", 1.0), "tlb": cfg.get("tlb")}
            for kern, w, p, s, r in itertools.product(cfg.get("kernels", ["6.1"]),
                                                      cfg["workloads"], cfg["policies"],
                                                      cfg["seeds"], cfg["ram"])]


def run_cell(cell: dict) -> dict:
    """One grid cell (a pure function: picklable for pools and Dask). A
    failure is a :class:`CellError` naming the cell (picklable, unlike the
    kernel a workload error holds)."""
    from .results import sweep_row
    from .workloads import run_workload
    try:
        d = run_workload(cell["workload"], ram=cell["ram"], policy=cell["policy"],
                         seed=cell["seed"], scale=cell["scale"], profile=cell.get("kernel"))
        return sweep_row(cell, d)
    except Exception as exc:  # noqa: BLE001 - reported with the cell, never lost in a worker
        raise CellError(f"cell {_cell_name(cell)}: {type(exc).__name__}: {exc}", cell) from None


def _cell_name(cell: dict) -> str:
    kernel = cell.get("kernel", "6.1")
    return (f"workload={cell['workload']} policy={cell['policy']} seed={cell['seed']} "
            f"ram={cell['ram']}" + (f" kernel={kernel}" if kernel != "6.1" else ""))


def run_sweep(cfg: dict, *, workers: int | None = None, scheduler: str | None = None,
              progress=None) -> list[dict]:
    """Results in grid order, whichever executor ran them. The first cell
    (in grid order) that fails stops the sweep: the cells not started are
    cancelled and :class:`CellError` carries the finished ones. An
    unreachable scheduler is :class:`SchedulerUnreachable` after
    :data:`SCHEDULER_TIMEOUT` seconds, before any cell runs."""
    return run_tasks(run_cell, cells(cfg), workers=workers, scheduler=scheduler,
                     progress=progress)


def run_tasks(fn, tasks: list, *, workers: int | None = None, scheduler: str | None = None,
              progress=None) -> list:
    """``fn(task)`` for every task on the sweep's executors (a local process
    pool, or the Dask scheduler at ``scheduler``), results in task order.
    ``fn`` must be picklable and raise :class:`CellError` naming its task;
    the first failure (in task order) cancels the tasks not started and
    carries the finished results. The grids of real-kernel boots
    (``calibrate``, ``realkernel record``) run here too: each boot is one
    task."""
    results: list = []
    if scheduler:
        from distributed import Client
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise SchedulerUnreachable(f"no Dask scheduler at {scheduler!r} within "
                                       f"{SCHEDULER_TIMEOUT:.0f} s: {exc}") from None
        with client:
            futures = client.map(fn, tasks, pure=False)
            _collect(futures, results, progress, cancel=client.cancel)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, t) for t in tasks]
            _collect(futures, results, progress,
                     cancel=lambda fs: [f.cancel() for f in fs])
    return results


def _collect(futures: list, results: list, progress, cancel) -> None:
    """Results in order into ``results``; at the first failure, cancel the
    rest and raise :class:`CellError` with the finished rows."""
    for i, fut in enumerate(futures):
        try:
            results.append(fut.result())
        except CellError as exc:
            cancel(futures[i + 1:])
            raise CellError(str(exc), exc.cell, results) from None
        except Exception as exc:  # noqa: BLE001 - a worker that died: the finished cells stay
            cancel(futures[i + 1:])
            raise CellError(f"cell {i + 1}: the worker failed: {type(exc).__name__}: {exc}",
                            None, results) from None
        if progress:
            progress()
