"""The dmfrag command line on tiny guests: each command, determinism,
record/replay, and bad input."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmfrag.cli import main
from dmfrag.workloads import replay, run_workload

TINY = ["--ram", "1G", "--scale", "0.2"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_json_has_meminfo_and_vmstat_on_top(capsys):
    code, out, _ = run(capsys, "run", "--workload", "secretmem", *TINY, "--json")
    assert code == 0
    res = json.loads(out)
    assert res["meminfo"]["DirectMap4k"] > 0 and "direct_map_level2_splits" in res["vmstat"]
    assert res["result_version"] == 3 and res["config"]["seed"] == 1


def test_same_seed_gives_byte_identical_json(capsys):
    a = run(capsys, "run", "--workload", "mixed", *TINY, "--json", "--seed", "5")[1]
    b = run(capsys, "run", "--workload", "mixed", *TINY, "--json", "--seed", "5")[1]
    c = run(capsys, "run", "--workload", "mixed", *TINY, "--json", "--seed", "6")[1]
    assert a == b and a != c


def test_record_then_replay_gives_the_same_state(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    code, _, _ = run(capsys, "run", "--workload", "module-churn", *TINY, "--record", str(trace))
    assert code == 0
    d1 = run_workload("module-churn", ram="1G", scale=0.2)
    d2, err = replay(trace.read_text().splitlines())
    assert err is None
    assert d1.kernel.meminfo() == d2.kernel.meminfo()
    assert d1.kernel.vmstat() == d2.kernel.vmstat()
    assert d1.kernel.ptdump() == d2.kernel.ptdump()


def test_malformed_trace_names_line_and_field_and_keeps_state(tmp_path, capsys):
    d = run_workload("secretmem", ram="1G", scale=0.05)
    lines = d.lines[:10] + ['{"op": "secretmem_free", "args": {"page": "h999"}}'] + d.lines[10:]
    trace = tmp_path / "bad.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "trace", "replay", str(trace))
    assert code == 1
    assert "trace line 11: field 'args.page': unknown handle 'h999'" in err
    res = json.loads(out)
    assert res["replayed_calls"] == 9                    # the state up to line 10 is reported
    assert res["meminfo"]["DirectMap4k"] > 0


def test_compare_validate_meminfo_ptdump(tmp_path, capsys):
    csv = tmp_path / "c.csv"
    code, out, _ = run(capsys, "compare", "--workload", "sockex1", *TINY,
                       "--policies", "baseline,prog-pack", "--csv", str(csv))
    assert code == 0 and "prog-pack" in out
    assert csv.read_text().splitlines()[0].startswith("policy,end_directmap_4k_kb,")
    assert run(capsys, "validate", "--workload", "pagetables", *TINY)[0] == 0
    code, out, _ = run(capsys, "meminfo", "--workload", "boot", *TINY)
    assert code == 0 and out.startswith("MemTotal:")
    code, out, _ = run(capsys, "ptdump", "--workload", "boot", *TINY)
    assert code == 0 and out.startswith("---[ User Space ]---")


#: the fields issue 16 names for every compare row (docs/results.md)
COMPARE_FIELDS = {"policy", "end_directmap_4k_kb", "end_directmap_2m_kb", "end_directmap_1g_kb",
                  "peak_split_2m_regions", "integrated_4k_gib_steps", "splits", "collapses",
                  "alloc_failures", "cached_pages_end", "oracle_peak_split_2m_regions"}


def test_compare_json_rows_carry_the_metrics(capsys):
    """Each row has the contract's fields, sorted by the end state then
    the integrated 4K bytes; the values agree with each other: the end
    state is meminfo's, the peak is at least the end and the bound, the
    integral is at most the largest DirectMap4k over the run's calls, a
    policy that caches reports its pages and merging counts collapses."""
    code, out, _ = run(capsys, "compare", "--workload", "mixed", "--ram", "2G", "--scale", "0.5",
                       "--policies", "baseline,cpa-merge,unmapped-alloc", "--json")
    assert code == 0
    rows = {r["policy"]: r for r in json.loads(out)["rows"]}
    keys = [(r["end_directmap_4k_kb"], r["integrated_4k_gib_steps"])
            for r in json.loads(out)["rows"]]
    assert keys == sorted(keys)
    for r in rows.values():
        assert COMPARE_FIELDS <= set(r), COMPARE_FIELDS - set(r)
        assert r["end_directmap_4k_kb"] == r["DirectMap4k"]
        assert r["end_directmap_4k_kb"] + r["end_directmap_2m_kb"] + r["end_directmap_1g_kb"] \
            == rows["baseline"]["end_directmap_4k_kb"] + rows["baseline"]["end_directmap_2m_kb"] \
            + rows["baseline"]["end_directmap_1g_kb"]
        assert r["peak_split_2m_regions"] >= r["end_split_2m_regions"]
        assert r["peak_split_2m_regions"] - r["oracle_peak_split_2m_regions"] \
            == r["above_oracle"] >= 0
        # DirectMap4k is at most 1 GiB at every call
        assert 0 < r["integrated_4k_gib_steps"] <= r["steps"]
        assert r["splits"] == r["level2_splits"] + r["level3_splits"]
    assert rows["baseline"]["cached_pages_end"] == 0 and rows["baseline"]["collapses"] == 0
    assert rows["unmapped-alloc"]["cached_pages_end"] > 0
    assert rows["unmapped-alloc"]["cached_pages_peak"] >= rows["unmapped-alloc"]["cached_pages_end"]
    assert rows["cpa-merge"]["collapses"] > 0
    assert rows["cpa-merge"]["collapse_entries_scanned"] >= 512 * rows["cpa-merge"]["collapses"]
    assert rows["cpa-merge"]["end_directmap_4k_kb"] <= rows["baseline"]["end_directmap_4k_kb"]


@pytest.mark.parametrize("argv, code, msg", [
    (["run", "--workload", "nope"], 2, "invalid choice"),
    (["run", "--workload", "boot", "--policy", "nope", "--ram", "1G"], 2, "unknown policy 'nope'"),
    (["compare", "--workload", "boot", "--policies", "baseline,zzz", "--ram", "1G"], 2,
     "unknown policy 'zzz'"),
    (["run", "--workload", "boot", "--ram", "32M"], 2, "not in RAM"),
    (["run", "--workload", "boot", "--e820", "/nonexistent"], 2, "cannot read --e820"),
    (["trace", "replay", "/nonexistent.jsonl"], 2, "cannot read trace"),
    (["run", "--workload", "boot", "--ram", "1G", "--tlb", "nope"], 2,
     "unknown TLB preset 'nope'; known: skylake"),
    (["compare", "--workload", "boot", "--ram", "1G", "--tlb", "nope"], 2, "unknown TLB preset"),
])
def test_bad_input_is_one_clear_line(capsys, argv, code, msg):
    try:
        got = main(argv)
    except SystemExit as exc:     # argparse's own usage errors exit 2
        got = exc.code
    _, err = capsys.readouterr()
    assert got == code and msg in err


def test_sweep_local_pool_and_dask_agree(tmp_path):
    from distributed import LocalCluster

    from dmfrag.sweep import load_sweep, run_sweep
    cfg_path = tmp_path / "s.toml"
    cfg_path.write_text('workloads = ["secretmem", "pagetables"]\npolicies = ["baseline", '
                        '"migrate-unmapped"]\nseeds = [1]\nram = ["1G"]\nscale = 0.1\n')
    cfg = load_sweep(cfg_path)
    local = run_sweep(cfg, workers=2)
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=None) as cluster:
        remote = run_sweep(cfg, scheduler=cluster.scheduler_address)
    assert local == remote
    assert [(r["workload"], r["policy"]) for r in local] == [
        ("secretmem", "baseline"), ("secretmem", "migrate-unmapped"),
        ("pagetables", "baseline"), ("pagetables", "migrate-unmapped")]


@pytest.mark.parametrize("text, msg", [
    ("workloads = [", "malformed TOML"),
    ('workloads = ["nope"]\npolicies = ["baseline"]\nseeds = [1]\nram = ["1G"]', "unknown workload 'nope'"),
    ('workloads = ["boot"]\npolicies = ["baseline"]\nseeds = [1]', "missing key 'ram'"),
    ('workloads = ["boot"]\npolicies = ["x"]\nseeds = [1]\nram = ["1G"]', "unknown policy 'x'"),
    ('workloads = ["boot"]\npolicies = ["baseline"]\nseeds = [1]\nram = ["1G"]\ntlb = "x"',
     "unknown TLB preset 'x'"),
])
def test_sweep_bad_config(tmp_path, capsys, text, msg):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    code, _, err = run(capsys, "sweep", str(p), "--out", str(tmp_path / "o"))
    assert code == 2 and msg in err


def test_compare_writes_plots(tmp_path, capsys):
    code, _, _ = run(capsys, "compare", "--workload", "secretmem", *TINY,
                     "--policies", "baseline,unmapped-alloc", "--plots", str(tmp_path))
    assert code == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["directmap_over_time.png", "end_state_and_oracle.png", "splits_over_time.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_python_dash_m_runs_the_same_cli():
    r = subprocess.run([sys.executable, "-m", "dmfrag.cli", "run", "--workload", "bogus"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "invalid choice: 'bogus'" in r.stderr


def test_missing_tool_exits_3_with_one_line(capsys, monkeypatch):
    import dmfrag.calibrate
    from dmfrag.realkernel import RealKernelError

    def missing(*_a, **_k):
        raise RealKernelError("missing qemu-system-x86_64: install it")
    monkeypatch.setattr(dmfrag.calibrate, "calibrate", missing)
    code, _, err = run(capsys, "calibrate", "--workload", "bpf")
    assert code == 3 and err == "dmfrag calibrate: missing qemu-system-x86_64: install it\n"
    code, _, err = run(capsys, "calibrate", "--workload", "bpf,nope")
    assert code == 2 and "unknown workload 'nope'; known: bpf, modules, ptwalk" in err
    code, _, err = run(capsys, "calibrate", "--workload", "bpf,boot")
    assert code == 2 and "boot is where every run starts: only first" in err


def test_registry_faces_agree():
    """Model names are what run accepts, guest names what calibrate accepts;
    a guest workload's model counterpart takes the snapshots its shell steps
    take."""
    from dmfrag import registry
    from dmfrag.calibrate import run_model
    from dmfrag.realkernel import WORKLOAD_STEPS
    from dmfrag.workloads import WORKLOADS
    assert list(WORKLOADS) == registry.model_names()
    assert list(WORKLOAD_STEPS) == ["modules", "bpf", "secretmem", "symbols", "ptwalk", "trace"]
    for w in registry.REGISTRY.values():
        assert w.model or w.guest_steps
        assert (w.calibration is None) == (w.guest_steps is None or w.diagnostic)
    e820 = (Path(__file__).parent / "data" / "dmesg-e820-example.log").read_text()
    snaps = run_model(e820, ("bpf", "secretmem", "trace"), kernel="6.1")   # 3.13: no secretmem
    taken = [line.split()[1] for w in ("bpf", "secretmem")
             for line in registry.guest_steps(w) if line.startswith("snap ")]
    assert list(snaps) == ["boot", *taken]
    with pytest.raises(ValueError, match="unknown workload 'mixed'"):
        run_model(e820, ("mixed",))


def _dmfrag_imports(path: Path, pkg: str) -> list[tuple[str, list[str]]]:
    """(module, names) for every dmfrag import in a file, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module
                                                                 else [])) \
                if node.level else node.module or ""
            if mod.startswith("dmfrag"):
                names = [a.name for a in node.names]
                subs = [f"{mod}.{n}" for n in names
                        if (path.parent / f"{n}.py").exists() and not node.module]
                out.extend((s, []) for s in subs)
                out.append((mod, [] if subs else names))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.startswith("dmfrag"))
    return out


def test_no_import_cycles_and_no_private_names_across_dmfrag_modules():
    root = Path(__file__).resolve().parent.parent / "dmfrag"
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = mod if rel.name == "__init__" else mod.rsplit(".", 1)[0]
        graph[mod] = set()
        for target, names in _dmfrag_imports(path, pkg):
            assert not [n for n in names if n.startswith("_")], (mod, target, names)
            if target != mod:
                graph[mod].add(target)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*stack, m])}")
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for t in sorted(graph[m]):
            visit(t, [*stack, m])
        state[m] = 2
    for m in sorted(graph):
        visit(m, [])


def test_run_says_which_kernel_record_it_followed(capsys):
    """A pasted boot log picks its kernel's record, and run says so."""
    log = Path(__file__).parent / "data" / "dmesg-e820-example.log"
    code, out, _err = run(capsys, "run", "--workload", "boot", "--e820", str(log),
                          "--scale", "0.05", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["kernel"] == "3.13"
    assert res["kernel_reason"].startswith("boot log names Linux 3.13: using the 3.13 record")
    code, out, _err = run(capsys, "run", "--workload", "boot", "--ram", "2G", "--scale", "0.05")
    assert code == 0 and out.splitlines()[-1] == "kernel 6.1 (default)"


def test_kernel_option_picks_the_record_everywhere(tmp_path, capsys):
    """--kernel names the record the model follows; the trace keeps it and
    its replay follows it (or the replay's own --kernel)."""
    code, out, _ = run(capsys, "run", "--workload", "boot", "--ram", "2G", "--scale", "0.05",
                       "--kernel", "5.10", "--json")
    res = json.loads(out)
    assert code == 0 and res["kernel"] == "5.10" and res["kernel_reason"] == "kernel 5.10 (asked for)"
    # 5.10 has no bpf_prog_pack: its boot filter's own module_alloc splits
    # nothing more than 5.10 did (22400 kB of 4K at boot, as Linux 5.10 shows).
    trace = tmp_path / "t.jsonl"
    code, _, _ = run(capsys, "trace", "record", "--workload", "boot", "--ram", "2G",
                     "--scale", "0.05", "--kernel", "5.10", "-o", str(trace))
    assert code == 0 and json.loads(trace.read_text().splitlines()[0])["kernel"] == "5.10"
    code, out, _ = run(capsys, "trace", "replay", str(trace))
    assert code == 0 and json.loads(out)["kernel"] == "5.10"
    assert json.loads(out)["meminfo"] == res["meminfo"]
    code, out, _ = run(capsys, "trace", "replay", str(trace), "--kernel", "6.1")
    assert code == 0 and json.loads(out)["kernel"] == "6.1"
    code, _, err = run(capsys, "run", "--workload", "secretmem", "--ram", "1G", "--kernel", "5.10")
    assert code == 2 and "5.10 has no memfd_secret" in err


def test_sweep_kernels_key(tmp_path):
    from dmfrag.sweep import SweepError, cells, load_sweep
    cfg = tmp_path / "g.toml"
    cfg.write_text('workloads = ["boot"]\npolicies = ["baseline"]\nseeds = [1]\nram = ["2G"]\n'
                   'kernels = ["5.10", "6.1"]\n')
    grid = cells(load_sweep(cfg))
    assert [c["kernel"] for c in grid] == ["5.10", "6.1"]
    cfg.write_text('workloads = ["boot"]\npolicies = ["baseline"]\nseeds = [1]\nram = ["2G"]\n'
                   'kernels = ["4.4"]\n')
    with pytest.raises(SweepError, match="unknown kernel '4.4'; known: 3.13, 5.10, 6.1, 7.2"):
        load_sweep(cfg)


def test_every_model_workload_says_where_its_stream_comes_from(capsys):
    """Issue 15's re-basing: a model workload is a synthetic stream, and
    run --help says so for each, with how far it was held to a real one."""
    from dmfrag import registry
    for name in registry.model_names():
        prov = registry.REGISTRY[name].provenance
        assert prov.startswith("synthetic"), name
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in registry.model_names():
        assert f"{name} (synthetic" in out, name
    assert "trace replay T --placement model" in out
