"""The buddy page allocator: a model of Linux 6.1 ``mm/page_alloc.c`` (being split)."""

from __future__ import annotations

from .buddy import *  # noqa: F403
from .buddy import __all__  # noqa: F401
