"""Who a page was allocated for, so that it is freed through the same path.

Linux relies on callers to free a page the way they took it (``vfree`` for
vmalloc pages, ``secretmem_free_folio`` for secret pages, ...); a page freed
through the wrong path goes back to the allocator still unmapped, or still
read-only, and the next user faults. The model records an owner per page
(one byte per PFN) and refuses such a free, naming the owner.
"""

from __future__ import annotations

import enum

__all__ = ["PageOwner"]


class PageOwner(enum.IntEnum):
    """The owner recorded for an allocated page (NONE: whoever called
    ``alloc_pages``, freed with ``free_pages``)."""

    NONE = 0
    VMALLOC = 1
    SECRETMEM = 2
    GUEST_MEMFD = 3
    PROTECTED_PGTABLE = 4
    PAGE_TABLE = 5

    @property
    def free_path(self) -> str:
        """How a page of this owner is freed."""
        return _FREE_PATH[self]


_FREE_PATH = {
    PageOwner.NONE: "free_pages",
    PageOwner.VMALLOC: "vfree of its area (modules: delete_module; BPF: bpf.free)",
    PageOwner.SECRETMEM: "secretmem.free",
    PageOwner.GUEST_MEMFD: "guest_memfd.free",
    PageOwner.PROTECTED_PGTABLE: "pgtable_protect.free",
    PageOwner.PAGE_TABLE: "the page-table code that linked it (never free_pages)",
}
