"""The C TLB model: per-access hooks and the model itself in ``_native.c``.

Attached to a machine (``m.tlb = TlbModel(...)``) it adds two native hooks
through the machine's public hook API: a memory hook (data accesses; the
virtual address is recovered by :mod:`emu.tlb.decode`, decoded once per RIP
through a callback into Python) and a block hook (one ITLB access per page
a block spans; it also refreshes CR3). They stay while the model is
attached, so every emulation counts, the machine's runs and a user's own
``uc.emu_start`` alike.
"""

from __future__ import annotations

import ctypes

import numpy as np
from unicorn import UC_HOOK_BLOCK, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE
from unicorn import x86_const as X

from .._native import fnptr, native, uclib
from ..asm import disasm_one
from .config import TlbConfig, layout, preset
from .counters import COUNTERS, stats
from .decode import describe, read_code
from .observer import MachineObserver

__all__ = ["TlbModel"]


class _CStruct(ctypes.Structure):
    _fields_ = [("sets", ctypes.c_uint32), ("ways", ctypes.c_uint32), ("shift", ctypes.c_uint32),
                ("repl", ctypes.c_uint32), ("sizes", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("rng", ctypes.c_uint64), ("tag", ctypes.c_void_p), ("stamp", ctypes.c_void_p),
                ("level", ctypes.c_void_p), ("glob", ctypes.c_void_p)]


class _CModel(ctypes.Structure):
    _fields_ = [("s", _CStruct * 16), ("l1d", ctypes.c_int32 * 3), ("l1i", ctypes.c_int32 * 3),
                ("stlb", ctypes.c_int32 * 3), ("psc", ctypes.c_int32 * 4),
                ("clock", ctypes.c_uint64), ("counters", ctypes.c_uint64 * len(COUNTERS)),
                ("ram64", ctypes.c_void_p), ("ram_qwords", ctypes.c_uint64),
                ("cr3", ctypes.c_uint64), ("ram_first", ctypes.c_uint64),
                ("levels", ctypes.c_uint64)]


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
                ("cr3_id", ctypes.c_int32), ("fixed_base_id", ctypes.c_int32),
                ("table", ctypes.c_void_p),
                ("table_mask", ctypes.c_uint64)]


class TlbModel(MachineObserver):
    """The C TLB model, attached to a :class:`emu.Machine` (``m.tlb = ...``).

    ``counters()`` (= ``stats()``) gives what a run reports in
    ``RunResult.tlb`` (perf names), ``raw_counters()`` the raw model
    counters (:data:`emu.tlb.COUNTERS`)."""

    def __init__(self, config: TlbConfig | str = "skylake"):
        cfg = preset(config) if isinstance(config, str) else config
        cfg.check()
        self.config = cfg
        self._lib = native()
        self._model = _CModel()
        structs, l1d, l1i, stlb, psc, self._first_psc = layout(cfg)
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
        MachineObserver.__init__(self)
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

    def attach(self, m) -> None:
        """Start observing machine ``m``'s CPU (``m.tlb = self`` calls this)."""
        self._claim(m)
        self._ctx.uc = m.uc_handle
        self._ctx.reg_read = fnptr(uclib.uc_reg_read)
        ctx = ctypes.addressof(self._ctx)
        self._hooks = [
            m.hook_add_native(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._lib.dmfrag_tlb_mem_hook, ctx),
            m.hook_add_native(UC_HOOK_BLOCK, self._lib.dmfrag_tlb_block_hook, ctx),
        ]

    def forget_code(self) -> None:
        """Drop the operand descriptions decoded per RIP: code was rewritten
        (the machine calls this before each run; call it after rewriting
        code yourself between your own ``emu_start`` calls)."""
        ctypes.memset(self._desc, 0, ctypes.sizeof(self._desc))
        self._decoded.clear()

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

    def set_operands(self, rip: int, read: tuple = (0, 0, 0, 0, 0),
                     write: tuple = (0, 0, 0, 0, 0)) -> None:
        """Describe the memory operands of the instruction at ``rip`` (as
        :func:`emu.tlb.describe` would: ``(kind, base, index, scale,
        disp)``, registers as Unicorn ids), for code whose shape the caller
        knows: it is not decoded then. Survives until :meth:`forget_code`.
        At most a few thousand RIPs are held (the table has 4096 slots)."""
        self._decoded[rip] = (tuple(read), tuple(write))
        self._lib.dmfrag_desc_set(ctypes.byref(self._ctx), ctypes.c_uint64(rip),
                                  read[0], read[1], read[2], read[3], ctypes.c_int64(read[4]),
                                  write[0], write[1], write[2], write[3],
                                  ctypes.c_int64(write[4]))

    def fixed_operand(self, reg_id: int) -> None:
        """Until called with 0: every data access the CPU makes is at the
        address in register ``reg_id`` (a Unicorn id), for straight-line
        code whose every load and store is through ``[reg]`` (an access
        replay, :mod:`dmfrag.accesses`). No RIP is read and nothing is
        decoded: reading RIP in the middle of a long translated block makes
        Unicorn restore the CPU state, which costs more than the model."""
        self._ctx.fixed_base_id = int(reg_id)

    # -- direct use (analytic tests) -----------------------------------------

    def prime(self, m) -> None:
        """Point the walker at ``m``'s RAM and current CR3 without running code."""
        self._model.ram64 = m.ram64.ctypes.data
        self._model.ram_qwords = len(m.ram64)
        self._model.ram_first = m.ram_base >> 3
        self._model.levels = getattr(m, 'paging_levels', 4)
        self._model.cr3 = m.cr3

    def access(self, va: int, kind: int = 0) -> None:
        """One access (0 load, 1 store, 2 fetch) at ``va``."""
        self._lib.dmfrag_tlb_access(ctypes.byref(self._model), ctypes.c_uint64(va), kind)

    def access_many(self, va, kind) -> None:
        """Accesses in order: ``va`` (uint64) and ``kind`` (uint8, 0 load,
        1 store, 2 fetch) arrays of one length, in one C call."""
        va = np.ascontiguousarray(va, dtype=np.uint64)
        kind = np.ascontiguousarray(kind, dtype=np.uint8)
        if va.shape != kind.shape or va.ndim != 1:
            raise ValueError(f"va and kind must be 1-D arrays of one length, not {va.shape} "
                             f"and {kind.shape}")
        if len(kind) and int(kind.max()) > 2:
            raise ValueError("kind must be 0 (load), 1 (store) or 2 (fetch)")
        self._lib.dmfrag_tlb_access_many(ctypes.byref(self._model),
                                         va.ctypes.data_as(ctypes.c_void_p),
                                         kind.ctypes.data_as(ctypes.c_void_p),
                                         ctypes.c_uint64(len(va)))

    # -- results -------------------------------------------------------------

    def raw_counters(self) -> dict[str, int]:
        """The model's raw event counts (:data:`emu.tlb.counters.COUNTERS`)."""
        return {name: int(self._model.counters[i]) for i, name in enumerate(COUNTERS)}

    def counters(self) -> dict[str, float]:
        """What a run reports, as ``RunResult.tlb`` has it: perf's event
        names, the raw counts as ``model.*``, walk memory references and the
        cycle estimate (the same dict as :meth:`stats`)."""
        return self.stats()

    def reset_counters(self) -> None:
        for i in range(len(COUNTERS)):
            self._model.counters[i] = 0

    def stats(self) -> dict[str, float]:
        return stats(self.raw_counters(), self.config)

    def entries(self, name: str) -> list[tuple[int, int]]:
        """(virtual page number, level) of the valid entries of one structure."""
        i = next(j for j, s in enumerate(self._structs) if s.name == name)
        tag = self._arrays[i][0]
        valid = tag[tag != 0]
        return sorted((int(t) >> 4, (int(t) >> 1) & 7) for t in valid)
