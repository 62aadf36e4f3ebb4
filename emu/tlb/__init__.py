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
page is translated twice (once per page), as hardware does. Instruction
fetch is counted per executed block (one ITLB access per page a block
spans). The same decoder feeds :class:`PyTlb`, the pure-Python twin used to
check the C path (identical counts on the same run).

Counters carry Linux ``perf`` event names (Intel's), see :data:`PERF_NAMES`.
The cycle estimate is a documented latency model, not a measurement:
``stlb_hit_cycles`` per STLB hit and ``walk_base_cycles`` +
``walk_ref_cycles`` per entry read for each walk.

The package: :mod:`.config` (geometries, presets, loader), :mod:`.counters`
(raw counters, perf names), :mod:`.decode` (operand decoding),
:mod:`.native` (:class:`TlbModel`), :mod:`.pytwin` (:class:`PyTlb`).

A model attaches to a machine by assignment (``m.tlb = TlbModel("skylake")``)
and then sees every emulation of that CPU until ``m.tlb = None``. The
machine calls back ``attach(m)``, ``detach(m)``, ``forget_code()`` (code was
rewritten), ``load_cr3(pa)``, ``flush_all()``, ``invlpg(va)`` and
``stats()``; the models use only the machine's public API.
"""

from .config import CPU_PRESET, PRESETS, Structure, TlbConfig, TlbConfigError, load_config, preset
from .counters import COUNTERS, PERF_NAMES
from .decode import describe, read_code
from .native import TlbModel
from .pytwin import PyTlb

__all__ = [
    "COUNTERS",
    "CPU_PRESET",
    "PERF_NAMES",
    "PRESETS",
    "PyTlb",
    "Structure",
    "TlbConfig",
    "TlbConfigError",
    "TlbModel",
    "describe",
    "load_config",
    "preset",
    "read_code",
]
