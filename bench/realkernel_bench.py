"""Real kernels in the loop: per kernel (5.10, 6.1, 7.2) the seconds to boot
it under QEMU (TCG), a recording of a workload (``dmfrag realkernel
record``: events per second of the whole real run, trace MB per million
events) and its placed replay on the model (events per second, model boot
included); the placed replay of the committed aged 5.10 trace (about 235,000
events; no QEMU needed); and, as before, the module/BPF/secretmem workload
on 6.1 next to the model's counterpart.

``--json`` prints one object. ``--smoke`` runs 6.1 only at 2 GiB with a
small recording (a check that the script works, not a measurement); without
qemu-system-x86, busybox-static and cpio the real-kernel figures are
``skipped`` and the committed-trace figure is still measured."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dmfrag.calibrate import run_model
from dmfrag.placed import replay_placed
from dmfrag.realkernel import KERNELS, RealKernel, RealKernelError
from dmfrag.recorder import record, write_trace

WORKLOAD = ("modules", "bpf", "secretmem")
AGED = Path(__file__).resolve().parent.parent / "tests" / "data" / "traces" / \
    "linux-5.10-8G-age-8000_bpf-2048.jsonl.gz"


def _replay_figures(path: Path) -> dict:
    t0 = time.perf_counter()
    r = replay_placed(path)
    secs = time.perf_counter() - t0
    return {"events": r.events, "replay_s": secs, "replay_events_per_s": r.events / secs,
            "equal": r.equal}


def _kernel_figures(kernel: str, ram: str, steps: tuple[str, ...]) -> dict:
    rk = RealKernel(kernel=kernel)
    fig: dict = {"ram": ram, "workload": list(steps)}
    fig["real_boot_s"] = rk.run(ram, ()).seconds
    rec = record(kernel, ram, steps, trace_buf_mb=64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl.gz"
        size = write_trace(rec, path)
        n = len(rec.events)
        secs = rec.header["recorder"]["seconds"]
        fig.update({"record_s": secs, "recorded_events": n, "recorded_events_per_s": n / secs,
                    "trace_bytes": size, "mb_per_million_events": size / 1e6 / n * 1e6})
        rep = _replay_figures(path)
    fig["placed_replay_events_per_s"] = rep["replay_events_per_s"]
    fig["placed_replay_equal"] = rep["equal"]
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram", default=None, help="default 8G (smoke: 2G)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, same code paths: a check that the script runs")
    args = ap.parse_args()
    if args.ram is None:
        args.ram = "2G" if args.smoke else "8G"
    out: dict = {"smoke": args.smoke, "committed_aged_510": _replay_figures(AGED)}
    rk = RealKernel()
    try:
        rk.check_tools()
    except RealKernelError as exc:
        if not args.smoke:
            sys.exit(f"realkernel_bench: {exc}")
        out["skipped"] = str(exc)
        print(json.dumps(out) if args.json else f"skipped: {exc}")
        return
    kernels = ("6.1",) if args.smoke else tuple(KERNELS)
    try:
        out["kernels"] = {}
        for k in kernels:
            steps = ("bpf:16",) if args.smoke else (("bpf:2048",) if k == "5.10"
                                                    else ("bpf:2048", "secretmem:4096"))
            out["kernels"][k] = _kernel_figures(k, args.ram, steps)
        wl = ("secretmem",) if args.smoke else WORKLOAD
        boot, run = rk.run(args.ram, ()), rk.run(args.ram, wl)
    except RealKernelError as exc:
        sys.exit(f"realkernel_bench: {exc}")
    t0 = time.perf_counter()
    run_model(run.e820_lines(), wl, rk)
    model_s = time.perf_counter() - t0
    out["workload_6_1"] = {"workload": list(wl), "real_s": run.seconds - boot.seconds,
                           "model_s": model_s}
    if args.json:
        print(json.dumps(out))
        return
    a = out["committed_aged_510"]
    print(f"placed replay, committed 5.10 aged trace: {a['events']:,} events in "
          f"{a['replay_s']:.2f} s = {a['replay_events_per_s']:,.0f} events/s (goal >= 200,000)")
    for k, f in out["kernels"].items():
        print(f"{k} at {f['ram']}: boot {f['real_boot_s']:.1f} s; record {','.join(f['workload'])}: "
              f"{f['recorded_events']:,} events in {f['record_s']:.1f} s "
              f"({f['recorded_events_per_s']:,.0f} events/s), {f['mb_per_million_events']:.2f} "
              f"MB per million events; placed replay {f['placed_replay_events_per_s']:,.0f} "
              f"events/s, equal to Linux: {f['placed_replay_equal']}")
    w = out["workload_6_1"]
    print(f"6.1 {','.join(w['workload'])}: real {w['real_s']:.1f} s after boot, model "
          f"{w['model_s']:.2f} s")


if __name__ == "__main__":
    main()
