"""TLB geometries: structures, the presets and the TOML/JSON loader.

A geometry (:class:`TlbConfig`) lists set-associative structures (DESIGN.md
section 9): L1 DTLB per page size, L1 ITLB, a second-level TLB and the
paging-structure caches, plus a replacement policy and the latencies of the
cycle estimate. :func:`layout` turns it into the index maps both models
(:class:`emu.tlb.TlbModel`, :class:`emu.tlb.PyTlb`) share.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "CPU_PRESET",
    "PRESETS",
    "Structure",
    "TlbConfig",
    "TlbConfigError",
    "layout",
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
    levels: tuple[int, ...]       # page levels it holds: 1=4K 2=2M 3=1G (4 PML4E, 5 PML5E cache)

    @property
    def sets(self) -> int:
        return self.entries // self.ways

    def check(self) -> None:
        if self.entries <= 0 or self.ways <= 0:
            raise TlbConfigError(f"{self.name}: entries and ways must be positive")
        if self.entries % self.ways:
            raise TlbConfigError(f"{self.name}: {self.entries} entries are not divisible by "
                                 f"{self.ways} ways")
        if not self.levels or any(lv not in (1, 2, 3, 4, 5) for lv in self.levels):
            raise TlbConfigError(f"{self.name}: page levels must be among 1 (4K), 2 (2M), "
                                 f"3 (1G), 4 (PML4E), 5 (PML5E), not {self.levels}")


@dataclass(frozen=True)
class TlbConfig:
    name: str
    l1d: tuple[Structure, ...]       # one per page size, or one shared
    l1i: tuple[Structure, ...]
    stlb: tuple[Structure, ...]      # second level: shared 4K/2M, maybe 1G apart
    psc: tuple[Structure | None, Structure | None, Structure | None]  # PML4E, PDPTE, PDE
    replacement: str = "lru"
    #: with 5-level paging, the PML5E cache (entries tagged with VA bits
    #: 56:48); None: a walk that misses the PML4E cache reads the PML5E
    psc_pml5e: Structure | None = None
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
        for s in self.structures() + [p for p in (*self.psc, self.psc_pml5e) if p]:
            s.check()
        for group, name in ((self.l1d, "l1d"), (self.l1i, "l1i")):
            covered = {lv for s in group for lv in s.levels}
            if covered != {1, 2, 3}:
                raise TlbConfigError(f"{name} must hold 4K, 2M and 1G pages, holds {sorted(covered)}")
        if len(self.structures()) + 4 > 16:
            raise TlbConfigError("at most 12 TLB structures")


def _s(name, entries, ways, *levels) -> Structure:
    return Structure(name, entries, ways, tuple(levels))


def _psc() -> tuple[Structure, Structure, Structure]:
    # ChampSim's defaults (sets x ways): level 4: 1x4, level 3: 2x4, level 2: 4x8.
    return (_s("psc_pml4e", 4, 4, 4), _s("psc_pdpte", 8, 4, 3), _s("psc_pde", 32, 8, 2))


#: The PML5E cache of the CPUs with 5-level paging (Ice Lake server and
#: later, Zen 4): the SDM names it (4.10.3.1) without a size; two entries,
#: fully associative, is this model's assumption (a kernel touches one
#: PML5E for its direct map and one for its image and modules).
_PSC_PML5E = Structure("psc_pml5e", 2, 2, (5,))


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
        psc=_psc(), psc_pml5e=_PSC_PML5E),
    # Zen 4: L1 DTLB 72 entries fully associative, all sizes; ITLB 64 fully
    # associative; L2 DTLB 3072x24 for 4K/2M (1G smashed to 2M: held as 2M
    # entries is not modelled, 1G is held as 1G); 64-entry page directory cache.
    "zen4": TlbConfig(
        "zen4",
        l1d=(_s("dtlb", 72, 72, 1, 2, 3),),
        l1i=(_s("itlb", 64, 64, 1, 2, 3),),
        stlb=(_s("l2_dtlb", 3072, 24, 1, 2, 3),),
        psc=(_s("pwc_pml4e", 4, 4, 4), _s("pwc_pdpte", 16, 4, 3), _s("pdc", 64, 8, 2)),
        psc_pml5e=_PSC_PML5E),
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
    ``l1i``, ``stlb`` (lists) or ``psc`` (three entries), and ``psc_pml5e``
    (one structure with ``levels = [5]``, or null for none)."""
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
    if "psc_pml5e" in data:
        changes["psc_pml5e"] = (None if data["psc_pml5e"] is None
                                else structs([data["psc_pml5e"]], "psc_pml5e")[0])
    for key in ("replacement", "stlb_hit_cycles", "walk_base_cycles", "walk_ref_cycles"):
        if key in data:
            changes[key] = data[key]
    unknown = set(data) - {"base", "name", "l1d", "l1i", "stlb", "psc", "psc_pml5e",
                           "replacement",
                           "stlb_hit_cycles", "walk_base_cycles", "walk_ref_cycles"}
    if unknown:
        raise TlbConfigError(f"unknown keys in {p.name}: {sorted(unknown)}")
    cfg = replace(cfg, **changes)
    cfg.check()
    return cfg


#: Counter order shared with _native.c.


def layout(cfg: TlbConfig):
    """Structure list (TLBs first, then the PSCs: PML4E, PDPTE, PDE, PML5E)
    and index maps."""
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
    for p in (*cfg.psc, cfg.psc_pml5e):
        if p is None:
            psc_idx.append(-1)
        else:
            psc_idx.append(len(all_structs))
            all_structs.append(p)
    return all_structs, per_level(cfg.l1d), per_level(cfg.l1i), per_level(cfg.stlb), psc_idx, len(structs)
