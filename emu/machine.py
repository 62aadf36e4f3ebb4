"""The emulated x86-64 machine: guest RAM, a Unicorn CPU with paging on.

Guest physical memory is host memory handed to Unicorn with ``mem_map_ptr``
and exposed as numpy arrays, so page tables are written by Python straight
into what the CPU walks. ``Machine(ram_bytes)`` makes its own Unicorn
instance over an anonymous ``MAP_NORESERVE`` mapping (a guest costs only the
host pages it touches); :func:`attach` drives a Unicorn instance and a RAM
buffer the user already has.

What the machine adds on top of Unicorn (DESIGN.md section 7):

* ``translate`` asks the CPU's own walk (``uc_vmem_translate``, reached with
  ctypes because the binding lacks it).
* ``invlpg`` executes a real INVLPG: Unicorn has no per-page flush API, so the
  machine borrows a not-present PML4 slot of the current tables for one
  instant, maps there a stub page of its own (outside guest RAM, see
  :mod:`emu.service`) ending in ``invlpg [rdi]; invlpg [rsi]``, and runs it.
  The stub invalidates the target and its own page; the next fetch falls off
  the end of the stub into a not-present page and the #PF stops the run, so
  no translation of the stub survives. The slot is then restored. Only if
  all 512 PML4 slots are present does ``invlpg`` fall back to a full flush
  (an over-flush is architecturally allowed, INVLPG "may" invalidate more).
* Each fault reports the CPU's own error code, and QEMU's double-fault
  tracking is reset after it as a delivered exception would reset it
  (:mod:`emu.cpustate`).
* A public hook API (:meth:`Machine.hook_add`, :meth:`Machine.hook_add_native`,
  :meth:`Machine.hook_del`) through which the TLB model, or anyone, observes
  the CPU.

The machine's interrupt hook and instruction counter are installed only
while the machine runs code itself (``run``, ``resume``, ``invlpg``, the
calibration at construction): a user's own ``uc.emu_start`` on an attached
``Uc`` behaves as plain Unicorn does. A TLB model assigned to ``m.tlb``
hooks the CPU from assignment to removal, so it counts those runs too.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Mapping

import numpy as np
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as X
from unicorn.unicorn_const import (
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_UNMAPPED,
)

from . import pagetable as pt
from ._native import InsnCounter, fnptr, native, uc_handle, uclib
from .asm import assemble, disasm, disasm_one
from .cpustate import MAXPHYADDR, enable_paging, flush_cpu_tlb
from .faults import (
    AttachError,
    Fault,
    FaultAction,
    FaultHandler,
    MachineError,
    PageFault,
    RunResult,
    RunStatus,
)
from .hostmem import HostMapping, buffer_view
from .pagetable import Access, PfErr
from .service import SVC_SIZE, ServicePages, borrow_slot, place

__all__ = [
    "CPU_MODELS",
    "MAXPHYADDR",
    "MAX_RAM_BYTES",
    "AttachError",
    "Fault",
    "FaultAction",
    "Machine",
    "MachineError",
    "PageFault",
    "RunResult",
    "RunStatus",
    "attach",
]

#: CPU models offered (QEMU's names); the TLB preset follows the family.
CPU_MODELS: dict[str, int] = {
    "skylake-server": X.UC_CPU_X86_SKYLAKE_SERVER,
    "skylake-client": X.UC_CPU_X86_SKYLAKE_CLIENT,
    "cascadelake-server": X.UC_CPU_X86_CASCADELAKE_SERVER,
    "icelake-server": X.UC_CPU_X86_ICELAKE_SERVER,
    "epyc": X.UC_CPU_X86_EPYC,
    "epyc-rome": X.UC_CPU_X86_EPYC_ROME,
}
#: Every x86 model Unicorn knows, by QEMU's name (for an attached Uc).
_CPU_NAMES = {getattr(X, n): n.removeprefix("UC_CPU_X86_").lower().replace("_", "-")
              for n in dir(X) if n.startswith("UC_CPU_X86_") and n != "UC_CPU_X86_ENDING"}
_CPU_NAMES.update({v: k for k, v in CPU_MODELS.items()})

#: ``Machine(ram_bytes)`` puts its service pages at the top of the 40-bit
#: physical address space; the largest guest RAM leaves 2 MiB below them.
_OWN_SVC_BASE = (1 << MAXPHYADDR) - SVC_SIZE
MAX_RAM_BYTES = _OWN_SVC_BASE - (2 << 20)

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_REG_IDS: dict[str, int] = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in _GPRS}
#: the GS segment base (MSR_GS_BASE): a run may set it (per-CPU style addressing)
_REG_IDS["gs_base"] = X.UC_X86_REG_GS_BASE

_EMPTY_PML4 = np.zeros(512, np.uint64)
_UNMAPPED_ERRORS = (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED)
_PROT = {Access.READ: 1, Access.WRITE: 2, Access.EXEC: 4}

#: Host memory a machine mapped into a Uc, kept as long as that Uc lives
#: (a Uc may outlive its Machine: ``uc = Machine(...).uc``).
_UC_MEMORY: weakref.WeakKeyDictionary[Uc, list[object]] = weakref.WeakKeyDictionary()

def _delete_native_hooks(uc: Uc, handles: set[int]) -> None:
    """Run when a machine is collected while its Uc lives on: native hooks
    point into memory of their owners (a TLB model's context), which goes
    with the machine."""
    uch = ctypes.c_void_p(uc_handle(uc))
    for handle in list(handles):
        uclib.uc_hook_del(uch, ctypes.c_size_t(handle))
    handles.clear()


#: uc_cb_hookintr_t: void (*)(uc_engine *uc, uint32_t intno, void *user_data)
_INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)


class Machine:
    """An x86-64 CPU in long mode with paging on, over ``ram_bytes`` of guest RAM.

    Attributes:
        ram: guest physical memory as a zero-copy ``uint8`` array
            (``ram[i]`` is physical address ``ram_base + i``).
        ram64: the same memory as ``uint64`` (page-table entries).
        ram_base: physical address of ``ram[0]`` (0 unless attached elsewhere).
        ram_bytes: size of guest RAM.
        cpu: the CPU model name.
        maxphyaddr: physical-address width of the CPU (bits).
        paging_levels: 4, or 5 (CR4.LA57: 57-bit virtual addresses, a PML5
            root; Ice Lake and Zen 4 servers boot Linux so).
        stats: counts of CR3 loads, flushes and INVLPGs.
    """

    def __init__(self, ram_bytes: int, cpu: str = "skylake-server", *, paging_levels: int = 4):
        if isinstance(ram_bytes, bool) or not isinstance(ram_bytes, (int, np.integer)):
            raise TypeError(f"ram_bytes must be an integer, not {type(ram_bytes).__name__}")
        ram_bytes = int(ram_bytes)
        if ram_bytes <= 0 or ram_bytes % pt.PAGE_SIZE:
            raise ValueError(f"ram_bytes must be a positive multiple of 4 KiB, not {ram_bytes:#x}")
        if ram_bytes > MAX_RAM_BYTES:
            raise ValueError(
                f"ram_bytes {ram_bytes:#x} is beyond what the emulated CPU can address: its "
                f"physical addresses are {MAXPHYADDR} bits, so guest RAM ends below "
                f"{MAX_RAM_BYTES:#x} ({MAX_RAM_BYTES / 2**30:.0f} GiB)")
        if cpu not in CPU_MODELS:
            raise ValueError(f"unknown cpu {cpu!r}; known: {', '.join(CPU_MODELS)}")
        if paging_levels not in (4, 5):
            raise ValueError(f"paging_levels must be 4 or 5, not {paging_levels!r}")
        # One host mapping: guest RAM, then the service pages.
        host = HostMapping(ram_bytes + SVC_SIZE)
        try:
            uc = Uc(UC_ARCH_X86, UC_MODE_64)
            uc.ctl_set_cpu_model(CPU_MODELS[cpu])
            uc.mem_map_ptr(0, ram_bytes, UC_PROT_ALL, host.addr)
        except UcError as exc:
            host.release()
            raise ValueError(f"Unicorn refused a guest of {ram_bytes:#x} bytes: {exc}") from None
        self._setup(uc, host.array[:ram_bytes], 0, cpu, _OWN_SVC_BASE,
                    host.array[ram_bytes:], host.addr + ram_bytes, host, paging_levels)

    def _setup(self, uc: Uc, ram: np.ndarray, ram_base: int, cpu: str, svc_base: int,
               svc_host: np.ndarray, svc_addr: int, host: object, levels: int = 4) -> None:
        """Take over ``uc`` (whose RAM is mapped): service pages, paging,
        calibration. ``host`` is whatever keeps the host memory alive; it
        lives as long as ``uc`` does."""
        _UC_MEMORY.setdefault(uc, []).append(host)
        self._uc = uc
        self._uch = ctypes.c_void_p(uc_handle(uc))
        self._host = host
        self.cpu = cpu
        self.ram = ram
        self.ram64 = ram.view(np.uint64)
        self.ram_base = ram_base
        self.ram_bytes = len(ram)
        self.maxphyaddr = MAXPHYADDR
        self.paging_levels = levels
        self._native_hooks: set[int] = set()
        # Holds uc, not the machine: uc stays valid until this has run.
        weakref.finalize(self, _delete_native_hooks, uc, self._native_hooks)
        self._lib = native()
        self._translate_fn = fnptr(uclib.uc_vmem_translate)
        self._pa = ctypes.c_uint64()
        self._intr_cb = _INTR_CB(self._intr_entry)
        self._intr_error: BaseException | None = None
        self._counter = InsnCounter()
        self._counter.stop = fnptr(uclib.uc_emu_stop)
        self._in_stub = False
        # Per-run state read by the interrupt hook.
        self._run_faults: list[Fault] = []
        self._on_fault: FaultHandler | FaultAction = FaultAction.STOP
        self._max_faults = 0
        self._stop_status: RunStatus | None = None
        self._fault_pending = False
        self._tlb = None
        self.stats = {"invlpg": 0, "invlpg_full_fallback": 0, "flush_tlb": 0, "cr3_loads": 0}
        try:
            self._svc = ServicePages(uc, svc_base, svc_host, svc_addr, levels)
        except UcError as exc:
            raise MachineError(f"cannot map the machine's service pages at {svc_base:#x}: "
                               f"{exc}") from None
        enable_paging(uc, self._svc.root, levels)
        self._exc = self._svc.calibrate(uc)

    # -- the Unicorn instance and hooks -------------------------------------

    @property
    def uc(self) -> Uc:
        """The ``unicorn.Uc`` this machine drives. Use it freely to read and
        write registers, run code and add hooks; writing CR3 or the paging
        control registers behind the machine's back bypasses its TLB model
        and its checks (use :attr:`cr3`, :meth:`flush_tlb`, :meth:`invlpg`)."""
        return self._uc

    @property
    def uc_handle(self) -> int:
        """The raw ``uc_engine *`` (for C code calling ``libunicorn``)."""
        return self._uch.value

    @property
    def service_base(self) -> int:
        """Physical address of the machine's own 32 KiB of service pages
        (outside guest RAM; see :mod:`emu.service`)."""
        return self._svc.base

    def hook_add(self, kind: int, callback, begin: int = 1, end: int = 0,
                 user_data: object = None) -> int:
        """Add a Python hook (``unicorn.Uc.hook_add``'s callback signatures:
        e.g. ``callback(uc, address, size, user_data)`` for ``UC_HOOK_CODE``).
        Active for every emulation of this CPU, the machine's and the user's,
        until :meth:`hook_del`. ``begin > end`` means every address."""
        return self._uc.hook_add(kind, callback, user_data, begin, end)

    def hook_add_native(self, kind: int, cfunc, user_data: int | None = None,
                        begin: int = 1, end: int = 0) -> int:
        """Add a C callback (a ctypes function of a loaded library, a ctypes
        ``CFUNCTYPE`` object, or an address) with a raw ``user_data`` pointer:
        no Python runs on the hot path. The caller keeps ``cfunc`` and what
        ``user_data`` points to alive until :meth:`hook_del`."""
        ptr = cfunc if isinstance(cfunc, int) else fnptr(cfunc)
        handle = ctypes.c_size_t()
        status = uclib.uc_hook_add(self._uch, ctypes.byref(handle), kind, ctypes.c_void_p(ptr),
                                   ctypes.c_void_p(user_data or 0),
                                   ctypes.c_uint64(begin), ctypes.c_uint64(end))
        if status:
            raise MachineError(f"uc_hook_add failed: {UcError(status)}")
        self._native_hooks.add(handle.value)
        return handle.value

    def hook_del(self, handle: int) -> None:
        """Remove a hook added by :meth:`hook_add` or :meth:`hook_add_native`."""
        if handle in self._native_hooks:
            status = uclib.uc_hook_del(self._uch, ctypes.c_size_t(handle))
            if status:
                raise MachineError(f"uc_hook_del failed: {UcError(status)}")
            self._native_hooks.discard(handle)
        else:
            self._uc.hook_del(handle)

    # -- the TLB model ------------------------------------------------------

    @property
    def tlb(self):
        """The TLB model observing this CPU (``emu.tlb.TlbModel`` or
        ``PyTlb``), or None. Assigning one attaches it (it hooks the CPU, so
        it counts every emulation from then on, a user's own ``emu_start``
        included); assigning None or another model detaches the old one."""
        return self._tlb

    @tlb.setter
    def tlb(self, model) -> None:
        if model is self._tlb:
            return
        if self._tlb is not None:
            old, self._tlb = self._tlb, None
            old.detach(self)
        if model is not None:
            model.attach(self)
            self._tlb = model

    # -- control registers and TLB ---------------------------------------

    @property
    def cr3(self) -> int:
        return self._uc.reg_read(X.UC_X86_REG_CR3)

    @cr3.setter
    def cr3(self, pa: int) -> None:
        """Load CR3. Unicorn drops every cached translation, global ones too
        (architecturally allowed); a TLB model keeps global entries."""
        pa = int(pa)
        end = self.ram_base + self.ram_bytes
        if pa % pt.PAGE_SIZE or not self.ram_base <= pa < end:
            raise ValueError(f"CR3 {pa:#x} must be a page-aligned address inside guest RAM "
                             f"[{self.ram_base:#x}, {end:#x})")
        self._uc.reg_write(X.UC_X86_REG_CR3, pa)
        self.stats["cr3_loads"] += 1
        if self._tlb is not None:
            self._tlb.load_cr3(pa)

    def flush_tlb(self) -> None:
        """Drop every cached translation, global ones included."""
        try:
            flush_cpu_tlb(self._uc)
        except UcError as exc:
            raise MachineError(f"uc_ctl(UC_CTL_TLB_FLUSH) failed: {exc}") from None
        self.stats["flush_tlb"] += 1
        if self._tlb is not None:
            self._tlb.flush_all()

    def invlpg(self, va: int) -> None:
        """Execute INVLPG ``va``: drop the cached translation of its page."""
        va = int(va)
        if not pt.is_canonical(va, self.paging_levels):
            raise ValueError(f"invlpg: {va:#x} is not a canonical address")
        self.stats["invlpg"] += 1
        if self._tlb is not None:
            self._tlb.invlpg(va)
        root = self.cr3 & pt.ADDR_MASK
        if root == self._svc.root:
            return  # the machine's own empty PML4: nothing can be cached
        first = (root - self.ram_base) >> 3
        pml4 = self.ram64[first: first + 512]
        slot = borrow_slot(pml4)
        if slot is None:
            self.stats["invlpg_full_fallback"] += 1
            flush_cpu_tlb(self._uc)
            return
        stub_va = self._svc.slot_va(slot)
        saved_entry = int(pml4[slot])
        regs = (X.UC_X86_REG_RIP, X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_CR2)
        saved = [self._uc.reg_read(r) for r in regs]
        pml4[slot] = self._svc.stub_pml4e
        counter = self._counter
        # A handler may call invlpg mid-run: the stub's own instructions
        # must not count against the guest's, nor in the TLB model.
        kept = (counter.count, counter.limit, counter.hit_limit, counter.last_rip)
        counter.limit = 0
        tlb = self._tlb
        if tlb is not None:
            tlb.detach(self)
        self._in_stub = True
        try:
            self._exc.reset()  # the stub's own #PF must not become a #DF
            self._uc.reg_write(X.UC_X86_REG_RDI, va)
            self._uc.reg_write(X.UC_X86_REG_RSI, stub_va)
            self._emu_start(self._svc.stub_entry_va(slot), 0)
        finally:
            self._in_stub = False
            counter.count, counter.limit, counter.hit_limit, counter.last_rip = kept
            pml4[slot] = saved_entry
            self._exc.reset()
            for r, v in zip(regs, saved):
                self._uc.reg_write(r, v)
            if tlb is not None:
                tlb.attach(self)

    # -- address translation ----------------------------------------------

    def translate(self, va: int, access: str | Access = "r") -> int:
        """Physical address of ``va`` by the emulated CPU's own page walk.

        Does not consult or fill the CPU's cached translations. Raises
        :class:`PageFault` (with the error code the access would push) when
        the access faults."""
        acc = Access.parse(access)
        va = int(va)
        if not pt.is_canonical(va, self.paging_levels):
            raise ValueError(f"{va:#x} is not a canonical address (the CPU raises #GP)")
        status = uclib.uc_vmem_translate(self._uch, ctypes.c_uint64(va), _PROT[acc],
                                         ctypes.byref(self._pa))
        if status == 0:
            return self._pa.value
        self._exc.reset()  # the CPU's probe walk raised a #PF internally
        code = self._error_code(va, acc)
        if code is None:
            raise MachineError(
                f"the CPU refused {acc.name.lower()} of {va:#x} (uc_err {status}) but the "
                f"software walk of the same tables allows it: a disagreement to report")
        raise PageFault(va, acc, code)

    def translate_many(self, vas: np.ndarray, access: str | Access = "r"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Batched :meth:`translate`: (physical addresses, ok mask); no error codes."""
        acc = Access.parse(access)
        vas = np.ascontiguousarray(vas, dtype=np.uint64)
        pas = np.zeros_like(vas)
        status = np.zeros(len(vas), dtype=np.uint8)
        ok = self._lib.dmfrag_translate_many(self._uch, self._translate_fn, vas.ctypes.data,
                                             pas.ctypes.data, status.ctypes.data, len(vas),
                                             _PROT[acc])
        if ok != len(vas):
            self._exc.reset()
        return pas, status == 0

    def walk(self, va: int, access: str | Access = "r") -> pt.WalkResult | pt.WalkFault:
        """Software walk of the current tables (for cross-checks, page size, flags)."""
        if self.cr3 & pt.ADDR_MASK == self._svc.root:
            return pt.walk(_EMPTY_PML4, 0, int(va), access, maxphyaddr=self.maxphyaddr,
                           levels=self.paging_levels)
        return pt.walk(self.ram64, self.cr3, int(va), access, maxphyaddr=self.maxphyaddr,
                       levels=self.paging_levels,
                       ram_base=self.ram_base)

    def _error_code(self, va: int, access: Access) -> PfErr | None:
        res = self.walk(va, access)
        return res.error_code if isinstance(res, pt.WalkFault) else None

    # -- physical and virtual memory access ---------------------------------

    def phys(self, pa: int, size: int) -> np.ndarray:
        """A zero-copy ``uint8`` view of guest RAM at physical ``[pa, pa+size)``
        (raises :class:`MachineError` outside guest RAM)."""
        off = int(pa) - self.ram_base
        if off < 0 or off + size > self.ram_bytes:
            raise MachineError(f"physical range {pa:#x}+{size:#x} is outside guest RAM "
                               f"[{self.ram_base:#x}, {self.ram_base + self.ram_bytes:#x})")
        return self.ram[off: off + size]

    def read_virt(self, va: int, size: int) -> bytes:
        """Read ``size`` bytes at ``va`` through the CPU's walk (page by page)."""
        out = bytearray()
        while size > 0:
            pa = self.translate(va, "r")
            n = min(size, pt.PAGE_SIZE - (va & (pt.PAGE_SIZE - 1)))
            out += self.phys(pa, n).tobytes()
            va, size = va + n, size - n
        return bytes(out)

    def read_virt_exec(self, va: int, size: int) -> bytes:
        """Read instruction bytes at ``va`` (stops at the first unfetchable page)."""
        out = bytearray()
        while size > 0:
            n = min(size, pt.PAGE_SIZE - (va & (pt.PAGE_SIZE - 1)))
            try:
                pa = self.translate(va, "x")
            except PageFault:
                if not out:
                    raise
                break
            out += self.phys(pa, n).tobytes()
            va, size = va + n, size - n
        return bytes(out)

    # -- execution ------------------------------------------------------

    def run(self, code: bytes | str, at: int, *, regs: Mapping[str, int] | None = None,
            until: int | None = None, max_insns: int | None = 10_000_000,
            on_fault: str | FaultAction | FaultHandler = "stop", max_faults: int = 1000,
            count_insns: bool = True, keep_decoded: bool = False) -> RunResult:
        """Place ``code`` at ``va`` and execute it.

        ``code`` is machine code or Intel-syntax assembly (assembled for
        address ``at``). It is written into the physical pages ``at`` maps to,
        which must be mapped and executable. Execution runs until the end of
        the code (or ``until``), HLT, a fault (by default), or ``max_insns``
        instructions. ``on_fault`` is ``"stop"``, ``"skip"`` (step over the
        faulting instruction and go on: handy for probing many addresses in
        one run) or a callable given each :class:`Fault` that returns a
        :class:`FaultAction` (``RETRY`` after fixing the tables). Every fault
        is in the result. An instruction that cannot be fetched (or decoded)
        cannot be skipped: ``"skip"`` stops the run there, status FAULTED. ``count_insns=False`` runs with no hook at all
        (full speed; ``insns`` is then None and ``max_insns`` is not enforced).
        ``keep_decoded=True`` keeps the attached TLB model's operand
        descriptions (the caller described this code itself:
        ``TlbModel.set_operands``); by default a run forgets them.

        Exceptions raised inside callbacks stop emulation and are re-raised.
        """
        at = int(at)
        if isinstance(code, str):
            code = assemble(code, at)
        code = bytes(code)
        if not code:
            raise ValueError("run: no code given")
        if isinstance(on_fault, str):
            on_fault = FaultAction(on_fault)
        if isinstance(on_fault, FaultAction) and on_fault is FaultAction.RETRY:
            raise ValueError("on_fault='retry' would loop forever; pass a handler that fixes the fault")
        if max_insns is not None and max_insns <= 0:
            raise ValueError(f"max_insns must be positive or None, not {max_insns}")
        reg_values = self._check_regs(regs or {})
        # Resolve every page first so that a bad address changes nothing.
        chunks = []
        va, off = at, 0
        while off < len(code):
            n = min(len(code) - off, pt.PAGE_SIZE - (va & (pt.PAGE_SIZE - 1)))
            try:
                pa = self.translate(va, "x")
            except PageFault as exc:
                raise MachineError(f"run: code at {va:#x} is not mapped executable ({exc})") from None
            chunks.append((self.phys(pa, n), code[off: off + n]))
            va, off = va + n, off + n
        for view, chunk in chunks:
            view[:] = np.frombuffer(chunk, np.uint8)
        # Writes through numpy bypass QEMU's self-modifying-code tracking:
        # drop translated blocks so the CPU executes what is in RAM now.
        self._uc.ctl_flush_tb()
        for name, value in reg_values.items():
            self._uc.reg_write(_REG_IDS[name], value)
        end = at + len(code) if until is None else int(until)
        return self._execute(at, end, max_insns, on_fault, max_faults, count_insns,
                             forget=not keep_decoded)

    def resume(self, *, until: int, max_insns: int | None = 10_000_000,
               on_fault: str | FaultAction | FaultHandler = "stop", max_faults: int = 1000,
               count_insns: bool = True) -> RunResult:
        """Continue from the current RIP (after a run stopped) up to ``until``."""
        if isinstance(on_fault, str):
            on_fault = FaultAction(on_fault)
        return self._execute(self._uc.reg_read(X.UC_X86_REG_RIP), int(until), max_insns,
                             on_fault, max_faults, count_insns)

    @staticmethod
    def _check_regs(regs: Mapping[str, int]) -> dict[str, int]:
        out = {}
        for name, value in regs.items():
            key = name.lower()
            if key not in _REG_IDS or key == "rip":
                raise ValueError(f"unknown or unsettable register {name!r}; "
                                 f"settable: {', '.join(n for n in _GPRS if n != 'rip')}")
            value = int(value)
            if not -(1 << 63) <= value < (1 << 64):
                raise ValueError(f"register {name} value {value:#x} does not fit 64 bits")
            out[key] = value & ((1 << 64) - 1)
        return out

    def _emu_start(self, begin: int, end: int) -> None:
        """``uc.emu_start`` with the machine's interrupt hook in place (only
        for the machine's own runs: a user's emulation sees plain Unicorn).
        An exception raised by the hook is re-raised here."""
        hook = self.hook_add_native(UC_HOOK_INTR, self._intr_cb, 0)
        try:
            self._uc.emu_start(begin, end)
        finally:
            self.hook_del(hook)
            error, self._intr_error = self._intr_error, None
        if error is not None:
            raise error

    def _execute(self, begin: int, end: int, max_insns: int | None, on_fault,
                 max_faults: int, count_insns: bool, forget: bool = True) -> RunResult:
        self._run_faults = []
        self._on_fault = on_fault
        self._max_faults = max_faults
        self._stop_status = None
        self._fault_pending = False
        self._exc.reset()  # a user's own emu_start may have left a fault undelivered
        counter = self._counter
        counter.count = 0
        counter.hit_limit = 0
        counter.limit = max_insns or 0
        counter_hook = None
        if count_insns:
            counter_hook = self.hook_add_native(UC_HOOK_CODE, self._lib.dmfrag_count_insn,
                                                ctypes.addressof(counter))
        if self._tlb is not None and forget:
            self._tlb.forget_code()  # a run writes fresh code: decoded operands may be stale
        pc = begin
        split: int | None = None  # a stop short of ``end`` (see _fetch_fault_origin)
        last_split: tuple[int, int] | None = None
        try:
            while True:
                try:
                    self._emu_start(pc, end if split is None else split)
                except UcError as exc:
                    if exc.errno in _UNMAPPED_ERRORS:
                        rip_now = self._uc.reg_read(X.UC_X86_REG_RIP)
                        raise MachineError(
                            f"guest code at rip {rip_now:#x} reached a physical address "
                            f"outside guest RAM [{self.ram_base:#x}, "
                            f"{self.ram_base + self.ram_bytes:#x}) through its page "
                            f"tables ({exc})") from None
                    if exc.errno != UC_ERR_INSN_INVALID:
                        raise
                    # Unicorn ends the run on #UD instead of calling the
                    # interrupt hook: treat it as the fault it is.
                    self._on_exception(6, self._uc.reg_read(X.UC_X86_REG_RIP))
                if split is not None:
                    # The instructions before the unfetchable one have run (or
                    # stopped early: a fault of theirs, HLT, the budget). Their
                    # block ends in an exit at ``split``: drop it, so that no
                    # later pass through it stops there.
                    self._uc.ctl_remove_cache(pc, split)
                    reached, split = self._uc.reg_read(X.UC_X86_REG_RIP) == split, None
                    if reached and not self._fault_pending and not counter.hit_limit:
                        pc = self._uc.reg_read(X.UC_X86_REG_RIP)
                        continue  # on to the unfetchable instruction itself
                if not self._fault_pending:
                    break
                self._fault_pending = False
                self._exc.reset()
                fault = self._run_faults[-1]
                origin = self._fetch_fault_origin(fault)
                if origin is not None and (fault.rip, origin) != last_split:
                    # Not a fault yet: run what precedes the instruction QEMU
                    # could not fetch, stopping in front of it. (The same
                    # split twice in a row would be no progress: the report
                    # then stands.)
                    self._run_faults.pop()
                    pc, split = fault.rip, origin
                    last_split = (pc, split)
                    continue
                last_split = None
                action = self._decide()
                if action is FaultAction.STOP:
                    break
                pc = self._uc.reg_read(X.UC_X86_REG_RIP)
                if action is FaultAction.SKIP:
                    size = self._insn_size(pc)
                    if size is None:  # nothing to skip: an instruction that cannot be fetched
                        self._stop_status = RunStatus.FAULTED
                        break
                    pc += size
                    self._uc.reg_write(X.UC_X86_REG_RIP, pc)
                if pc == end:
                    break
        finally:
            if self._fault_pending:  # a handler raised before the reset
                self._fault_pending = False
                self._exc.reset()
            if counter_hook is not None:
                self.hook_del(counter_hook)
        rip = self._uc.reg_read(X.UC_X86_REG_RIP)
        if self._stop_status is not None:
            status = self._stop_status
        elif counter.hit_limit:
            status = RunStatus.MAX_INSNS
        elif rip == end:
            status = RunStatus.COMPLETED
        else:
            status = RunStatus.HALTED
        regs = {name: self._uc.reg_read(_REG_IDS[name]) for name in _GPRS}
        insns = int(counter.count) if count_insns else None
        if insns is not None:
            # A faulting instruction was counted when it started but did not
            # complete; a faulting fetch never started one.
            insns -= sum(1 for f in self._run_faults if f.access is not Access.EXEC)
        return RunResult(status, insns, list(self._run_faults), regs,
                         self._tlb.stats() if self._tlb is not None else None)

    # -- faults ---------------------------------------------------------

    def _intr_entry(self, _uch, intno: int, _user) -> None:
        """The C-level interrupt callback: an exception must not unwind
        through Unicorn, so it is kept for :meth:`_emu_start` to raise."""
        try:
            self._hook_intr(intno)
        except BaseException as exc:  # noqa: BLE001 - re-raised by _emu_start
            self._intr_error = exc
            uclib.uc_emu_stop(self._uch)

    def _hook_intr(self, intno: int) -> None:
        uc = self._uc
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if self._in_stub:
            cr2 = uc.reg_read(X.UC_X86_REG_CR2)
            stub_next = (rip & ~(pt.PAGE_SIZE - 1))
            if intno != 14 or cr2 != stub_next:
                self._in_stub = False
                raise MachineError(f"invlpg stub: unexpected vector {intno} at {rip:#x}")
            uc.emu_stop()
            return
        self._on_exception(intno, rip)
        uc.emu_stop()

    def take_fault(self, intno: int) -> Fault:
        """For a user's ``UC_HOOK_INTR`` callback during their own
        ``uc.emu_start``: the exception the CPU just raised (vector
        ``intno``) as a :class:`Fault`, with CR2, the access and the CPU's
        own error code for a #PF; and what delivering it would do to the
        CPU (QEMU's double-fault tracking is reset, so the next #PF is not
        promoted to #DF). The machine does this itself for its own runs.
        The hook still decides how to go on (``uc.emu_stop()``, or fix the
        tables and return to retry)."""
        fault = self._describe_fault(intno, self._uc.reg_read(X.UC_X86_REG_RIP))
        self._exc.reset()
        return fault

    def _on_exception(self, intno: int, rip: int) -> None:
        """Record a guest exception; what happens next is decided once
        emu_start has returned (so a handler may use the machine)."""
        self._run_faults.append(self._describe_fault(intno, rip))
        self._fault_pending = True

    def _decide(self) -> FaultAction:
        """Apply the run's fault policy to the fault just recorded."""
        handler = self._on_fault
        if callable(handler):
            action = handler(self._run_faults[-1])
            action = FaultAction(action) if action is not None else FaultAction.STOP
        else:
            action = handler
        if action is FaultAction.STOP:
            self._stop_status = RunStatus.FAULTED
        elif len(self._run_faults) >= self._max_faults:
            self._stop_status = RunStatus.MAX_FAULTS
            action = FaultAction.STOP
        return action

    def _insn_bytes(self, rip: int) -> bytes | None:
        try:
            return self.read_virt_exec(rip, 15)
        except (PageFault, MachineError):
            return None

    def _insn_size(self, rip: int) -> int | None:
        """Length of the instruction at ``rip``; None if it cannot be fetched
        whole or decoded."""
        raw = self._insn_bytes(rip)
        insn = disasm_one(raw, rip) if raw else None
        return insn.size if insn is not None else None

    def _fetch_fault_origin(self, fault: Fault) -> int | None:
        """Where an instruction-fetch fault reported at ``fault.rip`` really
        arises, when that is a later instruction.

        QEMU translates a block of instructions before it runs any of them;
        a fetch fault while translating a later instruction of the block
        (one whose bytes reach into a page that cannot be fetched) abandons
        the whole block: RIP is the block's first instruction and none of
        its instructions ran. A real CPU retires the instructions before
        the unfetchable one. Decoding forward from RIP finds it: the first
        instruction that cannot be fetched whole. None when that is the one
        at RIP (the fault is as reported), or when the decoder cannot follow
        the code (the report then stands as QEMU made it)."""
        if fault.vector != 14 or fault.access is not Access.EXEC:
            return None
        rip, cr2 = fault.rip, fault.cr2
        if not rip < cr2 <= rip + 2 * pt.PAGE_SIZE:  # a block spans at most two pages
            return None
        addr = rip
        while addr < cr2:
            raw = self._insn_bytes(addr)
            insn = disasm_one(raw, addr) if raw else None
            if insn is None:
                if raw is not None and len(raw) == 15:
                    return None  # all its bytes fetchable: an opcode the decoder lacks
                break
            addr += insn.size
        return addr if rip < addr <= cr2 else None

    def _describe_fault(self, intno: int, rip: int) -> Fault:
        # CR2 and the error code first: reading the instruction's bytes walks
        # the tables with the CPU's probe, which raises (and records) a #PF
        # of its own when they reach an unfetchable page.
        if intno == 14:
            cr2 = self._uc.reg_read(X.UC_X86_REG_CR2)
            code = PfErr(self._exc.error_code() & 0x1F)
        raw = self._insn_bytes(rip)
        insn = disasm_one(raw, rip) if raw else None
        text = f"{insn.mnemonic} {insn.op_str}".strip() if insn else "?"
        if intno != 14:
            return Fault(intno, rip, text)
        self._uc.reg_write(X.UC_X86_REG_CR2, cr2)
        if code & PfErr.ID:
            access = Access.EXEC
        else:
            access = Access.WRITE if code & PfErr.W else Access.READ
        return Fault(14, rip, text, cr2, access, code)

    # -- convenience ----------------------------------------------------

    def disasm(self, va: int, count: int = 10) -> list[tuple[int, int, str]]:
        """Disassemble ``count`` instructions at ``va`` (read through the walk)."""
        return disasm(self.read_virt_exec(va, 15 * count), va, count)

    def __repr__(self) -> str:
        where = f", ram_base={self.ram_base:#x}" if self.ram_base else ""
        return (f"Machine(ram_bytes={self.ram_bytes:#x} ({self.ram_bytes / 2**30:g} GiB)"
                f"{where}, cpu={self.cpu!r}, cr3={self.cr3:#x})")


# -- attaching to a user's Unicorn instance ---------------------------------

def _check_backing(uc: Uc, ram: np.ndarray, base: int) -> None:
    """``ram`` must be what ``uc`` sees at ``[base, base+len(ram))``: covered
    by its regions, and a byte flipped in the buffer reads back through
    Unicorn (first and last page; restored at once)."""
    end = base + len(ram) - 1
    covered = base
    for begin, last, _perms in sorted(uc.mem_regions()):
        if begin <= covered <= last:
            covered = last + 1
        if covered > end:
            break
    if covered <= end:
        raise AttachError(f"guest RAM [{base:#x}, {end + 1:#x}) is not mapped in this Uc "
                          f"(map it first: uc.mem_map_ptr({base:#x}, {len(ram):#x}, "
                          f"UC_PROT_ALL, address of the buffer))")
    for off in (0, len(ram) - 1):
        before = int(ram[off])
        ram[off] = before ^ 0xA5
        try:
            seen = uc.mem_read(base + off, 1)[0]
        finally:
            ram[off] = before
        if seen != before ^ 0xA5:
            raise AttachError(f"the buffer is not the memory this Uc maps at {base + off:#x} "
                              f"(map it with uc.mem_map_ptr and the buffer's address)")


def attach(uc: Uc, ram: object, *, base: int = 0) -> Machine:
    """Drive a Unicorn instance the caller made: paging on, as :class:`Machine`.

    ``uc`` is a ``Uc(UC_ARCH_X86, UC_MODE_64)``; ``ram`` a writable buffer
    (an ``mmap``, a ``bytearray``, a numpy array: a whole number of 4 KiB
    pages) that the caller mapped at physical ``base`` with
    ``uc.mem_map_ptr`` (UC_PROT_ALL). ``m.ram``/``m.ram64`` view that buffer
    (zero-copy; ``m.ram[0]`` is physical ``base``). The machine maps its
    32 KiB of service pages in the highest free gap of ``uc``'s physical
    memory below ``1 << 40`` (:attr:`Machine.service_base`); map nothing
    there later. CR3 starts at the machine's empty root table; the other
    registers are kept. The CPU model is whatever the caller set.

    Raises :class:`AttachError` (a ValueError), before changing anything
    of ``uc``, for another architecture or mode, a buffer that is read-only
    or not what ``uc`` maps at ``base``, or RAM beyond the CPU's 40-bit
    physical addresses.
    """
    if not isinstance(uc, Uc):
        raise AttachError(f"attach needs a unicorn.Uc, not {type(uc).__name__}")
    arch, mode = uc.ctl_get_arch(), uc.ctl_get_mode()
    if arch != UC_ARCH_X86 or mode != UC_MODE_64:
        raise AttachError(f"attach needs an x86-64 Uc (UC_ARCH_X86, UC_MODE_64), not arch "
                          f"{arch}, mode {mode}")
    view = buffer_view(ram)
    if isinstance(base, bool) or not isinstance(base, (int, np.integer)):
        raise AttachError(f"base must be an integer, not {type(base).__name__}")
    base = int(base)
    if base < 0 or base % pt.PAGE_SIZE:
        raise AttachError(f"base {base:#x} must be a page-aligned physical address")
    if base + len(view) > 1 << MAXPHYADDR:
        raise AttachError(f"guest RAM [{base:#x}, {base + len(view):#x}) goes beyond the "
                          f"CPU's {MAXPHYADDR}-bit physical addresses")
    _check_backing(uc, view, base)
    try:
        svc_base = place(uc.mem_regions())
    except MachineError as exc:
        raise AttachError(str(exc)) from None
    model = uc.ctl_get_cpu_model()
    cpu = _CPU_NAMES.get(model, f"model {model}")
    svc = HostMapping(SVC_SIZE)
    m = Machine.__new__(Machine)
    m._setup(uc, view, base, cpu, svc_base, svc.array, svc.addr, svc)
    return m
