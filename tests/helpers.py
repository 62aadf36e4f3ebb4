"""Checks shared by the kernel tests."""

from guestkernel import Kernel


def counters_match_tables(k: Kernel) -> None:
    """direct_pages_count equals a recount of the live tables, plus the
    boot-time re-count that 6.1 keeps forever."""
    recount = k.pgt.recount_direct_map(k.max_pfn)
    diff = [c - r - h for c, r, h in zip(k.pgt.direct_pages_count, recount, k.highmap_counted)]
    assert diff == k.boot_overcount, (k.pgt.direct_pages_count, recount)
