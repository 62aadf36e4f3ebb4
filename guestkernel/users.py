"""The kernel's users of CPA, as the call sequences Linux 6.1 makes.

* Modules (kernel/module/main.c, strict_rwx.c): ``module_alloc`` of the core
  layout (text | rodata | ro_after_init | data) in the module area with
  ``VM_FLUSH_RESET_PERMS``; then ``module_enable_ro`` (text, rodata RO),
  ``module_enable_nx`` (rodata, ro_after_init, data NX) and
  ``module_enable_x`` (text X, no alias); after init, ro_after_init RO.
  Unloading is ``vfree`` (which resets the direct-map aliases).
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
from .layout import PAGE_SIZE
from .owner import PageOwner
from .versions import KernelVersion
from .vmalloc import PageAllocator, Vmalloc, VmFlags, VmStruct

__all__ = [
    "AreaSetup",
    "BpfJit",
    "BpfProg",
    "Execmem",
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
    area: VmStruct
    text_pages: int
    rodata_pages: int
    ro_after_init_pages: int
    data_pages: int
    #: the init layout's pages (freed once the module's init returned)
    init_text_pages: int = 0
    init_rodata_pages: int = 0
    init_data_pages: int = 0
    live: bool = True

    @property
    def base(self) -> int:
        return self.area.addr


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

    def module_alloc(self, size: int, *, huge: bool = False, caller: str = "module_alloc"
                     ) -> VmStruct:
        flags = VmFlags.FLUSH_RESET_PERMS | (VmFlags.ALLOW_HUGE_VMAP if huge else VmFlags(0))
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

    def delete_module(self, name: str) -> None:
        try:
            mod = self.modules.pop(name)
        except KeyError:
            raise UsersError(f"module {name!r} is not loaded") from None
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


@dataclass
class _Pack:
    base: int
    used: bytearray = field(default_factory=lambda: bytearray(BPF_PROG_PACK_SIZE // BPF_PROG_CHUNK_SIZE))


class BpfJit:
    """``bpf_jit_binary_pack_alloc`` / ``bpf_prog_pack_free``."""

    def __init__(self, execmem: Execmem, vmalloc: Vmalloc, use_pack: bool = True,
                 huge_pack: bool = False,
                 load_pages: tuple[tuple[int, str, bool], ...] = ()) -> None:
        self.execmem = execmem
        self.vmalloc = vmalloc
        self.use_pack = use_pack
        #: what bpf_prog_load allocates before the JIT image, in order:
        #: (order, GFP, kept with the program); the others are freed, last
        #: first, before the image is allocated (KernelVersion.bpf_load_pages)
        if any(kept and order for order, _gfp, kept in load_pages):
            raise UsersError("bpf: a page bpf_prog_load keeps must be order 0")
        self.load_pages = tuple((order, parse_gfp(gfp), kept) for order, gfp, kept in load_pages)
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
        try:
            prog = self._jit(size)
        except MemoryError:
            self._release(kept)
            raise
        prog.kept = kept
        self.progs[prog.addr] = prog
        return prog

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
                area = self._module_alloc_rox(BPF_PROG_PACK_SIZE)
                pack = _Pack(area.addr)
                self.packs.append(pack)
                prog = self._take(pack, 0, nchunks, size)
        return prog

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
