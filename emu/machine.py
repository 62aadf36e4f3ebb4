"""The emulated x86-64 machine: guest RAM, a Unicorn CPU with paging on.

Guest physical memory is one anonymous ``MAP_NORESERVE`` host mapping handed
to Unicorn with ``mem_map_ptr`` and exposed as numpy arrays, so page tables
are written by Python straight into what the CPU walks. A guest costs only the
host pages it touches.

What the machine adds on top of Unicorn (DESIGN.md section 7):

* ``translate`` asks the CPU's own walk (``uc_vmem_translate``, reached with
  ctypes because the binding lacks it).
* ``invlpg`` executes a real INVLPG: Unicorn has no per-page flush API, so the
  machine borrows a not-present PML4 slot of the current tables for one
  instant, maps there a stub page of its own (outside guest RAM) ending in
  ``invlpg [rdi]; invlpg [rsi]``, and runs it. The stub invalidates the
  target and its own page; the next fetch falls off the end of the stub
  into a not-present page and the #PF stops the run, so no translation of the
  stub survives. The slot is then restored. Only if all 512 PML4 slots are
  present does ``invlpg`` fall back to a full flush (an over-flush is
  architecturally allowed, INVLPG "may" invalidate more).
* Unicorn hands an exception to its interrupt hook and never delivers it
  through the guest IDT, so the error code the CPU computed is not pushed
  anywhere, and QEMU's double-fault tracking (``old_exception``) is never
  reset: the next #PF would be promoted to #DF. Both live in the CPU state
  that ``uc_context_save`` copies. At construction the machine raises known
  faults in its own pages and finds, by their values, where the error code
  and ``old_exception`` sit in that copy (a calibration that fails loudly if
  Unicorn's layout changes). Each fault then reports the CPU's own error
  code, and ``old_exception`` is reset after each fault as a delivered
  exception would reset it.
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import mmap
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_const import (
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_INSN_INVALID,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_UNMAPPED,
)

from . import pagetable as pt
from ._native import InsnCounter, fnptr, native, uclib
from .asm import assemble, disasm, disasm_one
from .pagetable import Access, PfErr, PteFlags

__all__ = [
    "CPU_MODELS",
    "Fault",
    "Machine",
    "MachineError",
    "PageFault",
    "RunResult",
    "RunStatus",
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

# Control-register bits (SDM 2.5).
CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR4_PAE, CR4_PGE = 1 << 5, 1 << 7
MSR_EFER = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

#: The machine's own pages (stub code and tables) sit at the top of the
#: emulated CPU's 40-bit physical address space, outside guest RAM.
MAXPHYADDR = 40
_SVC_PAGES = 8
_SVC_SIZE = _SVC_PAGES * pt.PAGE_SIZE
_SVC_BASE = (1 << MAXPHYADDR) - _SVC_SIZE
#: Largest guest RAM: leave 2 MiB below the service pages.
MAX_RAM_BYTES = _SVC_BASE - (2 << 20)
# Service page roles (offsets in pages from _SVC_BASE).
_SVC_ROOT, _SVC_PDPT, _SVC_PD, _SVC_PT, _SVC_CODE, _SVC_DATA = range(6)
#: PML4 slots borrowed for the stub, Linux's hypervisor hole (0xffff8000...
#: to 0xffff87ff...) first: nothing of the kernel model lives there.
_BORROW_ORDER = tuple(range(0x100, 0x110)) + tuple(range(0x110, 0x200)) + tuple(range(0x100))

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_REG_IDS: dict[str, int] = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in _GPRS}

#: Exception vectors by name, for messages.
_VECTORS = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 17: "#AC"}

_EMPTY_PML4 = np.zeros(512, np.uint64)
_UNMAPPED_ERRORS = (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED)

# The uc_ctl code for UC_CTL_TLB_FLUSH (unicorn.h: UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)).
_UC_CTL_TLB_FLUSH = UC_CTL_TLB_FLUSH | (0 << 26) | (UC_CTL_IO_WRITE << 30)


class MachineError(RuntimeError):
    """The machine cannot do what was asked (its state is unchanged)."""


class PageFault(Exception):
    """#PF: ``va`` cannot be accessed as ``access``; ``error_code`` as the CPU pushes it."""

    def __init__(self, va: int, access: str | Access, error_code: int):
        self.va = va
        self.access = Access.parse(access)
        self.error_code = PfErr(error_code)
        super().__init__(
            f"#PF at {va:#x} on {self.access.name.lower()} "
            f"(error code {int(error_code):#x}: {_describe_pf(self.error_code)})")


def _describe_pf(code: PfErr) -> str:
    if code & PfErr.RSVD:
        cause = "reserved bit set"
    elif code & PfErr.P:
        cause = "protection violation"
    else:
        cause = "not present"
    kind = "fetch" if code & PfErr.ID else ("write" if code & PfErr.W else "read")
    return f"{cause}, {kind}, {'user' if code & PfErr.U else 'supervisor'}"


class RunStatus(enum.Enum):
    COMPLETED = "completed"   # reached the end of the code (or the `until` address)
    HALTED = "halted"         # executed HLT
    FAULTED = "faulted"       # stopped at a fault (see RunResult.faults)
    MAX_INSNS = "max_insns"   # the instruction budget ran out (a guest that never stops)
    MAX_FAULTS = "max_faults"  # a fault handler kept resuming into faults


@dataclass(frozen=True)
class Fault:
    """An exception raised by guest code."""

    vector: int                  # 14 for #PF
    rip: int                     # the faulting instruction (it did not complete)
    insn: str                    # its disassembly, or '?' if its bytes are unreadable
    cr2: int | None = None       # #PF only: the faulting linear address
    access: Access | None = None  # #PF only
    error_code: PfErr | None = None  # #PF only: the CPU's own error code

    @property
    def name(self) -> str:
        return _VECTORS.get(self.vector, f"vector {self.vector}")

    def __str__(self) -> str:
        if self.vector == 14:
            return (f"#PF at rip {self.rip:#x} ({self.insn}): cr2 {self.cr2:#x}, "
                    f"{self.access.name.lower()}, error code {int(self.error_code):#x} "
                    f"({_describe_pf(self.error_code)})")
        return f"{self.name} at rip {self.rip:#x} ({self.insn})"


#: What a fault handler tells run() to do next.
class FaultAction(enum.Enum):
    STOP = "stop"      # end the run with status FAULTED
    RETRY = "retry"    # re-execute the faulting instruction (the handler fixed the tables)
    SKIP = "skip"      # continue after the faulting instruction


@dataclass
class RunResult:
    status: RunStatus
    insns: int | None                  # instructions completed (None if not counted)
    faults: list[Fault] = field(default_factory=list)
    regs: dict[str, int] = field(default_factory=dict)
    tlb: object | None = None          # TLB statistics when a TLB model was attached

    @property
    def rip(self) -> int:
        return self.regs["rip"]

    @property
    def fault(self) -> Fault | None:
        return self.faults[-1] if self.faults else None


FaultHandler = Callable[[Fault], "FaultAction | str | None"]


#: Linux MAP_NORESERVE (the mmap module lacks the constant before Python 3.13).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _host_mmap(size: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise ValueError(
            f"cannot reserve {size:#x} bytes ({size / 2**30:.1f} GiB) of host address space "
            f"for guest RAM: {_errno.errorcode.get(err, err)} ({os.strerror(err)})")
    return addr


def _host_munmap(addr: int, size: int) -> None:
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(addr, size)


def _ram_view(addr: int, size: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))


class Machine:
    """An x86-64 CPU in long mode with paging on, over ``ram_bytes`` of guest RAM.

    Attributes:
        ram: guest physical memory as a zero-copy ``uint8`` array.
        ram64: the same memory as ``uint64`` (page-table entries).
        cpu: the CPU model name.
        maxphyaddr: physical-address width of the CPU (bits).
        uc: the underlying ``unicorn.Uc`` (for experts; bypassing the machine's
            methods can break its invariants).
    """

    def __init__(self, ram_bytes: int, cpu: str = "skylake-server"):
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
        self.cpu = cpu
        self.ram_bytes = ram_bytes
        self.maxphyaddr = MAXPHYADDR
        total = ram_bytes + _SVC_SIZE
        base = _host_mmap(total)
        self._finalizer = weakref.finalize(self, _host_munmap, base, total)
        host = _ram_view(base, total)
        self.ram = host[:ram_bytes]
        self.ram64 = self.ram.view(np.uint64)
        self._svc = host[ram_bytes:]
        self._svc64 = self._svc.view(np.uint64)
        try:
            self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
            self.uc.ctl_set_cpu_model(CPU_MODELS[cpu])
            self.uc.mem_map_ptr(0, ram_bytes, UC_PROT_ALL, base)
            self.uc.mem_map_ptr(_SVC_BASE, _SVC_SIZE, UC_PROT_ALL, base + ram_bytes)
        except UcError as exc:
            self._finalizer()
            raise ValueError(f"Unicorn refused a guest of {ram_bytes:#x} bytes: {exc}") from None
        self._uch = self.uc._uch
        self.uc.hook_add(UC_HOOK_INTR, self._hook_intr)
        self._build_service_tables()
        self._enable_paging()
        self._in_stub = False
        self._calibrating = False
        self._calibrate_cpu_state()
        self._counter = InsnCounter()
        self._counter.stop = fnptr(uclib.uc_emu_stop)
        self._counter_hook: int | None = None
        self._lib = native()
        self._translate_fn = fnptr(uclib.uc_vmem_translate)
        self._pa = ctypes.c_uint64()
        # Per-run state read by the interrupt hook.
        self._run_faults: list[Fault] = []
        self._on_fault: FaultHandler | None = None
        self._max_faults = 0
        self.tlb = None  # a TLB model attaches here (emu.tlb)
        self.stats = {"invlpg": 0, "invlpg_full_fallback": 0, "flush_tlb": 0, "cr3_loads": 0}

    # -- set-up ---------------------------------------------------------

    def _svc_pa(self, page: int) -> int:
        return _SVC_BASE + page * pt.PAGE_SIZE

    def _build_service_tables(self) -> None:
        """The stub chain PDPT -> PD -> PT -> pages, linked into a PML4 slot
        only while the machine runs code of its own.

        PT[0] is the code page (RX): calibration code at its start, and at its
        very end ``invlpg [rdi]; invlpg [rsi]``. PT[1] is not present, so the
        fetch after the stub faults and ends the run. PT[2] is a RW+NX data
        page, PT[3] a read-only one, PT[4] has a reserved bit set: the
        calibration faults on them."""
        q = self._svc64
        tbl = PteFlags.P | PteFlags.RW
        q[_SVC_PDPT * 512] = self._svc_pa(_SVC_PD) | tbl
        q[_SVC_PD * 512] = self._svc_pa(_SVC_PT) | tbl
        ptb = _SVC_PT * 512
        q[ptb + 0] = self._svc_pa(_SVC_CODE) | PteFlags.P
        q[ptb + 2] = self._svc_pa(_SVC_DATA) | tbl | PteFlags.NX
        q[ptb + 3] = self._svc_pa(_SVC_DATA) | PteFlags.P | PteFlags.NX
        q[ptb + 4] = self._svc_pa(_SVC_DATA) | tbl | PteFlags.NX | (1 << (MAXPHYADDR + 1))
        stub = bytes([0x0F, 0x01, 0x3F, 0x0F, 0x01, 0x3E])  # invlpg [rdi]; invlpg [rsi]
        self._stub_off = pt.PAGE_SIZE - len(stub)
        self._svc_write(_SVC_CODE, self._stub_off, stub)

    def _svc_write(self, page: int, offset: int, data: bytes) -> None:
        start = page * pt.PAGE_SIZE + offset
        self._svc[start: start + len(data)] = np.frombuffer(data, np.uint8)

    def _calibrate_cpu_state(self) -> None:
        """Find the #PF error code and ``old_exception`` in Unicorn's saved CPU
        state by raising faults whose error codes are known (SDM 4.7)."""
        va = pt.canonical(_BORROW_ORDER[0] << 39)
        page = pt.PAGE_SIZE
        cases = [  # (code, rbx, expected error code)
            ("mov rax, [rbx]", va + 1 * page, 0x00),   # read, not present
            ("mov [rbx], rax", va + 1 * page, 0x02),   # write, not present
            ("mov [rbx], rax", va + 3 * page, 0x03),   # write, read-only
            ("jmp rbx", va + 2 * page, 0x11),          # fetch, NX
            ("mov rax, [rbx]", va + 4 * page, 0x09),   # read, reserved bit
            ("jmp rbx", va + 1 * page, 0x10),          # fetch, not present
        ]
        slot = _SVC_ROOT * 512 + _BORROW_ORDER[0]
        self._svc64[slot] = (
            self._svc_pa(_SVC_PDPT) | PteFlags.P | PteFlags.RW)
        clean = self.uc.context_save()
        clean_raw = np.frombuffer(ctypes.string_at(clean.context, clean.size), np.int32)
        seen = []
        try:
            for text, rbx, _ in cases:
                self._svc_write(_SVC_CODE, 0, assemble(text, va))
                self.uc.ctl_flush_tb()
                self.uc.reg_write(X.UC_X86_REG_RBX, rbx)
                self._calibrating = True
                self.uc.emu_start(va, va + self._stub_off)
                ctx = self.uc.context_save()
                seen.append(np.frombuffer(ctypes.string_at(ctx.context, ctx.size), np.int32).copy())
                self.uc.context_restore(clean)
        finally:
            self._calibrating = False
            self._svc64[slot] = 0
            uclib.uc_ctl(self._uch, _UC_CTL_TLB_FLUSH)
        snaps = np.stack(seen)
        expected = np.array([c[2] for c in cases], np.int32)[:, None]
        err_at = np.flatnonzero((snaps == expected).all(axis=0))
        old_at = np.flatnonzero((clean_raw == -1) & (snaps == 14).all(axis=0))
        if len(err_at) != 1 or len(old_at) != 1:
            raise MachineError(
                "cannot locate the #PF error code and old_exception in Unicorn's saved CPU "
                f"state (candidates: {len(err_at)}, {len(old_at)}); this Unicorn build's "
                "layout differs from 2.1.x")
        self._err_off = int(err_at[0]) * 4
        self._old_exc_off = int(old_at[0]) * 4

    def _cpu_error_code(self) -> int:
        """The error code of the exception the CPU just raised."""
        ctx = self.uc.context_save()
        return ctypes.c_int32.from_address(ctx.context.value + self._err_off).value

    def _reset_exception_state(self) -> None:
        """Do what delivering the exception would: old_exception = -1, so the
        next fault is not taken for a fault during delivery (#DF)."""
        ctx = self.uc.context_save()
        ctypes.c_int32.from_address(ctx.context.value + self._old_exc_off).value = -1
        self.uc.context_restore(ctx)

    def _enable_paging(self) -> None:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR3, self._svc_pa(_SVC_ROOT))  # an empty PML4
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | CR4_PAE | CR4_PGE)
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, EFER_LME | EFER_LMA | EFER_NXE))
        uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | CR0_PE | CR0_PG | CR0_WP)

    # -- control registers and TLB ---------------------------------------

    @property
    def cr3(self) -> int:
        return self.uc.reg_read(X.UC_X86_REG_CR3)

    @cr3.setter
    def cr3(self, pa: int) -> None:
        """Load CR3. Unicorn drops every cached translation, global ones too
        (architecturally allowed); a TLB model keeps global entries."""
        pa = int(pa)
        if pa % pt.PAGE_SIZE or not 0 <= pa < self.ram_bytes:
            raise ValueError(f"CR3 {pa:#x} must be a page-aligned address inside guest RAM "
                             f"[0, {self.ram_bytes:#x})")
        self.uc.reg_write(X.UC_X86_REG_CR3, pa)
        self.stats["cr3_loads"] += 1
        if self.tlb is not None:
            self.tlb.load_cr3(pa)

    def flush_tlb(self) -> None:
        """Drop every cached translation, global ones included."""
        status = uclib.uc_ctl(self._uch, _UC_CTL_TLB_FLUSH)
        if status:
            raise MachineError(f"uc_ctl(UC_CTL_TLB_FLUSH) failed: {UcError(status)}")
        self.stats["flush_tlb"] += 1
        if self.tlb is not None:
            self.tlb.flush_all()

    def invlpg(self, va: int) -> None:
        """Execute INVLPG ``va``: drop the cached translation of its page."""
        va = int(va)
        if not pt.is_canonical(va):
            raise ValueError(f"invlpg: {va:#x} is not a canonical address")
        self.stats["invlpg"] += 1
        if self.tlb is not None:
            self.tlb.invlpg(va)
        root = self.cr3 & pt.ADDR_MASK
        if root == self._svc_pa(_SVC_ROOT):
            return  # the machine's own empty PML4: nothing can be cached
        pml4 = self.ram64[root >> 3: (root >> 3) + 512]
        present = (pml4 & np.uint64(PteFlags.P)).astype(bool)
        slot = next((s for s in _BORROW_ORDER if not present[s]), None)
        if slot is None:
            self.stats["invlpg_full_fallback"] += 1
            uclib.uc_ctl(self._uch, _UC_CTL_TLB_FLUSH)
            return
        stub_va = pt.canonical(slot << 39)
        saved_entry = int(pml4[slot])
        regs = (X.UC_X86_REG_RIP, X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_CR2)
        saved = [self.uc.reg_read(r) for r in regs]
        pml4[slot] = self._svc_pa(_SVC_PDPT) | PteFlags.P | PteFlags.RW
        counter = self._counter
        # A handler may call invlpg mid-run: the stub's own instructions
        # must not count against the guest's.
        kept = (counter.count, counter.limit, counter.hit_limit, counter.last_rip)
        counter.limit = 0
        self._in_stub = True
        try:
            self.uc.reg_write(X.UC_X86_REG_RDI, va)
            self.uc.reg_write(X.UC_X86_REG_RSI, stub_va)
            self.uc.emu_start(stub_va + self._stub_off, 0)
        finally:
            self._in_stub = False
            counter.count, counter.limit, counter.hit_limit, counter.last_rip = kept
            pml4[slot] = saved_entry
            self._reset_exception_state()
            for r, v in zip(regs, saved):
                self.uc.reg_write(r, v)

    # -- address translation ----------------------------------------------

    def translate(self, va: int, access: str | Access = "r") -> int:
        """Physical address of ``va`` by the emulated CPU's own page walk.

        Does not consult or fill the CPU's cached translations. Raises
        :class:`PageFault` (with the error code the access would push) when
        the access faults."""
        acc = Access.parse(access)
        va = int(va)
        if not pt.is_canonical(va):
            raise ValueError(f"{va:#x} is not a canonical address (the CPU raises #GP)")
        prot = {Access.READ: 1, Access.WRITE: 2, Access.EXEC: 4}[acc]
        status = uclib.uc_vmem_translate(self._uch, ctypes.c_uint64(va), prot,
                                         ctypes.byref(self._pa))
        if status == 0:
            return self._pa.value
        self._reset_exception_state()  # the CPU's probe walk raised a #PF internally
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
        prot = {Access.READ: 1, Access.WRITE: 2, Access.EXEC: 4}[acc]
        ok = self._lib.dmfrag_translate_many(self._uch, self._translate_fn, vas.ctypes.data,
                                             pas.ctypes.data, status.ctypes.data, len(vas), prot)
        if ok != len(vas):
            self._reset_exception_state()
        return pas, status == 0

    def walk(self, va: int, access: str | Access = "r") -> pt.WalkResult | pt.WalkFault:
        """Software walk of the current tables (for cross-checks, page size, flags)."""
        if self.cr3 & pt.ADDR_MASK == self._svc_pa(_SVC_ROOT):
            return pt.walk(_EMPTY_PML4, 0, int(va), access, maxphyaddr=self.maxphyaddr)
        return pt.walk(self.ram64, self.cr3, int(va), access, maxphyaddr=self.maxphyaddr)

    def _error_code(self, va: int, access: Access) -> PfErr | None:
        res = self.walk(va, access)
        return res.error_code if isinstance(res, pt.WalkFault) else None

    # -- virtual memory access (through the software walk) ---------------------

    def read_virt(self, va: int, size: int) -> bytes:
        """Read ``size`` bytes at ``va`` through the CPU's walk (page by page)."""
        out = bytearray()
        while size > 0:
            pa = self.translate(va, "r")
            n = min(size, pt.PAGE_SIZE - (va & (pt.PAGE_SIZE - 1)))
            self._check_ram(pa, n)
            out += self.ram[pa: pa + n].tobytes()
            va, size = va + n, size - n
        return bytes(out)

    def _check_ram(self, pa: int, n: int) -> None:
        if pa + n > self.ram_bytes:
            raise MachineError(f"physical range {pa:#x}+{n:#x} is outside guest RAM")

    # -- execution ------------------------------------------------------

    def run(self, code: bytes | str, at: int, *, regs: Mapping[str, int] | None = None,
            until: int | None = None, max_insns: int | None = 10_000_000,
            on_fault: str | FaultAction | FaultHandler = "stop", max_faults: int = 1000,
            count_insns: bool = True) -> RunResult:
        """Place ``code`` at ``va`` and execute it.

        ``code`` is machine code or Intel-syntax assembly (assembled for
        address ``at``). It is written into the physical pages ``at`` maps to,
        which must be mapped and executable. Execution runs until the end of
        the code (or ``until``), HLT, a fault (by default), or ``max_insns``
        instructions. ``on_fault`` is ``"stop"``, ``"skip"`` (step over the
        faulting instruction and go on: handy for probing many addresses in
        one run) or a callable given each :class:`Fault` that returns a
        :class:`FaultAction` (``RETRY`` after fixing the tables). Every fault
        is in the result. ``count_insns=False`` runs with no hook at all
        (full speed; ``insns`` is then None and ``max_insns`` is not enforced).

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
            self._check_ram(pa, n)
            chunks.append((pa, code[off: off + n]))
            va, off = va + n, off + n
        for pa, chunk in chunks:
            self.ram[pa: pa + len(chunk)] = np.frombuffer(chunk, np.uint8)
        # Writes through numpy bypass QEMU's self-modifying-code tracking:
        # drop translated blocks so the CPU executes what is in RAM now.
        self.uc.ctl_flush_tb()
        for name, value in reg_values.items():
            self.uc.reg_write(_REG_IDS[name], value)
        end = at + len(code) if until is None else int(until)
        return self._execute(at, end, max_insns, on_fault, max_faults, count_insns)

    def resume(self, *, until: int, max_insns: int | None = 10_000_000,
               on_fault: str | FaultAction | FaultHandler = "stop", max_faults: int = 1000,
               count_insns: bool = True) -> RunResult:
        """Continue from the current RIP (after a run stopped) up to ``until``."""
        if isinstance(on_fault, str):
            on_fault = FaultAction(on_fault)
        return self._execute(self.uc.reg_read(X.UC_X86_REG_RIP), int(until), max_insns,
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

    def _execute(self, begin: int, end: int, max_insns: int | None, on_fault,
                 max_faults: int, count_insns: bool) -> RunResult:
        self._run_faults = []
        self._on_fault = on_fault
        self._max_faults = max_faults
        self._stop_status: RunStatus | None = None
        self._fault_pending = False
        counter = self._counter
        counter.count = 0
        counter.hit_limit = 0
        counter.limit = max_insns or 0
        if count_insns:
            self._install_counter()
        else:
            self._remove_counter()
        if self.tlb is not None:
            self.tlb.attach_run(self)
        pc = begin
        try:
            while True:
                try:
                    self.uc.emu_start(pc, end)
                except UcError as exc:
                    if exc.errno in _UNMAPPED_ERRORS:
                        rip_now = self.uc.reg_read(X.UC_X86_REG_RIP)
                        raise MachineError(
                            f"guest code at rip {rip_now:#x} reached a physical address "
                            f"outside guest RAM [0, {self.ram_bytes:#x}) through its page "
                            f"tables ({exc})") from None
                    if exc.errno != UC_ERR_INSN_INVALID:
                        raise
                    # Unicorn ends the run on #UD instead of calling the
                    # interrupt hook: treat it as the fault it is.
                    self._on_exception(6, self.uc.reg_read(X.UC_X86_REG_RIP))
                if not self._fault_pending:
                    break
                self._fault_pending = False
                self._reset_exception_state()
                action = self._decide()
                if action is FaultAction.STOP:
                    break
                pc = self.uc.reg_read(X.UC_X86_REG_RIP)
                if action is FaultAction.SKIP:
                    pc += self._insn_size(pc)
                    self.uc.reg_write(X.UC_X86_REG_RIP, pc)
                if pc == end:
                    break
        finally:
            if self._fault_pending:  # a handler raised before the reset
                self._fault_pending = False
                self._reset_exception_state()
            if self.tlb is not None:
                self.tlb.detach_run(self)
        rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        if self._stop_status is not None:
            status = self._stop_status
        elif counter.hit_limit:
            status = RunStatus.MAX_INSNS
        elif rip == end:
            status = RunStatus.COMPLETED
        else:
            status = RunStatus.HALTED
        regs = {name: self.uc.reg_read(_REG_IDS[name]) for name in _GPRS}
        insns = int(counter.count) if count_insns else None
        if insns is not None:
            # A faulting instruction was counted when it started but did not
            # complete; a faulting fetch never started one.
            insns -= sum(1 for f in self._run_faults if f.access is not Access.EXEC)
        return RunResult(status, insns, list(self._run_faults), regs,
                         self.tlb.stats() if self.tlb is not None else None)

    def _install_counter(self) -> None:
        if self._counter_hook is None:
            self._counter_hook = self._hook_add_native(
                UC_HOOK_CODE, self._lib.dmfrag_count_insn, ctypes.addressof(self._counter))

    def _remove_counter(self) -> None:
        if self._counter_hook is not None:
            uclib.uc_hook_del(self._uch, ctypes.c_size_t(self._counter_hook))
            self._counter_hook = None

    def _hook_add_native(self, kind: int, func, user_data: int, begin: int = 1,
                         end: int = 0) -> int:
        """Register a C callback with Unicorn (no Python on the hot path)."""
        handle = ctypes.c_size_t()
        status = uclib.uc_hook_add(self._uch, ctypes.byref(handle), kind,
                                   ctypes.c_void_p(fnptr(func)), ctypes.c_void_p(user_data),
                                   ctypes.c_uint64(begin), ctypes.c_uint64(end))
        if status:
            raise MachineError(f"uc_hook_add failed: {UcError(status)}")
        return handle.value

    # -- faults ---------------------------------------------------------

    def _hook_intr(self, uc: Uc, intno: int, _user) -> None:
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if self._calibrating:
            uc.emu_stop()
            return
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
            self._check_ram(pa, n)
            out += self.ram[pa: pa + n].tobytes()
            va, size = va + n, size - n
        return bytes(out)

    def _insn_size(self, rip: int) -> int:
        raw = self._insn_bytes(rip)
        insn = disasm_one(raw, rip) if raw else None
        if insn is None:
            raise MachineError(f"cannot skip the instruction at {rip:#x}: it cannot be decoded")
        return insn.size

    def _describe_fault(self, intno: int, rip: int) -> Fault:
        raw = self._insn_bytes(rip)
        insn = disasm_one(raw, rip) if raw else None
        text = f"{insn.mnemonic} {insn.op_str}".strip() if insn else "?"
        if intno != 14:
            return Fault(intno, rip, text)
        cr2 = self.uc.reg_read(X.UC_X86_REG_CR2)
        code = PfErr(self._cpu_error_code() & 0x1F)
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
        return (f"Machine(ram_bytes={self.ram_bytes:#x} ({self.ram_bytes / 2**30:g} GiB), "
                f"cpu={self.cpu!r}, cr3={self.cr3:#x})")
