"""Grouping policies: keep the pages that need PTE-level (or no) direct-map
entries together, so that few large pages are split.

``pte-mapped-cache`` (Mike Rapoport, RFC, Aug 2021): ``GFP_PTE_MAPPED``
requests are served from an order-0 cache of pages whose direct map is
already PTE-mapped. An empty cache is refilled by taking one 2M (order-9)
block from the buddy allocator and splitting its direct-map mapping once
(``set_memory_4k``); when no 2M block is free, a single page is taken and
split instead. The shrinker returns free cached pages to the buddy
allocator. Choice where the RFC is silent: the shrinker runs when an
allocation fails (the kernel's reclaim path), and returns whole cached
blocks first.

``migrate-unmapped`` (Rapoport, RFC, Jan 2022): a ``MIGRATE_UNMAPPED``
migrate type. ``GFP_UNMAPPED`` requests come from its free lists; when they
are empty a whole pageblock is stolen (an order-9 allocation of any type),
remapped at PTE level, and its pages moved to the UNMAPPED lists. Pages
leave the direct map when allocated and come back when freed; when a whole
pageblock is free again its PMD is restored (collapse) and the block
returns to the MOVABLE type. No shrinker: the free pages of a partly used
UNMAPPED pageblock serve only ``GFP_UNMAPPED`` requests (the RFC gives no
other type a fallback to it); ``compare`` reports them as cached. Module allocations and secretmem use
``GFP_UNMAPPED`` under this policy, as in the RFC's series.

``unmapped-alloc`` (Rapoport, "mm: introduce __GFP_UNMAPPED and
unmapped_alloc()", RFC, March 2023, presented at LSF/MM 2023; LWN's
account: https://lwn.net/Articles/926020/): a separate cache of 2M pages,
each removed from the direct map as a whole (one PMD rewritten: no 2M
split), itself a small buddy allocator that serves orders 0..9; a shrinker
maps free 2M pages back and returns them. Its users are the ones the design
names: module and BPF memory, ftrace/kprobe pages and read-only vmalloc
areas with reset perms (the "execmem" user), secretmem and guest_memfd.
Choices where the design is silent: a page of a chunk has no direct-map
alias for CPA to change (``Cpa._process_alias`` leaves a page of a 2M taken
out whole alone, as changing it would split the 2M), and vfree's reset
pass skips such pages (the cache owns their mapping); a page coming back
is unmapped again; with no free 2M block, the page allocator serves the
request and its pages leave the direct map one by one; when any
allocation fails, the kernel's reclaim path runs the shrinker.

``per-user-caches`` (Gorman/Hocko/Edgecombe review): slab-like order-0
caches per user kind (page tables, execmem, secretmem), each refilled in
batches from one global ``unmapped-alloc`` cache.

``prog-pack``: small executable images share 2M chunks backed by one 2M
page each (``bpf_prog_pack`` with ``module_alloc_huge``, the execmem ROX
cache): their direct-map alias changes as whole 2M pages.
"""

from __future__ import annotations

from guestkernel import gfp as G
from guestkernel.page_alloc import AllocationError, MigrateType
from guestkernel.policy import Policy, register_policy

_UNMAPPED = int(G.GFP_UNMAPPED)
_PTE_MAPPED = int(G.GFP_PTE_MAPPED)
_PLAIN = ~(_UNMAPPED | _PTE_MAPPED)


class _UnmappedUsers:
    """Mixin: module/BPF/ftrace memory (execmem) and secretmem ask for
    ``GFP_UNMAPPED`` pages, as in the 2022 RFC's series."""

    def user_gfp(self, user: str, gfp: int) -> int:
        if user in ("execmem", "secretmem"):
            return gfp | _UNMAPPED
        return gfp


def _fallback(k, held: dict[int, int], gfp: int, order: int) -> int:
    """No free 2M block for the grouped pool: serve the request from the
    normal free lists (its own fallback and stealing) and take its pages
    out of the direct map one by one, as an ungrouped kernel would (which
    splits the 2M pages they sit in). Remembered so that their free puts
    them back. Out of memory altogether, the AllocationError propagates."""
    pfn = k.buddy.alloc_pages(gfp & _PLAIN, order)
    try:
        k.cpa.remove_from_direct_map(pfn, 1 << order)
    except MemoryError:
        k.buddy.free_pages(pfn, order)
        raise
    held[pfn] = order
    return pfn


def _fallback_free(k, held: dict[int, int], pfn: int) -> bool:
    order = held.pop(pfn)
    k.cpa.restore_direct_map(pfn, 1 << order)
    k.buddy.free_pages(pfn, order)
    return True


@register_policy
class PteMappedCache(Policy):
    name = "pte-mapped-cache"
    defaults = {"max_cached": 4096}

    def attach(self, kernel) -> None:
        self.cache: list[int] = []
        self.handed: set[int] = set()

    def _refill(self, k, gfp: int) -> None:
        try:
            pfn = k.buddy.alloc_pages(gfp & _PLAIN, 9)
            n = 512
        except AllocationError:
            pfn = k.buddy.alloc_pages(gfp & _PLAIN, 0)
            n = 1
        k.cpa.split_to_4k(pfn, n)
        if n == 512:
            k.buddy.split_allocated(pfn, 9)   # split_page(): hand it out page by page
        self.cache.extend(range(pfn, pfn + n))

    def alloc_pages(self, kernel, gfp: int, order: int) -> int | None:
        if not gfp & _PTE_MAPPED or order:
            return None
        if not self.cache:
            self._refill(kernel, gfp)
        pfn = self.cache.pop()
        self.handed.add(pfn)
        return pfn

    def free_pages(self, kernel, pfn: int, order: int) -> bool:
        if pfn not in self.handed:
            return False
        self.handed.remove(pfn)
        if len(self.cache) >= self.tunables["max_cached"]:
            kernel.buddy.free_pages(pfn, 0)
        else:
            self.cache.append(pfn)
        return True

    def cached_pfns(self, kernel) -> list[int]:
        return list(self.cache)

    def cached_count(self, kernel) -> int:
        return len(self.cache)

    def shrink(self, kernel, nr_pages: int) -> int:
        freed = 0
        while self.cache and freed < nr_pages:
            kernel.buddy.free_pages(self.cache.pop(), 0)
            freed += 1
        return freed


@register_policy
class MigrateUnmapped(_UnmappedUsers, Policy):
    name = "migrate-unmapped"

    def setup_buddy(self, buddy) -> None:
        self.mt = buddy.register_migratetype("UNMAPPED")

    def attach(self, kernel) -> None:
        self.blocks: dict[int, int] = {}      # pageblock pfn -> pages allocated from it
        #: pages served by the normal fallback when no pageblock was free
        self.fallback: dict[int, int] = {}    # pfn -> order

    def _steal_pageblock(self, k, gfp: int) -> None:
        pfn = k.buddy.alloc_pages(gfp & _PLAIN, 9)
        k.cpa.split_to_4k(pfn, 512)                    # remap at PTE level
        k.buddy.set_pageblock_migratetype(pfn, self.mt)
        k.buddy.free_pages(pfn, 9)                      # its pages join the UNMAPPED lists
        self.blocks[pfn] = 0

    def alloc_pages(self, kernel, gfp: int, order: int) -> int | None:
        if not gfp & _UNMAPPED:
            return None
        k = kernel
        try:
            pfn = k.buddy.alloc_pages(gfp & _PLAIN, order, migratetype=self.mt)
        except AllocationError:
            try:
                self._steal_pageblock(k, gfp)
            except AllocationError:
                # No free pageblock: the RFC's UNMAPPED type steals through
                # the normal fallback, so the request is served as any other
                # and its pages taken out of the direct map one by one.
                return _fallback(k, self.fallback, gfp, order)
            pfn = k.buddy.alloc_pages(gfp & _PLAIN, order, migratetype=self.mt)
        k.cpa.remove_from_direct_map(pfn, 1 << order)
        self.blocks[pfn & ~511] = self.blocks.get(pfn & ~511, 0) + (1 << order)
        return pfn

    def cached_pfns(self, kernel) -> list[int]:
        """The free pages of the UNMAPPED lists: stolen pageblocks' pages
        that only GFP_UNMAPPED requests take."""
        b = kernel.buddy
        out: list[int] = []
        for z in b.zones:
            for o in range(len(z.free_area)):
                for head in b.free_list(z, o, self.mt):
                    out.extend(range(head, head + (1 << o)))
        return out

    def cached_count(self, kernel) -> int:
        return kernel.buddy.nr_free(mt=self.mt)

    def free_pages(self, kernel, pfn: int, order: int) -> bool:
        if pfn in self.fallback:
            return _fallback_free(kernel, self.fallback, pfn)
        block = pfn & ~511
        if block not in self.blocks or kernel.buddy.get_pageblock_migratetype(pfn) != self.mt:
            return False
        k = kernel
        k.cpa.restore_direct_map(pfn, 1 << order)
        k.buddy.free_pages(pfn, order)
        self.blocks[block] -= 1 << order
        if self.blocks[block] == 0 and k.buddy.nr_free(order=9, mt=self.mt) and k.buddy.is_free(block):
            # The whole pageblock is free: restore its PMD, give it back.
            del self.blocks[block]
            k.buddy.move_freepages_block(block, int(MigrateType.MOVABLE))
            k.buddy.set_pageblock_migratetype(block, int(MigrateType.MOVABLE))
            k.cpa.collapse_large_pages([block])
        return True


class _ChunkBuddy:
    """A buddy allocator over one 2M chunk (orders 0..9), free lists as sets."""

    def __init__(self, base: int):
        self.base = base
        self.free = {o: set() for o in range(10)}
        self.free[9].add(base)
        self.used: dict[int, int] = {}

    def alloc(self, order: int) -> int | None:
        o = next((o for o in range(order, 10) if self.free[o]), None)
        if o is None:
            return None
        pfn = min(self.free[o])
        self.free[o].remove(pfn)
        while o > order:
            o -= 1
            self.free[o].add(pfn + (1 << o))
        self.used[pfn] = order
        return pfn

    def release(self, pfn: int) -> None:
        order = self.used.pop(pfn)
        while order < 9:
            buddy = self.base + ((pfn - self.base) ^ (1 << order))
            if buddy not in self.free[order]:
                break
            self.free[order].remove(buddy)
            pfn = min(pfn, buddy)
            order += 1
        self.free[order].add(pfn)

    @property
    def empty(self) -> bool:
        return not self.used


@register_policy
class UnmappedAlloc(_UnmappedUsers, Policy):
    name = "unmapped-alloc"
    defaults = {"keep_free_chunks": 1}

    def attach(self, kernel) -> None:
        self.chunks: dict[int, _ChunkBuddy] = {}
        #: pages served from the normal lists when no 2M block was free
        self.fallback: dict[int, int] = {}

    def _new_chunk(self, k, gfp: int) -> _ChunkBuddy:
        pfn = k.buddy.alloc_pages(gfp & _PLAIN, 9)
        k.set_memory_np(k.pfn_to_virt(pfn), 512)    # one 2M entry, not split
        chunk = self.chunks[pfn] = _ChunkBuddy(pfn)
        return chunk

    def alloc_unmapped(self, k, gfp: int, order: int) -> int:
        for chunk in self.chunks.values():
            pfn = chunk.alloc(order)
            if pfn is not None:
                return pfn
        try:
            chunk = self._new_chunk(k, gfp)
        except AllocationError:
            # no free 2M block: the 2023 design falls back to the page
            # allocator (pages unmapped one by one, splitting their 2M pages)
            return _fallback(k, self.fallback, gfp, order)
        return chunk.alloc(order)

    def alloc_pages(self, kernel, gfp: int, order: int) -> int | None:
        if not gfp & _UNMAPPED or order > 9:
            return None
        return self.alloc_unmapped(kernel, gfp, order)

    @staticmethod
    def _unmap_again(kernel, pfn: int, order: int) -> None:
        """A page back in the unmapped cache is out of the direct map again:
        vfree's reset-perms pass (set_direct_map_default) mapped a module's
        pages back before freeing them, and the cache hands its pages to
        secretmem as unmapped (the 2023 design unmaps what comes back)."""
        kernel.cpa.set_memory_np_noalias(kernel.pfn_to_virt(pfn), 1 << order)

    def free_pages(self, kernel, pfn: int, order: int) -> bool:
        if pfn in self.fallback:
            return _fallback_free(kernel, self.fallback, pfn)
        chunk = self.chunks.get(pfn & ~511)
        if chunk is None or pfn not in chunk.used:
            return False
        self._unmap_again(kernel, pfn, chunk.used[pfn])
        chunk.release(pfn)
        empties = [c for c in self.chunks.values() if c.empty]
        if len(empties) > self.tunables["keep_free_chunks"]:
            self._return_chunk(kernel, empties[-1])
        return True

    def cached_pfns(self, kernel) -> list[int]:
        """The free pages of the cache's 2M chunks (out of the direct map)."""
        return [pfn for c in self.chunks.values() for o, heads in c.free.items()
                for h in heads for pfn in range(h, h + (1 << o))]

    def cached_count(self, kernel) -> int:
        return sum(len(heads) << o for c in self.chunks.values() for o, heads in c.free.items())

    def _return_chunk(self, k, chunk: _ChunkBuddy) -> None:
        k.set_memory_p(k.pfn_to_virt(chunk.base), 512)
        del self.chunks[chunk.base]
        k.buddy.free_pages(chunk.base, 9)

    def shrink(self, kernel, nr_pages: int) -> int:
        freed = 0
        for chunk in [c for c in self.chunks.values() if c.empty]:
            if freed >= nr_pages:
                break
            self._return_chunk(kernel, chunk)
            freed += 512
        return freed


@register_policy
class PerUserCaches(UnmappedAlloc):
    name = "per-user-caches"
    defaults = {"keep_free_chunks": 1, "batch": 16}

    def attach(self, kernel) -> None:
        super().attach(kernel)
        self.user_cache: dict[str, list[int]] = {"pagetable": [], "execmem": [], "secretmem": []}
        self.owner: dict[int, str] = {}

    @staticmethod
    def _user(gfp: int) -> str:
        if gfp & _PTE_MAPPED:
            return "pagetable"
        if gfp & G.GFP_ZERO:
            return "secretmem"
        return "execmem"

    def alloc_pages(self, kernel, gfp: int, order: int) -> int | None:
        if not gfp & (_UNMAPPED | _PTE_MAPPED) or order:
            return None
        user = self._user(gfp)
        cache = self.user_cache[user]
        if not cache:
            # a batch is best effort: what it got is used (a partial batch
            # left in the cache by a failure would be stranded there)
            for _ in range(self.tunables["batch"]):
                try:
                    cache.append(self.alloc_unmapped(kernel, gfp, 0))
                except AllocationError:
                    if not cache:
                        raise
                    break
        pfn = cache.pop()
        self.owner[pfn] = user
        if gfp & _PTE_MAPPED:
            kernel.set_direct_map_default_noflush(pfn)   # page tables stay mapped, 4K
        return pfn

    def free_pages(self, kernel, pfn: int, order: int) -> bool:
        user = self.owner.pop(pfn, None)
        if user is None:
            return False
        if user == "pagetable":
            kernel.cpa.remove_from_direct_map(pfn, 1)
        else:
            self._unmap_again(kernel, pfn, 0)
        self.user_cache[user].append(pfn)
        return True

    def cached_pfns(self, kernel) -> list[int]:
        """The per-user caches' pages and the global cache's free pages."""
        return [*super().cached_pfns(kernel),
                *(pfn for cache in self.user_cache.values() for pfn in cache)]

    def cached_count(self, kernel) -> int:
        return super().cached_count(kernel) + sum(len(c) for c in self.user_cache.values())

    def shrink(self, kernel, nr_pages: int) -> int:
        """The per-user caches give their free pages back to the global
        cache first (they are unmapped there already), so that whole 2M
        chunks become free and go back to the buddy allocator; before, a
        cached page kept its chunk in use and a full shrink returned
        nothing. Pages the fallback served go back to the buddy at once."""
        freed = 0
        for cache in self.user_cache.values():
            while cache:
                pfn = cache.pop()
                if pfn in self.fallback:
                    _fallback_free(kernel, self.fallback, pfn)
                    freed += 1
                else:
                    self.chunks[pfn & ~511].release(pfn)
        return freed + super().shrink(kernel, max(nr_pages - freed, 0))


@register_policy
class ProgPack(Policy):
    name = "prog-pack"
    prog_pack = True
