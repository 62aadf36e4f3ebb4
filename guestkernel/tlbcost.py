"""What fragmentation costs: run an access kernel over pages the guest kernel
allocated, addressed through its direct map, with the TLB model attached;
run the same on a reference kernel booted from the same memory map whose
direct map is unfragmented (same RAM, same frames, same program), and
report both side by side."""

from __future__ import annotations

from emu import kernels
from emu.tlb import TlbModel

from .kernel import Kernel
from .layout import PAGE_SIZE

__all__ = ["KERNELS", "reference_kernel", "tlb_cost"]

KERNELS = ("random", "chase", "stream")


def reference_kernel(k: Kernel) -> Kernel:
    """The same e820 and profile, just booted: the unfragmented reference."""
    return Kernel.boot(e820=k.e820, gbpages=k.gbpages, profile=k.profile,
                       initrd=k.bootmem.initrd or 0, cmdline=k.cmdline)


def _prepare(k: Kernel, kind: str, pfns: list[int], rounds: int, seed: int,
             saved: dict[int, int]) -> str:
    """Write the data the access kernel walks into RAM (remembering, in
    ``saved``, what each written qword held); return its program."""
    vas = [k.pfn_to_virt(p) for p in pfns]
    real = k.machine.ram64

    class _Saving:
        def __setitem__(self, slot, value):
            saved.setdefault(slot, int(real[slot]))
            real[slot] = value
    ram64 = _Saving()
    if kind in ("random", "chase"):
        if kind == "random":   # a dependent load per page, pages in a seeded random order
            nodes = _shuffled(vas, seed)
        else:                  # slab-like objects at varying offsets, in address order
            nodes = [va + 64 * ((i * 7) % 64) for i, va in enumerate(vas)]
        kernels.link_ring(lambda pa, v: ram64.__setitem__(pa >> 3, v), nodes,
                          lambda va: va - k.pfn_to_virt(0))
        return kernels.pointer_chase(nodes, rounds)
    if kind == "stream":
        half = len(vas) // 2
        table = (pfns[0] * PAGE_SIZE) >> 3
        pairs = list(zip(vas[1:half + 1], vas[half + 1:]))[: PAGE_SIZE // 16]
        for i, (src, dst) in enumerate(pairs):
            ram64[table + 2 * i] = src
            ram64[table + 2 * i + 1] = dst
        return kernels.stream_copy(vas[0], len(pairs), rounds)
    raise ValueError(f"unknown access kernel {kind!r}; known: {', '.join(KERNELS)}")


def _shuffled(vas: list[int], seed: int) -> list[int]:
    import random
    out = list(vas)
    random.Random(seed).shuffle(out)
    return out


def _run(k: Kernel, prog: str, preset: str) -> dict[str, float]:
    code = k.validator_code_page()
    m = k.machine
    m.tlb = TlbModel(preset)
    try:
        m.flush_tlb()
        r = m.run(prog, at=code, count_insns=False, max_insns=None,
                  regs={"rsp": k.pfn_to_virt(k.validator_out_pfn) + PAGE_SIZE})
    finally:
        m.tlb = None
    if r.status.value != "completed":
        raise RuntimeError(f"access kernel stopped: {r.status.value} {r.fault}")
    return r.tlb


def tlb_cost(k: Kernel, pfns: list[int], kind: str = "chase", *, rounds: int = 4,
             preset: str = "skylake", seed: int = 1, reference: Kernel | None = None) -> dict:
    """Side-by-side TLB cost of one access kernel on ``k`` and on the
    unfragmented reference (booted here unless given)."""
    if not pfns:
        raise ValueError("tlb_cost needs a working set of pages")
    ref = reference or reference_kernel(k)
    # The program writes into the pages it walks: never into page tables or
    # the validator's own pages, and what it overwrote is put back after.
    k.validator_code_page()
    ref.validator_code_page()
    avoid = {pa >> 12 for kern in (k, ref) for pa in kern.pgt.table_pages}
    avoid |= {kern.validator_out_pfn for kern in (k, ref)}
    avoid |= {p for kern in (k, ref)
              for p in kern.vmalloc.find_area(kern.validator_code_page()).pfns()}
    pfns = [p for p in pfns if p not in avoid]
    if len(pfns) < 2:
        raise ValueError("tlb_cost needs at least two pages that are not page tables")
    out = {}
    for name, kern in (("state", k), ("reference", ref)):
        saved: dict[int, int] = {}
        try:
            prog = _prepare(kern, kind, pfns, rounds, seed, saved)
            st = _run(kern, prog, preset)
        finally:
            for slot, value in saved.items():
                kern.machine.ram64[slot] = value
        acc = st["data_accesses"] or 1
        out[name] = {
            "dtlb_walks_per_kilo_access": 1000.0 * (st["dtlb_load_misses.walk_completed"]
                                                    + st["dtlb_store_misses.walk_completed"]) / acc,
            "walks_4k": st["dtlb_load_misses.walk_completed_4k"] + st["dtlb_store_misses.walk_completed_4k"],
            "walks_2m": st["dtlb_load_misses.walk_completed_2m_4m"] + st["dtlb_store_misses.walk_completed_2m_4m"],
            "walks_1g": st["dtlb_load_misses.walk_completed_1g"] + st["dtlb_store_misses.walk_completed_1g"],
            "stlb_hits": st["dtlb_load_misses.stlb_hit"] + st["dtlb_store_misses.stlb_hit"],
            "walk_mem_refs": st["walk_mem_refs"],
            "est_walk_cycles": st["est_walk_cycles"],
            "data_accesses": acc,
        }
    ref_cycles = out["reference"]["est_walk_cycles"] or 1
    out["walk_cycles_vs_reference"] = out["state"]["est_walk_cycles"] / ref_cycles
    out["kernel"], out["preset"], out["pages"] = kind, preset, len(pfns)
    return out
