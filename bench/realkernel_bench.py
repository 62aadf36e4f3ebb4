"""Real kernel vs model: time to boot Linux 6.1 under QEMU (TCG) and run the
module/BPF/secretmem workload, next to the same workload in the model.
``--json`` prints one object. ``--smoke`` boots a 2 GiB guest and runs only
the secretmem step (about 25 s: two QEMU boots; a check that the script
works, not a measurement); without qemu-system-x86, busybox-static and
cpio it reports ``skipped`` instead of failing."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dmfrag.calibrate import run_model
from dmfrag.realkernel import RealKernel, RealKernelError

WORKLOAD = ("modules", "bpf", "secretmem")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default=None, help="default 8G")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, same code paths: a check that the script runs")
    args = ap.parse_args()
    if args.ram is None:
        args.ram = "2G" if args.smoke else "8G"
    wl = ("secretmem",) if args.smoke else WORKLOAD
    rk = RealKernel()
    try:
        rk.check_tools()
    except RealKernelError as exc:
        if not args.smoke:
            sys.exit(f"realkernel_bench: {exc}")
        print(json.dumps({"skipped": str(exc), "smoke": True}) if args.json
              else f"skipped: {exc}")
        return
    try:
        rk.kernel_dir()
        rk.helpers()
        fig = {"ram": args.ram, "workload": list(wl), "smoke": args.smoke}
        boot = rk.run(args.ram, ())
        fig["real_boot_s"] = boot.seconds
        run = rk.run(args.ram, wl)
    except RealKernelError as exc:
        sys.exit(f"realkernel_bench: {exc}")
    fig["real_workload_s"] = run.seconds
    t0 = time.perf_counter()
    run_model(boot.e820_lines(), ())
    fig["model_boot_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_model(run.e820_lines(), wl, rk)
    fig["model_workload_s"] = time.perf_counter() - t0
    fig["workload_speedup"] = fig["real_workload_s"] / fig["model_workload_s"]
    if args.json:
        print(json.dumps(fig))
        return
    print(f"{args.ram}: boot      real {fig['real_boot_s']:6.1f} s   model {fig['model_boot_s']:6.2f} s")
    print(f"{args.ram}: workload  real {fig['real_workload_s']:6.1f} s   model "
          f"{fig['model_workload_s']:6.2f} s  ({fig['workload_speedup']:.0f}x faster)")


if __name__ == "__main__":
    main()
