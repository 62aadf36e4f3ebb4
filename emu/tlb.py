"""A TLB model keyed by the true virtual address of every access.

Structures (DESIGN.md section 9), each a generic set-associative cache whose
tag is the virtual page number of the page size it holds: L1 DTLB per page
size, L1 ITLB, a second-level TLB (4K and 2M shared; 1G apart where the
preset says so) and paging-structure caches for PML4E, PDPTE and PDE
entries. Replacement: LRU, or "random" (a per-structure xorshift64 with a
fixed seed, so runs repeat).

Semantics:
* a lookup probes the L1 structures of every page size, then the STLB; a
  miss walks the current tables (``pagetable.walk``'s rules, read from guest
  RAM) starting below the deepest paging-structure-cache hit, and counts the
  entries it reads; the leaf's size and G bit fill the STLB and the L1;
* a walk that faults fills nothing;
* INVLPG drops every entry covering the address and all paging-structure
  caches (SDM 4.10.4.1); a CR3 load drops non-global entries and the
  paging-structure caches; a full flush drops everything.

Where the virtual address comes from: Unicorn's memory hooks report physical
addresses. A C hook reads RIP, looks up a per-RIP description of the
instruction's memory operand (decoded once with capstone: base, index,
scale, displacement, or an implicit stack access) and reads the registers,
which at hook time still hold the operand's inputs. An access crossing a
page is reported twice; the second part is counted twice (once per page).
Instruction fetch is counted per executed block (one ITLB access per page a
block spans). An access crossing a page is translated twice, as hardware
does. The same decoder feeds :class:`PyTlb`, the pure-Python twin
used to check the C path (identical counts on the same run).

Counters carry Linux ``perf`` event names (Intel's), see :data:`PERF_NAMES`.
The cycle estimate is a documented latency model, not a measurement:
``stlb_hit_cycles`` per STLB hit and ``walk_base_cycles`` +
``walk_ref_cycles`` per entry read for each walk.
"""

from __future__ import annotations

import ctypes
import json
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from capstone import CS_AC_READ, CS_AC_WRITE
from capstone.x86 import X86_OP_MEM, X86_REG_INVALID, X86_REG_RIP
from unicorn import UC_HOOK_BLOCK, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from . import pagetable as pt
from ._native import fnptr, native, uclib
from .asm import disasm_one

__all__ = [
    "COUNTERS",
    "PERF_NAMES",
    "PRESETS",
    "PyTlb",
    "Structure",
    "TlbConfig",
    "TlbConfigError",
    "TlbModel",
    "load_config",
    "preset",
]


class TlbConfigError(ValueError):
    """An unknown preset or an impossible geometry."""


@dataclass(frozen=True)
class Structure:
    name: str
    entries: int
    ways: int
    levels: tuple[int, ...]       # page levels it holds: 1=4K 2=2M 3=1G (4 = PML4E cache)

    @property
    def sets(self) -> int:
        return self.entries // self.ways

    def check(self) -> None:
        if self.entries <= 0 or self.ways <= 0:
            raise TlbConfigError(f"{self.name}: entries and ways must be positive")
        if self.entries % self.ways:
            raise TlbConfigError(f"{self.name}: {self.entries} entries are not divisible by "
                                 f"{self.ways} ways")
        if not self.levels or any(lv not in (1, 2, 3, 4) for lv in self.levels):
            raise TlbConfigError(f"{self.name}: page levels must be among 1 (4K), 2 (2M), "
                                 f"3 (1G), 4 (PML4E), not {self.levels}")


@dataclass(frozen=True)
class TlbConfig:
    name: str
    l1d: tuple[Structure, ...]       # one per page size, or one shared
    l1i: tuple[Structure, ...]
    stlb: tuple[Structure, ...]      # second level: shared 4K/2M, maybe 1G apart
    psc: tuple[Structure | None, Structure | None, Structure | None]  # PML4E, PDPTE, PDE
    replacement: str = "lru"
    stlb_hit_cycles: int = 9
    walk_base_cycles: int = 10
    walk_ref_cycles: int = 25

    def structures(self) -> list[Structure]:
        out: list[Structure] = []
        for s in (*self.l1d, *self.l1i, *self.stlb):
            if s not in out:
                out.append(s)
        return out

    def check(self) -> None:
        if self.replacement not in ("lru", "random"):
            raise TlbConfigError(f"replacement must be 'lru' or 'random', not {self.replacement!r}")
        for s in self.structures() + [p for p in self.psc if p]:
            s.check()
        for group, name in ((self.l1d, "l1d"), (self.l1i, "l1i")):
            covered = {lv for s in group for lv in s.levels}
            if covered != {1, 2, 3}:
                raise TlbConfigError(f"{name} must hold 4K, 2M and 1G pages, holds {sorted(covered)}")
        if len(self.structures()) + 3 > 16:
            raise TlbConfigError("at most 13 TLB structures")


def _s(name, entries, ways, *levels) -> Structure:
    return Structure(name, entries, ways, tuple(levels))


def _psc() -> tuple[Structure, Structure, Structure]:
    # ChampSim's defaults (sets x ways): level 4: 1x4, level 3: 2x4, level 2: 4x8.
    return (_s("psc_pml4e", 4, 4, 4), _s("psc_pdpte", 8, 4, 3), _s("psc_pde", 32, 8, 2))


PRESETS: dict[str, TlbConfig] = {
    # Skylake: L1 DTLB 4K 64x4, 2M 32x4, 1G 4 (fully assoc.); ITLB 4K 128x8,
    # 2M 8 (fully assoc.); STLB 1536x12 shared 4K/2M, 16 for 1G (4-way).
    "skylake": TlbConfig(
        "skylake",
        l1d=(_s("dtlb_4k", 64, 4, 1), _s("dtlb_2m", 32, 4, 2), _s("dtlb_1g", 4, 4, 3)),
        l1i=(_s("itlb_4k", 128, 8, 1), _s("itlb_2m", 8, 8, 2, 3)),
        stlb=(_s("stlb", 1536, 12, 1, 2), _s("stlb_1g", 16, 4, 3)),
        psc=_psc()),
    # Golden Cove: DTLB 96 (4K, 6-way) + 32 (2M/1G, 4-way); ITLB 256x8;
    # STLB 2048 shared (16-way; the 1024-entry cap on 2M is not modelled), 1G apart.
    "golden-cove": TlbConfig(
        "golden-cove",
        l1d=(_s("dtlb_4k", 96, 6, 1), _s("dtlb_large", 32, 4, 2, 3)),
        l1i=(_s("itlb_4k", 256, 8, 1), _s("itlb_2m", 32, 8, 2, 3)),
        stlb=(_s("stlb", 2048, 16, 1, 2), _s("stlb_1g", 16, 4, 3)),
        psc=_psc()),
    # Zen 4: L1 DTLB 72 entries fully associative, all sizes; ITLB 64 fully
    # associative; L2 DTLB 3072x24 for 4K/2M (1G smashed to 2M: held as 2M
    # entries is not modelled, 1G is held as 1G); 64-entry page directory cache.
    "zen4": TlbConfig(
        "zen4",
        l1d=(_s("dtlb", 72, 72, 1, 2, 3),),
        l1i=(_s("itlb", 64, 64, 1, 2, 3),),
        stlb=(_s("l2_dtlb", 3072, 24, 1, 2, 3),),
        psc=(_s("pwc_pml4e", 4, 4, 4), _s("pwc_pdpte", 16, 4, 3), _s("pdc", 64, 8, 2))),
}
#: Emulated CPU models -> the preset of their family.
CPU_PRESET = {"skylake-server": "skylake", "skylake-client": "skylake",
              "cascadelake-server": "skylake", "icelake-server": "golden-cove",
              "epyc": "zen4", "epyc-rome": "zen4"}


def preset(name: str) -> TlbConfig:
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise TlbConfigError(f"unknown TLB preset {name!r}; known: {', '.join(PRESETS)}") from None
    return cfg


def load_config(path: str | Path) -> TlbConfig:
    """A custom geometry from TOML or JSON: ``base`` (a preset to start
    from), ``replacement``, latencies, and structures as tables
    ``{name = {entries = N, ways = W, levels = [1, 2]}}`` under ``l1d``,
    ``l1i``, ``stlb`` (lists) or ``psc`` (three entries)."""
    p = Path(path)
    try:
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise TlbConfigError(f"cannot read TLB geometry {str(p)!r}: {exc}") from None
    cfg = preset(data.get("base", "skylake"))

    def structs(items, what):
        if not isinstance(items, list):
            raise TlbConfigError(f"{what} must be a list of structures")
        out = []
        for it in items:
            try:
                out.append(Structure(str(it["name"]), int(it["entries"]), int(it["ways"]),
                                     tuple(int(x) for x in it["levels"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise TlbConfigError(f"{what}: bad structure {it!r} ({exc})") from None
        return tuple(out)

    changes = {"name": data.get("name", p.stem)}
    for key in ("l1d", "l1i", "stlb"):
        if key in data:
            changes[key] = structs(data[key], key)
    if "psc" in data:
        ps = structs(data["psc"], "psc")
        if len(ps) != 3:
            raise TlbConfigError("psc needs three structures (PML4E, PDPTE, PDE)")
        changes["psc"] = ps
    for key in ("replacement", "stlb_hit_cycles", "walk_base_cycles", "walk_ref_cycles"):
        if key in data:
            changes[key] = data[key]
    unknown = set(data) - {"base", "name", "l1d", "l1i", "stlb", "psc", "replacement",
                           "stlb_hit_cycles", "walk_base_cycles", "walk_ref_cycles"}
    if unknown:
        raise TlbConfigError(f"unknown keys in {p.name}: {sorted(unknown)}")
    cfg = replace(cfg, **changes)
    cfg.check()
    return cfg


#: Counter order shared with _native.c.
COUNTERS = (
    "loads", "stores", "fetches",
    "l1_miss_load", "l1_miss_store", "l1_miss_fetch",
    "stlb_hit_load", "stlb_hit_store", "stlb_hit_fetch",
    "walk_load", "walk_store", "walk_fetch",
    "walk_4k_load", "walk_2m_load", "walk_1g_load",
    "walk_4k_store", "walk_2m_store", "walk_1g_store",
    "walk_4k_fetch", "walk_2m_fetch", "walk_1g_fetch",
    "walk_mem_refs", "walk_faults", "psc_hit_pml4e", "psc_hit_pdpte", "psc_hit_pde",
    "undecoded",
)
#: perf's names for what the counters measure (Intel event names).
PERF_NAMES = {
    "dtlb_load_misses.miss_causes_a_walk": "walk_load",
    "dtlb_load_misses.stlb_hit": "stlb_hit_load",
    "dtlb_load_misses.walk_completed": "walk_load",
    "dtlb_load_misses.walk_completed_4k": "walk_4k_load",
    "dtlb_load_misses.walk_completed_2m_4m": "walk_2m_load",
    "dtlb_load_misses.walk_completed_1g": "walk_1g_load",
    "dtlb_store_misses.miss_causes_a_walk": "walk_store",
    "dtlb_store_misses.stlb_hit": "stlb_hit_store",
    "dtlb_store_misses.walk_completed": "walk_store",
    "dtlb_store_misses.walk_completed_4k": "walk_4k_store",
    "dtlb_store_misses.walk_completed_2m_4m": "walk_2m_store",
    "dtlb_store_misses.walk_completed_1g": "walk_1g_store",
    "itlb_misses.miss_causes_a_walk": "walk_fetch",
    "itlb_misses.stlb_hit": "stlb_hit_fetch",
    "itlb_misses.walk_completed": "walk_fetch",
    "itlb_misses.walk_completed_4k": "walk_4k_fetch",
    "itlb_misses.walk_completed_2m_4m": "walk_2m_fetch",
    "itlb_misses.walk_completed_1g": "walk_1g_fetch",
}


def _stats(raw: dict[str, int], cfg: TlbConfig) -> dict[str, float]:
    out: dict[str, float] = {name: raw[src] for name, src in PERF_NAMES.items()}
    out.update({f"model.{k}": v for k, v in raw.items()})
    # Walks that fault fill nothing and complete nothing.
    walks = raw["walk_load"] + raw["walk_store"] + raw["walk_fetch"]
    hits2 = raw["stlb_hit_load"] + raw["stlb_hit_store"] + raw["stlb_hit_fetch"]
    out["walk_mem_refs"] = raw["walk_mem_refs"]
    out["est_walk_cycles"] = (hits2 * cfg.stlb_hit_cycles + walks * cfg.walk_base_cycles
                              + raw["walk_mem_refs"] * cfg.walk_ref_cycles)
    data = raw["loads"] + raw["stores"]
    out["data_accesses"] = data
    out["dtlb_mpki_accesses"] = 1000.0 * (raw["walk_load"] + raw["walk_store"]) / data if data else 0.0
    return out


# -- the operand decoder shared by both paths ----------------------------------

def _uc_reg(insn, reg: int) -> int:
    if reg == X86_REG_INVALID:
        return 0
    return getattr(X, f"UC_X86_REG_{insn.reg_name(reg).upper()}", 0)


_STACK_WRITE = ("push", "call")
_STACK_READ = ("pop", "ret", "leave")


def read_code(m, rip: int, n: int = 15) -> bytes:
    """Instruction bytes at ``rip`` through the software walk.

    Never ask the CPU here: this runs inside a memory hook, and a
    ``uc_vmem_translate`` there refills QEMU's TLB under the load being
    performed (a use-after-free in load_helper)."""
    out = bytearray()
    va = rip
    while len(out) < n:
        res = m.walk(va, "x")
        if isinstance(res, pt.WalkFault) or res.pa >= m.ram_bytes:
            break
        take = min(n - len(out), 4096 - (va & 0xFFF))
        out += m.ram[res.pa: res.pa + take].tobytes()
        va += take
    return bytes(out)


def describe(insn) -> tuple[tuple[int, int, int, int, int], tuple[int, int, int, int, int]]:
    """(read, write) operand descriptions of one instruction: (kind, base,
    index, scale, disp); kind 0 none, 1 base+index*scale+disp, 2 [rsp]
    (pop), 3 [rsp - size] (push), 4 an absolute address in disp."""
    rd = wr = (0, 0, 0, 0, 0)
    for op in insn.operands:
        if op.type != X86_OP_MEM:
            continue
        m = op.mem
        if m.segment not in (0,) and insn.reg_name(m.segment) in ("fs", "gs"):
            continue   # segment base not modelled: counted as undecoded
        if m.base == X86_REG_RIP:
            desc = (4, 0, 0, 0, (insn.address + insn.size + m.disp) & ((1 << 64) - 1))
        else:
            desc = (1, _uc_reg(insn, m.base), _uc_reg(insn, m.index), m.scale, m.disp)
        if op.access & CS_AC_READ and rd[0] == 0:
            rd = desc
        if op.access & CS_AC_WRITE and wr[0] == 0:
            wr = desc
    name = insn.mnemonic
    if name.startswith(_STACK_WRITE) and wr[0] == 0:
        wr = (3, 0, 0, 0, 0)
    if name.startswith(_STACK_READ) and rd[0] == 0:
        rd = (2, 0, 0, 0, 0)
    return rd, wr


# -- the C model ----------------------------------------------------------------

class _CStruct(ctypes.Structure):
    _fields_ = [("sets", ctypes.c_uint32), ("ways", ctypes.c_uint32), ("shift", ctypes.c_uint32),
                ("repl", ctypes.c_uint32), ("sizes", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("rng", ctypes.c_uint64), ("tag", ctypes.c_void_p), ("stamp", ctypes.c_void_p),
                ("level", ctypes.c_void_p), ("glob", ctypes.c_void_p)]


class _CModel(ctypes.Structure):
    _fields_ = [("s", _CStruct * 16), ("l1d", ctypes.c_int32 * 3), ("l1i", ctypes.c_int32 * 3),
                ("stlb", ctypes.c_int32 * 3), ("psc", ctypes.c_int32 * 3),
                ("clock", ctypes.c_uint64), ("counters", ctypes.c_uint64 * len(COUNTERS)),
                ("ram64", ctypes.c_void_p), ("ram_qwords", ctypes.c_uint64),
                ("cr3", ctypes.c_uint64)]


class _Desc(ctypes.Structure):
    _fields_ = [("rip", ctypes.c_uint64), ("rd_base", ctypes.c_int32), ("rd_index", ctypes.c_int32),
                ("wr_base", ctypes.c_int32), ("wr_index", ctypes.c_int32),
                ("rd_disp", ctypes.c_int64), ("wr_disp", ctypes.c_int64),
                ("rd_scale", ctypes.c_int32), ("wr_scale", ctypes.c_int32),
                ("rd_kind", ctypes.c_int32), ("wr_kind", ctypes.c_int32)]


_DECODE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64)


class _HookCtx(ctypes.Structure):
    _fields_ = [("model", ctypes.c_void_p), ("uc", ctypes.c_void_p), ("reg_read", ctypes.c_void_p),
                ("decode", ctypes.c_void_p), ("rip_id", ctypes.c_int32), ("rsp_id", ctypes.c_int32),
                ("cr3_id", ctypes.c_int32), ("pad", ctypes.c_int32), ("table", ctypes.c_void_p),
                ("table_mask", ctypes.c_uint64)]


def _layout(cfg: TlbConfig):
    """Structure list (TLBs first, then the three PSCs) and index maps."""
    structs = cfg.structures()
    index = {s: i for i, s in enumerate(structs)}

    def per_level(group):
        out = [-1, -1, -1]
        for lv in (1, 2, 3):
            for s in group:
                if lv in s.levels:
                    out[lv - 1] = index[s]
                    break
        return out

    psc_idx = []
    all_structs = list(structs)
    for p in cfg.psc:
        if p is None:
            psc_idx.append(-1)
        else:
            psc_idx.append(len(all_structs))
            all_structs.append(p)
    return all_structs, per_level(cfg.l1d), per_level(cfg.l1i), per_level(cfg.stlb), psc_idx, len(structs)


class TlbModel:
    """The C TLB model, attached to a :class:`emu.Machine` (``m.tlb = ...``)."""

    def __init__(self, config: TlbConfig | str = "skylake"):
        cfg = preset(config) if isinstance(config, str) else config
        cfg.check()
        self.config = cfg
        self._lib = native()
        self._model = _CModel()
        structs, l1d, l1i, stlb, psc, self._first_psc = _layout(cfg)
        self._structs = structs
        self._arrays = []
        repl = 1 if cfg.replacement == "random" else 0
        for i, s in enumerate(structs):
            n = s.entries
            tag = np.zeros(n, np.uint64)
            stamp = np.zeros(n, np.uint64)
            level = np.zeros(n, np.uint8)
            glob = np.zeros(n, np.uint8)
            self._arrays.append((tag, stamp, level, glob))
            sizes = sum(1 << (lv - 1) for lv in s.levels)
            self._lib.dmfrag_tlb_init_struct(
                ctypes.byref(self._model), i, s.sets, s.ways, 0, repl, sizes,
                tag.ctypes.data_as(ctypes.c_void_p), stamp.ctypes.data_as(ctypes.c_void_p),
                level.ctypes.data_as(ctypes.c_void_p), glob.ctypes.data_as(ctypes.c_void_p))
        for arr, vals in ((self._model.l1d, l1d), (self._model.l1i, l1i),
                          (self._model.stlb, stlb), (self._model.psc, psc)):
            for j, v in enumerate(vals):
                arr[j] = v
        self._nstructs = len(structs)
        self._machine = None
        self._hooks: list[int] = []
        self._desc = (_Desc * 4096)()
        self._ctx = _HookCtx()
        self._ctx.table = ctypes.addressof(self._desc)
        self._ctx.table_mask = 4095
        self._ctx.rip_id, self._ctx.rsp_id = X.UC_X86_REG_RIP, X.UC_X86_REG_RSP
        self._ctx.cr3_id = X.UC_X86_REG_CR3
        self._ctx.model = ctypes.addressof(self._model)
        self._decode_cb = _DECODE_CB(self._decode)
        self._ctx.decode = ctypes.cast(self._decode_cb, ctypes.c_void_p).value
        self._decoded: dict[int, tuple] = {}

    # -- machine interface (called by emu.Machine) -----------------------------

    def attach_run(self, m) -> None:
        self._machine = m
        mdl = self._model
        mdl.ram64 = m.ram64.ctypes.data
        mdl.ram_qwords = len(m.ram64)
        mdl.cr3 = m.cr3
        self._ctx.uc = m._uch
        self._ctx.reg_read = fnptr(uclib.uc_reg_read)
        # A run writes fresh code: descriptions by RIP may be stale.
        ctypes.memset(self._desc, 0, ctypes.sizeof(self._desc))
        self._decoded.clear()
        ctx = ctypes.addressof(self._ctx)
        self._hooks = [
            m._hook_add_native(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._lib.dmfrag_tlb_mem_hook, ctx),
            m._hook_add_native(UC_HOOK_BLOCK, self._lib.dmfrag_tlb_block_hook, ctx),
        ]

    def detach_run(self, m) -> None:
        for h in self._hooks:
            uclib.uc_hook_del(m._uch, ctypes.c_size_t(h))
        self._hooks = []

    def load_cr3(self, pa: int) -> None:
        self._model.cr3 = pa
        self._lib.dmfrag_tlb_flush(ctypes.byref(self._model), self._first_psc, 1)
        self._flush_psc()

    def flush_all(self) -> None:
        self._lib.dmfrag_tlb_flush(ctypes.byref(self._model), len(self._structs), 0)

    def invlpg(self, va: int) -> None:
        self._lib.dmfrag_tlb_invlpg(ctypes.byref(self._model), ctypes.c_uint64(va),
                                    len(self._structs), self._first_psc)

    def _flush_psc(self) -> None:
        for i in range(self._first_psc, len(self._structs)):
            self._arrays[i][0][:] = 0

    # -- decoding ------------------------------------------------------------

    def _decode(self, rip: int) -> int:
        raw = read_code(self._machine, rip)
        insn = disasm_one(raw, rip) if raw else None
        if insn is None:
            return 0
        rd, wr = describe(insn)
        self._decoded[rip] = (rd, wr)
        self._lib.dmfrag_desc_set(ctypes.byref(self._ctx), ctypes.c_uint64(rip),
                                  rd[0], rd[1], rd[2], rd[3], ctypes.c_int64(rd[4]),
                                  wr[0], wr[1], wr[2], wr[3], ctypes.c_int64(wr[4]))
        return 1

    # -- direct use (analytic tests) -----------------------------------------

    def prime(self, m) -> None:
        """Point the walker at ``m``'s RAM and current CR3 without running code."""
        self._model.ram64 = m.ram64.ctypes.data
        self._model.ram_qwords = len(m.ram64)
        self._model.cr3 = m.cr3

    def access(self, va: int, kind: int = 0) -> None:
        """One access (0 load, 1 store, 2 fetch) at ``va``."""
        self._lib.dmfrag_tlb_access(ctypes.byref(self._model), ctypes.c_uint64(va), kind)

    # -- results -------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {name: int(self._model.counters[i]) for i, name in enumerate(COUNTERS)}

    def reset_counters(self) -> None:
        for i in range(len(COUNTERS)):
            self._model.counters[i] = 0

    def stats(self) -> dict[str, float]:
        return _stats(self.counters(), self.config)

    def entries(self, name: str) -> list[tuple[int, int]]:
        """(virtual page number, level) of the valid entries of one structure."""
        i = next(j for j, s in enumerate(self._structs) if s.name == name)
        tag = self._arrays[i][0]
        valid = tag[tag != 0]
        return sorted((int(t) >> 3, (int(t) >> 1) & 3) for t in valid)


# -- the pure-Python twin --------------------------------------------------------

@dataclass
class _PyStruct:
    s: Structure
    repl: int
    tag: list[int] = field(default_factory=list)
    stamp: list[int] = field(default_factory=list)
    glob: list[int] = field(default_factory=list)
    rng: int = 0


class PyTlb:
    """The same model in Python (slow; for checking the C path)."""

    def __init__(self, config: TlbConfig | str = "skylake"):
        cfg = preset(config) if isinstance(config, str) else config
        cfg.check()
        self.config = cfg
        structs, self.l1d, self.l1i, self.stlb, self.psc, self._first_psc = _layout(cfg)
        repl = 1 if cfg.replacement == "random" else 0
        self.s = [_PyStruct(st, repl, [0] * st.entries, [0] * st.entries, [0] * st.entries,
                            0x9E3779B97F4A7C15 ^ (i + 1)) for i, st in enumerate(structs)]
        self.clock = 0
        self.c = dict.fromkeys(COUNTERS, 0)
        self.ram64 = None
        self.cr3 = 0
        self._machine = None
        self._hooks: list[int] = []
        self._decoded: dict[int, tuple] = {}

    def _lookup(self, idx: int, va: int) -> int:
        if idx < 0:
            return 0
        t = self.s[idx]
        for lv in (1, 2, 3, 4):
            if lv not in t.s.levels:
                continue
            vpn = va >> (12 + 9 * (lv - 1))
            want = (vpn << 3) | (lv << 1) | 1
            base = (vpn % t.s.sets) * t.s.ways
            for w in range(t.s.ways):
                if t.tag[base + w] == want:
                    self.clock += 1
                    t.stamp[base + w] = self.clock
                    return lv
        return 0

    def _fill(self, idx: int, va: int, lv: int, glob: int) -> None:
        if idx < 0:
            return
        t = self.s[idx]
        vpn = va >> (12 + 9 * (lv - 1))
        want = (vpn << 3) | (lv << 1) | 1
        base = (vpn % t.s.sets) * t.s.ways
        ways = range(t.s.ways)
        victim = next((w for w in ways if t.tag[base + w] == want), None)
        if victim is None:
            victim = next((w for w in ways if not t.tag[base + w]), None)
        if victim is None:
            if t.repl == 1:
                x = t.rng
                x ^= (x << 13) & ((1 << 64) - 1)
                x ^= x >> 7
                x ^= (x << 17) & ((1 << 64) - 1)
                t.rng = x
                victim = x % t.s.ways
            else:
                victim = min(ways, key=lambda w: t.stamp[base + w])
        self.clock += 1
        t.tag[base + victim] = want
        t.stamp[base + victim] = self.clock
        t.glob[base + victim] = glob

    def _walk(self, va: int) -> tuple[int, int, int]:
        start = 4
        if self._lookup(self.psc[2], va):
            self.c["psc_hit_pde"] += 1
            start = 1
        elif self._lookup(self.psc[1], va):
            self.c["psc_hit_pdpte"] += 1
            start = 2
        elif self._lookup(self.psc[0], va):
            self.c["psc_hit_pml4e"] += 1
            start = 3
        table = self.cr3 & pt.ADDR_MASK
        n = 0
        for level in (4, 3, 2, 1):
            slot = (table >> 3) + ((va >> (12 + 9 * (level - 1))) & 511)
            if slot >= len(self.ram64):
                return 0, 0, n
            e = int(self.ram64[slot])
            if level <= start:
                n += 1
            if not e & 1:
                return 0, 0, n
            if level == 1 or (level <= 3 and e & 0x80):
                self._fill(self.psc[0], va, 4, 0)
                if level <= 2:
                    self._fill(self.psc[1], va, 3, 0)
                if level <= 1:
                    self._fill(self.psc[2], va, 2, 0)
                return level, (e >> 8) & 1, n
            table = e & pt.ADDR_MASK
        return 0, 0, n

    def access(self, va: int, kind: int) -> None:
        l1 = self.l1i if kind == 2 else self.l1d
        names = ("load", "store", "fetch")
        self.c[("loads", "stores", "fetches")[kind]] += 1
        for i in range(3):
            if l1[i] >= 0 and (i == 0 or l1[i] != l1[i - 1]) and self._lookup(l1[i], va):
                return
        self.c[f"l1_miss_{names[kind]}"] += 1
        for i in range(3):
            if self.stlb[i] >= 0 and (i == 0 or self.stlb[i] != self.stlb[i - 1]):
                lv = self._lookup(self.stlb[i], va)
                if lv:
                    self.c[f"stlb_hit_{names[kind]}"] += 1
                    self._fill(l1[lv - 1], va, lv, 0)
                    return
        self.c[f"walk_{names[kind]}"] += 1
        level, glob, refs = self._walk(va)
        self.c["walk_mem_refs"] += refs
        if not level:
            self.c["walk_faults"] += 1
            return
        self.c[f"walk_{('4k', '2m', '1g')[level - 1]}_{names[kind]}"] += 1
        self._fill(self.stlb[level - 1], va, level, glob)
        self._fill(l1[level - 1], va, level, glob)

    def prime(self, m) -> None:
        self.ram64 = m.ram64
        self.cr3 = m.cr3

    # -- machine interface (Python hooks: slow) -------------------------------

    def attach_run(self, m) -> None:
        self._machine = m
        self.ram64 = m.ram64
        self.cr3 = m.cr3
        self._decoded.clear()
        self._hooks = [m.uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._mem_hook),
                       m.uc.hook_add(UC_HOOK_BLOCK, self._block_hook)]

    def detach_run(self, m) -> None:
        for h in self._hooks:
            m.uc.hook_del(h)
        self._hooks = []

    def _block_hook(self, uc, address, size, _ud) -> None:
        self.cr3 = uc.reg_read(X.UC_X86_REG_CR3)
        end = address + (size or 1) - 1
        p = address & ~0xFFF
        while p <= end:
            self.access(max(p, address), 2)
            p += 4096

    def _mem_hook(self, uc, type_, address, size, _value, _ud) -> None:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        d = self._decoded.get(rip)
        if d is None:
            raw = read_code(self._machine, rip)
            insn = disasm_one(raw, rip) if raw else None
            if insn is None:
                self.c["undecoded"] += 1
                return
            d = self._decoded[rip] = describe(insn)
        is_write = type_ == 17
        kind, base, index, scale, disp = d[1] if is_write else d[0]
        if kind == 1:
            va = ((uc.reg_read(base) if base else 0) + (uc.reg_read(index) if index else 0) * scale
                  + disp) & ((1 << 64) - 1)
        elif kind == 4:
            va = disp
        elif kind == 2:
            va = uc.reg_read(X.UC_X86_REG_RSP)
        elif kind == 3:
            va = (uc.reg_read(X.UC_X86_REG_RSP) - size) & ((1 << 64) - 1)
        else:
            self.c["undecoded"] += 1
            return
        if address & 0xFFF == 0 and va & 0xFFF:
            return          # the second report of a page-crossing access
        self.access(va, 1 if is_write else 0)
        if (va & 0xFFF) + size > 4096:
            self.access((va | 0xFFF) + 1, 1 if is_write else 0)

    def load_cr3(self, pa: int) -> None:
        self.cr3 = pa
        for i, t in enumerate(self.s):
            for j in range(len(t.tag)):
                if i >= self._first_psc or not t.glob[j]:
                    t.tag[j] = 0

    def flush_all(self) -> None:
        for t in self.s:
            t.tag = [0] * len(t.tag)

    def invlpg(self, va: int) -> None:
        for i, t in enumerate(self.s):
            if i >= self._first_psc:
                t.tag = [0] * len(t.tag)
                continue
            for lv in t.s.levels:
                vpn = va >> (12 + 9 * (lv - 1))
                want = (vpn << 3) | (lv << 1) | 1
                base = (vpn % t.s.sets) * t.s.ways
                for w in range(t.s.ways):
                    if t.tag[base + w] == want:
                        t.tag[base + w] = 0

    def counters(self) -> dict[str, int]:
        return dict(self.c)

    def reset_counters(self) -> None:
        self.c = dict.fromkeys(COUNTERS, 0)

    def stats(self) -> dict[str, float]:
        return _stats(self.counters(), self.config)
