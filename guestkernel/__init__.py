"""guestkernel: the Linux memory-management model whose page tables the
emulated CPU walks (e820, memblock, buddy allocator, direct map, CPA)."""

from .e820 import E820Error, E820Table
from .layout import PAGE_OFFSET, VMALLOC_START, VMEMMAP_START

__all__ = [
    "PAGE_OFFSET",
    "VMALLOC_START",
    "VMEMMAP_START",
    "E820Error",
    "E820Table",
    "Kernel",
    "KernelError",
]


def __getattr__(name: str):
    # Kernel pulls in the buddy allocator and emu; import it on first use.
    if name in ("Kernel", "KernelError", "SystemState"):
        from . import kernel
        return getattr(kernel, name)
    raise AttributeError(name)
