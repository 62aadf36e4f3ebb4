"""The kernel's users of CPA, as the call sequences Linux 6.1 makes.

* Modules (kernel/module/main.c, strict_rwx.c): ``module_alloc`` of the core
  layout (text | rodata | ro_after_init | data) in the module area with
  ``VM_FLUSH_RESET_PERMS``; then ``module_enable_ro`` (text, rodata RO),
  ``module_enable_nx`` (rodata, ro_after_init, data NX) and
  ``module_enable_x`` (text X, no alias); after init, ro_after_init RO.
  Unloading is ``vfree`` (which resets the direct-map aliases).
  From 6.4 (``KernelVersion.module_mem_types``) each memory type is its own
  allocation, and on 7.x the text comes from the execmem ROX cache
  (:class:`ExecmemCache`); see :meth:`ModuleLoader.load_module`.
* BPF JIT with ``bpf_prog_pack`` (kernel/bpf/core.c): programs up to a pack
  share 2 MiB packs allocated with ``module_alloc`` and made RO+X once;
  larger images get their own ``module_alloc``.
* ftrace trampolines and kprobe instruction pages: one ``module_alloc``
  page made RO+X each.
* secretmem (mm/secretmem.c): each page faulted in is taken out of the
  direct map (``set_direct_map_invalid_noflush`` + a flush of that page)
  and put back when freed.
* ``guest_memfd`` without direct map: the same, for a batch of pages.
* page tables protected read-only (PKS-style): the table page's direct-map
  address is made RO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from . import gfp as G
from .cpa import Cpa
from .gfp import parse_gfp
from .layout import PAGE_SIZE, PMD_SIZE
from .owner import PageOwner
from .versions import KernelVersion
from .vmalloc import PageAllocator, Vmalloc, VmFlags, VmStruct

__all__ = [
    "AreaSetup",
    "BpfJit",
    "BpfProg",
    "Execmem",
    "ExecmemCache",
    "GuestMemfd",
    "Module",
    "ModuleLoader",
    "ProtectedPageTables",
    "Secretmem",
    "UserGfp",
    "UsersError",
]

BPF_PROG_PACK_SIZE = 2 << 20
BPF_PROG_CHUNK_SIZE = 64
#: sizeof(struct bpf_binary_header): a u32 before an 8-aligned image
BPF_BINARY_HEADER = 8

#: What GFP a user asks of the page allocator: (user name, mainline GFP) ->
#: GFP; a policy may add GFP_UNMAPPED (the 2022 RFC does for modules and
#: secretmem). Users: "execmem", "secretmem", "pgtable".
UserGfp = Callable[[str, int], int]


class UsersError(ValueError):
    """A bad request to a CPA user (unknown handle, bad size); nothing changed."""


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


_CpaCall = Callable[[int, int], object]


class AreaSetup:
    """Protect a fresh execmem area step by step, all or nothing.

    Each :meth:`step` runs a CPA call and remembers what undoes its effect
    on the direct-map aliases (the area itself is freed: an NX-only change,
    which never reaches the alias, needs no undo). When a step runs out of
    guest memory (a split finds no table page; CPA has already undone that
    step), the steps done are undone newest first (they only rewrite entries
    their own splits made 4K: no allocation), the area
    is freed without the vm_reset_perms pass (its aliases are back to their
    defaults, and that pass could itself need table pages), and the
    MemoryError propagates. The splits the done steps made stay, as they
    would in Linux, which never merges them back."""

    def __init__(self, vmalloc: Vmalloc, area: VmStruct) -> None:
        self.vmalloc = vmalloc
        self.area = area
        self._undo: list[tuple[_CpaCall, int, int]] = []

    def step(self, do: _CpaCall, undo: _CpaCall | None, addr: int, numpages: int) -> None:
        do(addr, numpages)
        if undo is not None:
            self._undo.append((undo, addr, numpages))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, MemoryError):
            for undo, addr, numpages in reversed(self._undo):
                undo(addr, numpages)
            self.area.flags &= ~VmFlags.FLUSH_RESET_PERMS
            self.vmalloc.vfree(self.area.addr)
        return False


class _NoArea:
    """A module without an init layout: its init steps do nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def step(self, *args) -> None:
        raise AssertionError("no init layout to protect")


@dataclass
class Module:
    name: str
    area: VmStruct | None
    text_pages: int
    rodata_pages: int
    ro_after_init_pages: int
    data_pages: int
    #: the init layout's pages (freed once the module's init returned)
    init_text_pages: int = 0
    init_rodata_pages: int = 0
    init_data_pages: int = 0
    live: bool = True
    #: kernels with module memory types: each type's base address (the
    #: init types' until do_free_init); ``area`` is then the text's
    mem: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> int:
        return self.area.addr if self.area is not None else self.mem["text"]


class Execmem:
    """``module_alloc`` (``execmem_alloc`` since 6.10): a module-area vmalloc
    with ``VM_FLUSH_RESET_PERMS``, pages taken with the GFP the policy gives
    the "execmem" user; and how the kernel makes it read-only+executable
    (``set_memory_rox`` where the version has it, else RO then X)."""

    def __init__(self, vmalloc: Vmalloc, cpa: Cpa, version: KernelVersion,
                 user_gfp: UserGfp) -> None:
        self.vmalloc = vmalloc
        self.cpa = cpa
        self.version = version
        self.user_gfp = user_gfp
        #: 7.x: EXECMEM_MODULE_TEXT (and kprobes, ftrace) from the ROX cache
        self.rox_cache = ExecmemCache(self) if version.execmem_rox_cache else None

    def execmem_alloc_rw(self, size: int, *, text: bool, caller: str) -> int:
        """7.x's ``execmem_alloc_rw``: text from the ROX cache where the
        kernel has one (else, and data always, a module-area vmalloc with
        VM_FLUSH_RESET_PERMS), then ``execmem_force_rw``: ``set_memory_nx``
        and ``set_memory_rw`` on the range (both made on every type where
        the kernel has the cache, CONFIG_ARCH_HAS_EXECMEM_ROX). Returns the
        address."""
        npages = _pages(size)
        cache = self.rox_cache
        if text and cache is not None:
            addr = cache.alloc(npages * PAGE_SIZE)
        else:
            addr = self.module_alloc(npages * PAGE_SIZE, caller=caller).addr
        if cache is not None:
            try:
                self.cpa.set_memory_nx(addr, npages)
                self.cpa.set_memory_rw(addr, npages)
            except MemoryError:
                self.execmem_free(addr, undo=True)
                raise
        return addr

    def execmem_free(self, addr: int, *, undo: bool = False) -> None:
        """``execmem_free``: back to the ROX cache (made RW, then ROX
        again: ``__execmem_cache_free``) or ``vfree``. ``undo``: a load
        that failed gives its memory back as it found it, with no CPA call
        that could need a page (a vmalloc area without the reset pass)."""
        cache = self.rox_cache
        if cache is not None and cache.owns(addr):
            cache.free(addr, undo=undo)
            return
        if undo:
            self.vmalloc.find_area(addr).flags &= ~VmFlags.FLUSH_RESET_PERMS
        self.vmalloc.vfree(addr)

    def module_alloc(self, size: int, *, huge: bool = False, caller: str = "module_alloc",
                     reset_perms: bool = True) -> VmStruct:
        """A module-area vmalloc with the "execmem" user's GFP; with
        VM_FLUSH_RESET_PERMS unless ``reset_perms`` is False (the ROX
        cache's own areas: execmem_cache_populate_alloc asks only for
        VM_ALLOW_HUGE_VMAP)."""
        flags = (VmFlags.FLUSH_RESET_PERMS if reset_perms else VmFlags(0)) \
            | (VmFlags.ALLOW_HUGE_VMAP if huge else VmFlags(0))
        return self.vmalloc.vmalloc_node_range(
            size, start=self.version.modules_vaddr, end=self.version.modules_end,
            gfp=self.user_gfp("execmem", int(G.GFP_KERNEL)), flags=flags, caller=caller)

    def make_rox(self, setup: AreaSetup, addr: int, numpages: int, user: str) -> None:
        """Read-only then executable, or one ``set_memory_rox`` on kernels
        whose ``user`` calls it."""
        cpa = self.cpa
        if user in self.version.set_memory_rox_users:
            setup.step(cpa.set_memory_rox, cpa.set_memory_rw, addr, numpages)
        else:
            setup.step(cpa.set_memory_ro, cpa.set_memory_rw, addr, numpages)
            setup.step(cpa.set_memory_x, None, addr, numpages)

    def alloc_rox(self, size: int, *, huge: bool = False, user: str = "execmem",
                  caller: str = "module_alloc") -> VmStruct:
        """module_alloc made RO+X, all or nothing."""
        area = self.module_alloc(size, huge=huge, caller=caller)
        with AreaSetup(self.vmalloc, area) as setup:
            self.make_rox(setup, area.addr, area.size // PAGE_SIZE, user)
        return area

    def alloc_insn_page(self) -> int:
        """kprobes/ftrace: one module_alloc page made RO+X."""
        return self.alloc_rox(PAGE_SIZE, caller="insn page").addr


class ExecmemCache:
    """7.x's execmem ROX cache (mm/execmem.c, x86 from 6.14 with
    CONFIG_ARCH_HAS_EXECMEM_ROX): module text comes from 2M areas of the
    module space kept read-only+executable, handed out first fit in address
    order (``execmem_cache_alloc_locked``: the free ranges in a maple tree).

    * ``execmem_cache_populate_alloc``: when no free range fits, a new area
      of the request rounded up to 2M, ``VM_ALLOW_HUGE_VMAP`` (one order-9
      block, PMD-mapped; without reset perms), made ``set_memory_rox``
      whole: its direct-map alias read-only as one 2M page, no split. If
      that fails, an area of the request's own size.
    * ``__execmem_cache_free``: ``set_memory_nx`` and ``set_memory_rw``,
      then ``set_memory_rox`` again, and the range back with its free
      neighbours; then ``execmem_cache_clean``: each free range that is 2M
      aligned and a multiple of 2M long has its areas' direct map made
      valid (``set_direct_map_valid_noflush``, one request per block) and
      is vfree'd. (Linux frees the area ``find_vm_area`` finds at the
      range's start only; here every area the range holds.)
    * ``execmem_cache_free``'s slow path (a free that fails, retried from a
      work item) is not modelled: a free that runs out of memory raises."""

    def __init__(self, execmem: Execmem) -> None:
        self.execmem = execmem
        #: free ranges [start, end), sorted, merged with their neighbours
        self.free_ranges: list[list[int]] = []
        #: busy ranges: start -> size in bytes
        self.busy: dict[int, int] = {}
        #: the cache's own vmalloc areas, by address
        self.areas: dict[int, VmStruct] = {}

    def owns(self, addr: int) -> bool:
        return addr in self.busy

    def _take(self, size: int) -> int | None:
        for rng in self.free_ranges:
            if rng[1] - rng[0] >= size:
                addr = rng[0]
                rng[0] += size
                if rng[0] == rng[1]:
                    self.free_ranges.remove(rng)
                self.busy[addr] = size
                return addr
        return None

    def _add(self, addr: int, size: int) -> None:
        """``execmem_cache_add_locked``: merged with adjacent free ranges."""
        lo, hi = addr, addr + size
        keep = []
        for a, b in self.free_ranges:
            if b == lo:
                lo = a
            elif a == hi:
                hi = b
            else:
                keep.append([a, b])
        keep.append([lo, hi])
        keep.sort()
        self.free_ranges = keep

    def populate(self) -> int:
        """``execmem_cache_populate`` ahead of any request: one new 2M area,
        made ROX, all of it free in the cache (7.x fills the cache so while
        it boots, before tracing starts). Returns its address."""
        area = self._new_area(PMD_SIZE)
        return area.addr

    def alloc(self, size: int) -> int:
        addr = self._take(size)
        if addr is not None:
            return addr
        self._new_area(size)
        addr = self._take(size)
        assert addr is not None
        return addr

    def _new_area(self, size: int) -> VmStruct:
        """A new area of the module space for ``size`` bytes, 2M-rounded
        and PMD-mapped where memory allows, made ROX, added free."""
        ex = self.execmem
        whole = -(-size // PMD_SIZE) * PMD_SIZE
        area = None
        for alloc_size, huge in ((whole, True), (whole, False), (size, False)):
            try:
                area = ex.module_alloc(alloc_size, huge=huge, caller="execmem_cache",
                                       reset_perms=False)
                break
            except MemoryError:
                continue
        if area is None:
            raise MemoryError("execmem cache: no memory for a new area")
        try:
            ex.cpa.set_memory_rox(area.addr, area.size // PAGE_SIZE)
        except MemoryError:
            ex.vmalloc.vfree(area.addr)
            raise
        self.areas[area.addr] = area
        self._add(area.addr, area.size)
        return area

    def free(self, addr: int, *, undo: bool = False) -> None:
        size = self.busy[addr]
        npages = size // PAGE_SIZE
        cpa = self.execmem.cpa
        if not undo:
            cpa.set_memory_nx(addr, npages)          # execmem_force_rw
            cpa.set_memory_rw(addr, npages)
        cpa.set_memory_rox(addr, npages)             # execmem_restore_rox
        del self.busy[addr]
        self._add(addr, size)
        self.clean()

    def clean(self) -> None:
        """``execmem_cache_clean``: whole free 2M areas leave the cache."""
        ex = self.execmem
        for lo, hi in list(self.free_ranges):
            if lo % PMD_SIZE or (hi - lo) % PMD_SIZE:
                continue
            inside = [a for a in self.areas.values() if lo <= a.addr and a.addr + a.size <= hi]
            if not inside:
                continue
            for area in inside:
                nr = 1 << area.page_order
                for pfn in area.pages:
                    ex.cpa.set_direct_map_valid_noflush(pfn, nr, True)
                ex.vmalloc.vfree(area.addr)
                del self.areas[area.addr]
            self.free_ranges.remove([lo, hi])


class ModuleLoader:
    def __init__(self, execmem: Execmem, cpa: Cpa, vmalloc: Vmalloc) -> None:
        self.execmem = execmem
        self.cpa = cpa
        self.vmalloc = vmalloc
        self.modules: dict[str, Module] = {}

    def load_module(self, name: str, text: int, rodata: int = 0, ro_after_init: int = 0,
                    data: int = 0, *, init_text: int = 0, init_rodata: int = 0,
                    init_data: int = 0) -> Module:
        """``load_module`` of a module whose sections have these sizes in
        bytes (each category page-aligned: STRICT_MODULE_RWX):

        * ``move_module``: the core layout (text, rodata, ro_after_init,
          data) one ``module_alloc``, then the init layout (init text, init
          rodata, init data) its own, when it has any;
        * ``complete_formation``: ``module_enable_ro`` (core text, init text,
          core rodata, init rodata), ``module_enable_nx`` (core rodata,
          ro_after_init and data, init rodata and data), ``module_enable_x``
          (core text, init text);
        * ``do_init_module``: the module's init runs, ``module_enable_ro(mod,
          true)`` makes ro_after_init read-only, and ``do_free_init`` frees
          the init layout (``vfree`` with VM_FLUSH_RESET_PERMS: its aliases
          back to RW).

        A step that runs out of memory undoes what the load did and frees
        both layouts (:class:`AreaSetup`); the module is not loaded."""
        if name in self.modules:
            raise UsersError(f"module {name!r} is already loaded")
        sizes = (text, rodata, ro_after_init, data, init_text, init_rodata, init_data)
        if not all(isinstance(x, int) for x in sizes) or min(sizes) < 0 or text <= 0:
            raise UsersError(f"module {name!r}: section sizes must be ints >= 0, text > 0")
        t, r, a, d = _pages(text), _pages(rodata), _pages(ro_after_init), _pages(data)
        it, ir, idata = _pages(init_text), _pages(init_rodata), _pages(init_data)
        if self.execmem.version.module_mem_types:
            return self._load_mem_types(name, {
                "text": t, "data": d, "rodata": r, "ro_after_init": a, "init_text": it,
                "init_data": idata, "init_rodata": ir})
        cpa = self.cpa
        ro, rw, nx, x = cpa.set_memory_ro, cpa.set_memory_rw, cpa.set_memory_nx, cpa.set_memory_x
        area = self.execmem.module_alloc((t + r + a + d) * PAGE_SIZE, caller=f"module {name}")
        base = area.addr
        mod = Module(name, area, t, r, a, d, it, ir, idata)
        with AreaSetup(self.vmalloc, area) as core:
            init_area = None
            if it + ir + idata:
                init_area = self.execmem.module_alloc((it + ir + idata) * PAGE_SIZE,
                                                      caller=f"module {name} init")
            with (AreaSetup(self.vmalloc, init_area) if init_area is not None
                  else _NoArea()) as init:
                ib = init_area.addr if init_area is not None else 0
                # complete_formation: module_enable_ro(mod, false)
                core.step(ro, rw, base, t)
                if it:
                    init.step(ro, rw, ib, it)
                if r:
                    core.step(ro, rw, base + t * PAGE_SIZE, r)
                if ir:
                    init.step(ro, rw, ib + it * PAGE_SIZE, ir)
                # module_enable_nx
                for off, n in ((t, r), (t + r, a), (t + r + a, d)):
                    if n:
                        core.step(nx, None, base + off * PAGE_SIZE, n)
                for off, n in ((it, ir), (it + ir, idata)):
                    if n:
                        init.step(nx, None, ib + off * PAGE_SIZE, n)
                # module_enable_x
                core.step(x, None, base, t)
                if it:
                    init.step(x, None, ib, it)
                # do_init_module: module_enable_ro(mod, true)
                if a:
                    core.step(ro, rw, base + (t + r) * PAGE_SIZE, a)
            if init_area is not None:
                # do_free_init: module_memfree of the init layout
                self.vmalloc.vfree(init_area.addr)
        self.modules[name] = mod
        return mod

    #: ``enum mod_mem_type``'s order (6.4+)
    MEM_TYPES = ("text", "data", "rodata", "ro_after_init", "init_text", "init_data",
                 "init_rodata")
    #: ``free_mod_mem``'s order: each core type in enum order, data (which
    #: holds the module) last; the init types are gone by then
    FREE_ORDER = ("text", "rodata", "ro_after_init", "data")

    def _load_mem_types(self, name: str, pages: dict[str, int]) -> Module:
        """``load_module`` with module memory types (6.4+; the sequence of
        7.x, kernel/module/main.c and strict_rwx.c, as the 7.2 recordings
        show it):

        * ``move_module``: for each type with a size, in enum order (text,
          data, rodata, ro_after_init, init text, init data, init rodata),
          ``execmem_alloc_rw`` (:meth:`Execmem.execmem_alloc_rw`: text from
          the ROX cache and made RW+NX, data types a vmalloc each);
        * ``complete_formation``: ``module_enable_rodata_ro`` (rodata, init
          rodata RO), ``module_enable_data_nx`` (every data type NX),
          ``module_enable_text_rox`` (text, init text: ``set_memory_rox``,
          which is ``execmem_restore_rox`` for cache memory);
        * ``do_init_module``: ``module_enable_rodata_ro_after_init``, then
          ``do_free_init``: ``execmem_free`` of init text (back to the
          cache), init data and init rodata (vfree, reset perms).

        Out of memory, what the load did is undone newest first and its
        memory given back; the module is not loaded."""
        ex, cpa = self.execmem, self.cpa
        mem: dict[str, int] = {}
        undo: list[tuple[_CpaCall, int, int]] = []

        def step(do: _CpaCall, back: _CpaCall | None, t: str) -> None:
            do(mem[t], pages[t])
            if back is not None:
                undo.append((back, mem[t], pages[t]))
        try:
            for t in self.MEM_TYPES:
                if pages[t]:
                    mem[t] = ex.execmem_alloc_rw(pages[t] * PAGE_SIZE, text=t.endswith("text"),
                                                 caller=f"module {name} {t}")
            for t in ("rodata", "init_rodata"):
                if t in mem:
                    step(cpa.set_memory_ro, cpa.set_memory_rw, t)
            for t in ("data", "rodata", "ro_after_init", "init_data", "init_rodata"):
                if t in mem:
                    step(cpa.set_memory_nx, None, t)
            for t in ("text", "init_text"):
                if t in mem:
                    step(cpa.set_memory_rox, cpa.set_memory_rw, t)
            if "ro_after_init" in mem:
                step(cpa.set_memory_ro, cpa.set_memory_rw, "ro_after_init")
        except MemoryError:
            for back, addr, n in reversed(undo):
                back(addr, n)
            for t in reversed(list(mem)):
                ex.execmem_free(mem[t], undo=True)
            raise
        for t in ("init_text", "init_data", "init_rodata"):      # do_free_init
            if t in mem:
                ex.execmem_free(mem.pop(t))
        mod = Module(name, None, pages["text"], pages["rodata"], pages["ro_after_init"],
                     pages["data"], pages["init_text"], pages["init_rodata"],
                     pages["init_data"], mem=mem)
        self.modules[name] = mod
        return mod

    def delete_module(self, name: str) -> None:
        """``free_module``; with module memory types ``free_mod_mem``: each
        type but data in enum order, data (which holds the module) last."""
        try:
            mod = self.modules.pop(name)
        except KeyError:
            raise UsersError(f"module {name!r} is not loaded") from None
        if mod.mem:
            for t in self.FREE_ORDER:
                if t in mod.mem:
                    self.execmem.execmem_free(mod.mem[t])
        else:
            self.vmalloc.vfree(mod.base)
        mod.live = False


@dataclass
class BpfProg:
    addr: int
    size: int
    pack: int | None          # pack base, or None for a private module_alloc
    #: the pages bpf_prog_load keeps with the program besides its image
    #: (the bpf_prog's own page), freed with it
    kept: tuple[int, ...] = ()
    #: the slab pages holding its objects (shared with the programs loaded
    #: around it): [pfn, order, programs on it]
    slab: tuple[list[int], ...] = ()


@dataclass
class _Pack:
    base: int
    used: bytearray = field(default_factory=lambda: bytearray(BPF_PROG_PACK_SIZE // BPF_PROG_CHUNK_SIZE))


class BpfJit:
    """``bpf_jit_binary_pack_alloc`` / ``bpf_prog_pack_free``."""

    def __init__(self, execmem: Execmem, vmalloc: Vmalloc, use_pack: bool = True,
                 huge_pack: bool = False,
                 load_pages: tuple[tuple[int, str, bool], ...] = (),
                 slab: tuple[tuple[int, str, int], ...] = ()) -> None:
        self.execmem = execmem
        self.vmalloc = vmalloc
        self.use_pack = use_pack
        #: what bpf_prog_load allocates before the JIT image, in order:
        #: (order, GFP, kept with the program); the others are freed, last
        #: first, before the image is allocated (KernelVersion.bpf_load_pages)
        if any(kept and order for order, _gfp, kept in load_pages):
            raise UsersError("bpf: a page bpf_prog_load keeps must be order 0")
        self.load_pages = tuple((order, parse_gfp(gfp), kept) for order, gfp, kept in load_pages)
        #: new slab pages as programs load: (order, GFP, one every N programs)
        #: (KernelVersion.bpf_load_slab); kept by the caches
        if any(every < 1 for _order, _gfp, every in slab):
            raise UsersError("bpf: a slab page rate must be at least one per program")
        self.slab = tuple((order, parse_gfp(gfp), every) for order, gfp, every in slab)
        #: per kind, the page the next programs' objects go to: [pfn,
        #: order, programs on it] (a slab a cache is filling)
        self.slab_current: list[list[int] | None] = [None] * len(self.slab)
        self.loads = 0
        #: packs backed by one 2M page (module_alloc_huge, 6.2+): their
        #: direct-map alias changes as a whole 2M page, without a split
        self.huge_pack = huge_pack
        self.packs: list[_Pack] = []
        self.progs: dict[int, BpfProg] = {}

    def _module_alloc_rox(self, size: int) -> VmStruct:
        huge = self.huge_pack and size >= BPF_PROG_PACK_SIZE
        return self.execmem.alloc_rox(size, huge=huge, user="bpf", caller="bpf")

    def alloc_bytes(self, proglen: int) -> int:
        """What the JIT allocates for an image of ``proglen`` bytes (the
        program's ``jited_prog_len``): with packs (5.18+,
        ``bpf_jit_binary_pack_alloc``) the image, its header and 16 bytes of
        illegal instructions rounded up to 64-byte chunks, an image of a
        pack or more its own pages; without (``bpf_jit_binary_alloc``) the
        image, its header and at least 128 bytes of illegal instructions in
        whole pages."""
        if not isinstance(proglen, int) or proglen <= 0:
            raise UsersError(f"bpf: bad JIT image length {proglen!r}")
        if self.use_pack:
            size = -(-(proglen + BPF_BINARY_HEADER + 16) // BPF_PROG_CHUNK_SIZE) \
                * BPF_PROG_CHUNK_SIZE
            return size if size <= BPF_PROG_PACK_SIZE else -(-size // PAGE_SIZE) * PAGE_SIZE
        return -(-(proglen + BPF_BINARY_HEADER + 128) // PAGE_SIZE) * PAGE_SIZE

    def _prog_pages(self) -> tuple[int, ...]:
        """bpf_prog_load's own pages before the JIT (the program, the
        verifier's buffers): allocated in the record's order, the
        transient ones freed again, last first; the kept ones returned.
        All or nothing: out of memory, what it took is given back."""
        pages = self.vmalloc.page_alloc
        taken: list[tuple[int, int, bool]] = []
        try:
            for order, gfp, kept in self.load_pages:
                taken.append((pages.alloc_pages(gfp, order), order, kept))
        except MemoryError:
            for pfn, order, _kept in reversed(taken):
                pages.free_pages(pfn, order)
            raise
        for pfn, order, kept in reversed(taken):
            if not kept:
                pages.free_pages(pfn, order)
        return tuple(pfn for pfn, _order, kept in taken if kept)

    def _release(self, kept: tuple[int, ...]) -> None:
        for pfn in kept:
            self.vmalloc.page_alloc.free_pages(pfn, 0)

    def load(self, size: int) -> BpfProg:
        """``bpf_prog_load`` of a program whose JIT image takes ``size``
        bytes (see :meth:`alloc_bytes` for what a program's JIT image length
        takes): the program's own pages first (:attr:`load_pages`), then the
        image in a pack or its own module_alloc."""
        if not isinstance(size, int) or size <= 0:
            raise UsersError(f"bpf: bad image size {size!r}")
        kept = self._prog_pages()
        new: dict[int, list[int]] = {}
        try:
            for kind, (order, gfp, every) in enumerate(self.slab):
                if self.slab_current[kind] is None or self.loads % every == every - 1:
                    new[kind] = [self.vmalloc.page_alloc.alloc_pages(gfp, order), order, 0]
            prog = self._jit(size)
        except MemoryError:
            for pfn, order, _n in reversed(new.values()):
                self.vmalloc.page_alloc.free_pages(pfn, order)
            self._release(kept)
            raise
        for kind, page in new.items():
            old = self.slab_current[kind]
            if old is not None and old[2] == 0:         # emptied before it filled
                self.vmalloc.page_alloc.free_pages(old[0], old[1])
            self.slab_current[kind] = page
        slab = tuple(page for page in self.slab_current if page is not None)
        for page in slab:
            page[2] += 1
        self.loads += 1
        prog.kept = kept
        prog.slab = slab
        self.progs[prog.addr] = prog
        return prog

    def _slab_release(self, slab: tuple[list[int], ...]) -> None:
        """A program's objects freed: a slab page none of the loaded
        programs has objects on goes back (slub's discard of an empty
        slab), unless a cache is still filling it."""
        for page in slab:
            page[2] -= 1
            if page[2] == 0 and not any(page is cur for cur in self.slab_current):
                self.vmalloc.page_alloc.free_pages(page[0], page[1])

    def _jit(self, size: int) -> BpfProg:
        if not self.use_pack or size > BPF_PROG_PACK_SIZE:
            area = self._module_alloc_rox(size)
            prog = BpfProg(area.addr, size, None)
        else:
            nchunks = -(-size // BPF_PROG_CHUNK_SIZE)
            prog = None
            for pack in self.packs:
                pos = pack.used.find(bytes(nchunks))
                if pos >= 0:
                    prog = self._take(pack, pos, nchunks, size)
                    break
            if prog is None:
                pack = self.new_pack()
                prog = self._take(pack, 0, nchunks, size)
        return prog

    def new_pack(self) -> _Pack:
        """``bpf_prog_pack_alloc``'s new pack: a 2M module_alloc made
        read-only and executable (one 2M page where packs are huge), its
        chunks all free; the pages come from ``vmalloc.page_alloc``."""
        area = self._module_alloc_rox(BPF_PROG_PACK_SIZE)
        pack = _Pack(area.addr)
        self.packs.append(pack)
        return pack

    @staticmethod
    def _take(pack: _Pack, pos: int, nchunks: int, size: int) -> BpfProg:
        pack.used[pos: pos + nchunks] = b"\x01" * nchunks
        return BpfProg(pack.base + pos * BPF_PROG_CHUNK_SIZE, size, pack.base)

    def free(self, addr: int) -> None:
        try:
            prog = self.progs.pop(addr)
        except KeyError:
            raise UsersError(f"bpf: no program at {addr:#x}") from None
        self._release(prog.kept)
        self._slab_release(prog.slab)
        if prog.pack is None:
            self.vmalloc.vfree(prog.addr)
            return
        pack = next(p for p in self.packs if p.base == prog.pack)
        pos = (prog.addr - pack.base) // BPF_PROG_CHUNK_SIZE
        n = -(-prog.size // BPF_PROG_CHUNK_SIZE)
        pack.used[pos: pos + n] = bytes(n)
        if not any(pack.used):
            self.packs.remove(pack)
            self.vmalloc.vfree(pack.base)


class Secretmem:
    """``memfd_secret``: pages leave the direct map one at a time."""

    OWNER = PageOwner.SECRETMEM

    def __init__(self, pages: PageAllocator, cpa: Cpa, user_gfp: UserGfp,
                 unavailable: str | None = None) -> None:
        self.page_alloc = pages
        self.cpa = cpa
        self.user_gfp = user_gfp
        #: None, or why this kernel has no such user (e.g. 5.10: no memfd_secret)
        self.unavailable = unavailable
        self.pages: set[int] = set()

    def fault(self) -> int:
        """secretmem_fault: allocate a page, unmap it from the direct map
        (unless the policy serves it with ``GFP_UNMAPPED``: the 2022 RFC)."""
        if self.unavailable:
            raise UsersError(self.unavailable)
        gfp = self.user_gfp("secretmem", int(G.GFP_HIGHUSER | G.GFP_ZERO))
        pfn = self.page_alloc.alloc_pages(gfp, 0, owner=self.OWNER)
        if not gfp & G.GFP_UNMAPPED:
            try:
                self.cpa.remove_from_direct_map(pfn, 1)
            except MemoryError:
                self.page_alloc.free_pages(pfn, 0, owner=self.OWNER)
                raise
        self.pages.add(pfn)
        return pfn

    def free(self, pfn: int) -> None:
        """secretmem_free_folio: map it back, then free it."""
        if pfn not in self.pages:
            raise UsersError(f"secretmem: pfn {pfn:#x} is not a secret page")
        self.pages.remove(pfn)
        if not self.user_gfp("secretmem", 0) & G.GFP_UNMAPPED:
            self.cpa.restore_direct_map(pfn, 1)
        self.page_alloc.free_pages(pfn, 0, owner=self.OWNER)


class GuestMemfd(Secretmem):
    """KVM ``guest_memfd`` without direct map: same protocol, many pages at once."""

    OWNER = PageOwner.GUEST_MEMFD

    def populate(self, nr_pages: int) -> list[int]:
        return [self.fault() for _ in range(nr_pages)]


class ProtectedPageTables:
    """Page-table pages that a protection scheme (PKS-protected page tables,
    "read-only page tables" RFCs) keeps read-only in the direct map: each
    table page is allocated (``GFP_PGTABLE``) and its direct-map alias made
    RO; it is made RW again before it is freed."""

    def __init__(self, pages: PageAllocator, cpa: Cpa, user_gfp: UserGfp) -> None:
        self.page_alloc = pages
        self.cpa = cpa
        self.user_gfp = user_gfp
        self.pages: set[int] = set()

    def alloc(self) -> int:
        pfn = self.page_alloc.alloc_pages(
            self.user_gfp("pgtable", int(G.GFP_PGTABLE | G.GFP_PTE_MAPPED)), 0,
            owner=PageOwner.PROTECTED_PGTABLE)
        try:
            self.cpa.set_memory_ro(self.cpa.pfn_to_virt(pfn), 1)
        except MemoryError:
            self.page_alloc.free_pages(pfn, 0, owner=PageOwner.PROTECTED_PGTABLE)
            raise
        self.pages.add(pfn)
        return pfn

    def free(self, pfn: int) -> None:
        if pfn not in self.pages:
            raise UsersError(f"pgtable: pfn {pfn:#x} is not a protected table page")
        self.pages.remove(pfn)
        self.cpa.set_memory_rw(self.cpa.pfn_to_virt(pfn), 1)
        self.page_alloc.free_pages(pfn, 0, owner=PageOwner.PROTECTED_PGTABLE)
