"""What the ``dmfrag`` subcommands share: the exit codes and the errors that
map to them, the workload/boot options, and running one workload for a
command (bad input there is the user's, exit 2, never a traceback)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..registry import model_names

if TYPE_CHECKING:
    from ..workloads import Driver

__all__ = ["EXIT_OK", "EXIT_PROBLEM", "EXIT_TOOL", "EXIT_USAGE", "ToolMissing", "UsageError",
           "add_kernel_arg", "add_workload_args", "boot_args", "check_accesses",
           "check_output_dir", "check_output_file", "check_policy", "check_run_args",
           "check_scale", "check_timeout", "check_tlb_preset", "check_truth", "config",
           "kernel_from_dump", "policies", "progress", "read_text", "run_one"]

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
    the dispatch function nor the global --debug)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "debug")}


def add_workload_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--workload, --ram | --e820, --seed, --scale: what picks one model run
    (``required=False``: the command has another source, compare's --trace)."""
    from ..registry import REGISTRY
    names = sorted(model_names())
    named = "; ".join(f"{n} ({REGISTRY[n].provenance})" if REGISTRY[n].provenance else n
                      for n in names).replace("%", "%%")        # argparse formats help
    p.add_argument("--workload", required=required, type=workload_spec, metavar="W",
                   help=f"a model workload: {named}. Or a comma-separated step list run "
                        f"in order, each step ending in a snapshot named after it (run --json "
                        f"'snapshots'): boot, modules, bpf, secretmem, age:N (N pipes of "
                        f"64 KiB, a seeded half closed), bpf:N[:K] (N BPF programs of K "
                        f"instructions, held), secretmem:N (held), bpftrace[:R] (R runs of "
                        f"28 programs loaded and unloaded), module-churn:N (N loads/removals of "
                        f"the five modules), vfree-reset:N (N read-only vmalloc areas with reset "
                        f"perms, a seeded half freed), or a model workload; "
                        f"e.g. age:8000,bpf:2048. The steps are the ones a real guest runs "
                        f"(calibrate, realkernel record); the model's run of them is its own "
                        f"counterpart. For a real kernel's own request stream, record it "
                        f"(realkernel record) and replay it with the model's placement "
                        f"(trace replay T --placement model [--policy P])")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ram", default="4G", help="guest RAM with QEMU's PC layout (default 4G)")
    g.add_argument("--e820", metavar="FILE",
                   help="a boot log file with BIOS-e820 lines (your machine); always a path")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="workload size factor (> 0)")
    add_kernel_arg(p)
    p.add_argument("--paging-levels", type=int, choices=(4, 5), default=None,
                   help="the model's paging mode: 5 (LA57: a PML5 root, PAGE_OFFSET "
                        "0xff11000000000000, as 6.1 and 7.2 run under QEMU -cpu max) or 4 "
                        "(no5lvl, or a CPU without LA57); each with the boot-time allocations "
                        "of that mode. Default: 4-level tables at 0xffff888000000000 with the "
                        "boot-time allocations of the kernel as it ran on the reference machine"
                        " (tlbcost: the stream's mode)")


def workload_spec(spec: str) -> str:
    """``--workload``: a model workload's name, or a step list read now (a
    bad one is a usage error, exit 2, before any work)."""
    from ..registry import REGISTRY, STEP_KINDS, UnknownWorkload, is_single, parse_steps
    if is_single(spec):
        return spec
    if ":" not in spec and "," not in spec and spec not in REGISTRY and spec not in STEP_KINDS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {spec!r} (choose from {', '.join(sorted(model_names()))}; or a "
            f"step list such as age:8000,bpf:2048, see --help)")
    try:
        parse_steps(spec)
    except UnknownWorkload as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def add_kernel_arg(p: argparse.ArgumentParser, help_default: str = "6.1, or the --e820 "
                   "log's kernel") -> None:
    """--kernel: the kernel record the model follows (guestkernel.versions)."""
    from guestkernel.versions import VERSIONS
    p.add_argument("--kernel", choices=list(VERSIONS), default=None,
                   help=f"the kernel the model follows (default {help_default})")


def read_text(path: str, what: str) -> str:
    """A file's text for ``what`` (an option or argument name); anything
    that makes it unreadable is bad input, said in one line."""
    try:
        text = Path(path).read_text()
    except IsADirectoryError:
        raise UsageError(f"cannot read {what} {path!r}: it is a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {what} {path!r}: not UTF-8 text (byte "
                         f"{exc.object[exc.start]:#04x} at offset {exc.start})") from None
    if not text.strip():
        raise UsageError(f"cannot read {what} {path!r}: the file is empty")
    return text


def boot_args(args: argparse.Namespace) -> dict:
    """How to boot: ``{"ram": ...}`` or the text of the --e820 file (always
    a path, read here: the API below takes the text)."""
    if getattr(args, "e820", None) is not None:
        return {"e820": read_text(args.e820, "--e820"), "ram": None}
    return {"ram": args.ram}


def check_scale(scale: object, what: str = "--scale") -> None:
    """A workload size factor: a finite number above 0 (inf, nan, 0 and
    negatives would run forever, nothing, or crash mid-run)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise UsageError(f"{what} must be a finite number above 0, not {scale!r}")


def check_policy(name: object, what: str = "--policy") -> None:
    """A registered policy (or an ``a+b`` combination) before any work."""
    from guestkernel.policy import get_policy
    if not isinstance(name, str) or not name:
        raise UsageError(f"{what} must be a policy name, not {name!r}")
    try:
        get_policy(name)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{what}: {exc}") from None


def check_boot(ram: object = None, e820: str | None = None, what: str = "--ram") -> None:
    """The memory map a run would boot, built and checked (sizes, layout,
    the emulated CPU's RAM limit) without booting: bad input is found before
    any work."""
    from guestkernel.boot import BootError, e820__memory_setup
    try:
        e820__memory_setup(e820, None if e820 is not None else ram)
    except (ValueError, BootError) as exc:
        raise UsageError(f"{'--e820' if e820 is not None else what}: {exc}") from None


def check_run_args(args: argparse.Namespace, pols: list[str]) -> dict:
    """Every input of a model run checked before any work: --scale, the
    policies, the memory map (--ram or the --e820 file). Returns
    :func:`boot_args`."""
    check_scale(args.scale)
    from ..registry import needs_secretmem
    kernel = getattr(args, "kernel", None)
    if kernel is not None and needs_secretmem(args.workload):
        from guestkernel.versions import get_version
        if not get_version(kernel).secretmem:
            raise UsageError(f"--workload {args.workload!r}: Linux {kernel} has no memfd_secret "
                             f"(5.14+)")
    for p in pols:
        check_policy(p)
    boot = boot_args(args)
    check_boot(boot["ram"], boot.get("e820"))
    return boot


def check_output_file(path: str | None, what: str) -> None:
    """A file the command will write, checked before the work: not a
    directory, in a directory that exists and can be written."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a directory, not a file")
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{what} {path!r}: not writable")


def check_output_dir(path: str | None, what: str) -> None:
    """A directory the command will write into, checked (and created, with
    its parents) before the work: a file there is an error."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {path!r} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path!r}: cannot create it: {exc.strerror}") from None
    if not os.access(p, os.W_OK):
        raise UsageError(f"{what} {path!r}: not writable")


def run_one(args: argparse.Namespace, policy: str) -> Driver:
    """Boot and run the command's workload on ``policy``. A memory map or
    size the kernel rejects is bad input; a workload running out of guest
    memory is not (it raises :class:`dmfrag.workloads.WorkloadError`, exit
    1, with the state reached)."""
    from guestkernel.kernel import KernelError

    from ..workloads import run_workload
    boot = boot_args(args)
    try:
        return run_workload(args.workload, ram=boot["ram"], e820=boot.get("e820"), policy=policy,
                            seed=args.seed, scale=args.scale, profile=args.kernel,
                            paging_levels=getattr(args, "paging_levels", None))
    except (ValueError, MemoryError, KernelError) as exc:
        raise UsageError(str(exc)) from None


def policies(spec: str) -> list[str]:
    """``all`` (every policy but the test ones) or a comma-separated list;
    a combination joins names with ``+``. An empty list is bad input."""
    from guestkernel.policy import policy_names
    names = [p for p in policy_names() if not p.startswith("test-")]
    if spec == "all":
        return names
    out = [p.strip() for p in spec.split(",") if p.strip()]
    if not out:
        raise UsageError(f"--policies {spec!r} names no policy; give 'all' or a comma-separated "
                         f"list of: {', '.join(names)}")
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


def kernel_from_dump(args: argparse.Namespace):
    """The kernel a --from-dump run starts from (``run``, ``tlbcost``;
    every input checked first: exit 2 naming what is wrong)."""
    from guestkernel.kernel import Kernel, KernelError

    from ..truth import TruthError, load_states
    path = Path(args.from_dump)
    if str(path) != "/proc/kcore" and not path.is_file():
        raise UsageError(f"--from-dump {args.from_dump!r}: no such file")
    if getattr(args, "record", None):
        raise UsageError("--record with --from-dump: a model trace starts from a boot, this run "
                         "starts from a dumped kernel's state")
    if getattr(args, "paging_levels", None) is not None:
        raise UsageError("--paging-levels with --from-dump: the model runs the paging mode the "
                         "dumped kernel ran in")
    kw = {"policy": args.policy, "profile": args.kernel}
    try:
        if path.suffix == ".npz":
            if args.vmlinux is not None:
                raise UsageError("--vmlinux is for a core; a stored state (.npz) needs none")
            states = load_states(path)
            if args.point is None:
                state = states[-1]
            else:
                found = [s for s in states if s.point == args.point]
                if not found:
                    raise UsageError(f"--point {args.point!r}: {path} holds "
                                     f"{', '.join(s.point for s in states)}")
                state = found[0]
            return Kernel.from_state(state, **kw)
        if args.point is not None:
            raise UsageError("--point is for a stored state (.npz), not a core")
        if args.vmlinux is None:
            raise UsageError("--from-dump CORE needs --vmlinux VMLINUX (the kernel's debug "
                             "symbols)")
        return Kernel.from_dump(path, args.vmlinux, **kw)
    except (TruthError, KernelError) as exc:
        raise UsageError(str(exc)) from None


def check_truth() -> None:
    """--truth needs drgn: exit 2 before any boot when it is missing."""
    from ..truth import TruthError, check_drgn
    try:
        check_drgn()
    except TruthError as exc:
        raise UsageError(str(exc)) from None


def check_timeout(seconds: float, what: str = "--timeout") -> None:
    """A guest's time limit: a finite number of seconds above 0."""
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{what} must be a finite number of seconds above 0, not {seconds}")


def check_accesses(args: argparse.Namespace) -> None:
    """``--accesses A`` (run, compare): a readable stream, and only with
    ``--tlb`` (what it is for)."""
    if getattr(args, "accesses", None) is None:
        return
    if not getattr(args, "tlb", None):
        raise UsageError("--accesses goes with --tlb (the stream prices the state)")
    from ..accesses import AccessFormatError, load_accesses
    try:
        load_accesses(args.accesses)
    except AccessFormatError as exc:
        raise UsageError(f"--accesses: {exc}") from None
