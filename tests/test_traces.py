"""Trace files, version 2: the header carries the e820 lines themselves
(never a file name), a trailer makes a trace cut short visible, and
version 1 is still read (with a warning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmfrag.cli import main
from dmfrag.workloads import TRACE_VERSION, e820_lines, replay, run_workload, trace_text

LOG = Path(__file__).parent / "data" / "dmesg-e820-example.log"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, list[str]]:
    d = run_workload("secretmem", ram="1G", scale=0.05)
    path = tmp_path_factory.mktemp("t") / "t.jsonl"
    path.write_text(trace_text(d))
    return path, path.read_text().splitlines()


def test_a_trace_ends_with_its_trailer(recorded):
    _path, lines = recorded
    head = json.loads(lines[0])
    assert head["version"] == TRACE_VERSION == 2
    assert json.loads(lines[-1]) == {"end": len(lines) - 2}
    d, err = replay(lines)
    assert err is None and d.warnings == []


@pytest.mark.parametrize("cut", [1, 2, 30])
def test_a_trace_cut_short_at_a_line_boundary_is_exit_1_with_the_state(tmp_path, capsys,
                                                                        recorded, cut):
    _path, lines = recorded
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[:-cut]) + "\n")
    code, out, err = cli(capsys, "trace", "replay", str(short))
    assert code == 1
    calls = len(lines) - 1 - cut
    assert (f"trace line {len(lines) - cut + 1}: field 'end': no trailer {{\"end\": N}}: the "
            f"trace ends after {calls} calls, cut short") in err
    res = json.loads(out)
    assert res["replayed_calls"] == calls and res["error"].startswith("trace line")


def test_a_wrong_trailer_or_lines_after_it(tmp_path, capsys, recorded):
    _path, lines = recorded
    n = len(lines) - 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:-1], json.dumps({"end": n + 5})]) + "\n")
    code, _out, err = cli(capsys, "trace", "replay", str(bad))
    assert code == 1 and f"field 'end': the trailer says {n + 5} calls, the trace holds {n}" in err
    bad.write_text("\n".join([*lines, lines[1]]) + "\n")
    code, _out, err = cli(capsys, "trace", "replay", str(bad))
    assert code == 1 and f"field 'line': after the trailer of line {len(lines)}" in err


@pytest.mark.parametrize("line", ["null", "[1, 2]", '"op"', "3"])
def test_a_call_line_that_is_not_an_object_stops_the_replay(tmp_path, capsys, recorded, line):
    _path, lines = recorded
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:5], line, *lines[5:]]) + "\n")
    code, out, err = cli(capsys, "trace", "replay", str(bad))
    assert code == 1 and f"trace line 6: field 'line': must be a JSON object, not {line!r}" in err
    assert json.loads(out)["replayed_calls"] == 4


def test_version_1_is_read_with_a_warning(tmp_path, capsys, recorded):
    _path, lines = recorded
    head = json.loads(lines[0])
    head["version"] = 1
    old = tmp_path / "v1.jsonl"
    old.write_text("\n".join([json.dumps(head), *lines[1:-1]]) + "\n")
    code, out, err = cli(capsys, "trace", "replay", str(old))
    assert code == 0
    assert ("dmfrag trace replay: warning: version-1 trace: it has no trailer, so a trace cut "
            "short cannot be told from a complete one") in err
    res = json.loads(out)
    assert res["replayed_calls"] == len(lines) - 2 and res["warnings"] and res["error"] is None


def test_the_header_keeps_only_the_e820_and_version_lines(tmp_path, capsys):
    log = LOG.read_text()
    trace = tmp_path / "t.jsonl"
    code, _out, _err = cli(capsys, "trace", "record", "--workload", "boot", "--e820", str(LOG),
                           "--scale", "0.05", "-o", str(trace))
    assert code == 0
    kept = json.loads(trace.read_text().splitlines()[0])["boot"]["e820"]
    assert kept == e820_lines(log)
    assert "Command line:" in log and "Command line:" not in kept
    assert kept.splitlines()[0].startswith("Linux version 3.13")
    assert all("e820" in ln or "Linux version" in ln for ln in kept.splitlines())
    d, err = replay(trace.read_text().splitlines())
    assert err is None and d.kernel.profile.name == "3.13"
