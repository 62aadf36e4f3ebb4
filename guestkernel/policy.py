"""The hook points where an allocator policy plugs into the guest kernel.

A policy decides how ``GFP_UNMAPPED``/``GFP_PTE_MAPPED`` requests (and any
other it wants) are served and freed, what happens under memory pressure,
and what it does around a CPA call. Every hook has a default that behaves as
mainline Linux does, so ``baseline`` overrides nothing. Policies live in the
``policies`` package or in any distribution that declares an entry point in
the group ``dmfrag.policies``; the kernel finds them by name here without
importing them by name.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .cpa import CpaData
    from .kernel import Kernel

__all__ = ["Policy", "PolicyError", "get_policy", "policy_names", "register_policy"]


class PolicyError(ValueError):
    """An unknown policy name, or a plugin that does not fit the interface."""


class Policy:
    """Base class: mainline behaviour at every hook."""

    name: ClassVar[str] = ""
    #: tunables with defaults; a subclass lists its own
    defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, **tunables):
        unknown = set(tunables) - set(self.defaults)
        if unknown:
            raise PolicyError(f"policy {self.name!r} has no tunable(s) {sorted(unknown)}; "
                              f"known: {sorted(self.defaults) or 'none'}")
        self.tunables = {**self.defaults, **tunables}

    def setup_buddy(self, buddy) -> None:
        """Called when the buddy allocator is built, before any allocation:
        the place to register a migrate type."""

    def attach(self, kernel: Kernel) -> None:
        """Called once the kernel has booted."""

    def alloc_pages(self, kernel: Kernel, gfp: int, order: int) -> int | None:
        """Serve a request the policy cares about and return its PFN, or None
        to let the buddy allocator serve it."""
        return None

    def free_pages(self, kernel: Kernel, pfn: int, order: int) -> bool:
        """Take back pages it handed out; True when it did."""
        return False

    def shrink(self, kernel: Kernel, nr_pages: int) -> int:
        """Memory pressure: give back up to ``nr_pages`` pages; returns how many."""
        return 0

    def cpa_before(self, kernel: Kernel, cpa: CpaData) -> None:
        """Before a CPA request runs."""

    def cpa_after(self, kernel: Kernel, cpa: CpaData) -> None:
        """After a CPA request and its flush."""


_REGISTRY: dict[str, type[Policy]] = {}
_HOOKS = ("setup_buddy", "attach", "alloc_pages", "free_pages", "shrink", "cpa_before", "cpa_after")


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
    import_module("policies")  # the in-tree plugins register themselves on import
    for ep in entry_points(group="dmfrag.policies"):
        if ep.name not in _REGISTRY:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Policy):
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

    def setup_buddy(self, buddy) -> None:
        for p in self.parts:
            p.setup_buddy(buddy)

    def attach(self, kernel) -> None:
        for p in self.parts:
            p.attach(kernel)

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
