"""The CLI's failure paths: bad input is one line and exit 2, found before
any work (output paths first); a workload that runs out of guest memory is
exit 1 with the state reached; a sweep keeps its finished cells; nothing is
ever a traceback (unless --debug asks for one)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dmfrag.sweep
import dmfrag.workloads
from dmfrag.cli import main

TINY = ["--ram", "1G", "--scale", "0.05"]
#: a run that runs out of guest memory after ~10000 calls, in a few seconds
OOM = ["--workload", "secretmem", "--ram", "96M", "--scale", "12"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:          # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_line(err: str, cmd: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dmfrag {cmd}: "), err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any model run or sweep from here is a test failure: the error must
    come first."""
    def ran(*_a, **_k):
        raise AssertionError("the work ran before the bad input was found")
    monkeypatch.setattr(dmfrag.workloads, "run_workload", ran)
    monkeypatch.setattr(dmfrag.sweep, "run_sweep", ran)


def _files(tmp_path: Path) -> dict:
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "empty.log").write_text("")
    (tmp_path / "binary.log").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return {"dir": str(tmp_path / "adir"), "file": str(tmp_path / "afile"),
            "missing": str(tmp_path / "nope" / "out.x"), "empty": str(tmp_path / "empty.log"),
            "binary": str(tmp_path / "binary.log")}


BAD = [
    # --scale: inf, nan, 0, negative
    (["run", "--workload", "boot", "--scale", "inf"], "--scale must be a finite number above 0"),
    (["run", "--workload", "boot", "--scale", "nan"], "--scale must be a finite number above 0"),
    (["meminfo", "--workload", "boot", "--scale", "0"], "--scale must be a finite number above 0"),
    (["compare", "--workload", "boot", "--scale", "-1"], "not -1.0"),
    # policies
    (["compare", "--workload", "boot", "--policies", ","], "--policies ',' names no policy"),
    (["run", "--workload", "boot", "--policy", "nope"], "unknown policy 'nope'"),
    (["trace", "replay", "{file}", "--policy", "nope"], "--policy: unknown policy 'nope'"),
    # sizes and maps
    (["run", "--workload", "boot", "--ram", "abc"], "cannot read a memory size from 'abc'"),
    (["run", "--workload", "boot", "--ram", "1T"], "beyond the emulated CPU's limit"),
    (["run", "--workload", "boot", "--e820", "{empty}"], "the file is empty"),
    (["run", "--workload", "boot", "--e820", "{dir}"], "it is a directory"),
    (["run", "--workload", "boot", "--e820", "{binary}"], "not UTF-8 text"),
    (["run", "--workload", "boot", "--e820", "{file}"], "no 'BIOS-e820"),
    (["run", "--workload", "boot", "--tlb", "nope"], "unknown TLB preset 'nope'"),
    # output paths, checked first
    (["run", "--workload", "boot", "--record", "{missing}"], "does not exist"),
    (["run", "--workload", "boot", "--record", "{dir}"], "is a directory, not a file"),
    (["compare", "--workload", "boot", "--csv", "{missing}"], "does not exist"),
    (["compare", "--workload", "boot", "--csv", "{dir}"], "is a directory, not a file"),
    (["compare", "--workload", "boot", "--plots", "{file}"], "is a file, not a directory"),
    (["trace", "record", "--workload", "boot", "-o", "{missing}"], "does not exist"),
    (["trace", "record", "--workload", "boot", "-o", "{dir}"], "is a directory"),
    (["calibrate", "--json", "{missing}"], "does not exist"),
    (["calibrate", "--json", "{dir}"], "is a directory"),
    (["calibrate", "--ram", "abc"], "--ram: cannot read a memory size from 'abc'"),
    (["realkernel", "record", "-o", "{missing}"], "does not exist"),
    (["realkernel", "record", "-o", "{dir}"], "is a directory"),
    (["realkernel", "record", "--ram", "abc", "-o", "{file}"], "cannot read a memory size"),
    (["realkernel", "record", "--kernel", "5.10", "--workload", "secretmem:8", "-o", "{file}"],
     "no memfd_secret"),
    (["realkernel", "record", "--workload", "nope", "-o", "{file}"], "unknown workload 'nope'"),
    (["realkernel", "record", "--trace-buf-mb", "0", "-o", "{file}"], "--trace-buf-mb must be"),
    (["realkernel", "record", "--grid", "{file}", "-o", "{dir}"], "cannot read the grid"),
    (["realkernel", "record", "--grid", "{file}", "-o", "{file}"], "must be an existing folder"),
    (["realkernel", "dump", "-o", "{file}"], "must end in .truth.npz"),
    (["realkernel", "dump", "-o", "{missing}.truth.npz"], "does not exist"),
    (["realkernel", "dump", "--ram", "abc", "-o", "{dir}/x.truth.npz"],
     "cannot read a memory size"),
    (["realkernel", "dump", "--workload", "nope", "-o", "{dir}/x.truth.npz"],
     "unknown workload 'nope'"),
    (["realkernel", "dump", "--timeout", "0", "-o", "{dir}/x.truth.npz"], "--timeout must be"),
    (["calibrate", "--kernel", "6.1,nope"], "unknown kernel 'nope'"),
    (["calibrate", "--ram", "2G,abc"], "cannot read a memory size from 'abc'"),
    (["calibrate", "--kernel", "6.1,7.2", "--workers", "0"], "--workers must be at least 1"),
    # trace files
    (["trace", "replay", "{file}", "--placement", "real"], "is not a recorded (version 3 or 4) trace"),
    (["trace", "replay", "{binary}"], "cannot read trace"),
    (["trace", "replay", "{dir}"], "it is a directory"),
]


@pytest.mark.parametrize("argv, msg", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_is_one_line_exit_2_before_any_work(tmp_path, capsys, no_work, argv, msg):
    f = _files(tmp_path)
    argv = [a.format(**f) for a in argv]
    if argv[0] != "calibrate" and "--ram" not in argv and "--e820" not in argv:
        argv += ["--ram", "1G"] if argv[:2] != ["trace", "replay"] else []
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert msg in one_line(err, argv[0])
    assert out == ""
    assert not Path(f["missing"]).parent.exists()                 # nothing created
    assert sorted(p.name for p in Path(f["dir"]).iterdir()) == []  # nothing written
    assert Path(f["file"]).read_text() == "keep me\n"              # nothing overwritten


def _header(**kw) -> str:
    head = {"format": "dmfrag-trace", "version": 2, "boot": {"ram": "1G"}, "policy": "baseline",
            "workload": "boot", "seed": 1, "scale": 0.1}
    head.update(kw)
    return json.dumps(head)


@pytest.mark.parametrize("first, msg", [
    ("null", "trace line 1: field 'format': the header must be a JSON object, not 'null'"),
    ("[1, 2]", "the header must be a JSON object, not '[1, 2]'"),
    (_header(boot={"ram": "abc"}), "field 'boot.ram': cannot read a memory size from 'abc'"),
    (_header(boot={"ram": None}), "field 'boot.ram': must be a size such as \"2G\", not None"),
    (_header(boot={"ram": "1T"}), "field 'boot.ram': RAM '1T' in QEMU's PC layout ends at"),
    (_header(policy="nope"), "field 'policy': unknown policy 'nope'"),
    (_header(version=3), "field 'version': unsupported version 3"),
    # the header carries the map itself: a file name in it is text, never opened
    (_header(boot={"e820": "/etc/shadow"}), "field 'boot.e820': no 'BIOS-e820"),
    (_header(boot={"e820": str(Path(__file__).parent / "data" / "dmesg-e820-example.log")}),
     "field 'boot.e820': no 'BIOS-e820"),
])
def test_bad_trace_header_is_exit_2(tmp_path, capsys, first, msg):
    trace = tmp_path / "t.jsonl"
    trace.write_text(first + "\n" + '{"end": 0}\n')
    code, out, err = cli(capsys, "trace", "replay", str(trace))
    assert code == 2 and msg in one_line(err, "trace") and out == ""


def _oom_calls(capsys) -> int:
    """How many of the OOM workload's calls succeed before one fails (a
    model figure: about 10,000 secretmem faults fill 96M; the tests below
    hold every command to the same one)."""
    code, out, _err = cli(capsys, "run", *OOM, "--json")
    assert code == 1
    calls = json.loads(out)["calls"]
    assert 9000 < calls < 11000
    return calls


def test_out_of_guest_memory_is_exit_1_naming_the_call_with_the_state(tmp_path, capsys):
    n = _oom_calls(capsys)
    rec = tmp_path / "oom.jsonl"
    code, out, err = cli(capsys, "run", *OOM, "--json", "--record", str(rec))
    assert code == 1
    line = one_line(err, "run")
    assert f"workload secretmem: call {n + 1} (secretmem_fault()) failed: AllocationError: " \
           "page allocation failure" in line and "(state up to it reported; the trace" in line
    res = json.loads(out)
    assert res["completed"] is False
    assert res["error"].startswith(f"call {n + 1} (secretmem_fault()")
    assert res["calls"] == n and res["meminfo"]["MemFree"] < 4096   # at the min watermarks
    # the trace of the calls before it is kept; its trailer says the run stopped
    lines = rec.read_text().splitlines()
    assert len(lines) == n + 2
    assert json.loads(lines[-1]) == {"end": n, "error": res["error"]}
    code, out, err = cli(capsys, "trace", "replay", str(rec))
    assert code == 0 and json.loads(out)["replayed_calls"] == n
    assert f"warning: the recorded run stopped after {n} calls: call {n + 1}" in err


def test_out_of_memory_in_other_commands(tmp_path, capsys):
    n = _oom_calls(capsys)
    code, out, err = cli(capsys, "meminfo", *OOM)
    assert code == 1 and out == ""
    assert f"dmfrag meminfo: workload secretmem: call {n + 1} (secretmem_fault())" in one_line(
        err, "meminfo")
    csv = tmp_path / "c.csv"
    code, out, err = cli(capsys, "compare", *OOM, "--policies", "baseline", "--json",
                         "--csv", str(csv))
    assert code == 1 and f"policy baseline: call {n + 1}" in one_line(err, "compare")
    res = json.loads(out)
    assert res["completed"] is False and res["rows"] == [] and f"call {n + 1}" in res["error"]
    assert not csv.exists()
    trace = tmp_path / "t.jsonl"
    code, out, err = cli(capsys, "trace", "record", *OOM, "-o", str(trace))
    assert code == 1 and "(the calls before it are recorded)" in err
    assert json.loads(trace.read_text().splitlines()[-1])["end"] == n


def test_debug_shows_the_traceback(capsys):
    code = main(["--debug", "run", "--workload", "boot", "--ram", "abc"])
    _out, err = capsys.readouterr()
    assert code == 2 and err.startswith("dmfrag run: --ram: cannot read a memory size")
    assert "Traceback (most recent call last)" in err


def test_run_validate_failure_is_exit_1_not_a_traceback(capsys, monkeypatch):
    from guestkernel.kernel import Kernel
    from guestkernel.validate import ValidationError

    def broken(self, mode="full"):
        raise ValidationError("direct-map", "PTE of 0xffff888000000000 disagrees")
    monkeypatch.setattr(Kernel, "validate", broken)
    code, _out, err = cli(capsys, "run", "--workload", "boot", *TINY, "--validate")
    assert code == 1 and "validation FAILED: [direct-map] PTE of 0xffff888000000000" in one_line(err, "run")


def test_an_unexpected_error_is_one_line(capsys, monkeypatch):
    import dmfrag.results
    monkeypatch.setattr(dmfrag.results, "run_result", lambda *a, **k: 1 / 0)
    code, _out, err = cli(capsys, "run", "--workload", "boot", *TINY)
    assert code == 1
    assert "internal error: ZeroDivisionError: division by zero (dmfrag --debug run" in \
        one_line(err, "run")


# -- sweep ------------------------------------------------------------------------

GRID = 'workloads = ["secretmem"]\npolicies = ["baseline"]\nseeds = [1]\n'


@pytest.mark.parametrize("text, msg", [
    (GRID + 'ram = ["1G", "abc"]', "'ram' 'abc': cannot read a memory size from 'abc'"),
    (GRID + 'ram = ["1G", "1T"]', "'ram' '1T': RAM '1T' in QEMU's PC layout ends at 0x10040000000"),
    (GRID + 'ram = ["1G", 2]', "'ram': every entry must be a size string"),
    (GRID + 'ram = ["1G"]\nscale = -1', "'scale' must be a finite number above 0, not -1"),
    (GRID + 'ram = ["1G"]\nscale = inf', "'scale' must be a finite number above 0, not inf"),
    (GRID + 'ram = ["1G"]\ntlb = "nope"', "unknown TLB preset 'nope'"),
    ('workloads = ["boot"]\npolicies = [1]\nseeds = [1]\nram = ["1G"]',
     "'policies': every entry must be a string, not 1"),
    ('workloads = ["boot"]\npolicies = ["baseline"]\nseeds = ["x"]\nram = ["1G"]',
     "'seeds': every entry must be an integer"),
])
def test_sweep_checks_every_cell_before_running_any(tmp_path, capsys, no_work, text, msg):
    cfg = tmp_path / "s.toml"
    cfg.write_text(text)
    code, out, err = cli(capsys, "sweep", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and msg in one_line(err, "sweep") and out == ""
    assert not (tmp_path / "o").exists()


def test_sweep_bad_invocations(tmp_path, capsys, no_work):
    cfg = tmp_path / "s.toml"
    cfg.write_text(GRID + 'ram = ["1G"]')
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\x00\xff\xfe\x80")
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    for argv, msg in [
        ([str(binary)], "not a TOML file (not UTF-8 text)"),
        ([str(cfg), "--out", str(afile)], f"--out {str(afile)!r} is a file, not a directory"),
        ([str(cfg), "--workers", "0"], "--workers must be at least 1, not 0"),
        ([str(tmp_path)], "it is a directory"),
    ]:
        code, _out, err = cli(capsys, "sweep", *argv)
        assert code == 2 and msg in one_line(err, "sweep"), (argv, err)
    assert afile.read_text() == "keep me\n"


def test_sweep_keeps_the_finished_cells_when_one_fails(tmp_path):
    """Run as the installed command: forked pool workers of a test process
    that has run a Dask LocalCluster (test_cli) can die, which is not what
    this test is about (a dead worker is reported the same way)."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(GRID + 'ram = ["256M", "96M", "2G"]\nscale = 12\n')
    out_dir = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "dmfrag.cli", "sweep", str(cfg), "--out",
                        str(out_dir), "--workers", "1"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = one_line(r.stderr, "sweep")
    assert "cell workload=secretmem policy=baseline seed=1 ram=96M: WorkloadError: call" in line
    assert "(1 of 3 cells finished before it, written)" in line
    doc = json.loads((out_dir / "sweep.json").read_text())
    assert doc["completed"] is False and "ram=96M" in doc["error"]
    assert [r["ram"] for r in doc["results"]] == ["256M"]
    assert (out_dir / "sweep.csv").read_text().splitlines()[1].startswith(
        "secretmem,baseline,1,256M")
    assert r.stdout.startswith("1 cells: ")


def test_unreachable_scheduler_fails_fast_with_exit_3(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(GRID + 'ram = ["1G"]')
    t0 = time.monotonic()
    code, _out, err = cli(capsys, "sweep", str(cfg), "--out", str(tmp_path / "o"),
                          "--scheduler", "tcp://127.0.0.1:9")
    assert code == 3 and time.monotonic() - t0 < 20
    assert "no Dask scheduler at 'tcp://127.0.0.1:9' within 5 s" in one_line(err, "sweep")
    assert not (tmp_path / "o" / "sweep.json").exists()


def test_no_traceback_from_the_installed_command(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b'{"format": "dmfrag-trace"}\n\xff\xfe\n')
    r = subprocess.run([sys.executable, "-m", "dmfrag.cli", "trace", "replay", str(trace)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("dmfrag trace: cannot read trace") and "not UTF-8" in r.stderr


# -- the real-kernel harness ------------------------------------------------------


def test_a_failing_qemu_keeps_its_stderr(tmp_path, monkeypatch):
    import dmfrag.realkernel as rk
    k = rk.RealKernel(cache=tmp_path)
    monkeypatch.setattr(k, "check_tools", lambda: None)
    monkeypatch.setattr(k, "kernel_dir", lambda: tmp_path)
    monkeypatch.setattr(k, "build_initramfs", lambda w, dest, **kw: dest)
    monkeypatch.setattr(rk.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(
        a[0], 1, b"", b"qemu-system-x86_64: -m abc: Parameter 'size' expects a non-negative number"))
    with pytest.raises(rk.RealKernelError, match=r"\(qemu exit 1\); qemu said: qemu-system-x86_64: "
                                                 r"-m abc: Parameter 'size' expects"):
        k.run("abc", ())


def test_the_kernel_package_is_pinned_and_its_hash_checked(tmp_path, monkeypatch):
    import dmfrag.realkernel as rk
    k = rk.RealKernel(cache=tmp_path)
    deb = tmp_path / f"{rk.KERNEL_PACKAGE}_{rk.KERNEL_PACKAGE_VERSION}_amd64.deb"
    deb.write_bytes(b"not the package")
    calls = []

    def fake_run(cmd, cwd=None, **_kw):
        calls.append(cmd)
        (Path(cwd) / deb.name).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(rk.subprocess, "run", fake_run)
    with pytest.raises(rk.RealKernelError, match="SHA256 .* is not the 0{64} apt's metadata"):
        k._verified_deb(rk.KERNEL_PACKAGE, rk.KERNEL_PACKAGE_VERSION, "0" * 64)
    assert calls == [["apt-get", "download",
                      f"{rk.KERNEL_PACKAGE}={rk.KERNEL_PACKAGE_VERSION}"]]
    assert deb.read_bytes() == b"not the package"      # a bad download never replaces it
    assert [p.name for p in tmp_path.iterdir()] == [deb.name]   # its temp folder is gone
