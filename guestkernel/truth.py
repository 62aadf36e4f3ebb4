"""Ground truth from a real kernel's memory: dumps read with drgn
(re-exported as :mod:`dmfrag.truth`, with the harness's dump capture).

A real kernel's whole memory-management state can be had from a dump of its
memory: the direct map's and the image mapping's page tables, every buddy
free list in list order, the per-CPU lists, the pageblock migratetypes, the
vmalloc areas with their pages, the modules and BPF packs. This module reads
them with drgn (the programmable debugger kernel developers use) and the
kernel's own debug vmlinux, and keeps them as a :class:`KernelState` of numpy
arrays, stored compactly (``.npz``) beside a recorded trace.

How a dump is taken (:func:`dmfrag.truth.capture_on_pause`): the real-kernel harness runs
the guest with the ``dumpwait`` helper at each snapshot point; it marks the
point in the trace, prints ``@@PAUSE dump POINT PADDR SIZE`` and holds still
while the host stops the machine and runs QEMU's ``dump-guest-memory`` (an
ELF core of guest-physical memory). ``PADDR`` is ``/sys/kernel/vmcoreinfo``:
where the kernel keeps its VMCOREINFO note, which drgn needs to read a core.
QEMU's own route to the note (``-device vmcoreinfo`` plus the guest loading
``qemu_fw_cfg.ko``) is not taken: loading a module changes the very direct
map being measured (module text is made read-only, and splits). The note is
read from the dump at that address instead and handed to drgn.

Any core drgn reads works the same (:func:`extract`): a QEMU dump, a kdump
vmcore of a production machine (its note is in the file), or the running
kernel's ``/proc/kcore``.

What is read, and the kernel's names for it:

* ``direct_pages_count[]`` (arch/x86/mm/pat/set_memory.c) and the vm events
  ``direct_map_level{2,3}_splits`` (and 7.2's ``_collapses``),
  ``NR_FREE_PAGES``;
* page tables: every present entry of PUD, PMD and PTE level over the direct
  map (``page_offset_base`` to the end of RAM rounded up to 1 GiB) and the
  image mapping (``__START_KERNEL_map`` + ``KERNEL_IMAGE_SIZE``), as
  (VA, level, raw entry); levels are ``enum pg_level`` (1 4K, 2 2M, 3 1G);
* each zone's ``free_area[order].free_list[migratetype]``, pfns in list
  order; the per-CPU lists (``per_cpu_pages.lists[pindex]``);
* pageblock migratetypes (``mem_section_usage.pageblock_flags``);
* vmalloc areas (``vmap_area``/``vm_struct``: range, flags, caller, pages),
  modules' address regions, BPF prog packs;
* the firmware e820 table and the command line (what :meth:`from_state
  <guestkernel.Kernel.from_state>` boots the model with).
"""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DIRECT_SPAN",
    "NO_PAGEBLOCK",
    "START_KERNEL_MAP",
    "TRUTH_VERSION",
    "KernelState",
    "TruthError",
    "check_drgn",
    "compare_free",
    "compare_tables",
    "extract",
    "find_vmcoreinfo",
    "load_states",
    "model_tables",
    "rebase_direct",
    "save_states",
    "state_bytes",
    "truth_path",
    "vmcoreinfo_from_core",
    "walk_tables",
]

TRUTH_VERSION = 1
START_KERNEL_MAP = 0xFFFFFFFF80000000
_PHYS_MASK = ((1 << 52) - 1) & ~0xFFF
_PS = 1 << 7
#: pfns are uint64; "no pageblock here" (no memory section) in pageblock_mt
NO_PAGEBLOCK = 255


class TruthError(RuntimeError):
    """A dump cannot be read or a stored state is not usable: says why."""


@dataclass
class KernelState:
    """One real kernel's memory-management state at one point."""

    point: str
    release: str
    la57: bool
    page_offset: int
    vmemmap_base: int
    max_pfn: int
    #: ``direct_pages_count[PG_LEVEL_NONE..PG_LEVEL_512G]``
    direct_pages_count: list[int]
    #: nr_free_pages, the direct-map split/collapse events, DirectMap4k/2M/1G (kB)
    counters: dict[str, int]
    #: present PUD/PMD/PTE entries of the direct map and the image mapping
    pt_va: np.ndarray
    pt_level: np.ndarray
    pt_entry: np.ndarray
    #: zones: [{name, start_pfn, spanned, present, managed, nr_free, watermark
    #: (min, low, high), lowmem_reserve, pcp: [{count, high, batch, free_factor
    #: ... as the kernel has them} per CPU]}], by index
    zones: list[dict]
    #: buddy free blocks in list order within each (zone, order, migratetype)
    free_zone: np.ndarray
    free_order: np.ndarray
    free_mt: np.ndarray
    free_pfn: np.ndarray
    #: per-CPU list pages: cpu, zone, list index, order, pfn (list order)
    pcp_cpu: np.ndarray
    pcp_zone: np.ndarray
    pcp_pindex: np.ndarray
    pcp_order: np.ndarray
    pcp_pfn: np.ndarray
    #: migratetype of each pageblock (pfn >> pageblock_order), NO_PAGEBLOCK where none
    pageblock_order: int
    pageblock_mt: np.ndarray
    #: PageReserved of each pfn below max_pfn, bit-packed (little bit order)
    page_reserved: np.ndarray
    #: vmalloc areas: start, size, flags, caller (function name), their pages
    vm_start: np.ndarray
    vm_size: np.ndarray
    vm_flags: np.ndarray
    vm_caller: list[str]
    vm_nr_pages: np.ndarray
    vm_pages: np.ndarray
    #: [{name, regions: [[start, size], ...]}]
    modules: list[dict] = field(default_factory=list)
    #: addresses of the BPF prog packs (6.1+)
    bpf_packs: list[int] = field(default_factory=list)
    #: firmware e820 table [[addr, size, type]] and the kernel command line
    e820: list[list[int]] = field(default_factory=list)
    cmdline: str = ""
    #: events in the tracing ring buffer when the dump was taken (-1: not
    #: read): where a recorded trace's dump point is, to the event
    trace_entries: int = -1
    #: seconds taken to read it (not stored)
    seconds: float = 0.0

    # -- derived -------------------------------------------------------------

    def free_blocks(self) -> int:
        return len(self.free_pfn)

    def free_mask(self, npages: int | None = None) -> np.ndarray:
        """A bool per pfn: free in the buddy lists or on a per-CPU list."""
        n = npages if npages is not None else self.max_pfn
        mask = np.zeros(n, dtype=bool)
        for pfns, orders in ((self.free_pfn, self.free_order), (self.pcp_pfn, self.pcp_order)):
            for order in np.unique(orders):
                heads = pfns[orders == order].astype(np.int64)
                heads = heads[heads < n]
                span = np.arange(1 << int(order), dtype=np.int64)
                idx = (heads[:, None] + span[None, :]).ravel()
                mask[idx[idx < n]] = True
        return mask

    def reserved_mask(self) -> np.ndarray:
        """A bool per pfn below max_pfn: PageReserved."""
        return np.unpackbits(self.page_reserved, bitorder="little")[: self.max_pfn].astype(bool)

    @property
    def booting(self) -> bool:
        """Taken while the kernel boots (the recorder's ``trace-start``):
        no zone has watermarks yet (``init_per_zone_wmark_min`` is an
        initcall), the per-CPU lists are the boot pageset and deferred
        struct-page init has not freed its range."""
        zones = [z for z in self.zones if z.get("managed")]
        return bool(zones) and all(not any(z.get("watermark") or [1]) for z in zones)

    def nr_free_listed(self) -> int:
        """Pages on the buddy lists (what NR_FREE_PAGES counts)."""
        return int(np.sum(np.left_shift(1, self.free_order.astype(np.int64))))

    def summary(self) -> dict:
        return {"point": self.point, "release": self.release, "la57": self.la57,
                "max_pfn": self.max_pfn, "direct_pages_count": self.direct_pages_count,
                "counters": self.counters, "page_table_entries": len(self.pt_va),
                "free_blocks": self.free_blocks(), "free_pages_listed": self.nr_free_listed(),
                "pcp_pages": len(self.pcp_pfn), "vmalloc_areas": len(self.vm_start),
                "modules": [m["name"] for m in self.modules], "bpf_packs": len(self.bpf_packs)}


_ARRAYS = ("pt_va", "pt_level", "pt_entry", "free_zone", "free_order", "free_mt", "free_pfn",
           "pcp_cpu", "pcp_zone", "pcp_pindex", "pcp_order", "pcp_pfn", "pageblock_mt", "page_reserved",
           "vm_start", "vm_size", "vm_flags", "vm_nr_pages", "vm_pages")
_META = ("point", "release", "la57", "page_offset", "vmemmap_base", "max_pfn",
         "direct_pages_count", "counters", "zones", "pageblock_order", "vm_caller", "modules",
         "bpf_packs", "e820", "cmdline", "trace_entries")


def truth_path(trace: str | Path) -> Path:
    """Where a trace's states are kept: ``X.jsonl.gz`` -> ``X.truth.npz``."""
    p = Path(trace)
    name = p.name
    for suffix in (".jsonl.gz", ".jsonl", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".truth.npz")


def save_states(path: str | Path, states: list[KernelState]) -> Path:
    """Write states to one compressed ``.npz`` (arrays ``I/name``, and a
    JSON ``meta`` with the rest), atomically."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    meta = {"version": TRUTH_VERSION, "states": []}
    for i, s in enumerate(states):
        meta["states"].append({k: getattr(s, k) for k in _META})
        for name in _ARRAYS:
            arrays[f"{i}/{name}"] = getattr(s, name)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    tmp.replace(path)
    return path


def load_states(path: str | Path) -> list[KernelState]:
    """The states of a ``.npz`` written by :func:`save_states`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("version") != TRUTH_VERSION:
                raise TruthError(f"{path}: truth version {meta.get('version')!r}, this dmfrag "
                                 f"reads version {TRUTH_VERSION}")
            out = []
            for i, m in enumerate(meta["states"]):
                m.setdefault("trace_entries", -1)
                arrays = {name: z[f"{i}/{name}"] for name in _ARRAYS}
                out.append(KernelState(**m, **arrays))
            return out
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise TruthError(f"{path}: not a dmfrag truth file ({exc})") from None


# -- reading a core ------------------------------------------------------------------

def _elf_segments(path: Path) -> list[tuple[int, int, int, int]] | None:
    """(p_type, offset, paddr, filesz) of each program header of a 64-bit
    ELF file; None when the file is not one."""
    with open(path, "rb") as f:
        eh = f.read(64)
        if eh[:4] != b"\x7fELF" or eh[4] != 2:
            return None
        phoff, = struct.unpack_from("<Q", eh, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", eh, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _f, off, _va, pa, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        out.append((p_type, off, pa, filesz))
    return out


def _elf_loads(path: Path) -> list[tuple[int, int, int]]:
    """(paddr, filesz, offset) of an ELF core's PT_LOAD segments."""
    segs = _elf_segments(path)
    if segs is None:
        raise TruthError(f"{path} is not a 64-bit ELF core (dump-guest-memory without -z)")
    return [(pa, filesz, off) for p_type, off, pa, filesz in segs if p_type == 1]


def vmcoreinfo_from_core(core: str | Path, paddr: int) -> bytes:
    """The VMCOREINFO note's text at guest-physical ``paddr`` of an ELF
    core (the address ``/sys/kernel/vmcoreinfo`` gives)."""
    core = Path(core)
    segs = _elf_loads(core)

    def read(addr: int, n: int) -> bytes:
        for pa, size, off in segs:
            if pa <= addr and addr + n <= pa + size:
                with open(core, "rb") as f:
                    f.seek(off + addr - pa)
                    return f.read(n)
        raise TruthError(f"{core}: physical {addr:#x}+{n} is not in the dump")
    namesz, descsz, _type = struct.unpack("<III", read(paddr, 12))
    if namesz > 64 or descsz > 1 << 16:
        raise TruthError(f"{core}: no ELF note at {paddr:#x} (namesz {namesz}, descsz {descsz})")
    note = read(paddr, 12 + ((namesz + 3) & ~3) + descsz)
    name = note[12:12 + namesz].rstrip(b"\0")
    if name != b"VMCOREINFO":
        raise TruthError(f"{core}: the note at {paddr:#x} is {name!r}, not VMCOREINFO")
    return note[12 + ((namesz + 3) & ~3):][:descsz]


def check_drgn() -> None:
    """drgn is importable, or one error saying how to get it."""
    try:
        import drgn  # noqa: F401
    except ImportError:
        raise TruthError("reading a kernel dump needs drgn: pip install 'dmfrag[truth]' "
                         "(or pip install drgn)") from None


def find_vmcoreinfo(core: str | Path) -> bytes | None:
    """The VMCOREINFO note's text of an ELF core that has no such note in
    its headers (a QEMU dump taken without ``-device vmcoreinfo``): the
    kernel keeps the note in its memory (``vmcoreinfo_note``), found by
    its name followed by ``OSRELEASE=``. None when there is none."""
    import mmap
    core = Path(core)
    with open(core, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pat = b"VMCOREINFO\x00\x00OSRELEASE="
        at = mm.find(pat)
        while at >= 12:
            namesz, descsz, _type = struct.unpack_from("<III", mm, at - 12)
            if namesz == 11 and 0 < descsz < 1 << 16:
                return bytes(mm[at + 12: at + 12 + descsz])
            at = mm.find(pat, at + 1)
    return None


def _elf_has_vmcoreinfo(path: Path) -> bool:
    """Whether an ELF core's PT_NOTE segments hold a VMCOREINFO note (True
    for a core that is not ELF, kdump's compressed format: drgn decides)."""
    segs = _elf_segments(path)
    if segs is None:
        return True
    with open(path, "rb") as f:
        for p_type, off, _pa, filesz in segs:
            if p_type == 4 and filesz < 1 << 24:
                f.seek(off)
                if b"VMCOREINFO" in f.read(filesz):
                    return True
    return False


def _program(core: str | Path, vmlinux: str | Path, vmcoreinfo: bytes | None):
    check_drgn()
    import drgn
    prog = drgn.Program(vmcoreinfo=vmcoreinfo) if vmcoreinfo else drgn.Program()
    try:
        if str(core) == "/proc/kcore":
            prog.set_kernel()
        else:
            prog.set_core_dump(str(core))
    except (drgn.FaultError, ValueError, OSError) as exc:
        raise TruthError(f"drgn cannot read {core}: {exc}") from None
    try:
        prog.load_debug_info([str(vmlinux)])
    except drgn.MissingDebugInfoError as exc:
        if "vmlinux" in str(exc) or "kernel" in str(exc).split(":")[0]:
            raise TruthError(f"drgn: {vmlinux} does not match the kernel in {core}: {exc}"
                             ) from None
        # missing module debug info is fine: only vmlinux's types are used
    return prog


def _try(prog, name: str):
    try:
        return prog[name]
    except KeyError:
        return None


def walk_tables(read_table, top: int, levels: int, ranges: list[tuple[int, int]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every present entry of P4D (PGD with 4 levels), PUD, PMD and PTE level in ``ranges`` of the
    tables rooted at physical ``top`` (``levels`` 4 or 5), each as (VA,
    level, entry); ``read_table(pa)`` gives the 512 entries of a table page.
    Shared by the real kernel's tables (read from its dump) and the model's."""
    bits = 12 + 9 * levels
    mask = (1 << bits) - 1
    high = ((1 << 64) - 1) & ~mask
    vas: list[np.ndarray] = []
    lvs: list[np.ndarray] = []
    ents: list[np.ndarray] = []

    def visit(table_pa: int, level: int, base: int, lo_: int, hi_: int, ext: int) -> None:
        shift = 12 + 9 * (level - 1)
        first = max(0, (lo_ - base) >> shift) if lo_ > base else 0
        last = min(511, (hi_ - 1 - base) >> shift)
        if last < first:
            return
        t = read_table(table_pa)
        idx = np.arange(first, last + 1, dtype=np.uint64)
        sub = t[first:last + 1]
        present = (sub & np.uint64(1)) != 0
        idx, sub = idx[present], sub[present]
        if level <= 4:
            vas.append((np.uint64(base) + idx * np.uint64(1 << shift)) | np.uint64(ext))
            lvs.append(np.full(len(idx), level, dtype=np.uint8))
            ents.append(sub.astype(np.uint64))
        if level == 1:
            return
        for i, e in zip(idx.tolist(), sub.tolist()):
            if level <= 3 and e & _PS:
                continue
            visit(e & _PHYS_MASK, level - 1, base + (i << shift), lo_, hi_, ext)
    for lo, hi in ranges:
        visit(top, levels, 0, lo & mask, ((hi - 1) & mask) + 1,
              high if lo >> (bits - 1) & 1 else 0)
    if not vas:
        return (np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros(0, np.uint64))
    return np.concatenate(vas), np.concatenate(lvs), np.concatenate(ents)


def extract(core: str | Path, vmlinux: str | Path, *, vmcoreinfo: bytes | None = None,
            point: str = "") -> KernelState:
    """Read a kernel's state from ``core`` (an ELF or kdump core, or
    ``/proc/kcore``) with its debug ``vmlinux``; ``vmcoreinfo``: the note's
    text where the core has none (see :func:`vmcoreinfo_from_core`)."""
    t0 = time.perf_counter()
    if not Path(core).exists():
        raise TruthError(f"no such core: {core}")
    if not Path(vmlinux).is_file():
        raise TruthError(f"no such vmlinux: {vmlinux}")
    if vmcoreinfo is None and str(core) != "/proc/kcore" and not _elf_has_vmcoreinfo(Path(core)):
        vmcoreinfo = find_vmcoreinfo(core)
        if vmcoreinfo is None:
            raise TruthError(f"{core} has no VMCOREINFO note, in its headers or in its memory: "
                             f"drgn cannot read it (dump with QEMU's -device vmcoreinfo, or "
                             f"give the note's text)")
    prog = _program(core, vmlinux, vmcoreinfo)
    from drgn import FaultError
    try:
        return _extract(prog, point, t0)
    except FaultError as exc:
        raise TruthError(f"reading {core}: {exc} (does {vmlinux} belong to this kernel?)"
                         ) from None
    except (LookupError, AttributeError) as exc:
        # a name this kernel does not have: a version the reader does not know
        raise TruthError(f"reading {core} with {Path(vmlinux).name}: {type(exc).__name__}: "
                         f"{exc} (a kernel whose structures dmfrag.truth does not know)"
                         ) from None


def _extract(prog, point: str, t0: float) -> KernelState:
    from drgn.helpers.linux.cpumask import for_each_possible_cpu
    from drgn.helpers.linux.mm import for_each_vmap_area
    from drgn.helpers.linux.mmzone import for_each_online_pgdat
    from drgn.helpers.linux.percpu import per_cpu_ptr
    from drgn.helpers.linux.vmstat import global_vm_event_state, global_zone_page_state

    release = prog["init_uts_ns"].name.release.string_().decode()
    l5 = _try(prog, "__pgtable_l5_enabled")
    la57 = bool(l5.value_()) if l5 is not None else False
    page_offset = prog["page_offset_base"].value_()
    vmemmap = prog["vmemmap_base"].value_()
    page_size = prog.type("struct page").size
    lru_off = _offsetof(prog, "struct page", "lru")
    max_pfn = prog["max_pfn"].value_()

    dpc = [int(x) for x in prog["direct_pages_count"].read_()]
    counters = {"nr_free_pages": global_zone_page_state(prog["NR_FREE_PAGES"])}
    for enum, name in (("DIRECT_MAP_LEVEL2_SPLIT", "direct_map_level2_splits"),
                       ("DIRECT_MAP_LEVEL3_SPLIT", "direct_map_level3_splits"),
                       ("DIRECT_MAP_LEVEL2_COLLAPSE", "direct_map_level2_collapses"),
                       ("DIRECT_MAP_LEVEL3_COLLAPSE", "direct_map_level3_collapses")):
        item = _try(prog, enum)
        if item is not None:
            counters[name] = global_vm_event_state(prog, item)
    counters["DirectMap4k"] = dpc[1] << 2
    counters["DirectMap2M"] = dpc[2] << 11
    if len(dpc) > 3:
        counters["DirectMap1G"] = dpc[3] << 20

    # -- page tables ----------------------------------------------------------
    pgd = prog["init_mm"].pgd.value_()           # init_top_pgt, in the image
    from drgn.helpers.linux.mm import follow_phys
    top = follow_phys(prog["init_mm"].address_of_(), pgd).value_()

    def read_table(pa: int) -> np.ndarray:
        return np.frombuffer(prog.read(pa, 4096, True), dtype=np.uint64)
    image_size = 1 << 30
    direct_end = page_offset + (((max_pfn << 12) + (1 << 30) - 1) & ~((1 << 30) - 1))
    pt_va, pt_level, pt_entry = walk_tables(
        read_table, top, 5 if la57 else 4,
        [(page_offset, direct_end), (START_KERNEL_MAP, START_KERNEL_MAP + image_size)])

    # -- zones, free lists, per-CPU lists ---------------------------------------
    nr_mt = prog["MIGRATE_TYPES"].value_()
    pcptypes = prog["MIGRATE_PCPTYPES"].value_()
    pb_order = int(prog["pageblock_order"].value_()) if _try(prog, "pageblock_order") \
        is not None else 9
    read_u64 = prog.read_u64
    zones = []
    fz: list[int] = []
    fo: list[int] = []
    fm: list[int] = []
    fp: list[int] = []
    pc: list[int] = []
    pz: list[int] = []
    pi: list[int] = []
    po: list[int] = []
    pp: list[int] = []

    def walk_list(head: int):
        node = read_u64(head)
        n = 0
        while node != head:
            yield (node - lru_off - vmemmap) // page_size
            node = read_u64(node)
            n += 1
            if n > 1 << 26:
                raise TruthError(f"a list at {head:#x} does not come back to its head")
    cpus = list(for_each_possible_cpu(prog))
    pgdat = next(iter(for_each_online_pgdat(prog)))
    for zi in range(len(pgdat.node_zones)):
        zone = pgdat.node_zones[zi]
        managed = zone.managed_pages.counter.value_()
        zinfo = {"name": zone.name.string_().decode(),
                 "start_pfn": zone.zone_start_pfn.value_(),
                 "spanned": zone.spanned_pages.value_(),
                 "present": zone.present_pages.value_(), "managed": managed,
                 "nr_free": int(zone.vm_stat[prog["NR_FREE_PAGES"]].counter.value_()),
                 "watermark": [int(x) for x in zone._watermark.read_()][:3],
                 "lowmem_reserve": [int(x) for x in zone.lowmem_reserve.read_()]}
        zones.append(zinfo)
        if not managed:
            continue
        fa = zone.free_area
        for order in range(len(fa)):
            lists = fa[order].free_list
            for mt in range(min(nr_mt, len(lists))):
                for pfn in walk_list(lists[mt].address_):
                    fz.append(zi)
                    fo.append(order)
                    fm.append(mt)
                    fp.append(pfn)
        pcp_field = "per_cpu_pageset" if _has_member(zone, "per_cpu_pageset") else "pageset"
        zinfo["pcp"] = []
        for cpu in cpus:
            pcp = per_cpu_ptr(getattr(zone, pcp_field), cpu)
            if pcp_field == "pageset":
                pcp = pcp.pcp
            zinfo["pcp"].append({name: int(getattr(pcp, name).value_())
                                 for name in ("count", "high", "batch", "free_factor",
                                              "free_count", "high_min", "high_max",
                                              "alloc_factor", "flags")
                                 if _has_member(pcp, name)})
            nlists = len(pcp.lists)
            low = pcptypes * 4                      # PAGE_ALLOC_COSTLY_ORDER + 1 orders
            for pindex in range(nlists):
                order = 0 if nlists == pcptypes else (
                    pindex // pcptypes if pindex < low else 9)
                for pfn in walk_list(pcp.lists[pindex].address_):
                    pc.append(cpu)
                    pz.append(zi)
                    pi.append(pindex)
                    po.append(order)
                    pp.append(pfn)

    # -- pageblocks ------------------------------------------------------------
    from drgn.helpers.linux.mmzone import nr_to_section, present_section
    sec_bits = 27
    pfn_sec_shift = sec_bits - 12
    blocks_per_sec = 1 << (pfn_sec_shift - pb_order)
    if _try(prog, "NR_PAGEBLOCK_BITS") is not None:
        nbits = prog["NR_PAGEBLOCK_BITS"].value_()
    else:                     # 6.16+: roundup_pow_of_two(__NR_PAGEBLOCK_BITS)
        nbits = 1 << (prog["__NR_PAGEBLOCK_BITS"].value_() - 1).bit_length()
    nsec = (max_pfn + (1 << pfn_sec_shift) - 1) >> pfn_sec_shift
    pageblock_mt = np.full(nsec * blocks_per_sec, NO_PAGEBLOCK, dtype=np.uint8)
    mt_bits = 3
    # PageReserved (never given to the buddy, or taken back): from each
    # present section's struct pages, the flags word of each
    pages_per_sec = 1 << pfn_sec_shift
    reserved = np.ones(nsec * pages_per_sec, dtype=bool)
    pg_reserved = prog["PG_reserved"].value_()
    words = page_size // 8
    for nr in range(nsec):
        ms = nr_to_section(prog, nr)
        if not ms or not present_section(ms) or not ms.usage:
            continue
        addr = ms.usage.pageblock_flags.address_
        raw = np.frombuffer(prog.read(addr, (blocks_per_sec * nbits + 7) // 8), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[: blocks_per_sec * nbits]
        bits = bits.reshape(blocks_per_sec, nbits)[:, :mt_bits]
        mts = (bits * (1 << np.arange(mt_bits))).sum(axis=1).astype(np.uint8)
        pageblock_mt[nr * blocks_per_sec:(nr + 1) * blocks_per_sec] = mts
        first = vmemmap + nr * pages_per_sec * page_size
        flags = np.frombuffer(prog.read(first, pages_per_sec * page_size),
                              dtype=np.uint64)[::words]
        reserved[nr * pages_per_sec:(nr + 1) * pages_per_sec] = (
            flags >> np.uint64(pg_reserved) & np.uint64(1)).astype(bool)

    # -- vmalloc areas, modules, packs --------------------------------------------
    vs, vz, vf, vn, vc = [], [], [], [], []
    vpages: list[np.ndarray] = []
    for va in for_each_vmap_area(prog):
        vm = va.vm if _has_member(va, "vm") else None
        if vm is None or not vm:
            continue
        vs.append(vm.addr.value_())
        vz.append(vm.size.value_())
        vf.append(vm.flags.value_())
        nr = vm.nr_pages.value_()
        vn.append(nr)
        caller = vm.caller.value_()
        try:
            vc.append(prog.symbol(caller).name)
        except LookupError:
            vc.append(hex(caller))
        if nr and vm.pages:
            ptrs = np.frombuffer(prog.read(vm.pages.value_(), 8 * nr), dtype=np.uint64)
            vpages.append(((ptrs - np.uint64(vmemmap)) // np.uint64(page_size)).astype(np.uint64))
    modules = []
    try:
        from drgn.helpers.linux.module import for_each_module, module_address_regions
        for mod in for_each_module(prog):
            modules.append({"name": mod.name.string_().decode(),
                            "regions": [[int(a), int(s)] for a, s in module_address_regions(mod)
                                        if s]})
    except (ImportError, LookupError):
        pass
    packs = []
    pack_list = _try(prog, "pack_list")
    if pack_list is not None:
        from drgn.helpers.linux.list import list_for_each_entry
        for pack in list_for_each_entry("struct bpf_prog_pack", pack_list.address_of_(), "list"):
            packs.append(pack.ptr.value_())
    e820 = []
    fw = _try(prog, "e820_table_firmware")
    if fw is not None:
        for i in range(fw.nr_entries.value_()):
            e = fw.entries[i]
            e820.append([e.addr.value_(), e.size.value_(), e.type.value_()])
    trace_entries = -1
    gt = _try(prog, "global_trace")
    if gt is not None:
        try:                       # ring_buffer_entries(): written, less overruns and reads
            buf = gt.array_buffer.buffer
            trace_entries = sum(
                buf.buffers[c].entries.a.counter.value_()
                - buf.buffers[c].overrun.a.counter.value_() - buf.buffers[c].read.value_()
                for c in cpus if buf.buffers[c])
        except (LookupError, AttributeError):
            trace_entries = -1
    mfk = _try(prog, "min_free_kbytes")
    counters["min_free_kbytes"] = int(mfk.value_()) if mfk is not None else -1
    cmd = _try(prog, "saved_command_line")
    cmdline = cmd.string_().decode(errors="replace") if cmd is not None and cmd else ""

    u64 = lambda xs: np.array(xs, dtype=np.uint64)
    u8 = lambda xs: np.array(xs, dtype=np.uint8)
    return KernelState(
        point=point, release=release, la57=la57, page_offset=page_offset,
        vmemmap_base=vmemmap, max_pfn=max_pfn, direct_pages_count=dpc, counters=counters,
        pt_va=pt_va, pt_level=pt_level, pt_entry=pt_entry, zones=zones,
        free_zone=u8(fz), free_order=u8(fo), free_mt=u8(fm), free_pfn=u64(fp),
        pcp_cpu=np.array(pc, dtype=np.uint16), pcp_zone=u8(pz), pcp_pindex=u8(pi),
        pcp_order=u8(po), pcp_pfn=u64(pp), pageblock_order=pb_order,
        pageblock_mt=pageblock_mt,
        page_reserved=np.packbits(reserved[:max_pfn], bitorder="little"), vm_start=u64(vs), vm_size=u64(vz), vm_flags=u64(vf),
        vm_caller=vc, vm_nr_pages=u64(vn),
        vm_pages=np.concatenate(vpages) if vpages else u64([]),
        modules=modules, bpf_packs=packs, e820=e820, cmdline=cmdline,
        trace_entries=trace_entries,
        seconds=time.perf_counter() - t0)


def _offsetof(prog, type_name: str, member: str) -> int:
    from drgn import offsetof
    return offsetof(prog.type(type_name), member)


def _has_member(obj, name: str) -> bool:
    try:
        obj.member_(name)
        return True
    except LookupError:
        return False


# -- comparing with the model ----------------------------------------------------------

#: the bits compared: P RW US PWT PCD PS/PAT(4K) G, PAT(large) and NX; not the
#: accessed/dirty bits the CPU sets, nor the software bits (9-11, 52-62)
FLAG_MASK = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x80 | 0x1000 | (1 << 63)
_TABLE_MASK = 0x1 | 0x2 | 0x4 | (1 << 63)
_LEVEL_NAME = {1: "4K", 2: "2M", 3: "1G", 4: "512G"}


def _flag_names(entry: int, level: int) -> str:
    names = []
    for bit, name in ((1, "RW"), (2, "USR"), (3, "PWT"), (4, "PCD"), (8, "GLB"), (63, "NX")):
        if entry >> bit & 1:
            names.append(name)
    if level > 1 and entry & _PS:
        names.append("PSE")
    if (level == 1 and entry & 0x80) or (level > 1 and entry & _PS and entry & 0x1000):
        names.append("PAT")
    return " ".join(names) or "-"


#: the direct map's span with 4-level paging (64 TiB): what counts as a
#: direct-map address when moving one between layouts
DIRECT_SPAN = 1 << 46


def rebase_direct(vas: np.ndarray, from_offset: int, to_offset: int) -> np.ndarray:
    """Direct-map addresses moved from one PAGE_OFFSET to another (a guest
    with 5-level paging, a model with 4), same pfn; others unchanged."""
    vas = vas.astype(np.uint64)
    off = np.uint64(from_offset)
    direct = (vas >= off) & (vas < off + np.uint64(DIRECT_SPAN))
    return np.where(direct, vas - off + np.uint64(to_offset), vas)


def compare_tables(real: tuple[np.ndarray, np.ndarray, np.ndarray],
                   model: tuple[np.ndarray, np.ndarray, np.ndarray],
                   *, real_offset: int, model_offset: int) -> dict:
    """Entry by entry: present entries keyed by (VA, level), the direct-map
    VAs of each side taken relative to its own PAGE_OFFSET (the real
    guests run 5-level paging). A leaf differs in level, pfn or flags
    (:data:`FLAG_MASK`); a table entry in flags; a table entry whose page
    is elsewhere counts apart (``table_pfn_mismatches``): boot-time tables
    are the model's own placement. The first difference is named."""
    def keyed(vas, levels, entries, offset):
        rel = rebase_direct(vas, offset, 0)
        return {(int(v), int(lv)): int(e) for v, lv, e in zip(rel, levels, entries)}
    r = keyed(*real, real_offset)
    m = keyed(*model, model_offset)
    mism = 0
    table_pfn = 0
    first = None
    for key in sorted(set(r) | set(m)):
        re, me = r.get(key), m.get(key)
        va, level = key
        leaf = level == 1 or ((re if re is not None else me) & _PS)
        if re is not None and me is not None:
            mask = FLAG_MASK if leaf else _TABLE_MASK
            if leaf and (re & _PHYS_MASK) == (me & _PHYS_MASK) and (re & mask) == (me & mask):
                continue
            if not leaf and (re & mask) == (me & mask) and (re & _PS) == (me & _PS):
                if (re & _PHYS_MASK) != (me & _PHYS_MASK):
                    table_pfn += 1
                continue
        mism += 1
        if first is None:
            where = (f"direct map +{va:#x} (pfn {va >> 12:#x})" if va < 1 << 46
                     else f"image {va:#x}")

            first = (f"{where} level {_LEVEL_NAME.get(level, level)}: Linux "
                     f"{_say(re, leaf, level)}, model {_say(me, leaf, level)}")
    return {"pte_mismatches": mism, "table_pfn_mismatches": table_pfn, "first": first,
            "entries": len(r)}


def _say(e: int | None, leaf: bool, level: int) -> str:
    if e is None:
        return "not present"
    kind = "maps pfn" if leaf else "table at pfn"
    return f"{kind} {(e & _PHYS_MASK) >> 12:#x} [{_flag_names(e, level)}]"


def compare_free(real: KernelState, model_free: np.ndarray,
                 model_lists: dict | None = None) -> dict:
    """Free pages as sets: ``model_free`` a bool per pfn. The mismatches
    are pages free on one side only; the first is named by pfn and, where
    Linux has it free, by its list (zone, order, migratetype, position).
    With ``model_lists`` ({(zone_name, order, mt): [heads...]}), the lists
    are compared in order too (``order_mismatches``)."""
    n = min(len(model_free), real.max_pfn)
    rmask = real.free_mask(n)
    diff = np.flatnonzero(rmask[:n] != model_free[:n])
    out = {"free_list_mismatches": len(diff), "first": None,
           "linux_only": int(np.count_nonzero(rmask[:n] & ~model_free[:n])),
           "model_only": int(np.count_nonzero(~rmask[:n] & model_free[:n]))}
    if len(diff):
        pfn = int(diff[0])
        out["first"] = f"pfn {pfn:#x}: " + (
            f"free in Linux ({_where_listed(real, pfn)}), not in the model"
            if rmask[pfn] else "free in the model, allocated in Linux")
    if model_lists is not None:
        order_mism = 0
        first_order = None
        for key, heads in _real_lists(real).items():
            other = model_lists.get(key, [])
            for pos, (a, b) in enumerate(zip(heads, other)):
                if a != b:
                    order_mism += 1
                    if first_order is None:
                        first_order = (f"zone {key[0]} order {key[1]} migratetype {key[2]} "
                                       f"position {pos}: Linux pfn {a:#x}, model {b:#x}")
            order_mism += abs(len(heads) - len(other))
        out["order_mismatches"] = order_mism
        if out["first"] is None:
            out["first"] = first_order
    return out


def _real_lists(real: KernelState) -> dict:
    out: dict = {}
    for z, o, mt, pfn in zip(real.free_zone.tolist(), real.free_order.tolist(),
                             real.free_mt.tolist(), real.free_pfn.tolist()):
        out.setdefault((real.zones[z]["name"], o, mt), []).append(pfn)
    return out


MIGRATETYPE_NAMES = ("Unmovable", "Movable", "Reclaimable", "HighAtomic", "CMA", "Isolate")


def _where_listed(real: KernelState, pfn: int) -> str:
    heads = real.free_pfn.astype(np.int64)
    span = np.left_shift(1, real.free_order.astype(np.int64))
    hit = np.flatnonzero((heads <= pfn) & (pfn < heads + span))
    if len(hit):
        i = int(hit[0])
        z, o, mt = int(real.free_zone[i]), int(real.free_order[i]), int(real.free_mt[i])
        same = (real.free_zone == z) & (real.free_order == o) & (real.free_mt == mt)
        pos = int(np.count_nonzero(same[:i]))
        name = MIGRATETYPE_NAMES[mt] if mt < len(MIGRATETYPE_NAMES) else str(mt)
        return (f"zone {real.zones[z]['name']} order {o} {name} position {pos}, "
                f"block {int(heads[i]):#x}")
    hit = np.flatnonzero(real.pcp_pfn.astype(np.int64) == pfn)
    if len(hit):
        i = int(hit[0])
        return f"cpu {int(real.pcp_cpu[i])} per-CPU list {int(real.pcp_pindex[i])}"
    return "free"


def state_bytes(states: list[KernelState]) -> int:
    """The compressed size of states as stored (for the benchmark)."""
    buf = io.BytesIO()
    arrays = {f"{i}/{n}": getattr(s, n) for i, s in enumerate(states) for n in _ARRAYS}
    np.savez_compressed(buf, **arrays)
    return buf.tell()


def model_tables(k) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's present PUD/PMD/PTE entries over the same ranges as
    :func:`extract` reads from Linux (its direct map and image mapping)."""
    ram64 = k.machine.ram64

    def read_table(pa: int) -> np.ndarray:
        return ram64[pa >> 3: (pa >> 3) + 512]
    po = k.page_offset
    direct_end = po + (((k.max_pfn << 12) + (1 << 30) - 1) & ~((1 << 30) - 1))
    return walk_tables(read_table, k.pgt.root, k.paging_levels,
                       [(po, direct_end), (START_KERNEL_MAP, START_KERNEL_MAP + (1 << 30))])
