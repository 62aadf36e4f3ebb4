"""Every benchmark script runs, at a smoke size, and prints its figures.

Each ``bench/*.py`` is run as ``make bench`` runs it (its own process) with
``--smoke --json``: it must exit 0 and print one JSON object holding the
figures the script is for, with sane values. The numbers of a smoke run are
not measurements (sizes are tiny); what is checked is that nothing in a
script broke unnoticed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
#: the truth recordings (tests/data/truth): one row each in truth_bench and
#: placement_bench --smoke
N_TRUTH = len(list((Path(__file__).parent / "data" / "truth").glob("*.jsonl.gz")))


def run_smoke(script: str, timeout: float = 120) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--json"],
                       capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent,
                       check=False)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stderr[-3000:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, f"{script} --json must print one line, printed:\n{r.stdout}"
    fig = json.loads(lines[0])
    assert fig.pop("smoke") is True
    return fig


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_emu(f: dict) -> None:
    for key in ("bare_loads_per_s", "counted_loads_per_s", "bare_1g_loads_per_s",
                "construct_1GiB_s", "construct_256GiB_s", "max_rss_MiB"):
        assert positive(f.pop(key)), key
    ratio = f.pop("counted_vs_bare_ratio")
    assert positive(ratio)
    assert f == {}


def check_tlb(f: dict) -> None:
    bare, modelled = f.pop("bare_loads_per_s"), f.pop("tlb_loads_per_s")
    assert positive(bare) and positive(modelled)
    assert f.pop("tlb_vs_bare_ratio") == pytest.approx(modelled / bare)
    assert f.pop("preset") == "skylake"
    walks, hits, refs = f.pop("dtlb_load_walks"), f.pop("stlb_hits"), f.pop("walk_mem_refs")
    assert count(walks) and count(hits) and count(refs)
    # 20,000 random loads over 1 GiB of 4K pages: nearly all miss both levels.
    assert 0 < walks + hits <= 20_000 and walks > hits and refs >= walks
    assert f == {}


def check_kernel(f: dict) -> None:
    assert f.pop("ram") == "4G"
    for key in ("boot_s", "boot_max_rss_MiB", "alloc_free_pairs_per_s", "split_cpa_per_s",
                "max_rss_MiB"):
        assert positive(f.pop(key)), key
    assert 1 <= f.pop("level2_splits") <= 20    # one RO page in each of 20 2M pages
    assert f == {}


def check_page_alloc(f: dict) -> None:
    for key in ("order0_pairs_per_s", "order0_burst1000_pairs_per_s", "order3_pairs_per_s",
                "order3_burst1000_pairs_per_s", "build_1TiB_s", "check_1TiB_s", "max_rss_MiB"):
        assert positive(f.pop(key)), key
    assert isinstance(f.pop("build_1TiB_rss_MiB"), (int, float))
    pages = f.pop("managed_1TiB_pages")
    assert count(pages) and 0.99 * (1 << 28) < pages < 1 << 28
    assert f == {}


def check_validate(f: dict) -> None:
    assert f.pop("ram") == "2G"
    for key in ("boot_s", "split_s", "validate_full_s", "pages_translated", "DirectMap4k_kB"):
        assert positive(f.pop(key)), key
    # Split to 4K everywhere: nothing larger is left.
    assert f.pop("DirectMap2M_kB") == 0 and f.pop("DirectMap1G_kB") == 0
    assert f == {}


def check_realkernel(f: dict) -> None:
    aged = f.pop("committed_aged_510")
    from dmfrag.placed import read_trace
    _, events = read_trace(BENCH.parent / "tests" / "data" / "traces" /
                           "linux-5.10-8G-age-8000_bpf-2048.jsonl.gz")
    assert aged.pop("events") == len(events) > 200000 and aged.pop("equal") is True
    assert positive(aged.pop("replay_s")) and positive(aged.pop("replay_events_per_s"))
    assert aged == {}
    if "skipped" in f:
        pytest.skip(f["skipped"])
    k = f.pop("kernels")
    assert list(k) == ["6.1"]
    g = k["6.1"]
    assert g.pop("ram") == "2G" and g.pop("workload") == ["bpf:16"]
    assert g.pop("placed_replay_equal") is True
    assert g.pop("recorded_events") > 5000 and g.pop("trace_bytes") > 10000
    for key in ("real_boot_s", "record_s", "recorded_events_per_s", "mb_per_million_events",
                "placed_replay_events_per_s"):
        assert positive(g.pop(key)), key
    assert g == {}
    w = f.pop("workload_6_1")
    assert w.pop("workload") == ["secretmem"]
    assert positive(w.pop("real_s")) and positive(w.pop("model_s")) and w == {}
    assert f == {}


def check_policies(f: dict) -> None:
    """Every claim ran on its small recordings under its policies; the
    tables of the claims whose recordings are the same at both sizes
    (merge, collapse) are the ones docs/policies-report.md publishes, and
    every Linux row the report publishes is its recording's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("policies_report", BENCH / "policies_report.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    assert f.pop("packed") == {}
    report = (BENCH.parent / "docs" / "policies-report.md").read_text()
    for claim, (_full, small, pols) in rep.CLAIMS.items():
        runs = f.pop(claim)
        assert list(runs) == small
        for name, r in runs.items():
            li = r["linux"]
            assert len(li["points"]) == len(li["directmap_4k_kb"]) >= 2
            for p, m in r["model"].items():
                assert count(m["splits"]) and count(m["peak_split_2m_regions"])
                assert len(m["directmap_4k_kb"]) == len(li["directmap_4k_kb"])
                assert m["peak_split_2m_regions"] >= m["oracle_peak_split_2m_regions"], (p, m)
            assert list(r["model"]) == pols
        if claim in ("merge", "collapse"):
            table = rep.markdown({claim: runs})
            assert table in report, f"docs/policies-report.md's {claim} tables are not {table}"
    assert f == {}
    # the Linux rows of every published table, from the recordings themselves
    import re
    for name in re.findall(r"<!-- table \w+ (\S+) -->", report):
        li = rep.linux(name)
        row = " / ".join(f"{x:,}" for x in li["directmap_4k_kb"])
        assert f"| **Linux** | {row} |" in report, name


def check_tlbcost(f: dict) -> None:
    streams = f.pop("streams")
    assert list(streams) == ["one_page", "spread", "captured"] and f.pop("ram") == "1G"
    assert f.pop("capture_slowdown") is None and "--smoke" in f.pop("capture_slowdown_reason")
    committed = f.pop("capture_slowdown_committed")
    assert sorted(committed) == [f"linux-{k}-1G-age-256.npz" for k in ("5.10", "6.1", "7.2")]
    assert all(1.0 < v < 5.0 for v in committed.values()), committed
    for name, r in streams.items():
        assert r.pop("accesses") == 20_000
        # the capture's stores land on the model's own boot: a few hit a page
        # that Linux had for data and the model for its boot BPF pack
        assert r.pop("faults") == 0 if name != "captured" else r.pop("faults") < 200
        assert positive(r.pop("with_tlb_accesses_per_s")) and positive(r.pop("bare_accesses_per_s"))
        assert 0 < r.pop("replay_vs_bare_ratio") < 10
        walks = r.pop("dtlb_walks")
        assert walks == 1 if name == "one_page" else walks > (100 if name == "spread" else 0)
        assert r == {}
    assert f == {}


def check_truth(f: dict) -> None:
    assert f.pop("kernel") == "6.1"
    committed = f.pop("committed")
    assert len(committed) == N_TRUTH == 8     # the last state of each truth recording
    for c in committed.values():
        assert c.pop("pte_mismatches") == 0 and c.pop("free_list_mismatches") == 0
        assert c.pop("page_table_entries") > 4000 and c.pop("free_blocks") > 100
        assert positive(c.pop("from_state_s")) and positive(c.pop("compare_s")) and c == {}
    if "skipped" in f:
        pytest.skip(f["skipped"])
    g = f.pop("guests")
    assert list(g) == ["2G"]
    g = g["2G"]
    assert g.pop("ram") == "2G" and g.pop("direct_map_equal") is True
    assert g.pop("pte_mismatches") == 0 and g.pop("free_list_mismatches") == 0
    assert g.pop("dump_bytes") > 2 * 10**9 and 10**4 < g.pop("state_bytes") < 10**6
    assert g.pop("page_table_entries") > 4000 and g.pop("free_blocks") > 100
    for key in ("dump_s", "extract_s", "from_state_s", "compare_s", "boot_s"):
        assert positive(g.pop(key)), key
    assert g == {} and f == {}


def check_placement(f: dict) -> None:
    traces = f.pop("traces")
    a = f.pop("all")
    assert len(traces) == N_TRUTH == 8 and f == {}
    assert a.pop("traces") == 8 and a.pop("events") == sum(
        r["own_boot"]["events"] for r in traces.values())
    assert positive(a.pop("seconds")) and positive(a.pop("replay_events_per_s"))
    assert positive(a.pop("events_per_s")) and a == {}
    for name, row in traces.items():
        # a boot recording starts from its trace-start dump; a workload one
        # from its boot dump, and from its trace-start dump too if it has
        # one (recorded since that dump exists: 7.2's)
        starts = ["from_trace_start"] if "-boot." in name else ["from_boot_dump"]
        if "-boot." not in name and "from_trace_start" in row:      # recorded since it exists
            starts.append("from_trace_start")
        runs = [row.pop("own_boot"), *(row.pop(s) for s in starts)]
        assert row == {}, name
        for g in runs:
            assert g.pop("completed") is True and g.pop("events") > 10000
            assert positive(g.pop("seconds")) and positive(g.pop("events_per_s"))
            assert positive(g.pop("replay_events_per_s"))
            assert g.pop("allocations") > 400
            assert 0.0 <= g.pop("same_pfn") <= g.pop("same_2m_region") <= 1.0
            assert 0 <= g.pop("bulk_same_pfn") <= g.pop("bulk_pages")
            assert isinstance(g.pop("counters_equal"), bool) and g == {}


def check_tlbcost_report(f: dict) -> None:
    """The smoke run's two policy rows are docs/tlb-cost.md's, verbatim
    (each row is computed alone: the full run's rows for them are these)."""
    import importlib.util
    assert f.pop("preset") == "skylake"
    pols = f.pop("policies")
    assert f == {} and list(pols) == ["baseline", "per-user-caches"]
    for r in pols.values():
        walks = r["walks"]
        assert walks[2] > walks[1] > 0 and walks[0] >= walks[1]
        assert r["vs_unsplit"] >= 1.0 and 0.0 <= r["position"] <= 1.0
        assert r["faults"] < r["accesses"] // 20
    assert pols["per-user-caches"]["splits"] == 0 < pols["baseline"]["splits"]
    spec = importlib.util.spec_from_file_location("tlbcost_report", BENCH / "tlbcost_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = (BENCH.parent / "docs" / "tlb-cost.md").read_text()
    for line in mod.markdown({"policies": pols}).splitlines()[2:]:
        assert line in doc, line


SCRIPTS: dict[str, tuple[Callable[[dict], None], tuple]] = {
    "emu_bench.py": (check_emu, ()),
    "tlb.py": (check_tlb, ()),
    "kernel_bench.py": (check_kernel, ()),
    "page_alloc_bench.py": (check_page_alloc, ()),
    "validate_bench.py": (check_validate, ()),
    "realkernel_bench.py": (check_realkernel, (pytest.mark.realkernel,)),
    "truth_bench.py": (check_truth, (pytest.mark.realkernel,)),
    "placement_bench.py": (check_placement, ()),
    "policies_report.py": (check_policies, ()),
    "tlbcost_bench.py": (check_tlbcost, ()),
    "tlbcost_report.py": (check_tlbcost_report, ()),
}


def test_every_bench_script_has_a_smoke_check():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", [pytest.param(s, marks=marks, id=s.removesuffix(".py"))
                                    for s, (_, marks) in SCRIPTS.items()])
def test_bench_smoke(script):
    check, _ = SCRIPTS[script]
    check(run_smoke(script, timeout=300 if script in ("realkernel_bench.py", "truth_bench.py")
                    else 120))
