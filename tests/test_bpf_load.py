"""bpf_prog_load's own pages (KernelVersion.bpf_load_pages) against the
recorded real kernels: each program keeps a page of its own besides its JIT
image, and the verifier's buffers come and go before the image."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from dmfrag.placed import read_trace
from dmfrag.registry import bpf_jit_bytes
from guestkernel import Kernel
from guestkernel.owner import PageOwner
from guestkernel.versions import get_version

TRACES = Path(__file__).parent / "data" / "traces"
BPF_TRACES = {"5.10": "linux-5.10-8G-age-8000_bpf-2048.jsonl.gz",
              "6.1": "linux-6.1-8G-bpf-2048_secretmem-4096.jsonl.gz",
              "7.2": "linux-7.2-8G-bpf-2048_secretmem-4096.jsonl.gz"}


@pytest.mark.parametrize("kernel", sorted(BPF_TRACES))
def test_the_record_is_what_each_recorded_program_load_allocates(kernel):
    """In the recorded bpf:2048 step, each bpf_prog_load (from its U marker
    to the next) allocates the record's (order, GFP) in the record's order
    (slab pages aside, which come in between now and then); the transient
    ones are freed before the next load, the kept one is not."""
    _h, events = read_trace(TRACES / BPF_TRACES[kernel])
    record = get_version(kernel).bpf_load_pages
    want = [(order, gfp) for order, gfp, _kept in record]
    starts = [i for i, e in enumerate(events) if e[0] == "U" and e[1] == "bpf_prog_load"]
    assert len(starts) >= 2048
    same = 0
    for i, j in pairwise(starts):
        freed = {e[1] for e in events[i + 1: j] if e[0] == "F"}
        # (5.10's JIT image follows with the GFP of the last buffer)
        allocs = [e for e in events[i + 1: j] if e[0] == "A" and (e[2], e[3]) in want]
        allocs = allocs[:len(want)]
        if [(e[2], e[3]) for e in allocs] != want:
            continue
        same += 1
        for e, (_o, _g, kept) in zip(allocs, record):
            assert (e[1] in freed) != kept, (i, e)
    assert same >= 0.99 * (len(starts) - 1)


@pytest.mark.parametrize("kernel", ["5.10", "6.1", "7.2"])
def test_a_program_keeps_its_own_page_until_it_is_freed(kernel):
    k = Kernel.boot(ram="2G", profile=kernel)
    size = bpf_jit_bytes(2, k)
    k.bpf.load(size)                       # past the first pack/split effects

    def held() -> int:
        states = k.buddy.page_states()
        mine = np.flatnonzero(states == 2)
        return int(np.sum(k.page_owner[mine] != PageOwner.PAGE_TABLE))

    before = held()
    prog = k.bpf.load(size)
    assert len(prog.kept) == 1 and k.buddy.allocated_order(prog.kept[0]) == 0
    image = 1 if kernel == "5.10" else 0   # 5.10: a page of its own; else a pack chunk
    assert held() - before == 1 + image
    k.bpf.free(prog.addr)
    assert held() == before
    k.buddy.check()
    k.validate("full")


FRESH_TRACES = {"5.10": "linux-5.10-8G-bpf-2048.jsonl.gz"}


@pytest.mark.parametrize("kernel", sorted(FRESH_TRACES))
def test_the_slab_rates_are_the_recorded_fresh_steps(kernel):
    """KernelVersion.bpf_load_slab: each kind of new slab page (order, GFP)
    comes once every N programs in a fresh kernel's recorded bpf:2048 step
    (allocated there and never freed), N the nearest whole number. (6.1's
    and 7.2's are in their records' comments, not applied yet:
    versions.BPF_SLAB_NOT_APPLIED says why.)"""
    _h, events = read_trace(TRACES / FRESH_TRACES[kernel])
    snaps = [i for i, e in enumerate(events) if e[0] == "S"]
    step = events[snaps[0]:snaps[1]]
    assert events[snaps[1]][1] == "bpf:2048"
    last_free = {e[1]: i for i, e in enumerate(step) if e[0] == "F"}
    for order, gfp, every in get_version(kernel).bpf_load_slab:
        n = sum(1 for i, e in enumerate(step) if e[0] == "A" and (e[2], e[3]) == (order, gfp)
                and last_free.get(e[1], -1) < i)
        assert n and round(2048 / n) == every, (order, gfp, n)


def _growth(trace: str, workload: str, kernel: str) -> tuple[int, int]:
    """DirectMap4k growth over the last step: Linux's (recorded) and the
    model's own run of the same steps on the recording's memory map."""
    from dmfrag.workloads import run_workload
    header, events = read_trace(TRACES / trace)
    real = [e[2]["meminfo"]["DirectMap4k"] for e in events if e[0] == "S"]
    d = run_workload(workload, e820=header["boot_log"], profile=kernel)
    model = [p["meminfo"]["DirectMap4k"] for p in d.points]
    return real[-1] - real[-2], model[-1] - model[-2]


@pytest.mark.parametrize("trace, workload", [
    ("linux-5.10-8G-bpf-2048.jsonl.gz", "bpf:2048"),
    ("linux-5.10-8G-age-8000_bpf-2048.jsonl.gz", "age:8000,bpf:2048")])
def test_5_10_bpf_growth_is_linuxs_within_ten_percent(trace, workload):
    """Issue 15's goal: 2048 two-instruction programs on 5.10 at 8G grow
    DirectMap4k as Linux's did within 10 %, on a fresh boot (Linux +22.5
    MB) and after aging (8000 pipes, a seeded half closed: Linux +528 MB;
    the 88 MB of the issue's text came from an older aging helper)."""
    real, model = _growth(trace, workload, "5.10")
    assert real > 20000
    assert abs(model - real) <= 0.1 * real, (real, model)
