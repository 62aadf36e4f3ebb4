"""Random sequences of kernel operations on a 6 GiB guest with 1G pages,
validated after every step, for every registered policy (policies added
later are covered automatically). A failure is printed by hypothesis as a
replayable list of calls on the state machine.

Protections live across steps: ``protect`` makes pages (one page of a block,
or the whole block) RO, not present, NX, executable or RO+X and keeps them
that way in the ``protected`` bundle; only ``unprotect``, a later step,
restores them. Movable pages come from the top of RAM, inside 1G pages, so
protecting one page there splits a 1G page (and ``cpa-merge`` and
``cpa-collapse`` can put it back together). Every step ends with a sampled
validation (the pages touched since the last one, plus a sample, by the
CPU's own walk), every example with a full one.

Runtime: the hypothesis profiles of ``tests/conftest.py`` ("ci" by default,
``--hypothesis-profile=long`` for a long run).
"""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from emu import PageFault
from guestkernel import Kernel
from guestkernel import gfp as G
from guestkernel.page_alloc import AllocationError
from guestkernel.policy import policy_names
from policies.oracle import OracleTracker

POLICIES = [p for p in policy_names() if not p.startswith("test-")]
#: QEMU's -m 6G: 1G leaves at [1G,2G), [5G,6G), [6G,7G) after boot
RAM = "6G"
#: GFP_UNMAPPED has its own rule (alloc_unmapped)
GFPS = [G.GFP_KERNEL, G.GFP_HIGHUSER_MOVABLE, G.GFP_KERNEL | G.GFP_ZERO, G.GFP_DMA32]
#: up to order 4, and whole 2M blocks
ORDERS = st.integers(0, 4) | st.just(9)
#: a protection and the calls that undo it (the direct map's default is RW+NX)
PROTECT = {"ro": ("rw",), "np": ("p",), "nx": (), "x": ("nx",), "rox": ("rw", "nx")}
#: what the CPU must allow on a page under each protection: read, write, fetch
ALLOWS = {"ro": "r", "np": "", "nx": "rw", "x": "rwx", "rox": "rx", None: "rw"}


@dataclass(frozen=True)
class Block:
    pfn: int
    order: int


@dataclass(frozen=True)
class Protected:
    block: Block
    first: int                # first page protected, relative to the block
    npages: int
    op: str


#: what the examples did, per policy: a test of the test (1G pages were hit)
SEEN: dict[str, dict[str, int]] = {}


def machine_for(policy: str):
    seen = SEEN.setdefault(policy, {"level3_splits": 0, "level3_collapses": 0,
                                    "level2_collapses": 0, "protected": 0, "examples": 0})

    class KernelOps(RuleBasedStateMachine):
        blocks = Bundle("blocks")          # held, mapped as the direct map's default
        unmapped = Bundle("unmapped")      # held, GFP_UNMAPPED (its owner never remaps it)
        protected = Bundle("protected")

        @initialize(target=protected, op=st.sampled_from(["ro", "np", "x", "rox"]))
        def boot_and_split_a_1g_page(self, op):
            """Boot, then protect one movable page inside a 1G page, which
            the call splits (1G -> 2M -> 4K); and one page of a 2M block."""
            self.k = Kernel.boot(ram=RAM, policy=policy)
            self.oracle = OracleTracker(self.k)
            self.areas: list[int] = []
            self.secrets: list[int] = []
            self.modules: list[str] = []
            self.live: set[Protected] = set()
            self.steps = 0
            seen["examples"] += 1
            block = Block(self._page_in_a_1g_page(), 0)
            va = self.k.pfn_to_virt(block.pfn)
            assert self.k.lookup_address(va)[1] == 3
            p = self._protect(block, op, 0, 1)
            assert self.k.lookup_address(va)[1] == 1
            assert self.k.vmstat()["direct_map_level3_splits"] == 1
            # and a whole 2M block with one page protected (its 2M page split)
            block = Block(self.k.alloc_pages(G.GFP_KERNEL, 9), 9)
            q = self._protect(block, op, 3, 1)
            assert self.k.lookup_address(self.k.pfn_to_virt(block.pfn))[1] == 1
            return multiple(p, q)

        def _page_in_a_1g_page(self) -> int:
            """A movable page the direct map maps with a whole 1G page: the
            top 1G page is split at boot, as in Linux (the boot
            bpf_prog_pack takes the per-CPU unit's free tail), so the
            movable 4M blocks are taken until one lies below it."""
            k, passed = self.k, []
            while True:
                pfn = k.alloc_pages(G.GFP_HIGHUSER_MOVABLE, 10)
                if k.lookup_address(k.pfn_to_virt(pfn))[1] == 3:
                    break
                passed.append(pfn)
            for p in passed:
                k.free_pages(p, 10)
            k.split_pages(pfn, 10)
            for p in range(pfn + 1, pfn + 1024):
                k.free_pages(p, 0)
            return pfn

        def _alloc(self, gfp, order):
            try:
                return Block(self.k.alloc_pages(gfp, order), order)
            except AllocationError:
                return multiple()

        @rule(target=blocks, order=ORDERS, gfp=st.sampled_from(GFPS))
        def alloc_pages(self, order, gfp):
            return self._alloc(gfp, order)

        @rule(target=unmapped, order=ORDERS)
        def alloc_unmapped(self, order):
            return self._alloc(G.GFP_KERNEL | G.GFP_UNMAPPED, order)

        @rule(block=consumes(blocks) | consumes(unmapped))
        def free_pages(self, block):
            self.k.free_pages(block.pfn, block.order)

        def _protect(self, block, op, first, npages):
            getattr(self.k, f"set_memory_{op}")(self.k.pfn_to_virt(block.pfn + first), npages)
            seen["protected"] += 1
            p = Protected(block, first, npages, op)
            self.live.add(p)
            return p

        def _unprotect(self, p):
            for undo in PROTECT[p.op]:
                getattr(self.k, f"set_memory_{undo}")(
                    self.k.pfn_to_virt(p.block.pfn + p.first), p.npages)
            self.live.remove(p)

        @rule(target=protected, block=consumes(blocks), op=st.sampled_from(sorted(PROTECT)),
              whole=st.booleans(), at=st.integers(0, 1 << 16))
        def protect(self, block, op, whole, at):
            n = 1 << block.order
            first, npages = (0, n) if whole else (at % n, 1)
            return self._protect(block, op, first, npages)

        @rule(target=protected, p=consumes(protected))
        def make_block_code(self, p):
            """The user of a block it protected part of makes all of it code
            (RO+X, as BPF and module loads do; 6.15 collapses after it)."""
            self._unprotect(p)
            return self._protect(p.block, "rox", 0, 1 << p.block.order)

        @rule(target=blocks, p=consumes(protected))
        def unprotect(self, p):
            self._unprotect(p)
            return p.block

        @rule(block=blocks, op=st.sampled_from(["rw", "nx", "4k"]))
        def set_memory_same(self, block, op):
            """Calls that leave a held, unprotected block as it is (or only
            mark it 4K-only): no change a later step has to undo."""
            getattr(self.k, f"set_memory_{op}")(self.k.pfn_to_virt(block.pfn), 1 << block.order)

        @rule(pages=st.integers(1, 40), reset=st.booleans())
        def vmalloc(self, pages, reset):
            area = self.k.vmalloc.vmalloc_node_range(pages * 4096)
            if reset:
                self.k.vmalloc.set_vm_flush_reset_perms(area.addr)
                self.k.set_memory_ro(area.addr, pages)
            self.areas.append(area.addr)

        @precondition(lambda self: self.areas)
        @rule(i=st.integers(0, 1 << 16))
        def vfree(self, i):
            self.k.vfree(self.areas.pop(i % len(self.areas)))

        @rule()
        def secretmem_fault(self):
            self.secrets.append(self.k.secretmem.fault())

        @precondition(lambda self: self.secrets)
        @rule(i=st.integers(0, 1 << 16))
        def secretmem_free(self, i):
            self.k.secretmem.free(self.secrets.pop(i % len(self.secrets)))

        @rule(text=st.integers(1, 40000), rodata=st.integers(0, 20000), data=st.integers(0, 20000))
        def load_module(self, text, rodata, data):
            name = f"m{len(self.modules)}_{self.steps}"
            self.k.modules.load_module(name, text, rodata, 0, data)
            self.modules.append(name)

        @precondition(lambda self: self.modules)
        @rule(i=st.integers(0, 1 << 16))
        def delete_module(self, i):
            self.k.modules.delete_module(self.modules.pop(i % len(self.modules)))

        def _check_cpu(self, block, first, npages, op):
            """The CPU's own answer for the first, a middle and the last page
            (not the model's record of what it asked for)."""
            for i in sorted({first, first + npages // 2, first + npages - 1}):
                va, pa = self.k.pfn_to_virt(block.pfn + i), (block.pfn + i) << 12
                for access in "rwx":
                    try:
                        got = self.k.machine.translate(va, access)
                    except PageFault:
                        got = None
                    want = pa if access in ALLOWS[op] else None
                    assert got == want, (op, hex(va), access, got)

        @invariant()
        def protections_hold(self):
            for p in self.live:
                self._check_cpu(p.block, p.first, p.npages, p.op)

        @invariant()
        def within_the_oracle(self):
            """No placement goes below the oracle's bound (docs/oracle.md);
            while nothing has merged, not below the no-merge bound either."""
            any_run, no_merge = self.oracle.now()
            split = self.k.pgt.split_2m_regions(self.k.max_pfn)
            v = self.k.vmstat()
            assert split >= any_run, (split, any_run)
            if not v["direct_map_level2_collapses"] + v["direct_map_level3_collapses"]:
                assert split >= no_merge, (split, no_merge)

        @invariant()
        def validates(self):
            self.steps += 1
            self.k.validate("sample", sample=64, seed=self.steps, execution=self.steps % 4 == 0)

        def teardown(self):
            k = getattr(self, "k", None)
            if k is None:
                return
            k.validate("full")
            for p in list(self.live):       # what a later step would have undone
                self._unprotect(p)
                self._check_cpu(p.block, p.first, p.npages, None)
            k.validate("sample", sample=64, seed=-1)
            v = k.vmstat()
            for key in ("level3_splits", "level3_collapses", "level2_collapses"):
                seen[key] += v[f"direct_map_{key}"]

    KernelOps.__name__ = f"KernelOps_{policy.replace('-', '_')}"
    return KernelOps


@pytest.mark.parametrize("policy", POLICIES)
def test_random_operations_validate(policy):
    SEEN.pop(policy, None)
    machine = machine_for(policy)
    machine.TestCase.settings = settings()      # the loaded profile (tests/conftest.py)
    machine.TestCase().runTest()
    # The examples did what this test is for: protections, 1G splits, merges.
    seen = SEEN[policy]
    assert seen["protected"] and seen["level3_splits"], seen
    if policy == "cpa-merge":     # restoring the 1G page's protection merges it back
        assert seen["level2_collapses"] and seen["level3_collapses"], seen
