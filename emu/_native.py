"""Loader for the compiled helpers in ``_native.c`` (built by ``pip install``).

The shared object is a plain C library loaded with ctypes; Unicorn entry
points are passed to it as function pointers taken from the same
``libunicorn`` the Python binding uses.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache

from unicorn.unicorn_py3.unicorn import uclib

__all__ = ["UC_HOOK_CB", "InsnCounter", "fnptr", "native", "uc_handle", "uclib"]


class InsnCounter(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint64),
        ("limit", ctypes.c_uint64),
        ("last_rip", ctypes.c_uint64),
        ("hit_limit", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("stop", ctypes.c_void_p),
    ]


UC_HOOK_CB = ctypes.c_void_p


@cache
def native() -> ctypes.CDLL:
    spec = importlib.util.find_spec("emu._cnative")
    if spec is None or spec.origin is None:
        raise ImportError(
            "emu's compiled helper (emu/_native.c) is not built: install the "
            "project with `pip install -e .` (or run `make test`), which compiles it")
    lib = ctypes.CDLL(spec.origin)
    lib.dmfrag_translate_many.restype = ctypes.c_size_t
    lib.dmfrag_translate_many.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def fnptr(func) -> int:
    """Address of a C function exported by a ctypes library."""
    return ctypes.cast(func, ctypes.c_void_p).value


def uc_handle(uc) -> int:
    """The ``uc_engine *`` behind a ``unicorn.Uc``, for calling ``libunicorn``
    directly (``uc_vmem_translate``, native hooks). The binding keeps it in
    ``Uc._uch`` and offers no public accessor: this is the one place that
    reads it."""
    return uc._uch.value
