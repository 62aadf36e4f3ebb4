"""``dmfrag tlbcost``: what a direct-map state costs a stream of kernel
memory accesses, run as the emulated CPU's own loads, stores and fetches
through the state's tables and two references (dmfrag.accesses)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    EXIT_OK,
    UsageError,
    add_workload_args,
    check_policy,
    check_tlb_preset,
    kernel_from_dump,
)

__all__ = ["add_parser", "main"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tlbcost", help="a kernel access stream through a state's direct map "
                                       "and two references, priced in TLB walks")
    p.add_argument("--accesses", required=True, metavar="A",
                   help="the stream: .npz (va uint64, kind uint8 0 load/1 store/2 fetch, "
                        "optional size uint8) or .npy (uint64 addresses: 8-byte loads)")
    add_workload_args(p, required=False)
    p.add_argument("--trace", metavar="T",
                   help="instead of --workload: the state after a recorded trace, replayed "
                        "with the model's placement (trace replay --placement model)")
    p.add_argument("--from-dump", metavar="CORE", default=None,
                   help="instead of --workload/--trace: a real kernel's state (X.truth.npz of "
                        "accesses record --truth, realkernel record --truth or realkernel "
                        "dump; or a core with --vmlinux): the stream replayed on the state it "
                        "ran on, with no placement difference")
    p.add_argument("--vmlinux", metavar="VMLINUX", default=None,
                   help="with --from-dump CORE: the dumped kernel's vmlinux with debug symbols")
    p.add_argument("--point", default=None,
                   help="with --from-dump X.truth.npz: the state's point (default: the last)")
    p.add_argument("--all-regions", action="store_true",
                   help="replay every access of a captured stream (by default only those to "
                        "the direct map and the kernel image, the regions the model maps as "
                        "Linux does; the others are counted under stream.regions)")
    p.add_argument("--policy", default="baseline", help="the policy of the state's run")
    p.add_argument("--tlb", default="skylake", metavar="PRESET")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """The state is a fresh boot (--ram/--kernel), a workload's end, or a
    trace's end; every input is checked before any work. A booted state
    runs the paging mode of the stream (a 5-level capture: a 5-level
    model) unless --paging-levels says otherwise."""
    from ..accesses import AccessFormatError, layout_of, load_accesses, tlbcost
    check_tlb_preset(args.tlb)
    check_policy(args.policy)
    if sum(x is not None for x in (args.trace, args.workload, args.from_dump)) > 1:
        raise UsageError("give one of --workload W, --trace T and --from-dump X, not more")
    try:
        stream = load_accesses(args.accesses)
    except AccessFormatError as exc:
        raise UsageError(str(exc)) from None
    if not len(stream):
        raise UsageError(f"--accesses {args.accesses}: the stream is empty")
    if args.paging_levels is None and args.trace is None and args.from_dump is None:
        # the model runs the paging mode the stream was captured in (None: a
        # stream in no Linux layout, a user's own: the default)
        args.paging_levels = layout_of(stream.va)
    k = _state(args)
    try:
        out = tlbcost(k, stream, args.tlb, all_regions=args.all_regions)
    except ValueError as exc:
        raise UsageError(f"--accesses {args.accesses}: {exc}") from None
    out["source"] = {"accesses": args.accesses, "trace": args.trace, "workload": args.workload,
                     "from_dump": args.from_dump, "point": args.point, "policy": args.policy}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        cols = ("accesses", "dtlb_walks", "walks_4k", "walks_2m", "walks_1g", "stlb_hits",
                "walk_mem_refs", "est_walk_cycles", "dtlb_walks_per_kilo_access", "faults")
        print("run      " + "  ".join(f"{c:>14}" for c in cols))
        for name in ("state", "unsplit", "all_4k"):
            r = out[name]
            print(f"{name:<8} " + "  ".join(
                f"{r[c]:>14.2f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
        st = out["stream"]
        if st.get("left_out"):
            regs = ", ".join(f"{n} {c:,}" for n, c in st["regions"].items() if c)
            print(f"replayed {st['replayed']:,} accesses (the direct map and the image of a "
                  f"{st['paging_levels']}-level stream: {regs}); {st['left_out']:,} left out")
        if st.get("relocated"):
            print(f"the {st['paging_levels']}-level stream's direct-map addresses were moved "
                  f"to the model's {out['paging_levels']}-level direct map (same pfns)")
        pos = out["position"]
        print(f"the state's walk cycles sit at {pos:.3f} between unsplit (0) and all 4K (1)"
              if pos is not None else "unsplit and all 4K walk the same: no position")
    return EXIT_OK


def _state(args: argparse.Namespace):
    from guestkernel import Kernel
    if args.from_dump is not None:
        return kernel_from_dump(args)
    if args.point is not None or args.vmlinux is not None:
        raise UsageError("--point and --vmlinux go with --from-dump")
    if args.trace is not None:
        from ..modelled import replay_modelled
        if args.paging_levels is not None:
            raise UsageError("--paging-levels with --trace: a recorded trace replays in the "
                             "paging mode of the kernel that recorded it")
        from ..placed import PlacedReplayError
        if not Path(args.trace).is_file():
            raise UsageError(f"--trace {args.trace}: no such file")
        try:
            res = replay_modelled(args.trace, policy=args.policy, kernel=args.kernel)
        except PlacedReplayError as exc:
            raise UsageError(str(exc)) from None
        if res.error:
            raise UsageError(f"--trace {args.trace}: {res.error}")
        return res.model
    if args.workload is not None:
        from .common import check_run_args, run_one
        check_run_args(args, [args.policy])
        return run_one(args, args.policy).kernel
    from .common import boot_args, check_boot
    boot = boot_args(args)
    check_boot(boot["ram"], boot.get("e820"))
    return Kernel.boot(ram=boot["ram"], e820=boot.get("e820"), policy=args.policy,
                       profile=args.kernel, paging_levels=args.paging_levels)
