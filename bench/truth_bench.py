"""Ground truth from a real kernel's memory: for a 2 GiB and an 8 GiB guest
of one real kernel (default 6.1), the seconds QEMU takes to dump the guest
(``dump-guest-memory``), drgn to read its state (page tables, free lists,
pageblocks, vmalloc areas ...), and the model to compare itself with it
(``Kernel.from_state`` then the table-by-table and free-page comparison),
and the stored state's size; plus the comparison of the committed states
(tests/data/truth), which needs no QEMU.

``--json`` prints one object. ``--smoke``: 2 GiB only (a check that the
script works, not a measurement). Without qemu-system-x86, busybox-static
and cpio, or drgn, the real-kernel figures are ``skipped``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dmfrag.realkernel import RealKernel, RealKernelError
from dmfrag.truth import (
    TruthError,
    check_drgn,
    compare_free,
    compare_tables,
    load_states,
    model_tables,
    state_bytes,
)
from guestkernel import Kernel

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "truth"


def _compare(state) -> dict:
    """Model from the state, then both comparisons; seconds of each."""
    t0 = time.perf_counter()
    k = Kernel.from_state(state)
    t1 = time.perf_counter()
    pt = compare_tables((state.pt_va, state.pt_level, state.pt_entry), model_tables(k),
                        real_offset=state.page_offset, model_offset=k.page_offset)
    fr = compare_free(state, k.buddy.page_states() == 1)
    t2 = time.perf_counter()
    return {"from_state_s": t1 - t0, "compare_s": t2 - t1,
            "pte_mismatches": pt["pte_mismatches"],
            "free_list_mismatches": fr["free_list_mismatches"],
            "page_table_entries": pt["entries"], "free_blocks": state.free_blocks()}


def _guest(kernel: str, ram: str) -> dict:
    rk = RealKernel(kernel=kernel)
    run = rk.run(ram, (), truth=True, timeout=600)
    st, t = run.states[0], run.dumps[0]
    fig = {"ram": ram, "dump_s": t["dump_s"], "dump_bytes": t["dump_bytes"],
           "extract_s": t["extract_s"], "state_bytes": state_bytes([st]),
           "boot_s": run.seconds}
    fig.update(_compare(st))
    fig["direct_map_equal"] = (run.meminfo("boot")["DirectMap4k"]
                               == st.direct_pages_count[1] * 4)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="6.1", help="the real kernel (default 6.1)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="2 GiB only: a check that the script runs")
    args = ap.parse_args()
    out: dict = {"smoke": args.smoke, "kernel": args.kernel, "committed": {}}
    for npz in sorted(DATA.glob("*.truth.npz")):
        st = load_states(npz)[-1]
        out["committed"][npz.name] = _compare(st)
    try:
        RealKernel(kernel=args.kernel).check_tools()
        check_drgn()
    except (RealKernelError, TruthError) as exc:
        if not args.smoke:
            sys.exit(f"truth_bench: {exc}")
        out["skipped"] = str(exc)
        print(json.dumps(out) if args.json else f"skipped: {exc}")
        return
    out["guests"] = {}
    try:
        for ram in ("2G",) if args.smoke else ("2G", "8G"):
            out["guests"][ram] = _guest(args.kernel, ram)
    except (RealKernelError, TruthError) as exc:
        sys.exit(f"truth_bench: {exc}")
    if args.json:
        print(json.dumps(out))
        return
    for name, c in out["committed"].items():
        print(f"committed {name}: from_state {c['from_state_s']:.2f} s, compare "
              f"{c['compare_s']:.2f} s ({c['page_table_entries']:,} entries, "
              f"{c['free_blocks']:,} free blocks; mismatches {c['pte_mismatches']} / "
              f"{c['free_list_mismatches']})")
    for ram, g in out["guests"].items():
        print(f"{args.kernel} at {ram}: dump {g['dump_s']:.1f} s ({g['dump_bytes'] / 1e9:.2f} GB), "
              f"extract {g['extract_s']:.2f} s, from_state {g['from_state_s']:.2f} s, compare "
              f"{g['compare_s']:.2f} s; state {g['state_bytes']:,} bytes; mismatches "
              f"{g['pte_mismatches']} / {g['free_list_mismatches']}")


if __name__ == "__main__":
    main()
