"""Host memory behind guest physical memory.

Two sources: an anonymous ``MAP_NORESERVE`` mapping the machine owns (a guest
costs only the host pages it touches), or a writable buffer a user already
handed to their own Unicorn instance (:func:`emu.attach`). Either way the
machine sees it as a zero-copy ``uint8`` numpy array and a host address.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import weakref

import numpy as np

from .faults import AttachError

__all__ = ["HostMapping", "buffer_view"]

#: Linux MAP_NORESERVE (the mmap module lacks the constant before Python 3.13).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _munmap(addr: int, size: int) -> None:
    _libc().munmap(addr, size)


class HostMapping:
    """``size`` bytes of anonymous, lazily backed host memory.

    ``addr`` is its host address, ``array`` a ``uint8`` view of all of it.
    The memory is unmapped when this object is garbage collected, or by
    :meth:`release`; whoever hands ``addr`` to Unicorn keeps this object
    alive as long as the Unicorn instance."""

    def __init__(self, size: int):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        addr = _libc().mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise ValueError(
                f"cannot reserve {size:#x} bytes ({size / 2**30:.1f} GiB) of host address space "
                f"for guest RAM: {_errno.errorcode.get(err, err)} ({os.strerror(err)})")
        self.addr = addr
        self.size = size
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))
        self._finalizer = weakref.finalize(self, _munmap, addr, size)

    def release(self) -> None:
        """Unmap now (idempotent); views of it must not be used afterwards."""
        self._finalizer()


def buffer_view(buf: object) -> np.ndarray:
    """A writable, contiguous buffer as a zero-copy ``uint8`` array.

    Raises :class:`AttachError` for anything else: a read-only buffer (the
    CPU and the page-table builder write guest RAM), a non-contiguous one,
    one that is not a whole number of 4 KiB pages."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise AttachError(f"guest RAM must be a writable buffer (an mmap, a bytearray or a "
                          f"numpy array), not {type(buf).__name__}") from None
    if mv.readonly:
        raise AttachError(f"guest RAM buffer ({type(buf).__name__}) is read-only; the CPU "
                          f"and the page-table builder write guest RAM")
    if not mv.c_contiguous:
        raise AttachError("guest RAM buffer must be contiguous")
    arr = np.frombuffer(mv.cast("B"), np.uint8)
    if len(arr) == 0 or len(arr) % 4096:
        raise AttachError(f"guest RAM buffer size {len(arr):#x} is not a positive multiple "
                          f"of 4 KiB")
    return arr
