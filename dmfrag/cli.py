"""The ``dmfrag`` command line.

Exit codes: 0 success, 1 the work ran and found a problem (a validation
failure, a model/real difference with --strict), 2 bad input (usage,
unknown names), 3 a missing external tool or package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .realkernel import WORKLOAD_STEPS, RealKernelError

    workload = tuple(w for w in args.workload.split(",") if w)
    bad = [w for w in workload if w not in WORKLOAD_STEPS]
    if bad:
        print(f"dmfrag calibrate: unknown workload {bad[0]!r}; known: "
              f"{', '.join(sorted(WORKLOAD_STEPS))}", file=sys.stderr)
        return 2
    try:
        comp = calibrate(args.ram, workload, install=args.install, timeout=args.timeout)
    except RealKernelError as exc:
        print(f"dmfrag calibrate: {exc}", file=sys.stderr)
        return 3
    print(f"RAM {args.ram}, workload {','.join(workload) or '(boot only)'}: real kernel "
          f"{comp.real_seconds:.1f} s, model {comp.model_seconds:.1f} s")
    print(comp.table())
    print("\nKnown differences (not yet modelled):")
    for d in comp.known_differences:
        print(f"  - {d}")
    out = Path(args.json)
    out.write_text(comp.to_json())
    print(f"\nwritten: {out}")
    if args.strict and any(r != m for _p, _k, r, m in comp.rows()):
        return 1
    return 0


def _metadata(args: argparse.Namespace) -> dict:
    from .results import metadata
    return metadata({k: v for k, v in vars(args).items() if k != "func"})


def _boot_args(args) -> dict:
    if getattr(args, "e820", None):
        try:
            return {"e820": Path(args.e820).read_text(), "ram": None}
        except OSError as exc:
            raise _Usage(f"cannot read --e820 {args.e820!r}: {exc.strerror}") from None
    return {"ram": args.ram}


class _Usage(Exception):
    """Bad input: exit 2 with the message."""


def _run_one(args, policy: str):
    from guestkernel.kernel import KernelError

    from .workloads import run_workload
    boot = _boot_args(args)
    try:
        return run_workload(args.workload, ram=boot["ram"], e820=boot.get("e820"), policy=policy,
                            seed=args.seed, scale=args.scale)
    except (ValueError, MemoryError, KernelError) as exc:
        raise _Usage(str(exc)) from None


def _result(args, d) -> dict:
    from .results import run_result
    return run_result(d, workload=args.workload, seed=args.seed, tlb=getattr(args, "tlb", None),
                      config={k: v for k, v in vars(args).items() if k != "func"})


def _cmd_run(args) -> int:
    d = _run_one(args, args.policy)
    res = _result(args, d)
    if args.record:
        Path(args.record).write_text("\n".join(d.lines) + "\n")
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        mi, vm = res["meminfo"], res["vmstat"]
        print(f"{args.workload} on {res['policy']} ({res['calls']} calls): DirectMap4k "
              f"{mi['DirectMap4k']} kB, 2M {mi['DirectMap2M']} kB, 1G {mi['DirectMap1G']} kB; "
              f"splits {vm['direct_map_level2_splits']}/{vm['direct_map_level3_splits']} "
              f"(2M/1G), collapses {vm['direct_map_level2_collapses']}/"
              f"{vm['direct_map_level3_collapses']}")
    if args.validate:
        d.kernel.validate("full")
    return 0


def _policies(spec: str) -> list[str]:
    from guestkernel.policy import policy_names
    names = [p for p in policy_names() if not p.startswith("test-")]
    if spec == "all":
        return names
    out = [p.strip() for p in spec.split(",") if p.strip()]
    for p in out:
        for part in p.split("+"):
            if part not in names:
                raise _Usage(f"unknown policy {part!r}; known: {', '.join(names)}")
    return out


def _progress(items, label: str):
    """A rich progress bar on stderr (quiet when not a terminal)."""
    from rich.progress import Progress
    with Progress(transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task(label, total=len(items))
        for it in items:
            yield it
            prog.advance(task)


def _cmd_compare(args) -> int:
    from .results import compare_row
    rows = []
    series = {}
    for pol in _progress(_policies(args.policies), f"compare {args.workload}"):
        d = _run_one(args, pol)
        res = _result(args, d)
        rows.append(compare_row(pol, d, res))
        series[pol] = {"samples": d.samples, "row": rows[-1]}
    cols = list(rows[0])
    if args.json:
        print(json.dumps({"rows": rows, **_metadata(args)}, sort_keys=True))
    else:
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    if args.plots:
        from .plots import plot_compare
        for path in plot_compare(series, args.plots):
            print(f"plot: {path}", file=sys.stderr)
    return 0


def _cmd_validate(args) -> int:
    from guestkernel.validate import ValidationError
    d = _run_one(args, args.policy)
    try:
        stats = d.kernel.validate(args.mode)
    except ValidationError as exc:
        print(f"dmfrag validate: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"valid: {stats['translated']} pages translated, {stats['table_pages']} table pages, "
          f"{stats.get('executed', 0)} pages loaded by guest code")
    return 0


def _cmd_meminfo(args) -> int:
    d = _run_one(args, args.policy)
    for key, val in d.kernel.meminfo().items():
        print(f"{key + ':':<16}{val:>10} kB")
    return 0


def _cmd_ptdump(args) -> int:
    d = _run_one(args, args.policy)
    sys.stdout.write(d.kernel.ptdump())
    return 0


def _cmd_trace(args) -> int:
    from .workloads import TraceError, replay
    if args.trace_cmd == "record":
        d = _run_one(args, args.policy)
        Path(args.output).write_text("\n".join(d.lines) + "\n")
        print(f"recorded {len(d.lines) - 1} calls to {args.output}")
        return 0
    try:
        lines = Path(args.file).read_text().splitlines()
    except OSError as exc:
        raise _Usage(f"cannot read trace {args.file!r}: {exc.strerror}") from None
    try:
        d, err = replay(lines, policy=args.policy)
    except TraceError as exc:
        raise _Usage(str(exc)) from None
    res = {"meminfo": d.kernel.meminfo(), "vmstat": d.kernel.vmstat(),
           "replayed_calls": len(d.lines) - 1, "error": str(err) if err else None}
    print(json.dumps(res, sort_keys=True))
    if err:
        print(f"dmfrag trace replay: {err} (state up to that line kept and reported)",
              file=sys.stderr)
        return 1
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import SweepError, cells, load_sweep, run_sweep
    try:
        cfg = load_sweep(args.config)
    except SweepError as exc:
        raise _Usage(str(exc)) from None
    from rich.progress import Progress
    grid = cells(cfg)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as prog:
        task = prog.add_task("sweep", total=len(grid))
        results = run_sweep(cfg, workers=args.workers, scheduler=args.scheduler,
                            progress=lambda: prog.advance(task))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"results": results, **_metadata(args)},
                                               sort_keys=True, indent=1))
    import csv
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    print(f"{len(results)} cells: {out / 'sweep.json'}, {out / 'sweep.csv'}")
    return 0


def _cmd_bench(args) -> int:
    import subprocess
    bench = Path(__file__).resolve().parent.parent / "bench"
    scripts = sorted(bench.glob("*.py")) if bench.is_dir() else []
    if not scripts:
        raise _Usage("no bench/ scripts next to the package (run from a source checkout)")
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
    return 0


def _workload_args(p) -> None:
    from .workloads import WORKLOADS
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS), metavar="W",
                   help=f"one of: {', '.join(sorted(WORKLOADS))}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ram", default="4G", help="guest RAM with QEMU's PC layout (default 4G)")
    g.add_argument("--e820", help="a boot log with BIOS-e820 lines (your machine)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="workload size factor")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dmfrag", description="Direct-map fragmentation lab.",
        epilog="Exit codes: 0 success; 1 the check failed (validation, replay error, "
               "--strict difference); 2 bad input; 3 a missing external tool.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one workload on one policy")
    _workload_args(run)
    run.add_argument("--policy", default="baseline")
    run.add_argument("--tlb", metavar="PRESET", help="also price the run in TLB misses")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--record", metavar="FILE", help="write the trace (JSON Lines)")
    run.add_argument("--validate", action="store_true", help="full validation at the end")
    run.set_defaults(func=_cmd_run)
    cmp_ = sub.add_parser("compare", help="one workload on several policies, one table")
    _workload_args(cmp_)
    cmp_.add_argument("--policies", default="all", help="'all' or a comma-separated list")
    cmp_.add_argument("--tlb", metavar="PRESET")
    cmp_.add_argument("--json", action="store_true")
    cmp_.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    cmp_.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    cmp_.set_defaults(func=_cmd_compare)
    val = sub.add_parser("validate", help="run a workload and validate against the CPU")
    _workload_args(val)
    val.add_argument("--policy", default="baseline")
    val.add_argument("--mode", choices=("full", "sample"), default="full")
    val.set_defaults(func=_cmd_validate)
    for name, fn, helptext in (("meminfo", _cmd_meminfo, "meminfo after a workload"),
                               ("ptdump", _cmd_ptdump, "the page tables after a workload")):
        p = sub.add_parser(name, help=helptext)
        _workload_args(p)
        p.add_argument("--policy", default="baseline")
        p.set_defaults(func=fn)
    sw = sub.add_parser("sweep", help="a grid of workloads x policies x seeds x RAM sizes")
    sw.add_argument("config", help="the grid as TOML (see dmfrag.sweep)")
    sw.add_argument("--workers", type=int, default=None, help="local processes (default: CPUs)")
    sw.add_argument("--scheduler", help="a Dask scheduler address (tcp://...) instead")
    sw.add_argument("--out", default="sweep-out", help="directory for sweep.json and sweep.csv")
    sw.set_defaults(func=_cmd_sweep)
    be = sub.add_parser("bench", help="gather every bench/ script's figures")
    be.add_argument("--only", help="comma-separated script names (e.g. tlb,emu_bench)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=_cmd_bench)
    tr = sub.add_parser("trace", help="record or replay a trace")
    trs = tr.add_subparsers(dest="trace_cmd", required=True)
    rec = trs.add_parser("record", help="run a workload and write its trace")
    _workload_args(rec)
    rec.add_argument("--policy", default="baseline")
    rec.add_argument("-o", "--output", required=True)
    rec.set_defaults(func=_cmd_trace)
    rep = trs.add_parser("replay", help="replay a trace (optionally on another policy)")
    rep.add_argument("file")
    rep.add_argument("--policy", default=None)
    rep.set_defaults(func=_cmd_trace)
    cal = sub.add_parser("calibrate", help="run a real Linux 6.1 and the model side by side",
                         description="Boot Debian's Linux 6.1 under QEMU with the given RAM, run "
                                     "the workload, run the same in the model, and compare "
                                     "DirectMap4k/2M/1G and the split counters at each point.")
    cal.add_argument("--ram", default="8G", help="guest RAM, e.g. 2G, 8G (default 8G)")
    cal.add_argument("--workload", default="modules,bpf,secretmem",
                     help="comma-separated: modules, bpf, secretmem (default: all)")
    cal.add_argument("--json", default="calibrate.json", help="where to write the JSON result")
    cal.add_argument("--timeout", type=float, default=240.0, help="kill the guest after this")
    cal.add_argument("--install", action="store_true",
                     help="apt-get install missing tools (needs root)")
    cal.add_argument("--strict", action="store_true", help="exit 1 if real and model differ")
    cal.set_defaults(func=_calibrate)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except _Usage as exc:
        print(f"dmfrag {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
