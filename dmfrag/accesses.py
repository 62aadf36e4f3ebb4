"""Kernel memory-access streams, replayed as the emulated CPU's own loads,
stores and fetches through a kernel state's page tables, with the TLB
model attached.

**Format** (documented in the README). An ``.npz`` holds ``va`` (uint64,
the virtual address of each access), ``kind`` (uint8: 0 load, 1 store,
2 instruction fetch) and, optionally, ``size`` (uint8: bytes, 1, 2, 4 or
8; default 8). A plain ``.npy`` of uint64 is a stream of 8-byte loads.
Users can bring their own streams.

**Replay.** The stream is cut into chunks. Each chunk becomes machine code
that the emulated CPU runs at the kernel image's text (mapped executable in
every state):

* ``mov rsi, <va>`` first (the TLB model is told every data access is
  through ``[rsi]``);
* a load of ``n`` bytes is then ``mov al/ax/eax/rax, [rsi]``;
* a store is ``mov rax, <the bytes there now>`` then ``mov [rsi],
  al/ax/eax/rax``. It writes back what the memory holds, so guest RAM
  (page tables included) is unchanged;
* a fetch is ``mov r15, <next slot>; jmp rsi`` with ``rsi`` at a fixed spot
  of the fetched page (its last 8 bytes: the TLB translates pages, not
  bytes), where ``jmp r15`` is written for the chunk and the bytes put back
  after.

Every address goes through the CPU's own walk, and the TLB model counts
it. A load or store the state does not allow is a page fault: it is
skipped and reported, never counted as a silent number. A fetch the state
does not allow is reported without being run (an instruction the CPU
cannot fetch cannot be skipped). The chunk's own code is fetched from the
image's 2M text pages: one ITLB entry, counted with the fetches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guestkernel.layout import LAYOUT_4LEVEL, LAYOUT_5LEVEL

if TYPE_CHECKING:
    from guestkernel import Kernel

__all__ = ["FETCH", "LOAD", "REGIONS", "STORE", "AccessFormatError", "AccessStream",
           "ReplayResult", "default_stream", "layout_of", "load_accesses", "modelled_part", "price",
           "references", "region_counts", "replay", "save_accesses"]

LOAD, STORE, FETCH = 0, 1, 2
_SIZES = (1, 2, 4, 8)
#: accesses per chunk of code (~20 bytes each: ~80 KiB of code)
CHUNK = 4096


class AccessFormatError(ValueError):
    """A stream file that is not one (names the file and what is wrong)."""


@dataclass
class AccessStream:
    va: np.ndarray
    kind: np.ndarray
    size: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.va)
        if len(self.kind) != n or len(self.size) != n:
            raise AccessFormatError(f"va, kind and size differ in length ({n}, {len(self.kind)}, "
                                    f"{len(self.size)})")
        bad = np.flatnonzero(self.kind > FETCH)
        if len(bad):
            raise AccessFormatError(f"kind must be 0 (load), 1 (store) or 2 (fetch); access "
                                    f"{bad[0]} has {self.kind[bad[0]]}")
        bad = np.flatnonzero(~np.isin(self.size, _SIZES))
        if len(bad):
            raise AccessFormatError(f"size must be 1, 2, 4 or 8 bytes; access {bad[0]} has "
                                    f"{self.size[bad[0]]}")

    def __len__(self) -> int:
        return len(self.va)

    @classmethod
    def loads(cls, vas) -> AccessStream:
        va = np.ascontiguousarray(vas, dtype=np.uint64)
        return cls(va, np.zeros(len(va), np.uint8), np.full(len(va), 8, np.uint8))


def load_accesses(path: str | Path) -> AccessStream:
    """Read a stream file (``.npz`` or ``.npy``); a file that is not one is
    an :class:`AccessFormatError` naming it."""
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AccessFormatError(f"{p}: not a .npz or .npy access stream ({exc})") from None
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint64 or data.ndim != 1:
            raise AccessFormatError(f"{p}: a .npy stream is a 1-D uint64 array of load "
                                    f"addresses, not {data.dtype} of shape {data.shape}")
        return AccessStream.loads(data)
    with data:
        if "va" not in data.files:
            raise AccessFormatError(f"{p}: no 'va' array (has: {', '.join(data.files) or 'none'})")
        va = data["va"]
        if va.dtype != np.uint64 or va.ndim != 1:
            raise AccessFormatError(f"{p}: 'va' must be 1-D uint64, not {va.dtype} {va.shape}")
        kind = data["kind"] if "kind" in data.files else np.zeros(len(va), np.uint8)
        size = data["size"] if "size" in data.files else np.full(len(va), 8, np.uint8)
        try:
            return AccessStream(va, kind.astype(np.uint8, casting="safe"),
                                size.astype(np.uint8, casting="safe"))
        except TypeError:
            raise AccessFormatError(f"{p}: 'kind' and 'size' must be uint8") from None
        except AccessFormatError as exc:
            raise AccessFormatError(f"{p}: {exc}") from None


def save_accesses(path: str | Path, s: AccessStream, **extra: np.ndarray) -> None:
    """Write ``s`` as ``.npz`` (``extra``: more arrays beside the three,
    such as a capture's ``window_index`` and ``meta``)."""
    np.savez_compressed(path, va=s.va, kind=s.kind, size=s.size, **extra)


@dataclass
class ReplayResult:
    """The TLB model's counts over the stream (perf names and the model's
    raw counters, as ``RunResult.tlb``) and the faults met."""

    accesses: int
    tlb: dict = field(default_factory=dict)
    faults: int = 0
    #: the first faults: (index in the stream, va, kind, what)
    first_faults: list[tuple[int, int, int, str]] = field(default_factory=list)


#: Each access is one 24-byte slot of straight-line code:
#:   mov rsi, <va>; mov rax, <bytes to store> | mov r15, <next slot>; <op>; nop...
#: with <op> a load or store through [rsi] of 1, 2, 4 or 8 bytes, or
#: ``jmp rsi`` for a fetch (``jmp r15`` is written at the target). Every
#: data access of the run is through [rsi]: the TLB model is told so
#: (``TlbModel.fixed_operand``) and reads no RIP and decodes nothing.
_SLOT, _OP_AT = 24, 20
_OPS = {(LOAD, 1): b"\x8a\x06", (LOAD, 2): b"\x66\x8b\x06", (LOAD, 4): b"\x8b\x06",
        (LOAD, 8): b"\x48\x8b\x06", (STORE, 1): b"\x88\x06", (STORE, 2): b"\x66\x89\x06",
        (STORE, 4): b"\x89\x06", (STORE, 8): b"\x48\x89\x06"}
_OP_TABLE = np.full((3, 9, 4), 0x90, np.uint8)       # [kind, size] -> op bytes, nop-padded
for (_k, _n), _b in _OPS.items():
    _OP_TABLE[_k, _n, : len(_b)] = np.frombuffer(_b, np.uint8)
for _n in _SIZES:
    _OP_TABLE[FETCH, _n, :2] = (0xFF, 0xE6)          # jmp rsi
_JMP_R15 = b"\x41\xff\xe7"
_JMP_R15_ARR = np.frombuffer(_JMP_R15, np.uint8)
_BYTE8 = np.arange(8, dtype=np.int64)[None, :]
#: the TLB model's table of operand descriptions holds 4096 RIPs
MAX_CHUNK = 2048


def replay(k: Kernel, s: AccessStream, *, tlb=None, chunk: int = MAX_CHUNK,
           attach: bool = False) -> ReplayResult:
    """Run ``s`` on ``k``'s machine (its page tables as they are now).
    ``tlb``: an :class:`emu.tlb.TlbModel` (or a preset name), None to run
    bare (for measuring the model's own cost). The state is left as it
    was: RAM, tables and the TLB model's attachment.

    Every access runs on the CPU, through its own walk of the tables (a
    translation the state does not allow faults there). The TLB model sees
    the same sequence the CPU's hooks would show it: each chunk's code page,
    each load and store that ran (both pages of one that crosses a page),
    each fetch's target and the return into the code. By default it is fed
    that sequence in one call after each chunk has run; ``attach=True``
    attaches it to the CPU instead (a hook per access, as for any other
    code: the reference the feed is held to, and what a model without
    ``access_many``, such as :class:`emu.tlb.PyTlb`, gets)."""
    from unicorn import x86_const as X

    from emu.tlb import TlbModel
    if not 0 < chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be 1..{MAX_CHUNK}")
    m = k.machine
    model = TlbModel(tlb) if isinstance(tlb, str) else tlb
    feed = model is not None and not attach and hasattr(model, "access_many")
    out = ReplayResult(len(s))
    text = (k.profile.image.text, k.profile.image.etext)
    old = m.tlb
    m.tlb = None if feed else model
    try:
        m.flush_tlb()
        if feed:
            model.prime(m)
            model.flush_all()
        elif model is not None:
            model.fixed_operand(X.UC_X86_REG_RSI)
        lo = 0
        while lo < len(s):
            hi, code_va = _plan_chunk(k, s, lo, min(len(s), lo + chunk), text)
            ran = _run_chunk(k, s, lo, hi, code_va, out)
            if feed:
                model.access_many(*_tlb_sequence(s, lo, hi, code_va, ran))
            lo = hi
        if model is not None:
            out.tlb = dict(model.counters())
    finally:
        if model is not None and not feed:
            model.fixed_operand(0)
        m.tlb = old
    return out


def _tlb_sequence(s: AccessStream, lo: int, hi: int, code_va: int, ran: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The TLB accesses the CPU made running the chunk [lo, hi) at
    ``code_va`` (``ran``: which of its accesses ran without a fault): the
    code's page first; per load or store its address, and the next page's
    first byte when it crosses a page; per fetch its target (the site of
    its page) and the slot after it, where the return lands. Blocks that
    end inside the code add fetches of the code's own page, which the L1
    ITLB holds (it is touched after every fetch): they change no count."""
    va, kind, size = s.va[lo:hi], s.kind[lo:hi], s.size[lo:hi]
    n = hi - lo
    fe = kind == FETCH
    first = np.where(fe, _fetch_sites(va), va)
    second = np.where(fe, np.uint64(code_va) + (np.arange(1, n + 1, dtype=np.uint64)
                                                 * np.uint64(_SLOT)),
                      (va | np.uint64(0xFFF)) + np.uint64(1))
    crosses = ~fe & ((va & np.uint64(0xFFF)) + size.astype(np.uint64) > np.uint64(4096))
    vas = np.stack([first, second], axis=1).ravel()
    kinds = np.repeat(kind, 2)
    keep = np.stack([ran, ran & (fe | crosses)], axis=1).ravel()
    return (np.concatenate([np.array([code_va], np.uint64), vas[keep]]),
            np.concatenate([np.array([FETCH], np.uint8), kinds[keep]]))


#: where a chunk's code may start: every 64 KiB of the image's text
_CODE_STEP = 1 << 16


#: where in its page a fetch runs: the TLB sees the page, not the byte, so
#: every fetch of a page jumps to the same spot, ``jmp r15`` written there
#: once a chunk (no two patches ever overlap)
_FETCH_SITE = 0xFF8


def _fetch_sites(va: np.ndarray) -> np.ndarray:
    return (va & ~np.uint64(0xFFF)) | np.uint64(_FETCH_SITE)


def _plan_chunk(k: Kernel, s: AccessStream, lo: int, hi: int, text: tuple[int, int]
                ) -> tuple[int, int]:
    """How far the chunk from ``lo`` may go and where its code runs: in the
    image's text, clear of every fetch site of the chunk and of every byte
    its stores write (through any alias: where the state lets a store
    reach the text, as the references' unprotected text does, the
    write-back must not land in the code), the chunk halved until a place
    is found."""
    img = k.profile.image
    va, kind = s.va[lo:hi], s.kind[lo:hi]
    fe = np.flatnonzero(kind == FETCH)
    st = np.flatnonzero(kind == STORE)
    pts = [_fetch_sites(va[fe])]
    idx = [fe]
    if len(st):
        pas, ok = k.machine.translate_many(va[st], "r")
        lo_pa, hi_pa = img.pa(text[0]), img.pa(text[1])
        pas = pas.astype(np.uint64)
        inside = ok & (pas >= np.uint64(lo_pa)) & (pas < np.uint64(hi_pa))
        pts.append(pas[inside] - np.uint64(lo_pa) + np.uint64(text[0]))   # as text addresses
        idx.append(st[inside])
    points, where = np.concatenate(pts), np.concatenate(idx)
    order = np.argsort(where, kind="stable")
    points, where = points[order], where[order]
    u = np.unique(points)
    while True:
        need = (hi - lo) * _SLOT
        for c in range(text[0], max(text[0], text[1] - need) + 1, _CODE_STEP):
            # a point in [c - 7, c + need): a patch (3 bytes) or a store (up to 8)
            i = int(np.searchsorted(u, np.uint64(max(c - 7, 0))))
            if i == len(u) or int(u[i]) >= c + need:
                return hi, c
        if hi - lo == 1:
            raise RuntimeError(f"no place in the image's text for the replay's code near "
                               f"access {lo}")
        hi = lo + (hi - lo) // 2
        u = np.unique(points[: np.count_nonzero(where < hi - lo)])


def _fault(out: ReplayResult, i: int, va: int, kind: int, what: str) -> None:
    out.faults += 1
    if len(out.first_faults) < 16:
        out.first_faults.append((i, va, kind, what))


def _run_chunk(k: Kernel, s: AccessStream, lo: int, hi: int, code_va: int,
               out: ReplayResult) -> np.ndarray:
    m = k.machine
    va, kind, size = s.va[lo:hi], s.kind[lo:hi], s.size[lo:hi]
    n = hi - lo
    ram = m.ram
    code_pa = m.translate(code_va, "x")
    saved = ram[code_pa: code_pa + n * _SLOT].copy()        # the image's text, put back
    slots = np.full((n, _SLOT), 0x90, np.uint8)
    slots[:, 0:2] = (0x48, 0xBE)                                      # mov rsi, imm64
    slots[:, 2:10] = va.astype("<u8").view(np.uint8).reshape(n, 8)
    slots[:, 10:12] = (0x48, 0xB8)                                    # mov rax, imm64
    imm = np.zeros(n, "<u8")
    slots[:, _OP_AT: _OP_AT + 4] = _OP_TABLE[kind, size]
    # a fetch: mov r15, <the next slot>; jmp rsi; ``jmp r15`` at the target
    fe = np.flatnonzero(kind == FETCH)
    targets = np.zeros(0, np.int64)
    if len(fe):
        slots[fe, 10:12] = (0x49, 0xBF)                               # mov r15, imm64
        imm[fe] = code_va + (fe.astype(np.uint64) + 1) * _SLOT
        a = _fetch_sites(va[fe])
        slots[fe, 2:10] = a.astype("<u8").view(np.uint8).reshape(len(fe), 8)
        pas, ok = m.translate_many(a, "x")
        pas = pas.astype(np.int64)
        # (_plan_chunk put the code clear of every site: none lands in it)
        skip = ~ok | (pas + 3 > len(ram))
        for j in fe[skip]:
            _fault(out, lo + int(j), int(va[j]), FETCH, "fetch: not executable in this state")
        slots[fe[skip], _OP_AT: _OP_AT + 2] = (0x90, 0x90)            # not run
        targets = np.unique(pas[~skip])
    # one site a page: the patches never overlap
    at3 = targets[:, None] + _BYTE8[:, :3]
    orig = np.asarray(ram)[at3].copy()
    np.asarray(ram)[at3] = _JMP_R15_ARR
    try:
        # a store writes back the bytes there now, patches included (guest
        # RAM stays as it was, and a store on a patched site keeps the patch)
        st = np.flatnonzero(kind == STORE)
        if len(st):
            pas, ok = m.translate_many(va[st], "w")
            pas = pas.astype(np.int64)
            w = size[st].astype(np.int64)
            good = ok & (pas + w <= len(ram))
            if good.any():
                at = pas[good][:, None] + _BYTE8
                np.minimum(at, len(ram) - 1, out=at)
                b = np.where(_BYTE8 < w[good][:, None], np.asarray(ram)[at], 0).astype(np.uint8)
                imm[st[good]] = np.ascontiguousarray(b).view("<u8").ravel()
        slots[:, 12:20] = imm.view(np.uint8).reshape(n, 8)
        r = m.run(slots.tobytes(), at=code_va, on_fault="skip", max_faults=n + 1,
                  count_insns=False, max_insns=None, keep_decoded=True)
    finally:
        np.asarray(ram)[at3] = orig
        ram[code_pa: code_pa + len(saved)] = saved
    if r.status.value != "completed":
        raise RuntimeError(f"access replay stopped in the chunk at {lo}: {r.status.value} "
                           f"{r.fault}")
    ran = np.ones(n, bool)
    if len(fe):
        ran[fe[skip]] = False
    for f in r.faults:
        j = min(max((f.rip - code_va) // _SLOT, 0), n - 1)
        ran[j] = False
        _fault(out, lo + j, int(va[j]), int(kind[j]), f"page fault: {f}")
    return ran


# -- Linux's address layout ----------------------------------------------------

#: where Linux puts its regions, by paging mode (arch/x86/include/asm/
#: page_64_types.h, pgtable_64_types.h; Documentation/arch/x86/x86_64/mm.rst):
#: name -> (start, end) for 4-level and for 5-level (LA57) paging
def _regions(lay) -> dict[str, tuple[int, int]]:
    return {"direct_map": (lay.page_offset, lay.direct_map_end),
            "vmalloc": (lay.vmalloc_start, lay.vmalloc_end + 1),
            # 1 TB of vmemmap (4-level), 0.5 PB (5-level)
            "vmemmap": (lay.vmemmap_start,
                        lay.vmemmap_start + (1 << (40 if lay.paging_levels == 4 else 49))),
            "kernel_image": (0xFFFFFFFF80000000, 0xFFFFFFFFA0000000 + (1 << 30)),
            "modules": (0xFFFFFFFFA0000000 + (1 << 30), 0xFFFFFFFFFF000000)}


REGIONS = {4: _regions(LAYOUT_4LEVEL), 5: _regions(LAYOUT_5LEVEL)}


def layout_of(va: np.ndarray) -> int | None:
    """4 or 5 (levels of paging) from where the stream's direct-map and
    vmalloc addresses sit; None when it has neither."""
    counts = {}
    for levels, regs in REGIONS.items():
        n = 0
        for name in ("direct_map", "vmalloc", "vmemmap"):
            lo, hi = regs[name]
            n += int(np.count_nonzero((va >= np.uint64(lo)) & (va < np.uint64(hi))))
        counts[levels] = n
    if not any(counts.values()):
        return None
    return max(counts, key=counts.get)


def region_counts(va: np.ndarray, levels: int) -> dict[str, int]:
    """Accesses per region of Linux's layout (``other``: fixmap, the CPU
    entry area, ...)."""
    out, covered = {}, np.zeros(len(va), bool)
    for name, (lo, hi) in REGIONS[levels].items():
        m = (va >= np.uint64(lo)) & (va < np.uint64(hi))
        out[name] = int(np.count_nonzero(m))
        covered |= m
    out["other"] = int(len(va) - np.count_nonzero(covered))
    return out


# -- the three states and the figures ------------------------------------------


def to_kernel_layout(k: Kernel, s: AccessStream, levels: int | None) -> AccessStream:
    """A stream recorded under the other paging mode than ``k``'s (a 5-level
    capture priced on a 4-level state, or the reverse): its direct-map
    addresses moved to ``k``'s direct map, same pfn (the image is at the
    same addresses in both; other regions are kept as they are). The
    stream itself when the modes agree."""
    if levels is None or levels == k.paging_levels:
        return s
    lo = REGIONS[levels]["direct_map"][0]
    va = s.va.copy()
    m = (va >= np.uint64(lo)) & (va < np.uint64(lo + (1 << 52)))
    va[m] = va[m] - np.uint64(lo) + np.uint64(k.page_offset)
    return AccessStream(va, s.kind, s.size)


#: the regions the model maps exactly as Linux does
MODELLED_REGIONS = ("direct_map", "kernel_image")


def modelled_part(k: Kernel, s: AccessStream) -> tuple[AccessStream, dict]:
    """The part of a captured stream the model can price: its accesses to
    the direct map and the kernel image, the regions whose mapping the
    model builds as Linux does (vmalloc, vmemmap, modules and the fixmap
    hold Linux's own allocations, which the model's state does not have at
    those addresses). A stream of the other paging mode than the kernel's
    has its direct-map addresses moved to the kernel's
    (:func:`to_kernel_layout`; ``relocated`` says so). A stream whose
    addresses fall in no Linux region (a user's own) is kept whole.

    Returns the stream to replay and what was left out, per region."""
    levels = layout_of(s.va)
    if levels is None:
        return s, {"paging_levels": None, "regions": {}, "replayed": len(s), "left_out": 0,
                   "relocated": False}
    keep = np.zeros(len(s), bool)
    for name in MODELLED_REGIONS:
        lo, hi = REGIONS[levels][name]
        keep |= (s.va >= np.uint64(lo)) & (s.va < np.uint64(hi))
    sub = to_kernel_layout(k, AccessStream(s.va[keep], s.kind[keep], s.size[keep]), levels)
    n = int(np.count_nonzero(keep))
    return sub, {"paging_levels": levels, "regions": region_counts(s.va, levels),
                 "replayed": n, "left_out": len(s) - n,
                 "relocated": levels != k.paging_levels}


def unsplit_kernel(k: Kernel) -> Kernel:
    """The same machine and kernel record, booted up to the buddy hand-over
    with no CPA call at all: the direct map as init_memory_mapping built it."""
    from guestkernel import Kernel as K
    return K.boot(e820=k.e820, gbpages=k.gbpages, profile=k.profile, boot_cpa=False,
                  initrd=k.bootmem.initrd or 0, cmdline=k.cmdline,
                  paging_levels=k.requested_paging_levels)


def all_4k_kernel(k: Kernel) -> Kernel:
    """:func:`unsplit_kernel` with every large page of the direct map split
    to 4K (a forced split of each 2M region of RAM, aliases left alone: the
    kernel image's own mapping keeps its 2M pages, as in ``unsplit``, so the
    two references differ in the direct map only)."""
    from guestkernel.cpa import CpaError, CpaFlags
    u = unsplit_kernel(k)
    for pfn in range(0, u.max_pfn, 512):
        n = min(512, u.max_pfn - pfn)
        try:
            u.cpa.change_page_attr_set_clr(u.pfn_to_virt(pfn), n, 0, 0, force_split=True,
                                           in_flag=CpaFlags.NO_CHECK_ALIAS)
        except CpaError:
            pass                       # a hole: nothing mapped there to split
    return u


def figures(r: ReplayResult) -> dict:
    """The fields ``dmfrag tlbcost`` prints for one run."""
    t = r.tlb
    walks = t["dtlb_load_misses.walk_completed"] + t["dtlb_store_misses.walk_completed"]
    acc = r.accesses or 1
    out = {
        "accesses": r.accesses,
        "dtlb_walks": walks,
        "itlb_walks": t["itlb_misses.walk_completed"],
        "walks_4k": t["dtlb_load_misses.walk_completed_4k"]
        + t["dtlb_store_misses.walk_completed_4k"],
        "walks_2m": t["dtlb_load_misses.walk_completed_2m_4m"]
        + t["dtlb_store_misses.walk_completed_2m_4m"],
        "walks_1g": t["dtlb_load_misses.walk_completed_1g"]
        + t["dtlb_store_misses.walk_completed_1g"],
        "stlb_hits": t["dtlb_load_misses.stlb_hit"] + t["dtlb_store_misses.stlb_hit"]
        + t["itlb_misses.stlb_hit"],
        "walk_mem_refs": t["walk_mem_refs"],
        "est_walk_cycles": t["est_walk_cycles"],
        "faults": r.faults,
    }
    out["dtlb_walks_per_kilo_access"] = 1000.0 * walks / acc
    out["est_walk_cycles_per_kilo_access"] = 1000.0 * t["est_walk_cycles"] / acc
    return out


def tlbcost(k: Kernel, s: AccessStream, preset: str = "skylake", *,
            all_regions: bool = False) -> dict:
    """The stream on three direct maps of the same machine: ``state`` (the
    kernel as it is), ``unsplit`` (no CPA split at all) and ``all_4k`` (all
    of it at 4K); ``position``: where the state's walk cycles sit between
    the two references (0 unsplit, 1 all 4K). ``stream``: what of it was
    replayed (:func:`modelled_part`; ``all_regions``: every access, those
    the model does not map being faults)."""
    if all_regions:
        levels = layout_of(s.va)
        s, part = to_kernel_layout(k, s, levels), {
            "paging_levels": levels, "replayed": len(s), "left_out": 0,
            "relocated": levels is not None and levels != k.paging_levels}
    else:
        s, part = modelled_part(k, s)
    if not len(s):
        raise ValueError("no access of the stream is in a region the model maps (the direct "
                         "map, the kernel image): nothing to replay")
    out = {"preset": preset, "paging_levels": k.paging_levels, "stream": part}
    unsplit, all_4k = references(k)
    for name, kern in (("state", k), ("unsplit", unsplit), ("all_4k", all_4k)):
        r = replay(kern, s, tlb=preset)
        out[name] = figures(r)
        if name == "state":
            out["first_faults"] = [{"index": i, "va": va, "kind": kd, "what": w}
                                   for i, va, kd, w in r.first_faults]
    lo, hi = out["unsplit"]["est_walk_cycles"], out["all_4k"]["est_walk_cycles"]
    out["position"] = (out["state"]["est_walk_cycles"] - lo) / (hi - lo) if hi != lo else None
    return out


#: the last machine's two references (booting and splitting them costs more
#: than a replay; compare prices every policy's state on the same machine)
_REFS: dict = {}


def references(k: Kernel) -> tuple[Kernel, Kernel]:
    """:func:`unsplit_kernel` and :func:`all_4k_kernel` of ``k``'s machine,
    kept for the next call on the same machine and kernel record (a replay
    leaves them as they were)."""
    key = (repr(k.e820.entries), k.profile.name, k.gbpages,
           k.bootmem.initrd or 0, k.cmdline, k.requested_paging_levels)
    if key not in _REFS:
        _REFS.clear()
        u = unsplit_kernel(k)
        _REFS[key] = (u, all_4k_kernel(k))
    return _REFS[key]


# -- the committed real streams ---------------------------------------------

#: Streams captured on the real kernels (``dmfrag accesses record``), shipped
#: with the package: what ``run``/``compare``/``sweep --tlb`` price a state
#: with unless given ``--accesses``.
STREAMS = Path(__file__).resolve().parent / "data" / "accesses"
#: the capture each kernel record is priced with (the kernel itself; 6.1
#: for a record with no capture of its own)
DEFAULT_STREAM = "linux-{kernel}-1G-age-256.npz"


def default_stream(kernel: str) -> Path:
    """The committed capture for the model's kernel record ``kernel``."""
    p = STREAMS / DEFAULT_STREAM.format(kernel=kernel)
    return p if p.is_file() else STREAMS / DEFAULT_STREAM.format(kernel="6.1")


def price(k: Kernel, preset: str, accesses: str | Path | None = None) -> dict:
    """The ``tlb`` object of a run's result: :func:`tlbcost` of a real
    kernel's stream (``accesses``, default :func:`default_stream`) on
    ``k``'s state, with ``accesses`` (the file) and
    ``walk_cycles_vs_reference`` (the state's walk cycles over
    ``unsplit``'s: 1.0, fragmentation costs nothing)."""
    path = Path(accesses) if accesses is not None else default_stream(k.profile.name)
    out = tlbcost(k, load_accesses(path), preset)
    out["accesses"] = path.name if accesses is None else str(path)
    lo = out["unsplit"]["est_walk_cycles"]
    out["walk_cycles_vs_reference"] = out["state"]["est_walk_cycles"] / lo if lo else None
    return out
