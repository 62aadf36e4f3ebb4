"""The ``oracle`` yardstick (not a policy): lower bounds on the split 2M
regions of the direct map that *any* placement of the same request stream
must have had at its peak. The derivation is in docs/oracle.md; in short:

* A page's *class* is the direct-map entry it wants: *protected* (absent,
  or present read-only: a policy may unmap what its user asked to be
  read-only, so the two are one class), else its present attribute bits;
  the default class (present, RW, NX) is every free page's. A 2M region
  stays one leaf only when its 512 pages share a class (merging the
  read-only and the absent makes the bound only lower: still a bound).
* **Fixed pages** (never given to the buddy when the stream starts: the
  image, memblock, holes) stay where they are: a region whose fixed pages
  differ is split whatever comes (``B`` of them, with ``room`` allocator
  pages); a region whose fixed pages all want one non-default class ``c``
  is uniform when filled with ``c`` (``class_room[c]`` pages).
* **Everything else is placeable** in the relaxation: ``N_c`` pages of a
  non-default class fill whole regions in multiples of 512; at least
  ``max(0, N_c % 512 - class_room[c])`` sit in split regions, which the
  fixed regions' room takes first:
  ``bound = B + ceil(max(0, sum_c max(0, N_c % 512 - class_room[c]) - room) / 512)``.
* **What a policy holds is not the stream's**: pages in its caches
  (``Policy.cached_pfns``) count as default, so placement-only policies
  share one bound; a policy that changes what users ask for (prog-pack)
  has its own.
* **No merging**: a kernel that never merges keeps the regions split at
  the start split, so they all join ``B`` (the no-merge bound).

:class:`OracleTracker` evaluates both after each kernel call it is ticked
for (CPA requests mark the state changed) and keeps their peaks.
"""

from __future__ import annotations

import numpy as np

from guestkernel.shadow import S_MAPPED, S_NX, S_P, S_RW

__all__ = ["OracleTracker", "fixed_regions", "lower_bound", "stream_classes"]

_DEFAULT = S_MAPPED | S_P | S_RW | S_NX
_PRESENT = S_MAPPED | S_P
_DEFAULT8 = np.uint64(_DEFAULT * 0x0101010101010101)
_EIGHT = np.arange(8, dtype=np.int64)[None, :]


def _classes(values: np.ndarray) -> np.ndarray:
    """Shadow bytes -> class: 0 for a page the direct map must not let be
    written (absent, or present read-only: a policy may unmap what its
    user asked to be read-only, as the grouping proposals do with module
    memory, so the two are one class and the bound is the same for
    them), else the byte (present, writable pages)."""
    return np.where((values & (_PRESENT | S_RW)) == (_PRESENT | S_RW), values, 0).astype(np.uint8)


def fixed_regions(shadow_direct: np.ndarray, reserved: np.ndarray,
                  split: np.ndarray | None = None) -> tuple[int, int, np.ndarray]:
    """``(B, room, class_room)``: the 2M regions whose pages outside the
    allocator (``reserved``: never given to the buddy, holes included)
    already want different entries; the allocator's pages in them (any
    class's remainder can go there without a further split); and per class
    ``c``, the allocator's pages in regions whose fixed pages all want
    ``c`` (non-default): filled with class ``c`` they are uniform.

    ``split`` (region numbers split when the stream starts): for a kernel
    that never merges, those stay split whatever comes, so they are all
    counted in ``B`` (and their pages in ``room``)."""
    n = len(reserved)
    regions = -(-n // 512)
    cls = np.zeros(regions * 512, dtype=np.int16)
    fixed = np.ones(regions * 512, dtype=bool)       # beyond max_pfn: absent, fixed
    cls[:n] = _classes(shadow_direct[:n])
    fixed[:n] = reserved
    cls = cls.reshape(regions, 512)
    fixed = fixed.reshape(regions, 512)
    lo = np.where(fixed, cls, 256).min(axis=1)
    hi = np.where(fixed, cls, -1).max(axis=1)
    mixed = (hi >= 0) & (lo != hi)
    if split is not None:
        mixed[np.asarray(split, dtype=np.int64)] = True
    free = 512 - fixed.sum(axis=1)
    single = (hi >= 0) & (lo == hi) & (hi != _DEFAULT) & (free > 0)
    class_room = np.bincount(hi[single], weights=free[single], minlength=256).astype(np.int64)
    return int(np.count_nonzero(mixed)), int(free[mixed].sum()), class_room


def stream_classes(shadow_direct: np.ndarray, cached: np.ndarray | list[int],
                   spans: list[tuple[int, int]] | None = None,
                   fixed: np.ndarray | None = None) -> np.ndarray:
    """Pages per non-default class now (index: the class byte), of the
    pages the allocator places: the policy's cached pages count as
    default, the ``fixed`` pfns (reserved when the stream began) not at
    all. ``spans`` (pfn ranges) limits the count to them (the holes are
    fixed: :class:`OracleTracker` skips them)."""
    d = shadow_direct
    parts = []
    for lo, hi in spans or [(0, len(d))]:
        # eight pages a word: most of the direct map is default, and the
        # words that are not are few (the image, what the stream changed)
        n8 = lo + ((hi - lo) & ~7)
        words = np.ascontiguousarray(d[lo:n8]).view(np.uint64)
        odd = np.flatnonzero(words != _DEFAULT8)
        parts.append(d[lo:n8].reshape(-1, 8)[odd].ravel())
        parts.append(d[n8:hi])
    vals = np.concatenate(parts)
    counts = np.bincount(_classes(vals[vals != _DEFAULT]), minlength=256)
    for drop in (fixed, cached):
        if drop is not None and len(drop):
            c = d[np.asarray(drop, dtype=np.int64)]
            c = c[c != _DEFAULT]
            if len(c):
                counts -= np.bincount(_classes(c), minlength=256)
    counts[_DEFAULT] = 0
    return counts


def _hole_spans(d: np.ndarray, reserved: np.ndarray) -> list[tuple[int, int]]:
    """The pfn ranges outside the holes: runs of 2M regions that are
    reserved and unmapped whole (e820 holes, which no request changes)."""
    n = len(d)
    full = n // 512
    hole = np.zeros(full, dtype=bool)
    if full:
        hole = ((d[: full * 512] & S_MAPPED) == 0).reshape(full, 512).all(axis=1) & \
            reserved[: full * 512].reshape(full, 512).all(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([1], hole.astype(np.int8), [1]))))
    spans = [(a * 512, b * 512) for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(),
                                                 strict=True)]
    if full * 512 < n:
        if spans and spans[-1][1] == full * 512:
            spans[-1] = (spans[-1][0], n)
        else:
            spans.append((full * 512, n))
    return spans


def lower_bound(fixed: int, room: int, class_room: np.ndarray, counts: np.ndarray) -> int:
    """``B + ceil(max(0, sum_c max(0, N_c % 512 - class_room_c) - room) / 512)``."""
    rest = int(np.maximum(counts % 512 - class_room, 0).sum()) - room
    return fixed + (-(-rest // 512) if rest > 0 else 0)


class OracleTracker:
    """The bound over a run of ``kernel``, from the moment it is created.
    An observer (it changes nothing): CPA requests mark the state changed;
    :meth:`tick` (the driver calls it after each kernel call) evaluates the
    bound when the state or the policy's cache changed; :meth:`detach`
    stops it."""

    def __init__(self, kernel):
        self.k = kernel
        d = kernel.shadow.direct[: kernel.max_pfn]
        reserved = kernel.buddy.page_states() == 0
        #: the fixed regions (B) when the stream started, and the room
        #: for remainders without a further split
        self.fixed, self.room, self.class_room = fixed_regions(d, reserved)
        #: the same with every region split at the start kept split: the
        #: bound for a run that merges nothing
        self.fixed_nm, self.room_nm, self.class_room_nm = fixed_regions(
            d, reserved, kernel.pgt.split_2m_region_list(kernel.max_pfn))
        self.peak_nm = 0
        self._spans = _hole_spans(d, reserved)
        inside = np.zeros(len(reserved), dtype=bool)
        for lo, hi in self._spans:
            inside[lo:hi] = True
        self._fixed_pfns = np.flatnonzero(reserved & inside)
        # what now() scans: the pages the allocator places (the reserved
        # ones, holes included, are fixed and never counted), eight a word,
        # only the words holding one at least (the image's are skipped)
        self._counted = ~reserved
        n8 = len(reserved) & ~7
        self._n8 = n8
        self._words = np.flatnonzero(~reserved[:n8].reshape(-1, 8).all(axis=1))
        self._tail = n8 + np.flatnonzero(self._counted[n8:])
        #: counts() keeps the class counts without the cache (None: not yet
        #: scanned) and the shadow bytes they were counted from
        self._base: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self.peak = 0
        self.evaluations = 0
        self._dirty = True
        self._cached_key: object = None
        kernel.cpa.add_observer(after=self._after)
        self.tick()

    def _after(self, _cpa) -> None:
        self._dirty = True

    def detach(self) -> None:
        self.k.cpa.remove_observer(self._after)

    def now(self) -> tuple[int, int]:
        """The bounds on the split 2M regions at this moment: (any run, a
        run that merged nothing since the start)."""
        counts = self.counts()
        return (lower_bound(self.fixed, self.room, self.class_room, counts),
                lower_bound(self.fixed_nm, self.room_nm, self.class_room_nm, counts))

    def counts(self) -> np.ndarray:
        """:func:`stream_classes` of the kernel now, with the holes and the
        fixed pages left out: the same numbers, kept up to date from the
        pages whose shadow byte changed since the last call (one compare
        over the direct map's bytes, then only the changed pages)."""
        k = self.k
        d = k.shadow.direct[: k.max_pfn]
        if self._base is None:
            words = np.ascontiguousarray(d[: self._n8]).view(np.uint64)[self._words]
            odd = self._words[words != _DEFAULT8]
            pfns = np.concatenate(((odd[:, None] * 8 + _EIGHT).ravel(), self._tail))
            pfns = pfns[self._counted[pfns]]
            vals = d[pfns]
            self._base = np.bincount(_classes(vals[vals != _DEFAULT]), minlength=256)
            self._last = d.copy()
        else:
            changed = np.flatnonzero(d != self._last)
            if len(changed):
                new = d[changed]
                keep = self._counted[changed]
                old = self._last[changed][keep]
                self._last[changed] = new
                new = new[keep]
                self._base -= np.bincount(_classes(old[old != _DEFAULT]), minlength=256)
                self._base += np.bincount(_classes(new[new != _DEFAULT]), minlength=256)
        counts = self._base.copy()
        cached = k.policy_cached_pfns()
        if len(cached):
            cached = np.asarray(cached, dtype=np.int64)
            c = d[cached[self._counted[cached]]]
            c = c[c != _DEFAULT]
            if len(c):
                counts -= np.bincount(_classes(c), minlength=256)
        counts[_DEFAULT] = 0
        return counts

    def tick(self) -> None:
        key = self.k.policy_cached_count()
        if not self._dirty and key == self._cached_key:
            return
        self._dirty = False
        self._cached_key = key
        self.evaluations += 1
        any_run, no_merge = self.now()
        self.peak = max(self.peak, any_run)
        self.peak_nm = max(self.peak_nm, no_merge)

    def bound(self) -> dict[str, int]:
        """``peak_split_2m_regions``: the bound's peak so far (valid for
        every run); ``no_merge_peak_split_2m_regions``: the bound for a run
        that merged nothing (no collapse); ``fixed_split_2m_regions``: B."""
        self.tick()
        return {"peak_split_2m_regions": self.peak, "fixed_split_2m_regions": self.fixed,
                "no_merge_peak_split_2m_regions": self.peak_nm}
