"""What the ``dmfrag`` subcommands share: the exit codes and the errors that
map to them, the workload/boot options, and running one workload for a
command (bad input there is the user's, exit 2, never a traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..registry import model_names

if TYPE_CHECKING:
    from ..workloads import Driver

__all__ = ["EXIT_OK", "EXIT_PROBLEM", "EXIT_TOOL", "EXIT_USAGE", "ToolMissing", "UsageError",
           "add_workload_args", "boot_args", "check_tlb_preset", "config", "policies", "progress",
           "run_one"]

#: the work ran and found nothing wrong
EXIT_OK = 0
#: the work ran and found a problem (validation failure, replay error, a
#: model/real difference with --strict)
EXIT_PROBLEM = 1
#: bad input: usage, unknown names, unreadable files
EXIT_USAGE = 2
#: a missing external tool or package
EXIT_TOOL = 3

T = TypeVar("T")


class UsageError(Exception):
    """Bad input: ``main`` prints ``dmfrag CMD: message`` and exits 2."""


class ToolMissing(Exception):
    """A missing external tool: ``main`` prints ``dmfrag CMD: message`` and
    exits 3."""


def config(args: argparse.Namespace) -> dict:
    """The command's arguments as results record them (every option, not
    the dispatch function)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """--workload, --ram | --e820, --seed, --scale: what picks one model run."""
    names = sorted(model_names())
    p.add_argument("--workload", required=True, choices=names, metavar="W",
                   help=f"one of: {', '.join(names)}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ram", default="4G", help="guest RAM with QEMU's PC layout (default 4G)")
    g.add_argument("--e820", help="a boot log with BIOS-e820 lines (your machine)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="workload size factor")


def boot_args(args: argparse.Namespace) -> dict:
    """How to boot: ``{"ram": ...}`` or the text of the --e820 boot log."""
    if getattr(args, "e820", None):
        try:
            return {"e820": Path(args.e820).read_text(), "ram": None}
        except OSError as exc:
            raise UsageError(f"cannot read --e820 {args.e820!r}: {exc.strerror}") from None
    return {"ram": args.ram}


def run_one(args: argparse.Namespace, policy: str) -> Driver:
    """Boot and run the command's workload on ``policy``. A memory map or
    size the kernel rejects is bad input."""
    from guestkernel.kernel import KernelError

    from ..workloads import run_workload
    boot = boot_args(args)
    try:
        return run_workload(args.workload, ram=boot["ram"], e820=boot.get("e820"), policy=policy,
                            seed=args.seed, scale=args.scale)
    except (ValueError, MemoryError, KernelError) as exc:
        raise UsageError(str(exc)) from None


def policies(spec: str) -> list[str]:
    """``all`` (every policy but the test ones) or a comma-separated list;
    a combination joins names with ``+``."""
    from guestkernel.policy import policy_names
    names = [p for p in policy_names() if not p.startswith("test-")]
    if spec == "all":
        return names
    out = [p.strip() for p in spec.split(",") if p.strip()]
    for p in out:
        for part in p.split("+"):
            if part not in names:
                raise UsageError(f"unknown policy {part!r}; known: {', '.join(names)}")
    return out


def check_tlb_preset(name: str | None) -> None:
    """An unknown --tlb preset is bad input, found before the run (not a
    traceback after it)."""
    if name:
        from emu.tlb import TlbConfigError, preset
        try:
            preset(name)
        except TlbConfigError as exc:
            raise UsageError(str(exc)) from None


def progress(items: list[T], label: str) -> Iterator[T]:
    """A rich progress bar on stderr (quiet when not a terminal)."""
    from rich.progress import Progress
    with Progress(transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task(label, total=len(items))
        for it in items:
            yield it
            prog.advance(task)


