"""The hook points where an allocator policy plugs into the guest kernel.

A policy decides how ``GFP_UNMAPPED``/``GFP_PTE_MAPPED`` requests (and any
other it wants) are served and freed, what happens under memory pressure,
what GFP each CPA user asks for, and what it does around a CPA call. Every
hook has a default that behaves as mainline Linux does, so ``baseline``
overrides nothing. A policy changes the kernel only through these hooks and
the declared fields below (and the kernel's public API inside them).

Policies are found only through the entry-point group ``dmfrag.policies``
(the in-tree ones are declared in this project's ``pyproject.toml``, as any
other distribution would declare its own); this module never imports a
policy by name. :func:`register_policy` also registers a class directly
(tests do, for planted-bug policies).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .api import KernelApi
    from .cpa import CpaData
    from .page_alloc import BuddyAllocator

__all__ = ["ENTRY_POINT_GROUP", "ComposedPolicy", "Policy", "PolicyError", "get_policy",
           "policy_names", "register_policy"]

#: The entry-point group policies are declared in.
ENTRY_POINT_GROUP = "dmfrag.policies"


class PolicyError(ValueError):
    """An unknown policy name, or a plugin that does not fit the interface."""


class Policy:
    """Base class: mainline behaviour at every hook."""

    name: ClassVar[str] = ""
    #: tunables with defaults; a subclass lists its own
    defaults: ClassVar[dict[str, object]] = {}
    #: declared field: BPF images share 2 MiB packs backed by one 2M page
    #: each (bpf_prog_pack with module_alloc_huge), even on a kernel whose
    #: record has no bpf_prog_pack
    prog_pack: ClassVar[bool] = False

    def __init__(self, **tunables):
        unknown = set(tunables) - set(self.defaults)
        if unknown:
            raise PolicyError(f"policy {self.name!r} has no tunable(s) {sorted(unknown)}; "
                              f"known: {sorted(self.defaults) or 'none'}")
        self.tunables = {**self.defaults, **tunables}

    def setup_buddy(self, buddy: BuddyAllocator) -> None:
        """Called when the buddy allocator is built, before any allocation:
        the place to register a migrate type."""

    def attach(self, kernel: KernelApi) -> None:
        """Called once the kernel has booted."""

    def user_gfp(self, user: str, gfp: int) -> int:
        """The GFP a CPA user asks of the page allocator: ``user`` is
        "execmem" (modules, BPF, ftrace/kprobe pages), "secretmem" (and
        guest_memfd) or "pgtable"; ``gfp`` is mainline's. A grouping policy
        adds GFP_UNMAPPED or GFP_PTE_MAPPED here; a user asked for
        GFP_UNMAPPED leaves the unmapping to the allocator."""
        return gfp

    def alloc_pages(self, kernel: KernelApi, gfp: int, order: int) -> int | None:
        """Serve a request the policy cares about and return its PFN, or None
        to let the buddy allocator serve it."""
        return None

    def free_pages(self, kernel: KernelApi, pfn: int, order: int) -> bool:
        """Take back pages it handed out; True when it did."""
        return False

    def shrink(self, kernel: KernelApi, nr_pages: int) -> int:
        """Memory pressure: give back up to ``nr_pages`` pages; returns how many."""
        return 0

    def cached_pfns(self, kernel: KernelApi) -> list[int]:
        """The pages the policy holds now that no user does (its caches'
        free pages, whatever their direct-map state): what ``compare``
        reports as cached, and what the oracle counts as the default
        mapping (another placement need not hold them)."""
        return []

    def cached_count(self, kernel: KernelApi) -> int:
        """``len(cached_pfns(kernel))``, cheaply (sampled after every kernel
        call); a policy with large caches overrides it."""
        return len(self.cached_pfns(kernel))

    def cpa_before(self, kernel: KernelApi, cpa: CpaData) -> None:
        """Before a CPA request runs."""

    def cpa_after(self, kernel: KernelApi, cpa: CpaData) -> None:
        """After a CPA request and its flush."""


_REGISTRY: dict[str, type[Policy]] = {}
_HOOKS = ("setup_buddy", "attach", "user_gfp", "alloc_pages", "free_pages", "shrink",
          "cached_pfns", "cached_count", "cpa_before", "cpa_after")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: check the plugin and register it under ``cls.name``."""
    if not isinstance(cls, type) or not issubclass(cls, Policy):
        raise PolicyError(f"{cls!r} is not a subclass of guestkernel.policy.Policy")
    if not cls.name or not isinstance(cls.name, str):
        raise PolicyError(f"policy class {cls.__qualname__} has no 'name'")
    for hook in _HOOKS:
        if not callable(getattr(cls, hook, None)):
            raise PolicyError(f"policy {cls.name!r}: hook {hook!r} is not callable")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise PolicyError(f"policy name {cls.name!r} is taken by {other.__module__}."
                          f"{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Load every policy declared in the entry-point group (once each)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin is named, not a traceback
            raise PolicyError(f"policy plugin {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not (isinstance(obj, type) and issubclass(obj, Policy)):
            raise PolicyError(f"policy plugin {ep.name!r} ({ep.value}) is not a subclass of "
                              "guestkernel.policy.Policy")
        if obj.name != ep.name:
            raise PolicyError(f"policy plugin {ep.name!r} ({ep.value}) names itself "
                              f"{obj.name!r}; the entry point and the class must agree")
        register_policy(obj)


def policy_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


class ComposedPolicy(Policy):
    """``a+b``: grouping and merging compose. Page hooks go to the parts in
    order (the first that serves or takes a page wins); shrinkers and CPA
    hooks run for every part."""

    def __init__(self, parts: list[Policy]):
        super().__init__()
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.prog_pack = any(p.prog_pack for p in parts)

    def setup_buddy(self, buddy) -> None:
        for p in self.parts:
            p.setup_buddy(buddy)

    def attach(self, kernel) -> None:
        for p in self.parts:
            p.attach(kernel)

    def user_gfp(self, user, gfp):
        for p in self.parts:
            gfp = p.user_gfp(user, gfp)
        return gfp

    def alloc_pages(self, kernel, gfp, order):
        for p in self.parts:
            pfn = p.alloc_pages(kernel, gfp, order)
            if pfn is not None:
                return pfn
        return None

    def free_pages(self, kernel, pfn, order):
        return any(p.free_pages(kernel, pfn, order) for p in self.parts)

    def shrink(self, kernel, nr_pages):
        return sum(p.shrink(kernel, nr_pages) for p in self.parts)

    def cached_pfns(self, kernel):
        return [pfn for p in self.parts for pfn in p.cached_pfns(kernel)]

    def cached_count(self, kernel):
        return sum(p.cached_count(kernel) for p in self.parts)

    def cpa_before(self, kernel, cpa):
        for p in self.parts:
            p.cpa_before(kernel, cpa)

    def cpa_after(self, kernel, cpa):
        for p in self.parts:
            p.cpa_after(kernel, cpa)


def get_policy(name: str | Policy, **tunables) -> Policy:
    if isinstance(name, Policy):
        return name
    if isinstance(name, str) and "+" in name:
        if tunables:
            raise PolicyError("tunables cannot be given to a composed policy; build the parts "
                              "and pass ComposedPolicy([...])")
        return ComposedPolicy([get_policy(part) for part in name.split("+")])
    _discover()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return cls(**tunables)
