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
