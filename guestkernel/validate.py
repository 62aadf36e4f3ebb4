"""The validator: the kernel model against the emulated CPU (DESIGN.md s. 8).

``validate(k, mode)`` raises :class:`ValidationError` at the first broken
invariant, naming it, the virtual address, what the model expected and
what the CPU did. Invariants, in order:

1. ``counters``: DirectMap4k/2M/1G equal a recount of the live tables (plus
   the re-count 6.1 makes at boot), and the vmstat split/collapse counters
   account for every change since boot.
2. ``pgtable-pages``: every linked table page is one the kernel allocated
   for page tables and still holds (not free in the buddy allocator); no
   page allocated for tables is left unlinked (a leak).
3. ``buddy``: the allocator's own invariants (free lists disjoint, aligned,
   free + allocated + reserved cover RAM, pageblock types consistent).
4. ``translation``: for every page the model maps (direct map, kernel image,
   vmalloc and modules), the CPU's translation for read, write and fetch
   (``Machine.translate_many``, which answers from the CPU's cached
   translations when it holds one: a stale entry is caught here) gives the
   frame and P/RW/NX the model holds. Full mode checks every page; sample
   mode a seeded sample plus every page touched since the last validation.
5. ``execution``: guest code loads a tag through the virtual address of a
   sample of pages (each sampled frame carries its PFN and a generation
   stamp for the run), stores back where the model says a store must fault
   and calls where a fetch must fault; results and faults must match.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

from emu import FaultAction, RunStatus
from emu import pagetable as pt
from emu.pagetable import PfErr
from emu.pagetable import PteFlags as F

from .layout import PAGE_SIZE
from .owner import PageOwner
from .shadow import S_MAPPED, S_NX, S_P, S_RW

if TYPE_CHECKING:
    from .api import KernelApi as Kernel

__all__ = ["ValidationError", "validate"]


class ValidationError(AssertionError):
    """A broken invariant: ``invariant``, ``va``, ``expected``, ``actual``."""

    def __init__(self, invariant: str, message: str, va: int | None = None,
                 expected: object = None, actual: object = None):
        where = f" at {va:#x}" if va is not None else ""
        detail = ""
        if expected is not None or actual is not None:
            detail = f": expected {expected}, CPU/tables gave {actual}"
        super().__init__(f"[{invariant}]{where} {message}{detail}")
        self.invariant, self.va, self.expected, self.actual = invariant, va, expected, actual


def _bits_str(bits: int) -> str:
    if not bits & S_P:
        return "not present"
    return ("RW" if bits & S_RW else "RO") + (" NX" if bits & S_NX else " X")


def validate(k: Kernel, mode: str = "full", *, seed: int = 0, sample: int = 4096,
             execution: bool = True) -> dict[str, int]:
    """Check every invariant; returns what was checked (counts)."""
    if mode not in ("full", "sample"):
        raise ValueError(f"mode must be 'full' or 'sample', not {mode!r}")
    stats: dict[str, int] = {}
    _check_counters(k)
    _check_table_pages(k, stats)
    stats["unmapped_owned"] = _check_unmapped_owners(k)
    k.buddy.check()
    rng = random.Random(seed)
    stats["translated"] = _check_translation(k, mode, rng, sample)
    if execution:
        try:
            k.validator_code_page()
        except MemoryError:
            # Out of guest memory: no page for the probe code. The other
            # checks stand; say that this one could not run.
            stats["executed"] = 0
            stats["execution_skipped"] = 1
        else:
            stats["executed"] = _check_execution(k, rng, min(sample, 64))
    k.shadow.touched.clear()
    k.shadow.touched_va.clear()
    return stats


# -- 1. counters -------------------------------------------------------------

def _check_counters(k: Kernel) -> None:
    count = k.pgt.direct_pages_count
    recount = k.pgt.recount_direct_map(k.max_pfn)
    names = {1: "DirectMap4k", 2: "DirectMap2M", 3: "DirectMap1G"}
    # Splits Linux left uncounted (the level's counter was already 0) keep
    # one large page counted at their level and 512 smaller ones uncounted.
    uncounted = k.cpa.uncounted_splits
    for level in (1, 2, 3):
        clamp = uncounted[level] - 512 * uncounted[level + 1]
        want = recount[level] + k.boot_overcount[level] + k.highmap_counted[level] + clamp
        if count[level] != want:
            raise ValidationError(
                "counters", f"{names[level]} disagrees with the live tables",
                expected=f"{want} pages (recount {recount[level]} + boot re-count "
                         f"{k.boot_overcount[level]} + image-mapping splits "
                         f"{k.highmap_counted[level]}"
                         + (f" + splits left uncounted {clamp})" if clamp else ")"),
                actual=f"{count[level]} pages")
    vm = k.vmstat_counters
    s2 = vm["direct_map_level2_splits"] - vm["direct_map_level2_collapses"]
    s3 = vm["direct_map_level3_splits"] - vm["direct_map_level3_collapses"]
    base = k.boot_direct_pages_count
    delta = [count[i] - base[i] for i in range(4)]
    want = {1: 512 * s2, 2: 512 * s3 - s2, 3: -s3}
    for level in (1, 2, 3):
        if delta[level] != want[level]:
            raise ValidationError(
                "counters", f"{names[level]} changed since boot by {delta[level]} pages, "
                "which the vmstat split/collapse counters do not account for",
                expected=f"{want[level]} (level2 splits-collapses {s2}, level3 {s3})",
                actual=delta[level])


# -- 1b. pages a user took out of the direct map ------------------------------

#: users whose pages must not be in the direct map while they hold them
_UNMAPPED_USERS = (PageOwner.SECRETMEM, PageOwner.GUEST_MEMFD)


def _check_unmapped_owners(k: Kernel) -> int:
    """A page secretmem or guest_memfd holds is out of the direct map as
    the CPU's own tables say (not only as the shadow records it): a policy
    that hands such a user a page from a cache of "unmapped" pages that is
    in fact mapped leaks the secret. Returns the pages checked."""
    owner = k.page_owner
    pfns = np.flatnonzero(np.isin(owner[:k.max_pfn], np.array(_UNMAPPED_USERS, dtype=owner.dtype)))
    for pfn in pfns.tolist():
        found = k.lookup_address(k.pfn_to_virt(pfn))
        if found is not None and found[0] & int(F.P):
            raise ValidationError(
                "ownership", f"pfn {pfn:#x} belongs to {PageOwner(int(owner[pfn])).name.lower()} "
                "but is mapped in the direct map", va=k.pfn_to_virt(pfn),
                expected="not present", actual=f"present at level {found[1]}")
    return len(pfns)


# -- 2. page-table pages -----------------------------------------------------

def _linked_tables(k: Kernel) -> set[int]:
    ram64 = k.machine.ram64
    found = {k.pgt.root}
    stack = [(k.pgt.root, k.pgt.levels)]
    while stack:
        table, level = stack.pop()
        entries = ram64[table >> 3: (table >> 3) + 512]
        for i in np.flatnonzero(entries & np.uint64(F.P)).tolist():
            entry = int(entries[i])
            if level > 1 and not (level < 4 and entry & F.PS):
                child = entry & pt.ADDR_MASK
                if child not in found and level - 1 >= 1:
                    found.add(child)
                    if level - 1 > 1:
                        stack.append((child, level - 1))
    return found


def _check_table_pages(k: Kernel, stats: dict[str, int]) -> None:
    linked = _linked_tables(k)
    owned = k.pgt.table_pages
    stats["table_pages"] = len(linked)
    for pa in sorted(linked - owned):
        raise ValidationError("pgtable-pages", "a linked page table is not a page the kernel "
                              "allocated for page tables", va=k.page_offset + pa,
                              expected="owned by the page tables", actual="not owned")
    for pa in sorted(owned - linked):
        raise ValidationError("pgtable-pages", "a page allocated for page tables is linked "
                              "nowhere (leaked)", va=k.page_offset + pa,
                              expected="linked", actual="unlinked")
    for pa in sorted(linked):
        pfn = pa >> 12
        if pfn < k.max_pfn and (k.buddy.is_free(pfn) or k.buddy.in_pcp(pfn)):
            raise ValidationError("pgtable-pages", "a linked page table is free in the buddy "
                                  "allocator (freed while linked)", va=k.page_offset + pa,
                                  expected="allocated", actual="free")


# -- 4. translation ----------------------------------------------------------

def _check_translation(k: Kernel, mode: str, rng: random.Random, sample: int) -> int:
    sh = k.shadow
    # Pages touched since the last validation first: a stale translation
    # lives in the CPU's TLB only until other translations evict it.
    # Most recent first.
    touched = np.fromiter(reversed(sh.touched), dtype=np.int64, count=len(sh.touched))
    touched = touched[(sh.direct[touched] & S_MAPPED) != 0].astype(np.uint64)
    if len(touched):
        _compare(k, np.uint64(k.page_offset) + touched * np.uint64(PAGE_SIZE), touched,
                 sh.direct[touched.astype(np.int64)], "direct map")
    first_va = [va for va in reversed(sh.touched_va) if sh.expected(va) is not None]
    if first_va:
        exp = [sh.expected(va) for va in first_va]
        _compare(k, np.array(first_va, dtype=np.uint64),
                 np.array([e[0] for e in exp], dtype=np.uint64),
                 np.array([e[1] for e in exp], dtype=np.uint8), "vmalloc/module/image")
    mapped = np.flatnonzero(sh.direct & S_MAPPED)
    if mode == "sample" and len(mapped) > sample:
        pick = np.array(sorted(rng.sample(range(len(mapped)), sample)), dtype=np.int64)
        chosen = mapped[pick]
        pfns = chosen
    else:
        pfns = mapped
    pfns = pfns.astype(np.uint64)
    vas = np.uint64(k.page_offset) + pfns * np.uint64(PAGE_SIZE)
    bits = sh.direct[pfns.astype(np.int64)]
    _compare(k, vas, pfns, bits, "direct map")
    others = list(sh.vmap.items()) + [
        (va, ((va - k.profile.image.text + k.profile.image.phys_start) >> 12, b))
        for va, b in sh.image.items()]
    if mode == "sample" and len(others) > sample:
        keep = set(rng.sample(range(len(others)), sample))
        others = [o for i, o in enumerate(others) if i in keep or o[0] in sh.touched_va]
    if others:
        ovas = np.array([o[0] for o in others], dtype=np.uint64)
        opfns = np.array([o[1][0] for o in others], dtype=np.uint64)
        obits = np.array([o[1][1] for o in others], dtype=np.uint8)
        _compare(k, ovas, opfns, obits, "vmalloc/module/image")
    return len(vas) + len(others)


def _compare(k: Kernel, vas: np.ndarray, pfns: np.ndarray, bits: np.ndarray, what: str) -> None:
    m = k.machine
    present = (bits & S_P) != 0
    checks = (
        ("r", present),
        ("w", present & ((bits & S_RW) != 0)),
        ("x", present & ((bits & S_NX) == 0)),
    )
    for access, want in checks:
        pas, ok = m.translate_many(vas, access)
        bad = np.flatnonzero(ok != want)
        if len(bad):
            i = int(bad[0])
            va = int(vas[i])
            raise ValidationError(
                "translation", f"{what}: {access!r} access", va=va,
                expected=f"{'allowed' if want[i] else 'fault'} ({_bits_str(int(bits[i]))})",
                actual=f"{'allowed' if ok[i] else 'fault'} (leaf {_leaf(k, va)})")
        wrong = np.flatnonzero(ok & (pas != pfns * np.uint64(PAGE_SIZE)))
        if len(wrong):
            i = int(wrong[0])
            raise ValidationError("translation", f"{what}: wrong frame", va=int(vas[i]),
                                  expected=f"pa {int(pfns[i]) * PAGE_SIZE:#x}",
                                  actual=f"pa {int(pas[i]):#x}")


def _leaf(k: Kernel, va: int) -> str:
    res = k.machine.walk(va)
    if isinstance(res, pt.WalkFault):
        return f"walk faults at level {res.level}"
    return f"{res.leaf:#018x} level {res.level}"


# -- 5. execution ------------------------------------------------------------

def _check_execution(k: Kernel, rng: random.Random, n: int) -> int:
    """Load a tag through each sampled page; store/fetch where a fault is due."""
    sh = k.shadow
    code_va = k.validator_code_page()
    candidates = np.flatnonzero((sh.direct & (S_MAPPED | S_P)) == (S_MAPPED | S_P))
    if not len(candidates):
        return 0
    tables = {pa >> 12 for pa in k.pgt.table_pages}
    picks = [int(candidates[rng.randrange(len(candidates))]) for _ in range(n * 2)]
    picks = [p for p in dict.fromkeys(picks) if p not in tables and k.e820.is_region_memory(p << 12, 4096)][:n]
    if not picks:
        return 0
    k.validation_generation += 1
    gen = k.validation_generation
    ram64 = k.machine.ram64
    lines, saved, expect = [], {}, []
    for j, pfn in enumerate(picks):
        va = k.page_offset + pfn * PAGE_SIZE
        slot = (pfn * PAGE_SIZE + 8 * (j % 512)) >> 3      # one qword per sampled page
        saved[slot] = int(ram64[slot])
        tag = (gen << 40) | pfn
        ram64[slot] = tag
        off = slot * 8 - pfn * PAGE_SIZE
        lines.append(f"mov rax, [rbx + {j * 8}]\nmov rcx, [rax + {off}]\nmov [rdx + {j * 8}], rcx")
        expect.append((va + off, tag, int(sh.direct[pfn])))
    out_pfn = k.validator_out_pfn
    out_pa = out_pfn * PAGE_SIZE
    ram64[out_pa >> 3: (out_pa >> 3) + len(picks)] = 0
    addr_pa = out_pa + 2048
    ram64[addr_pa >> 3: (addr_pa >> 3) + len(picks)] = [
        np.uint64(k.page_offset + p * PAGE_SIZE) for p in picks]
    try:
        r = k.machine.run("\n".join(lines), at=code_va, on_fault=FaultAction.SKIP,
                          regs={"rbx": k.page_offset + addr_pa, "rdx": k.page_offset + out_pa},
                          max_insns=10 * len(picks) + 100)
        for f in r.faults:
            raise ValidationError("execution", f"load faulted: {f}", va=f.cr2,
                                  expected="a successful load", actual=str(f))
        for j, (va, tag, bits) in enumerate(expect):
            got = int(ram64[(out_pa >> 3) + j])
            if got != tag:
                raise ValidationError("execution", "load through the direct map read another "
                                      "frame", va=va, expected=f"tag {tag:#x}",
                                      actual=f"{got:#x}")
        # Stores where the model forbids them must fault (stores write back
        # what was read, so a missed fault corrupts nothing).
        ro = [(k.page_offset + p * PAGE_SIZE, p) for p in picks if not sh.direct[p] & S_RW]
        if ro:
            code = "\n".join(f"mov rax, [rbx + {j * 8}]\nmov rcx, [rax]\nmov [rax], rcx"
                             for j in range(len(ro)))
            ram64[addr_pa >> 3: (addr_pa >> 3) + len(ro)] = [np.uint64(v) for v, _ in ro]
            r = k.machine.run(code, at=code_va, on_fault=FaultAction.SKIP,
                              regs={"rbx": k.page_offset + addr_pa}, max_insns=10 * len(ro) + 100)
            faulted = {f.cr2 for f in r.faults if f.vector == 14
                       and f.error_code == PfErr.P | PfErr.W}
            for va, _p in ro:
                if va not in faulted:
                    raise ValidationError("execution", "store to a read-only page did not "
                                          "fault with P|W", va=va, expected="#PF error 0x3",
                                          actual=[str(f) for f in r.faults if f.cr2 == va] or "no fault")
        # Fetches from the direct map must fault (it is never executable):
        # jump there with HLT planted, one run each.
        for pfn in picks[:4]:
            va = k.page_offset + pfn * PAGE_SIZE + 64
            pa = pfn * PAGE_SIZE + 64
            old = int(k.machine.ram[pa])
            k.machine.ram[pa] = 0xF4
            try:
                r = k.machine.run("jmp rax", at=code_va, regs={"rax": va}, max_insns=4)
            finally:
                k.machine.ram[pa] = old
            bits = int(sh.direct[pfn])
            want = PfErr.ID | (PfErr.P if bits & S_P else PfErr(0))
            if bits & S_NX and not (r.status is RunStatus.FAULTED and r.fault.cr2 == va
                                    and r.fault.error_code == want):
                raise ValidationError("execution", "fetch from a non-executable page did not "
                                      "fault", va=va, expected=f"#PF error {int(want):#x}",
                                      actual=str(r.fault) if r.fault else r.status.value)
    finally:
        for slot, value in saved.items():
            ram64[slot] = value
    return len(picks)
