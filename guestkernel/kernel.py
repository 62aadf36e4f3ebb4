"""The booted guest kernel: its subsystems, declared, and the public API.

A :class:`Kernel` is built by :meth:`Kernel.boot`, which runs the steps of
:mod:`guestkernel.boot` in Linux's order and hands the result to
``Kernel.__init__``. The kernel then owns, each in its own module:

========================  ================================================
``machine``               the emulated CPU and guest RAM (``emu.Machine``)
``pgt``                   the kernel page tables (``pgtable``)
``buddy``                 the page allocator (``page_alloc``)
``cpa``                   set_memory_* and the direct-map accounting (``cpa``)
``tlb``                   the kernel's TLB flushes (``tlbflush``)
``shadow``                what every mapping should be, for the validator
``vmalloc``, ``execmem``  vmalloc and module_alloc (``vmalloc``, ``users``)
``modules``, ``bpf``,     the CPA users (``users``)
``secretmem``, ...
``policy``                the allocator policy (``policy``, a plugin)
========================  ================================================

The kernel's own methods are the public contract (``alloc_pages``,
``set_memory_ro``, ``meminfo``, ...): thin entry points over the
subsystems, plus page allocation with the policy's routing.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from emu import Machine

from . import gfp as G
from .boot import (
    BootError,
    boot_cpa_calls,
    defer_watermarks,
    e820__memblock_setup,
    e820__memory_setup,
    ftrace_init,
    ftrace_pages,
    init_mem_mapping,
    mem_init,
    real_mode_base,
    select_version,
)
from .bootmem import (
    HARNESS_CMDLINE,
    BootmemError,
    BootMemory,
    boot_command_line,
    initrd_range,
    percpu_embedded_pages,
)
from .cpa import Cpa, CpaData
from .e820 import E820Table
from .layout import PAGE_SIZE, KernelLayout, layout_for
from .memblock import Memblock
from .owner import PageOwner
from .page_alloc import AllocationError, BuddyAllocator, largest_aligned_order
from .pgtable import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, KernelPageTables
from .policy import Policy, get_policy
from .ptdump import ptdump
from .shadow import Shadow
from .tlbflush import TlbFlush
from .users import BpfJit, Execmem, GuestMemfd, ModuleLoader, ProtectedPageTables, Secretmem
from .validate import validate
from .versions import KernelVersion, VersionError
from .vmalloc import Vmalloc

__all__ = ["Kernel", "KernelError", "SystemState"]

GiB = 1 << 30
_GFP_UNMAPPED = int(G.GFP_UNMAPPED)
_GFP_ZERO = int(G.GFP_ZERO)
_NOT_POLICY_GFP = ~int(G.GFP_UNMAPPED | G.GFP_PTE_MAPPED)


class KernelError(ValueError):
    """A request the kernel refuses (bad input, a page freed through the
    wrong path, an unknown kernel version); nothing changed. Guest
    out-of-memory is ``guestkernel.page_alloc.AllocationError``, a
    ``MemoryError``."""


class SystemState(enum.Enum):
    BOOTING = "booting"
    RUNNING = "running"


class Kernel:
    """A booted guest kernel. Build it with :meth:`Kernel.boot`."""

    def __init__(self, *, version: KernelVersion, version_reason: str, e820: E820Table,
                 memblock: Memblock, machine: Machine, pgt: KernelPageTables, shadow: Shadow,
                 buddy: BuddyAllocator, policy: Policy, gbpages: bool, boot_log: list[str],
                 init_memory_mapping_calls: list, boot_overcount: list[int],
                 debug_vm: bool = False) -> None:
        #: the kernel record followed (:mod:`guestkernel.versions`)
        self.profile: KernelVersion = version
        #: why that record: asked for, named by the boot log, or the default
        self.profile_reason: str = version_reason
        self.e820: E820Table = e820
        self.memblock: Memblock = memblock
        self.machine: Machine = machine
        self.pgt: KernelPageTables = pgt
        self.shadow: Shadow = shadow
        self.buddy: BuddyAllocator = buddy
        self.policy: Policy = policy
        self.policy_name: str = policy.name
        self.gbpages: bool = gbpages
        self.max_pfn: int = e820.max_pfn
        self.max_pfn_mapped: int = e820.max_pfn
        #: the lines the kernel logs while mapping, in its format
        self.boot_log: list[str] = boot_log
        self.init_memory_mapping_calls: list = init_memory_mapping_calls
        #: what the kernel counted twice while mapping (fixed for life)
        self.boot_overcount: list[int] = boot_overcount
        self.system_state: SystemState = SystemState.BOOTING
        self.debug_vm: bool = debug_vm
        self.validation_generation: int = 0
        #: /proc/vmstat's event counters the model keeps
        self.vmstat_counters: dict[str, int] = dict.fromkeys(
            ("direct_map_level2_splits", "direct_map_level3_splits",
             "direct_map_level2_collapses", "direct_map_level3_collapses"), 0)
        self.tlb: TlbFlush = TlbFlush(machine, self.vmstat_counters)
        # After the buddy hand-over, page tables come from alloc_pages.
        pgt.alloc_table = self.alloc_pgtable_page
        pgt.free_table = self.free_pgtable_page
        pgt.after_bootmem = True
        self.cpa: Cpa = Cpa(pgt=pgt, shadow=shadow, version=version, max_pfn=self.max_pfn,
                            tlb=self.tlb, vmstat=self.vmstat_counters,
                            alloc_pgtable_page=self.alloc_pgtable_page,
                            free_pgtable_page=self.free_pgtable_page, gbpages=gbpages)
        self.vmalloc: Vmalloc = Vmalloc(self, self.cpa)
        self.execmem: Execmem = Execmem(self.vmalloc, self.cpa, version, self.user_gfp)
        self.modules: ModuleLoader = ModuleLoader(self.execmem, self.cpa, self.vmalloc)
        self.bpf: BpfJit = BpfJit(self.execmem, self.vmalloc, use_pack=version.bpf_prog_pack,
                                  load_pages=version.bpf_load_pages,
                                  slab=version.bpf_load_slab)
        self.secretmem: Secretmem = Secretmem(
            self, self.cpa, self.user_gfp,
            None if version.secretmem else
            f"secretmem: Linux {version.name} has no memfd_secret (it arrived in 5.14)")
        self.guest_memfd: GuestMemfd = GuestMemfd(self, self.cpa, self.user_gfp)
        self.pgtable_protect: ProtectedPageTables = ProtectedPageTables(self, self.cpa,
                                                                        self.user_gfp)
        #: who each allocated page is for (owner.py): freed through that path only
        self.page_owner: np.ndarray = np.zeros(self.max_pfn, dtype=np.uint8)
        #: allocations that failed out of ``alloc_pages`` (after the policy's
        #: shrinker): the model's count of "page allocation failure" warnings
        self.alloc_failures: int = 0
        #: pfn -> order of pages allocated with GFP_UNMAPPED by the buddy path
        self._unmapped: dict[int, int] = {}
        #: a replay's source of page-table pfns (see alloc_pgtable_page)
        self.pgtable_pfn_source: Callable[[], int] | None = None
        #: where the real-mode blob is (boot.real_mode_base), None: nowhere
        self.real_mode_base: int | None = None
        #: table pages preallocate_vmalloc_pages made at mem_init
        self.vmalloc_prealloc_pages = 0
        #: ftrace_init's dyn_ftrace record pages (boot.ftrace_pages)
        self.ftrace_pages = 0
        #: where the boot-time memblock allocations went (guestkernel.bootmem),
        #: the initrd's pages [start, end) and the command line
        self.bootmem: BootMemory = BootMemory()
        self.cmdline: str = HARNESS_CMDLINE
        #: ``boot(paging_levels=)`` as asked (None: the default; see boot)
        self.requested_paging_levels: int | None = None
        #: what Kernel.from_state took over from the real kernel (None: booted)
        self.from_state_report: dict | None = None
        #: and where such a replay's freed table pages go (instead of the buddy)
        self.pgtable_free_sink: Callable[[int], None] | None = None
        #: table pages alloc_pgtable_page has made so far (a replay matches
        #: them with Linux's, dmfrag.modelled)
        self.pgtable_pages_made = 0
        self._validator_code: int | None = None
        self._validator_out = 0
        self._in_debug_vm = False
        # The policy acts from SYSTEM_RUNNING on (boot is mainline's).
        self._policy_alloc: Callable[[Kernel, int, int], int | None] | None = None
        self._policy_free: Callable[[Kernel, int, int], bool] | None = None

    # -- boot -------------------------------------------------------------

    @classmethod
    def boot(cls, ram: str | int | None = "8G", e820: str | Path | E820Table | None = None,
             gbpages: bool = True, policy: str | Policy = "baseline",
             profile: str | KernelVersion | None = None, debug_vm: bool = False,
             boot_cpa: bool = True, initrd: int | tuple[int, int] | None = None,
             cmdline: str | None = None, paging_levels: int | None = None,
             **policy_tunables) -> Kernel:
        """Boot a guest kernel (the steps of :mod:`guestkernel.boot`).

        ``e820`` (a boot log's text as a ``str``, a ``pathlib.Path`` to one,
        or an E820Table; a ``str`` is never taken as a path) wins over ``ram``; with neither, ``ram`` gives QEMU's PC layout for that
        size. ``profile`` names the kernel record ("6.1", "5.10", "7.2",
        "3.13"); with none, a boot log's ``Linux version`` line picks the
        nearest, else 6.1 (``k.profile_reason`` says which and why).
        ``policy`` names a registered policy (tunables as keywords).
        ``boot_cpa=False`` stops right after the buddy hand-over
        (``memblock_free_all`` in mem_init): neither the rest of mem_init
        (:meth:`preallocate_vmalloc_pages`), nor ``ftrace_init``'s record
        pages, nor any boot CPA call has been taken and the system is not
        running yet; a replay
        of a recorded boot (:mod:`dmfrag.placed`) goes on from there and
        calls :meth:`enter_running` itself.

        ``initrd``: the initrd's size in bytes, placed as QEMU places it, or
        its [start, end) (a boot log's ``RAMDISK:`` line wins; None: the
        project's boot initramfs; 0: none). ``cmdline``: the kernel command line (else a
        boot log's ``Command line:``, else the project's harness's): its
        length sizes two boot-time copies (:mod:`guestkernel.bootmem`).

        ``paging_levels``: 5 (LA57: the CPU walks a PML5 and the kernel
        takes the 5-level layout, PAGE_OFFSET 0xff11000000000000, as
        Debian's 6.1 and 7.2 do under QEMU's ``-cpu max``) or 4 (Linux
        booted with ``no5lvl``, or on a CPU without LA57; 5.10's Debian
        build is 4-level only); both size the boot-time allocations as
        that mode does (``MAX_PHYSMEM_BITS``). None (the default): 4-level
        tables at :data:`guestkernel.PAGE_OFFSET`, the layout every caller
        of the model has known, with the boot-time allocations of the
        record's kernel as it ran on the reference machine (so that its
        meminfo is Linux's there)."""
        try:
            table, log = e820__memory_setup(e820, ram)
            version, reason = select_version(profile, log)
            ramdisk = initrd_range(table, log, initrd)
            percpu = percpu_embedded_pages(log)
        except (BootError, VersionError, BootmemError) as exc:
            raise KernelError(str(exc)) from None
        if cmdline is None:
            cmdline = boot_command_line(log)
        elif not isinstance(cmdline, str):
            raise KernelError(f"cmdline must be a str, not {type(cmdline).__name__}")
        if paging_levels is not None and (isinstance(paging_levels, bool)
                                          or paging_levels not in (4, 5)):
            raise KernelError(f"paging_levels must be 4 or 5 (or None), not {paging_levels!r}")
        pol = get_policy(policy, **policy_tunables)   # a bad name fails before any work
        bootmem = BootMemory(initrd=ramdisk)
        try:
            mb = e820__memblock_setup(table, version, ramdisk)
            machine = Machine(table.max_pfn * PAGE_SIZE, paging_levels=paging_levels or 4)
            tables = init_mem_mapping(machine, table, mb, version, bool(gbpages))
            buddy = mem_init(table, mb, version, pol, cmdline, bootmem, percpu, paging_levels)
        except BootError as exc:
            raise KernelError(str(exc)) from None
        k = cls(version=version, version_reason=reason, e820=table, memblock=mb,
                machine=machine, pgt=tables.pgt, shadow=tables.shadow, buddy=buddy, policy=pol,
                gbpages=bool(gbpages), boot_log=tables.log,
                init_memory_mapping_calls=tables.calls, boot_overcount=tables.boot_overcount,
                debug_vm=debug_vm)
        k.real_mode_base = real_mode_base(table, version)
        k.ftrace_pages = ftrace_pages(version, log)
        k.bootmem, k.cmdline = bootmem, cmdline
        k.requested_paging_levels = paging_levels
        if boot_cpa:
            k.buddy.boot_pagesets()
            defer_watermarks(k.buddy, version)
            k.preallocate_vmalloc_pages()
            ftrace_init(k.buddy, k.ftrace_pages)
            k.buddy.setup_per_cpu_pageset()
            boot_cpa_calls(k.cpa, k.buddy, k.bpf, version, real_mode=k.real_mode_base,
                           initrd=ramdisk)
            k._enter_running()
        return k

    @classmethod
    def from_state(cls, state, *, policy: str | Policy = "baseline",
                   profile: str | KernelVersion | None = None, debug_vm: bool = False,
                   **policy_tunables) -> Kernel:
        """A model started from a real kernel's state (a
        :class:`dmfrag.truth.KernelState`, as read from its memory): the
        same memory map, Linux's direct-map and image tables, free lists,
        pageblocks and counters (see :mod:`guestkernel.from_state`). The
        kernel record is the one the state's release names; a release with
        no record is a KernelError naming the nearest (``profile`` picks one
        anyway). ``k.from_state_report`` says what was taken over."""
        from .from_state import StateError, e820_text, install_state
        from .versions import VERSIONS, nearest_version
        if profile is None:
            m = re.match(r"(\d+)\.(\d+)", state.release)
            if m is None:
                raise KernelError(f"the state's kernel release {state.release!r} names no "
                                  f"version; pass profile= (one of {', '.join(VERSIONS)})")
            name = f"{m.group(1)}.{m.group(2)}"
            if name not in VERSIONS:
                near = nearest_version((int(m.group(1)), int(m.group(2))))
                raise KernelError(f"the model has no record for Linux {state.release}; the "
                                  f"nearest is {near.name}: pass profile={near.name!r} "
                                  f"(--kernel {near.name}) to start from it anyway")
            profile = name
        if not state.e820:
            raise KernelError("the state carries no e820 table: cannot lay out the machine")
        if state.booting:
            raise KernelError(f"the state {state.point!r} was taken while the kernel booted "
                              f"(no watermarks, the boot pageset, deferred memory not yet "
                              f"freed): the model cannot run from it; replay its trace from it "
                              f"(trace replay --placement model --start {state.point})")
        # the paging mode the state's kernel ran in: every address stays Linux's
        levels = 5 if state.page_offset == layout_for(5).page_offset else 4
        k = cls.boot(e820=e820_text(state.e820), profile=profile, policy=policy,
                     debug_vm=debug_vm, boot_cpa=False, paging_levels=levels,
                     **policy_tunables)
        try:
            k.from_state_report = install_state(k, state)
        except StateError as exc:
            raise KernelError(str(exc)) from None
        k.profile_reason = (f"kernel {k.profile.name}: started from a dumped Linux "
                            f"{state.release} ({state.point or 'state'})")
        return k

    @classmethod
    def from_dump(cls, core: str | Path, vmlinux: str | Path, *,
                  vmcoreinfo: bytes | None = None, **kw) -> Kernel:
        """``from_state`` of the state read from ``core`` (a QEMU dump, a
        kdump vmcore, ``/proc/kcore``) with its debug ``vmlinux`` (needs
        drgn; see :func:`guestkernel.truth.extract`)."""
        from .truth import TruthError, extract
        try:
            state = extract(core, vmlinux, vmcoreinfo=vmcoreinfo, point="dump")
        except TruthError as exc:
            raise KernelError(str(exc)) from None
        return cls.from_state(state, **kw)

    def enter_running(self) -> None:
        """``system_state = SYSTEM_RUNNING`` for a kernel booted with
        ``boot_cpa=False`` (see :meth:`_enter_running`)."""
        if self.system_state is SystemState.RUNNING:
            raise KernelError("the system is already running")
        self._enter_running()

    def _enter_running(self) -> None:
        """``system_state = SYSTEM_RUNNING``: splits count in vmstat from
        now on; the policy and CONFIG_DEBUG_VM start watching CPA."""
        self.system_state = SystemState.RUNNING
        self.cpa.system_running = True
        self.boot_direct_pages_count: list[int] = list(self.pgt.direct_pages_count)
        self.shadow.touched.clear()
        self.shadow.touched_va.clear()
        pol = self.policy
        # Call a policy's page hooks only if it overrides them (the hot path).
        if type(pol).alloc_pages is not Policy.alloc_pages:
            self._policy_alloc = pol.alloc_pages
        if type(pol).free_pages is not Policy.free_pages:
            self._policy_free = pol.free_pages
        if pol.prog_pack:
            self.bpf.use_pack = self.bpf.huge_pack = True
        if type(pol).cpa_before is not Policy.cpa_before:
            self.cpa.add_observer(before=lambda c: pol.cpa_before(self, c))
        if type(pol).cpa_after is not Policy.cpa_after:
            self.cpa.add_observer(after=lambda c: pol.cpa_after(self, c))
        if self.debug_vm:
            self.cpa.add_observer(after=lambda _c: self._debug_vm())
        pol.attach(self)

    # -- page allocation --------------------------------------------------

    def user_gfp(self, user: str, gfp: int) -> int:
        """The GFP a CPA user asks for: the policy's choice once the system
        runs (``Policy.user_gfp``), mainline's while booting."""
        if self.system_state is SystemState.RUNNING:
            return self.policy.user_gfp(user, gfp)
        return gfp

    def alloc_pages(self, gfp: int, order: int = 0, *, owner: PageOwner = PageOwner.NONE
                    ) -> int:
        """Allocate 2^order pages; returns the first PFN.

        The policy sees the request first (when it overrides the hook); what
        it declines comes from the buddy allocator. ``GFP_UNMAPPED`` pages
        leave the direct map (and come back at free); ``GFP_ZERO`` pages are
        zeroed. ``owner`` (a CPA user) is recorded: only the same owner may
        free the pages. No page: ``AllocationError`` (a ``MemoryError``)."""
        gfp = int(gfp)
        if order.__class__ is not int or not 0 <= order <= 10:
            raise KernelError(f"alloc_pages: order must be 0..10, not {order!r}")
        try:
            pfn = self._alloc_pages_served(gfp, order)
        except MemoryError:
            self.alloc_failures += 1
            raise
        if gfp & _GFP_ZERO:
            pa = pfn * PAGE_SIZE
            self.machine.ram[pa: pa + (PAGE_SIZE << order)] = 0
        if owner:
            self.page_owner[pfn: pfn + (1 << order)] = owner
        if self.debug_vm:
            self._debug_vm()
        return pfn

    def _alloc_pages_served(self, gfp: int, order: int) -> int:
        """The policy's page, else the buddy allocator's. Either failing,
        the policy's shrinker runs once and the request is retried (the
        slow path's direct reclaim: shrink_slab, then another try)."""
        pfn = None
        if self._policy_alloc:
            try:
                pfn = self._policy_alloc(self, gfp, order)
            except AllocationError:
                if not self._direct_reclaim(order):
                    raise
                pfn = self._policy_alloc(self, gfp, order)
        if pfn is None:
            buddy_gfp = gfp & _NOT_POLICY_GFP
            try:
                pfn = self.buddy.alloc_pages(buddy_gfp, order)
            except AllocationError:
                if not self._direct_reclaim(order):
                    raise
                pfn = self.buddy.alloc_pages(buddy_gfp, order)
            if gfp & _GFP_UNMAPPED:
                try:
                    self.cpa.remove_from_direct_map(pfn, 1 << order)
                except MemoryError:
                    self.buddy.free_pages(pfn, order)
                    raise
                self._unmapped[pfn] = order
        return pfn

    def policy_cached_pfns(self) -> list[int]:
        """The pages the policy's caches hold that no user does
        (``Policy.cached_pfns``); none before it is attached (boot)."""
        if self.system_state is not SystemState.RUNNING:
            return []
        return self.policy.cached_pfns(self)

    def policy_cached_count(self) -> int:
        """``len(policy_cached_pfns())``, cheaply."""
        if self.system_state is not SystemState.RUNNING:
            return 0
        return self.policy.cached_count(self)

    @property
    def policy_overrides_allocations(self) -> bool:
        """Whether the policy's class overrides ``alloc_pages`` or
        ``free_pages`` (true before it is attached, unlike
        :attr:`policy_routes_allocations`)."""
        cls = type(self.policy)
        return cls.alloc_pages is not Policy.alloc_pages or cls.free_pages is not Policy.free_pages

    def _direct_reclaim(self, order: int) -> bool:
        """An allocation failed: the slow path's direct reclaim
        (``__alloc_pages_direct_reclaim``). The policy's shrinker runs (the
        kernel's shrink_slab); when it gave pages back they may sit on the
        per-CPU lists of their own migratetype, so the lists are drained
        (``drain_all_pages``) before the caller's one retry. False when
        nothing was given back: the failure stands."""
        if not self.policy.shrink(self, 1 << order):
            return False
        self.buddy.drain_pages()
        return True

    @property
    def policy_routes_allocations(self) -> bool:
        """Whether the policy sees allocations or frees before the buddy
        allocator (it overrides ``alloc_pages`` or ``free_pages``)."""
        return self._policy_alloc is not None or self._policy_free is not None

    def alloc_pages_bulk(self, gfp: int, nr_pages: int, *, owner: PageOwner = PageOwner.NONE
                         ) -> list[int]:
        """``alloc_pages_bulk``: up to ``nr_pages`` order-0 pages in one call,
        off the per-CPU list (see ``BuddyAllocator.alloc_pages_bulk``); the
        caller takes the rest one ``alloc_pages`` at a time, as vmalloc does.
        A policy that routes allocations, or a request for a policy's memory,
        gets one page through ``alloc_pages`` (the bulk allocator's
        single-page path), so the policy sees every page."""
        gfp = int(gfp)
        if self._policy_alloc or gfp & ~_NOT_POLICY_GFP:
            return [self.alloc_pages(gfp, 0, owner=owner)] if nr_pages > 0 else []
        pfns = self.buddy.alloc_pages_bulk(gfp, nr_pages)
        if gfp & _GFP_ZERO:
            ram = self.machine.ram
            for pfn in pfns:
                ram[pfn * PAGE_SIZE: (pfn + 1) * PAGE_SIZE] = 0
        if owner:
            po = self.page_owner
            for pfn in pfns:
                po[pfn] = owner
        if self.debug_vm:
            self._debug_vm()
        return pfns

    def free_pages(self, pfn: int, order: int = 0, *, owner: PageOwner = PageOwner.NONE
                   ) -> None:
        """Free what ``alloc_pages`` gave; a page of another owner (a secret
        page, a vmalloc page, a page table) is refused, naming its owner."""
        if pfn.__class__ is int and 0 <= pfn < self.max_pfn:
            # int() first: comparing a numpy scalar with an IntEnum makes
            # numpy probe the enum's attributes (the hot path of every free).
            have = int(self.page_owner[pfn])
            if have != owner:
                have = PageOwner(have)
                raise KernelError(f"free_pages({pfn:#x}, {order}): the page belongs to "
                                  f"{have.name.lower()}; free it through {have.free_path}")
        if self._unmapped:
            unmapped = self._unmapped.get(pfn)
            if unmapped is not None and unmapped != order:
                raise KernelError(f"free_pages({pfn:#x}, {order}): allocated with order {unmapped}")
        else:
            unmapped = None
        # (a GFP_UNMAPPED page the buddy allocator served, which the policy
        # never saw, goes back the way it came: mapped again, then freed)
        if unmapped is None and self._policy_free and self._policy_free(self, pfn, order):
            if owner:
                self.page_owner[pfn: pfn + (1 << order)] = 0
            return
        self.buddy.free_pages(pfn, order)   # raises on a bad free, before any change below
        if owner:
            self.page_owner[pfn: pfn + (1 << order)] = 0
        if unmapped is not None:
            del self._unmapped[pfn]
            self.cpa.restore_direct_map(pfn, 1 << order)
        if self.debug_vm:
            self._debug_vm()

    def free_pages_bulk(self, pfns: list[int], *, owner: PageOwner = PageOwner.NONE) -> None:
        """``free_pages_bulk`` (vfree's way on 7.x, ``vfree_contig_free``):
        each run of physically contiguous order-0 pages, in array order, is
        freed as the largest aligned blocks that fit it
        (``free_prepared_contig_range``), so a run of 8 aligned pages is one
        order-3 free onto the per-CPU list. Earlier kernels, and a policy
        that routes frees, free one page at a time."""
        if not self.profile.vfree_contig_free or self._policy_free:
            for pfn in pfns:
                self.free_pages(pfn, 0, owner=owner)
            return
        i, n = 0, len(pfns)
        while i < n:
            j = i + 1
            while j < n and pfns[j] == pfns[j - 1] + 1:
                j += 1
            start, end = pfns[i], pfns[j - 1] + 1
            while start < end:
                order = largest_aligned_order(start, end)
                if order:
                    self.buddy.join_allocated(start, order)
                self.free_pages(start, order, owner=owner)
                start += 1 << order
            i = j

    def split_pages(self, pfn: int, order: int) -> None:
        """``split_page``: an allocated 2^order block (of the buddy
        allocator, not of a policy) becomes 2^order order-0 pages, each freed
        on its own."""
        self.buddy.split_allocated(pfn, order)

    @property
    def linux_paging_levels(self) -> int:
        """The paging mode of the Linux this model stands for: the one asked
        at boot, else (the default kernel) the mode its record's machine ran
        in, which sized the boot-time allocations (5-level for 6.1 and 7.2
        under QEMU's ``-cpu max``, 4-level for 5.10)."""
        if self.requested_paging_levels is not None:
            return self.requested_paging_levels
        rec = self.profile.bootmem
        return 5 if rec is not None and rec.pgtable_l5 else self.paging_levels

    def preallocate_vmalloc_pages(self) -> int:
        """The end of ``mem_init`` (5.9+): a table page per top-level entry
        of the vmalloc space (:meth:`Vmalloc.preallocate_vmalloc_pages`), in
        the count of :attr:`linux_paging_levels`' mode. Linux panics when a
        page is missing; here that is a KernelError. Returns the pages made
        (0 on kernels before 5.9, or when the tables are there already)."""
        if not self.profile.vmalloc_prealloc:
            return 0
        try:
            made = self.vmalloc.preallocate_vmalloc_pages(self.linux_paging_levels)
        except MemoryError:
            raise KernelError("Failed to pre-allocate pages for vmalloc area: out of "
                              "memory at mem_init") from None
        self.vmalloc_prealloc_pages += len(made)
        return len(made)

    def alloc_pgtable_page(self, why: str = "page table") -> int:
        """An order-0 page for a kernel page table (after boot: the buddy
        allocator, GFP_KERNEL as split_large_page asks); returns its address.
        A replay that knows where Linux put the table sets
        ``pgtable_pfn_source`` (a callable giving that pfn): the page is then
        the page's bookkeeping is the replay's (see ``pgtable_free_sink``)."""
        if self.pgtable_pfn_source is not None:
            pfn = self.pgtable_pfn_source()     # the replay keeps the page's bookkeeping
        else:
            pfn = self.buddy.alloc_pages(int(G.GFP_KERNEL), 0)
        self.pgtable_pages_made += 1
        pa = pfn * PAGE_SIZE
        self.machine.ram[pa: pa + PAGE_SIZE] = 0
        self.pgt.table_pages.add(pa)
        self.page_owner[pfn] = PageOwner.PAGE_TABLE
        return pa

    def free_pgtable_page(self, pa: int) -> None:
        """Free an unlinked table page: a buddy page goes back to the buddy;
        a boot-time (memblock) one is handed over as free_reserved_page does."""
        self.pgt.table_pages.discard(pa)
        pfn = pa >> 12
        self.page_owner[pfn] = PageOwner.NONE
        if self.pgtable_free_sink is not None:
            self.pgtable_free_sink(pfn)
        elif self.buddy.allocated_order(pfn) == 0:
            self.buddy.free_pages(pfn, 0)
        else:
            self.buddy.free_range(pfn, pfn + 1)

    # -- addresses --------------------------------------------------------

    @property
    def layout(self) -> KernelLayout:
        """Where this kernel's regions are (4- or 5-level paging)."""
        return self.pgt.layout

    @property
    def paging_levels(self) -> int:
        return self.pgt.levels

    @property
    def page_offset(self) -> int:
        """PAGE_OFFSET: the direct map's base in this kernel's layout."""
        return self.pgt.page_offset

    def pfn_to_virt(self, pfn: int) -> int:
        return self.pgt.page_offset + pfn * PAGE_SIZE

    def virt_to_pfn(self, va: int) -> int:
        po = self.pgt.page_offset
        if not po <= va < po + self.max_pfn * PAGE_SIZE:
            raise KernelError(f"{va:#x} is not a direct-map address")
        return (va - po) >> 12

    def lookup_address(self, va: int) -> tuple[int, int] | None:
        """(entry, level) of what maps ``va`` (level 1=4K, 2=2M, 3=1G), or None."""
        return self.pgt.lookup_address(int(va))

    # -- TLB (tlbflush.py) -------------------------------------------------

    def flush_tlb_all(self) -> None:
        self.tlb.flush_tlb_all()

    def flush_tlb_one_kernel(self, va: int) -> None:
        self.tlb.flush_tlb_one_kernel(va)

    def flush_tlb_kernel_range(self, start: int, end: int) -> None:
        self.tlb.flush_tlb_kernel_range(start, end)

    # -- CPA entry points (cpa.py) ----------------------------------------------

    def set_memory_ro(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_ro(addr, numpages)

    def set_memory_rw(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_rw(addr, numpages)

    def set_memory_x(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_x(addr, numpages)

    def set_memory_nx(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_nx(addr, numpages)

    def set_memory_np(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_np(addr, numpages)

    def set_memory_np_noalias(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_np_noalias(addr, numpages)

    def set_memory_p(self, addr: int, numpages: int) -> CpaData:
        return self.cpa.set_memory_p(addr, numpages)

    def set_memory_rox(self, addr: int, numpages: int) -> CpaData:
        """6.2+: read-only and executable in one request."""
        return self.cpa.set_memory_rox(addr, numpages)

    def set_memory_4k(self, addr: int, numpages: int) -> CpaData:
        """Split to 4K and mark the entries so that no collapse undoes it
        (6.15's _PAGE_KERNEL_4K, a software bit here: collapse.KERNEL_4K)."""
        return self.cpa.set_memory_4k(addr, numpages)

    def set_direct_map_invalid_noflush(self, pfn: int) -> CpaData:
        """Clear P and RW of one page's direct-map entry, no alias, no flush."""
        return self.cpa.set_direct_map_invalid_noflush(pfn)

    def set_direct_map_default_noflush(self, pfn: int) -> CpaData:
        """Set P and RW of one page's direct-map entry, no alias, no flush."""
        return self.cpa.set_direct_map_default_noflush(pfn)

    # -- kernel users of CPA (users.py) --------------------------------------

    def module_alloc(self, size: int) -> int:
        """arch/x86/kernel/module.c: a module-area vmalloc with VM_FLUSH_RESET_PERMS."""
        return self.execmem.module_alloc(size).addr

    execmem_alloc = module_alloc   # the 6.10+ name of the same allocation

    def alloc_insn_page(self) -> int:
        """kprobes/ftrace: one module_alloc page made RO+X."""
        return self.execmem.alloc_insn_page()

    def vfree(self, addr: int) -> None:
        self.vmalloc.vfree(addr)

    # -- counters (Linux's names; cpa.py keeps them) --------------------------

    @property
    def highmap_counted(self) -> list[int]:
        """Splits of the image mapping counted in direct_pages_count."""
        return self.cpa.highmap_counted

    def split_page_count(self, level: int, highmap: bool = False) -> None:
        self.cpa.split_page_count(level, highmap)

    def collapse_page_count(self, level: int) -> None:
        self.cpa.collapse_page_count(level)

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo's fields that this model keeps, in kB."""
        count = self.pgt.direct_pages_count
        managed = sum(z.managed_pages for z in self.buddy.zones)
        return {
            "MemTotal": managed * 4,
            "MemFree": self.buddy.nr_free() * 4,
            "PageTables": len(self.pgt.table_pages) * 4,
            "DirectMap4k": count[PG_LEVEL_4K] * 4,
            "DirectMap2M": count[PG_LEVEL_2M] * 2048,
            "DirectMap1G": count[PG_LEVEL_1G] * 1048576,
        }

    def vmstat(self) -> dict[str, int]:
        """The model's /proc/vmstat counters (all of them, whatever the
        kernel version prints: ``k.profile.vmstat_counters`` says which the
        real kernel has)."""
        out = dict(self.vmstat_counters)
        out["nr_free_pages"] = self.buddy.nr_free()
        return out

    # -- validation (validate.py) and ptdump (ptdump.py) ---------------------

    def validate(self, mode: str = "full", **kw) -> dict[str, int]:
        """Check the model against the CPU; raises ValidationError (see validate.py)."""
        self.tlb.sync()                  # the CPU runs probes: no flush held back
        return validate(self, mode, **kw)

    def validator_code_page(self) -> int:
        """An executable page in the module area for the validator's probes."""
        if self._validator_code is None:
            code = self.alloc_insn_page()
            try:
                out = self.alloc_pages(int(G.GFP_KERNEL), 0)
            except MemoryError:
                self.vfree(code)
                raise
            self._validator_code, self._validator_out = code, out
        return self._validator_code

    @property
    def validator_out_pfn(self) -> int:
        self.validator_code_page()
        return self._validator_out

    def _debug_vm(self) -> None:
        """CONFIG_DEBUG_VM: a sample validation after every operation."""
        if self.debug_vm and not self._in_debug_vm and self.system_state is SystemState.RUNNING:
            self._in_debug_vm = True
            try:
                self.validate("sample", sample=256, execution=False)
            finally:
                self._in_debug_vm = False

    def ptdump(self) -> str:
        """The kernel page tables as debugfs ``page_tables/kernel`` prints them."""
        return ptdump(self)

    def __repr__(self) -> str:
        mi = self.meminfo()
        return (f"Kernel({self.profile.name}, {self.e820.total_ram() / GiB:.2f} GiB RAM, "
                f"policy={self.policy.name!r}, DirectMap4k={mi['DirectMap4k']} kB, "
                f"2M={mi['DirectMap2M']} kB, 1G={mi['DirectMap1G']} kB)")
