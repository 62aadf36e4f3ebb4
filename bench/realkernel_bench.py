"""Real kernel vs model: time to boot Linux 6.1 under QEMU (TCG) and run the
module/BPF/secretmem workload, next to the same workload in the model.
``--json`` prints one object."""

from __future__ import annotations

import argparse
import json
import time

from dmfrag.calibrate import run_model
from dmfrag.realkernel import RealKernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default="8G")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rk = RealKernel()
    rk.kernel_dir()
    rk.helpers()
    fig = {"ram": args.ram}
    boot = rk.run(args.ram, ())
    fig["real_boot_s"] = boot.seconds
    wl = ("modules", "bpf", "secretmem")
    run = rk.run(args.ram, wl)
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
