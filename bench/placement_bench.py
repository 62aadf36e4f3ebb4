"""The model's own placement on real request streams: for every committed
recorded trace (tests/data/traces, tests/data/truth and its 8g folder), the modelled replay
(``trace replay --placement model``) in events per second (goal >= 200,000)
and its placement fractions (same pfn, same 2M region as Linux), from the
model's own boot and, where a trace has stored states, from Linux's state
when its tracing started (``--start trace-start``: what no event shows is
Linux's, the boot is the model's) and at the boot dump (``--start boot``:
the workload alone).

``--json`` prints one object. ``--smoke``: the three 2G truth recordings
only (a check that the script works)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dmfrag.modelled import replay_modelled
from dmfrag.placed import read_trace
from dmfrag.truth import TRACE_START, load_states, truth_path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def _figures(path: Path, start: str | None) -> dict:
    _, events = read_trace(path)
    t0 = time.perf_counter()
    r = replay_modelled(path, start=start)
    secs = time.perf_counter() - t0
    p = r.placement()
    # events_per_s: the whole call (reading the trace, the model's boot, the
    # replay); replay_events_per_s: the event loop alone (r.seconds)
    return {"events": len(events), "seconds": secs, "events_per_s": len(events) / secs,
            "replay_events_per_s": len(events) / r.seconds,
            "same_pfn": p["same_pfn"], "same_2m_region": p["same_2m_region"],
            "allocations": p["allocations"], "bulk_pages": r.bulk_pages,
            "bulk_same_pfn": r.bulk_same_pfn, "counters_equal": r.equal,
            "completed": r.error is None}


def _workload(path: Path) -> dict:
    """The trace's header, with ``workload`` only when it has steps (a
    boot-only trace has nothing after its boot dump to replay)."""
    header, _ = read_trace(path)
    return {"workload": header["workload"]} if header.get("workload") else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the 2G truth recordings only")
    args = ap.parse_args()
    traces = sorted((DATA / "truth").glob("*.jsonl.gz"))
    if not args.smoke:
        traces += sorted((DATA / "truth" / "8g").glob("*.jsonl.gz"))
        traces += sorted((DATA / "traces").glob("*.jsonl.gz"))
    out: dict = {"smoke": args.smoke, "traces": {}}
    for t in traces:
        row = {"own_boot": _figures(t, None)}
        if truth_path(t).exists():
            points = load_states(truth_path(t))
            if any(st.point == TRACE_START for st in points):
                row["from_trace_start"] = _figures(t, TRACE_START)
            if any(st.point == "boot" for st in points) and "workload" in _workload(t):
                row["from_boot_dump"] = _figures(t, "boot")
        # (the 8g folder's recording shares a name with a reference trace)
        out["traces"][t.name if t.parent.name != "8g" else f"8g/{t.name}"] = row
    # the goal figure over the whole set, from the model's own boot: every
    # event of every trace over the time of every call (reading, boot,
    # replay), and over the event loops' time alone
    own = [row["own_boot"] for row in out["traces"].values()]
    events = sum(f["events"] for f in own)
    secs = sum(f["seconds"] for f in own)
    loops = sum(f["events"] / f["replay_events_per_s"] for f in own)
    out["all"] = {"traces": len(own), "events": events, "seconds": secs,
                  "events_per_s": events / secs, "replay_events_per_s": events / loops}
    if args.json:
        print(json.dumps(out))
        return
    for name, row in out["traces"].items():
        for how, f in row.items():
            print(f"{name} ({how}): {f['events']:,} events in {f['seconds']:.2f} s = "
                  f"{f['events_per_s']:,.0f} events/s (goal >= 200,000; the event loop "
                  f"alone {f['replay_events_per_s']:,.0f}); same pfn "
                  f"{f['same_pfn']:.3f}, same 2M region {f['same_2m_region']:.3f} over "
                  f"{f['allocations']:,} allocations; bulk pages at Linux's pfn "
                  f"{f['bulk_same_pfn']:,}/{f['bulk_pages']:,}; counters equal: "
                  f"{f['counters_equal']}")
    a = out["all"]
    print(f"all {a['traces']} traces from the model's own boot: {a['events']:,} events in "
          f"{a['seconds']:.2f} s = {a['events_per_s']:,.0f} events/s (goal >= 200,000; the "
          f"event loops alone {a['replay_events_per_s']:,.0f})")


if __name__ == "__main__":
    main()
