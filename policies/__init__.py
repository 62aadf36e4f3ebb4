"""Allocator policies for the direct map, one module each (DESIGN.md section 6).

Importing this package registers the in-tree policies with
``guestkernel.policy``; out-of-tree ones come through the entry-point group
``dmfrag.policies``.
"""

from . import baseline, grouping, merge

__all__ = ["baseline", "grouping", "merge"]
