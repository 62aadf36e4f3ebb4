"""Random sequences of kernel operations on a small guest, validated after
every step, for every registered policy (policies added later are covered
automatically). A failure is printed by hypothesis as a replayable list of
calls on the state machine."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guestkernel import Kernel
from guestkernel import gfp as G
from guestkernel.page_alloc import AllocationError
from guestkernel.policy import policy_names

POLICIES = [p for p in policy_names() if not p.startswith("test-")]
GFPS = [G.GFP_KERNEL, G.GFP_HIGHUSER_MOVABLE, G.GFP_KERNEL | G.GFP_ZERO, G.GFP_DMA32,
        G.GFP_KERNEL | G.GFP_UNMAPPED]


def machine_for(policy: str):
    class KernelOps(RuleBasedStateMachine):
        @initialize()
        def boot(self):
            self.k = Kernel.boot(ram="1G", policy=policy)
            self.pages: list[tuple[int, int]] = []
            self.areas: list[int] = []
            self.secrets: list[int] = []
            self.modules: list[str] = []
            self.steps = 0

        @rule(order=st.integers(0, 4), gfp=st.sampled_from(GFPS))
        def alloc_pages(self, order, gfp):
            try:
                self.pages.append((self.k.alloc_pages(gfp, order), order))
            except AllocationError:
                pass

        @precondition(lambda self: self.pages)
        @rule(i=st.integers(0, 1 << 16))
        def free_pages(self, i):
            pfn, order = self.pages.pop(i % len(self.pages))
            self.k.free_pages(pfn, order)

        @precondition(lambda self: self.pages)
        @rule(i=st.integers(0, 1 << 16), op=st.sampled_from(["ro", "rw", "np", "p", "4k", "nx"]))
        def set_memory(self, i, op):
            pfn, order = self.pages[i % len(self.pages)]
            getattr(self.k, f"set_memory_{op}")(self.k.pfn_to_virt(pfn), 1 << order)
            if op == "np":   # a user that unmaps its page maps it back before freeing
                self.k.set_memory_p(self.k.pfn_to_virt(pfn), 1 << order)
            if op == "ro":
                self.k.set_memory_rw(self.k.pfn_to_virt(pfn), 1 << order)

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

        @invariant()
        def validates(self):
            self.steps += 1
            self.k.validate("sample", sample=64, seed=self.steps, execution=self.steps % 4 == 0)

    KernelOps.__name__ = f"KernelOps_{policy.replace('-', '_')}"
    return KernelOps


@pytest.mark.parametrize("policy", POLICIES)
def test_random_operations_validate(policy):
    machine = machine_for(policy)
    machine.TestCase.settings = settings(
        max_examples=12, stateful_step_count=12, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    machine.TestCase().runTest()
