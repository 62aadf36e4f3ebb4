"""The buddy allocator's C loops (``_cbuddy.c``, a CPython extension built by
``pip install``): ``__rmqueue_smallest`` with ``expand``, ``rmqueue_bulk``'s
loop and ``__free_one_page``, working on the allocator's own Python state so
that it ends exactly as the Python code leaves it. That Python code is the
reference: it runs when the extension is not built, or with
``DMFRAG_PURE_PYTHON_ALLOC=1`` in the environment (read at import)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["cbuddy"]

cbuddy: ModuleType | None = None
if os.environ.get("DMFRAG_PURE_PYTHON_ALLOC", "") in ("", "0"):
    try:
        # (by its full name, as emu/_native.py finds emu._cnative)
        cbuddy = importlib.import_module("guestkernel.page_alloc._cbuddy")
    except ImportError:       # not built: the Python reference
        cbuddy = None
