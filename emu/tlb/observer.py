"""What both TLB models share as observers of one machine: claiming it
(one machine at a time), and letting go of it with their hooks."""

from __future__ import annotations

__all__ = ["MachineObserver"]


class MachineObserver:
    """Base of :class:`emu.tlb.TlbModel` and :class:`emu.tlb.PyTlb`: the
    machine it observes and the hooks it installed there."""

    def __init__(self) -> None:
        self._machine = None
        self._hooks: list[int] = []

    def forget_code(self) -> None:      # pragma: no cover - each model has its own
        raise NotImplementedError

    def prime(self, m) -> None:         # pragma: no cover - each model has its own
        raise NotImplementedError

    def _claim(self, m) -> None:
        """Start observing ``m``: refused while another machine is observed;
        a new machine's code is decoded afresh."""
        if self._machine is not None and self._machine is not m:
            raise ValueError("this TLB model is attached to another machine; detach it "
                             "there first (machine.tlb = None)")
        if self._machine is not m:
            self.forget_code()
        self._machine = m
        self.prime(m)

    def detach(self, m) -> None:
        """Stop observing ``m`` (its hooks go; entries and counters stay)."""
        for h in self._hooks:
            m.hook_del(h)
        self._hooks = []
        self._machine = None
