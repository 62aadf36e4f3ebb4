"""Builds emu's native helper; all metadata lives in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        # A plain C library loaded with ctypes (no Python API): hooks that run
        # per instruction or per access must not call into Python.
        Extension("emu._cnative", sources=["emu/_native.c"],
                  extra_compile_args=["-O2", "-std=c11"]),
        # A CPython extension: the buddy allocator's innermost loops on its
        # own Python state (guestkernel/page_alloc/_native.py; the Python
        # code stays the reference and runs when this is not built).
        Extension("guestkernel.page_alloc._cbuddy",
                  sources=["guestkernel/page_alloc/_cbuddy.c"],
                  extra_compile_args=["-O2", "-std=c11"]),
    ],
)
