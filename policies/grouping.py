"""Grouping policies: keep the pages that need PTE-level (or no) direct-map
entries together, so that few large pages are split.

Each is modelled on what its cover letter says (quoted below; the messages
are on lore.kernel.org under their Message-Id), and every choice made
where it is silent is named.

``pte-mapped-cache``: Mike Rapoport, "[RFC PATCH 0/4] mm/page_alloc: cache
pte-mapped allocations", 23 Aug 2021, <20210823132513.15836-1-rppt@kernel.org>.
"The idea is to use a gfp flag that will instruct the page allocator to
use the cache of pte-mapped pages [...] When the cache is empty there is an
attempt to refill it using PMD-sized allocation so that once the direct map
is split we'll be able to use all 4K pages made available by the split. If
the high order allocation fails, we fall back to order-0 and mark the
entire pageblock as pte-mapped. When pages from that pageblock are freed to
the page allocator they are put into the pte-mapped cache. [...] For now
only order-0 allocations of pte-mapped pages are supported [...] The free
pages in the cache may be reclaimed using a shrinker, but for now they will
remain mapped with PTEs in the direct map." So: ``GFP_PTE_MAPPED`` order-0
requests come from the cache; a refill splits one 2M block's mapping once
(``set_memory_4k``) and splits the block (``split_page``); a failed refill
takes one page and marks its pageblock, whose later frees (of any page,
whole blocks split to order 0) join the cache. Choices where it is silent:
the shrinker runs when an allocation fails (the kernel's reclaim path);
``max_cached`` caps the cache (a free beyond it goes to the buddy).

``migrate-unmapped``: Rapoport, "[RFC PATCH 0/3] Prototype for direct map
awareness in page allocator", 27 Jan 2022,
<20220127085608.306306-1-rppt@kernel.org>. "The pages that need to be
removed from the direct map are grouped in the free lists in a dedicated
migrate type called MIGRATE_UNMAPPED. When there a page allocation request
with __GFP_UNMAPPED set and MIGRATE_UNMAPPED list is empty, a page of the
requested order is stolen from another migrate type, just like it would
happen for the existing fallback processing. The difference is that the
pageblock containing that page is remapped with PTEs in the direct map, and
all the free pages in that pageblock are moved to MIGRATE_UNMAPPED
unconditionally. The pages are actually unmapped only in the end of
post_alloc_hook() and they are mapped back in free_pages_prepare()". Its
users: "switch secretmem to use the new mechanism" and "enable
__GFP_UNMAPPED in x86::module_alloc()". So: UNMAPPED is a registered
migratetype whose fallback is the buddy allocator's own
(``__rmqueue_fallback``: the largest free block first, so a whole free
pageblock when there is one); the pageblock a stolen page sits in is split
to 4K, its free pages moved and its type set to UNMAPPED. A page another
user held there when it was stolen joins the UNMAPPED lists when freed.
Choices where it is silent: UNMAPPED steals from UNMOVABLE, RECLAIMABLE,
then MOVABLE; no shrinker (the free pages of a partly used UNMAPPED
pageblock serve only ``GFP_UNMAPPED`` requests: the RFC gives no other type
a fallback to it; ``compare`` reports them as cached); when a whole
pageblock is free again its PMD is restored (collapse) and it returns to
MOVABLE.

``unmapped-alloc``: Rapoport, "[RFC PATCH 0/5] Prototype for direct map
awareness in page allocator", 8 Mar 2023,
<20230308094106.227365-1-rppt@kernel.org> (patch 1/5 "mm: intorduce
__GFP_UNMAPPED and unmapped_alloc()"; presented at LSF/MM 2023, LWN:
https://lwn.net/Articles/926020/). "The pages that need to be removed from
the direct map are grouped in a dedicated cache. When there is a page
allocation request with __GFP_UNMAPPED set, it is redirected from
__alloc_pages() to that cache using a new unmapped_alloc() function. The
cache is implemented as a buddy allocator and it can handle high order
requests. The cache starts empty and whenever it does not have enough pages
to satisfy an allocation request the cache attempts to allocate PMD_SIZE
page to replenish the cache. If PMD_SIZE page cannot be allocated, the
cache is replenished with a page of the highest order available. That page
is removed from the direct map and added to the local buddy allocator.
There is also a shrinker that releases pages from the unmapped cache when
there us a memory pressure in the system. When shrinker releases a page it
is mapped back into the direct map." So: chunks of order 9 (one PMD made
not present: no split), or of the highest order the buddy allocator has
(down to the request's: its 2M page splits); each chunk a small buddy
allocator; the shrinker maps empty chunks back and frees them. Its users
are the ones the design names: module and BPF memory, ftrace/kprobe pages
and read-only vmalloc areas with reset perms (the "execmem" user),
secretmem and guest_memfd. Choices where it is silent: a page of a chunk
has no direct-map alias for CPA to change (``Cpa._process_alias`` leaves a
page of a 2M taken out whole alone, as changing it would split the 2M),
and vfree's reset pass skips such pages (the cache owns their mapping); a
page coming back is unmapped again; one empty chunk is kept
(``keep_free_chunks``); when any allocation fails, the kernel's reclaim
path runs the shrinker.

``per-user-caches``: the alternative the 2021 letter names (and the 2023
thread's reviewers, Gorman, Hocko and Edgecombe, returned to): "Another
option is to have per-user caches, e.g one for the page tables, another
for vmalloc etc. This approach provides better control of the
permissions of the pages allocated from these caches and allows the user
to decide when (if at all) the pages can be accessed [...] The down side of
this approach is that it complicates the freeing path." So: order-0 caches
per user kind (page tables, execmem, secretmem), each refilled in batches
(``batch``) from one global ``unmapped-alloc`` cache; a freed page goes
back to its user's cache (the dedicated free path). Choice where it is
silent: the shrinker gives the users' free pages back to the global
cache, whose empty chunks it returns.

``prog-pack``: Song Liu's ``bpf_prog_pack`` (<20220204185742.271030-1-song@kernel.org>,
which Aaron Lu's letter above credits: it "packs multiple bpf progs into a
single page instead of allocating and changing one page's protection for
each bpf prog. This approach made large mapping split happen much
fewer"), with ``module_alloc_huge`` and the execmem ROX cache: small
executable images share 2M chunks backed by one 2M page each, so their
direct-map alias changes as whole 2M pages.
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


@register_policy
class PteMappedCache(Policy):
    name = "pte-mapped-cache"
    defaults = {"max_cached": 4096}

    def attach(self, kernel) -> None:
        self.cache: list[int] = []
        self.handed: set[int] = set()
        #: pageblocks marked pte-mapped by an order-0 refill (their frees join the cache)
        self.pte_blocks: set[int] = set()

    def _refill(self, k, gfp: int) -> None:
        try:
            pfn = k.buddy.alloc_pages(gfp & _PLAIN, 9)
            n = 512
        except AllocationError:
            # "we fall back to order-0 and mark the entire pageblock as pte-mapped"
            pfn = k.buddy.alloc_pages(gfp & _PLAIN, 0)
            n = 1
        k.cpa.split_to_4k(pfn, n)
        if n == 512:
            k.buddy.split_allocated(pfn, 9)   # split_page(): hand it out page by page
        else:
            self.pte_blocks.add(pfn >> 9)
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
            # "When pages from that pageblock are freed to the page allocator
            # they are put into the pte-mapped cache" (a whole block: its pages)
            if (pfn >> 9 not in self.pte_blocks
                    or len(self.cache) + (1 << order) > self.tunables["max_cached"]):
                return False
            if order:
                kernel.buddy.split_allocated(pfn, order)   # (its 2M is split already)
            self.cache.extend(range(pfn, pfn + (1 << order)))
            return True
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
        self.mt = buddy.register_migratetype(
            "UNMAPPED", fallbacks=(int(MigrateType.UNMOVABLE), int(MigrateType.RECLAIMABLE),
                                   int(MigrateType.MOVABLE)))

    def attach(self, kernel) -> None:
        self.blocks: dict[int, int] = {}      # pageblock pfn -> pages handed out from it
        self.handed: dict[int, int] = {}      # pfn -> order, what GFP_UNMAPPED got

    def _claim_pageblock(self, k, block: int) -> None:
        """The RFC's steal: the pageblock is remapped with PTEs, all its free
        pages move to the UNMAPPED lists, and it is UNMAPPED from now on."""
        k.cpa.split_to_4k(block, 512)
        k.buddy.move_freepages_block(block, self.mt)
        k.buddy.set_pageblock_migratetype(block, self.mt)
        self.blocks[block] = 0

    def alloc_pages(self, kernel, gfp: int, order: int) -> int | None:
        if not gfp & _UNMAPPED:
            return None
        k = kernel
        # the UNMAPPED lists, else the fallback steals (AllocationError: none anywhere)
        pfn = k.buddy.alloc_pages(gfp & _PLAIN, order, migratetype=self.mt)
        block = pfn & ~511
        if block not in self.blocks:
            self._claim_pageblock(k, block)
        k.cpa.remove_from_direct_map(pfn, 1 << order)
        self.blocks[block] += 1 << order
        self.handed[pfn] = order
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
        block = pfn & ~511
        if block not in self.blocks:
            return False
        k = kernel
        if pfn in self.handed:
            del self.handed[pfn]
            k.cpa.restore_direct_map(pfn, 1 << order)
            self.blocks[block] -= 1 << order
        # (a page another user held when the block was stolen: it joins the
        # UNMAPPED lists, the pageblock's type, as any free does)
        k.buddy.free_pages(pfn, order)
        if self.blocks[block] == 0:
            self._give_back(k, block)
        return True

    def _give_back(self, k, block: int) -> None:
        """A pageblock none of whose pages is handed out any more, wholly
        free in the buddy allocator (in a free block of order 9 or more,
        which may span UNMAPPED pageblocks the steal claimed with it): each
        such pageblock returns to MOVABLE, and those remapped at 4K get
        their PMD back (collapse)."""
        found = k.buddy.block_of(block)
        if found is None or found[2] != "free" or found[1] < 9:
            return
        head, order, _ = found
        movable = int(MigrateType.MOVABLE)
        split = []
        for pb in range(head, head + (1 << order), 512):
            if k.buddy.get_pageblock_migratetype(pb) != self.mt or self.blocks.get(pb, 0):
                continue
            if self.blocks.pop(pb, None) is not None:
                split.append(pb)
            k.buddy.move_freepages_block(pb, movable)
            k.buddy.set_pageblock_migratetype(pb, movable)
        if split:
            k.cpa.collapse_large_pages(split)


class _ChunkBuddy:
    """A buddy allocator over one chunk of the unmapped cache: a 2M page
    (order 9), or a smaller block when no 2M page was free; free lists as
    sets."""

    def __init__(self, base: int, order: int = 9):
        self.base = base
        self.order = order
        self.free = {o: set() for o in range(order + 1)}
        self.free[order].add(base)
        self.used: dict[int, int] = {}

    def alloc(self, order: int) -> int | None:
        o = next((o for o in range(order, self.order + 1) if self.free[o]), None)
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
        while order < self.order:
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

    def _new_chunk(self, k, gfp: int, order: int) -> _ChunkBuddy:
        """"the cache attempts to allocate PMD_SIZE page to replenish the
        cache. If PMD_SIZE page cannot be allocated, the cache is replenished
        with a page of the highest order available" (down to the request's;
        none: AllocationError, the reclaim path's to handle)."""
        for o in range(9, order - 1, -1):
            try:
                pfn = k.buddy.alloc_pages(gfp & _PLAIN, o)
            except AllocationError:
                if o == order:
                    raise
                continue
            # "removed from the direct map": a 2M page is one PMD, no split
            k.set_memory_np(k.pfn_to_virt(pfn), 1 << o)
            chunk = self.chunks[pfn] = _ChunkBuddy(pfn, o)
            return chunk
        raise AssertionError("unreachable")

    def _chunk_of(self, pfn: int) -> _ChunkBuddy | None:
        for o in range(9, -1, -1):
            c = self.chunks.get(pfn & ~((1 << o) - 1))
            if c is not None and c.order == o:
                return c
        return None

    def alloc_unmapped(self, k, gfp: int, order: int) -> int:
        for chunk in self.chunks.values():
            pfn = chunk.alloc(order) if order <= chunk.order else None
            if pfn is not None:
                return pfn
        return self._new_chunk(k, gfp, order).alloc(order)

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
        chunk = self._chunk_of(pfn)
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
        """"When shrinker releases a page it is mapped back into the direct map"."""
        k.set_memory_p(k.pfn_to_virt(chunk.base), 1 << chunk.order)
        del self.chunks[chunk.base]
        k.buddy.free_pages(chunk.base, chunk.order)

    def shrink(self, kernel, nr_pages: int) -> int:
        freed = 0
        for chunk in [c for c in self.chunks.values() if c.empty]:
            if freed >= nr_pages:
                break
            self._return_chunk(kernel, chunk)
            freed += 1 << chunk.order
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
        nothing."""
        for cache in self.user_cache.values():
            while cache:
                pfn = cache.pop()
                self._chunk_of(pfn).release(pfn)
        return super().shrink(kernel, nr_pages)


@register_policy
class ProgPack(Policy):
    name = "prog-pack"
    prog_pack = True
