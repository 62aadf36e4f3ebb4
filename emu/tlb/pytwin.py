"""The pure-Python twin of the C TLB model (slow; for checking the C path).

The same structures, replacement, walk and counters as ``_native.c``, fed
by Python hooks through the machine's public hook API: on the same run the
two give identical counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unicorn import UC_HOOK_BLOCK, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from .. import pagetable as pt
from ..asm import disasm_one
from .config import Structure, TlbConfig, layout, preset
from .counters import COUNTERS, stats
from .decode import describe, read_code
from .observer import MachineObserver

__all__ = ["PyTlb"]


@dataclass
class _PyStruct:
    s: Structure
    repl: int
    tag: list[int] = field(default_factory=list)
    stamp: list[int] = field(default_factory=list)
    glob: list[int] = field(default_factory=list)
    rng: int = 0


class PyTlb(MachineObserver):
    """The same model in Python (slow; for checking the C path)."""

    def __init__(self, config: TlbConfig | str = "skylake"):
        cfg = preset(config) if isinstance(config, str) else config
        cfg.check()
        self.config = cfg
        structs, self.l1d, self.l1i, self.stlb, self.psc, self._first_psc = layout(cfg)
        repl = 1 if cfg.replacement == "random" else 0
        self.s = [_PyStruct(st, repl, [0] * st.entries, [0] * st.entries, [0] * st.entries,
                            0x9E3779B97F4A7C15 ^ (i + 1)) for i, st in enumerate(structs)]
        self.clock = 0
        self.c = dict.fromkeys(COUNTERS, 0)
        self.ram64 = None
        self.ram_first = 0          # qword index of ram64[0] (RAM's physical base / 8)
        self.cr3 = 0
        self.levels = 4
        MachineObserver.__init__(self)
        self._decoded: dict[int, tuple] = {}

    def _lookup(self, idx: int, va: int) -> int:
        if idx < 0:
            return 0
        t = self.s[idx]
        for lv in (1, 2, 3, 4, 5):
            if lv not in t.s.levels:
                continue
            vpn = va >> (12 + 9 * (lv - 1))
            want = (vpn << 4) | (lv << 1) | 1
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
        want = (vpn << 4) | (lv << 1) | 1
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
        top = self.levels
        start = top
        if self._lookup(self.psc[2], va):
            self.c["psc_hit_pde"] += 1
            start = 1
        elif self._lookup(self.psc[1], va):
            self.c["psc_hit_pdpte"] += 1
            start = 2
        elif self._lookup(self.psc[0], va):
            self.c["psc_hit_pml4e"] += 1
            start = 3
        elif top == 5 and self._lookup(self.psc[3], va):
            self.c["psc_hit_pml5e"] += 1
            start = 4
        table = self.cr3 & pt.ADDR_MASK
        n = 0
        for level in range(top, 0, -1):
            slot = (table >> 3) + ((va >> (12 + 9 * (level - 1))) & 511) - self.ram_first
            if not 0 <= slot < len(self.ram64):
                return 0, 0, n
            e = int(self.ram64[slot])
            if level <= start:
                n += 1
            if not e & 1:
                return 0, 0, n
            if level == 1 or (level <= 3 and e & 0x80):
                if top == 5:
                    self._fill(self.psc[3], va, 5, 0)
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
        """Point the walker at ``m``'s RAM and current CR3 without running code."""
        self.ram64 = m.ram64
        self.ram_first = m.ram_base >> 3
        self.levels = getattr(m, 'paging_levels', 4)
        self.cr3 = m.cr3

    # -- machine interface (Python hooks: slow) -------------------------------

    def attach(self, m) -> None:
        """Start observing machine ``m``'s CPU (``m.tlb = self`` calls this)."""
        self._claim(m)
        self._hooks = [m.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._mem_hook),
                       m.hook_add(UC_HOOK_BLOCK, self._block_hook)]

    def forget_code(self) -> None:
        """Drop the operand descriptions decoded per RIP (code was rewritten)."""
        self._decoded.clear()

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
                want = (vpn << 4) | (lv << 1) | 1
                base = (vpn % t.s.sets) * t.s.ways
                for w in range(t.s.ways):
                    if t.tag[base + w] == want:
                        t.tag[base + w] = 0

    def raw_counters(self) -> dict[str, int]:
        """The model's raw event counts (:data:`emu.tlb.counters.COUNTERS`)."""
        return dict(self.c)

    def counters(self) -> dict[str, float]:
        """What a run reports, as ``RunResult.tlb`` has it: perf's event
        names, the raw counts as ``model.*``, walk memory references and the
        cycle estimate (the same dict as :meth:`stats`)."""
        return self.stats()

    def reset_counters(self) -> None:
        self.c = dict.fromkeys(COUNTERS, 0)

    def stats(self) -> dict[str, float]:
        return stats(self.raw_counters(), self.config)
