"""Builds emu's native helper; all metadata lives in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        # A plain C library loaded with ctypes (no Python API): hooks that run
        # per instruction or per access must not call into Python.
        Extension("emu._cnative", sources=["emu/_native.c"],
                  extra_compile_args=["-O2", "-std=c11"]),
    ],
)
