"""The firmware memory map (arch/x86/kernel/e820.c model).

An :class:`E820Table` is built from a pasted boot log (the kernel's own
``BIOS-e820: [mem 0x...-0x...] type`` lines, then its ``e820: update`` and
``e820: remove`` adjustments, in log order; every other line is ignored) or
from a RAM size, as QEMU lays out a PC (what the reference kernel of
``../shared/data/linux-6.1-under-qemu.md`` was booted on).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["E820Entry", "E820Error", "E820Table", "E820Type", "parse_size"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class E820Error(ValueError):
    """A memory map or size that cannot be used; says what is wrong."""


class E820Type(enum.Enum):
    """Types as the kernel prints them (``e820_type_to_string``)."""

    RAM = "usable"
    RESERVED = "reserved"
    ACPI = "ACPI data"
    NVS = "ACPI NVS"
    UNUSABLE = "unusable"
    PMEM = "persistent (type 7)"
    PRAM = "persistent (type 12)"
    SOFT_RESERVED = "soft reserved"
    RESERVED_KERN = "reserved (kern)"

    @classmethod
    def parse(cls, text: str) -> E820Type:
        text = text.strip()
        for t in cls:
            if t.value == text:
                return t
        if text.startswith("type "):
            return cls.RESERVED  # unknown firmware types are reserved to the kernel
        raise E820Error(f"unknown e820 type {text!r}")


@dataclass(frozen=True, order=True)
class E820Entry:
    start: int   # first byte
    end: int     # one past the last byte
    type: E820Type

    @property
    def size(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[mem {self.start:#018x}-{self.end - 1:#018x}] {self.type.value}"


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """'8G', '512M', '1T', '4096' or an int -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (m := _SIZE.match(size)):
        unit = (m.group(2) or "B")[0].upper()
        value = int(m.group(1)) * {"B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}[unit]
    else:
        raise E820Error(f"cannot read a memory size from {size!r} (expected e.g. '8G', '512M')")
    if value <= 0:
        raise E820Error(f"memory size must be positive, not {size!r}")
    return value


_MEM = r"\[mem (0x[0-9a-fA-F]+)-(0x[0-9a-fA-F]+)\]"
_BIOS = re.compile(r"(?:BIOS-e820|BIOS-provided physical RAM map.*)?\bBIOS-e820:\s*" + _MEM + r"\s+(.+?)\s*$")
_UPDATE = re.compile(r"\be820: update " + _MEM + r"\s+(.+?)\s+==>\s+(.+?)\s*$")
_REMOVE = re.compile(r"\be820: remove " + _MEM + r"\s+(.+?)\s*$")
_TIMESTAMP = re.compile(r"^\s*(<\d+>)?\s*\[\s*\d+\.\d+\]\s*")


class E820Table:
    """Sorted, non-overlapping ranges with a type each (holes are absent)."""

    def __init__(self, entries: list[E820Entry] | None = None):
        self._entries: list[E820Entry] = []
        for e in entries or []:
            self._set(e.start, e.end, e.type)

    # -- construction ---------------------------------------------------

    @classmethod
    def from_dmesg(cls, text: str) -> E820Table:
        """The map the kernel ended up with, from its boot log."""
        table = cls()
        seen_bios = False
        for no, raw in enumerate(text.splitlines(), start=1):
            line = _TIMESTAMP.sub("", raw)
            try:
                if m := _BIOS.search(line):
                    start, last = int(m.group(1), 16), int(m.group(2), 16)
                    table._add_checked(start, last, E820Type.parse(m.group(3)))
                    seen_bios = True
                elif m := _UPDATE.search(line):
                    start, last = int(m.group(1), 16), int(m.group(2), 16)
                    table.update(start, last + 1, E820Type.parse(m.group(3)),
                                 E820Type.parse(m.group(4)))
                elif m := _REMOVE.search(line):
                    start, last = int(m.group(1), 16), int(m.group(2), 16)
                    table.remove(start, last + 1, E820Type.parse(m.group(3)))
            except E820Error as exc:
                raise E820Error(f"boot log line {no}: {exc}: {raw.strip()!r}") from None
        if not seen_bios:
            raise E820Error("no 'BIOS-e820: [mem ...] type' lines in the boot log")
        if not table.ram_ranges():
            raise E820Error("the boot log's e820 map has no usable RAM")
        return table

    @classmethod
    def qemu_pc(cls, ram: str | int) -> E820Table:
        """QEMU's i440fx PC layout for ``-m RAM`` (as seen by Linux 6.1):
        usable [0, 0x9fc00), reserved 0x9fc00-0x9ffff and 0xf0000-0xfffff,
        RAM from 1 MiB to the lower-memory top (RAM up to 3 GiB; 128 KiB
        below it reserved), the rest above 4 GiB."""
        size = parse_size(ram)
        if size % MiB or size < 16 * MiB:
            raise E820Error(f"RAM must be a whole number of MiB, at least 16 MiB, not {ram!r}")
        low = min(size, 3 * GiB)
        t = cls()
        t._set(0, 0x9FC00, E820Type.RAM)
        t._set(0x9FC00, 0xA0000, E820Type.RESERVED)
        t._set(0xF0000, 0x100000, E820Type.RESERVED)
        t._set(0x100000, low - 128 * KiB, E820Type.RAM)
        t._set(low - 128 * KiB, low, E820Type.RESERVED)
        t._set(0xFFFC0000, 1 << 32, E820Type.RESERVED)
        if size > low:
            t._set(4 * GiB, 4 * GiB + size - low, E820Type.RAM)
        # The kernel's own edit at boot (e820__memory_setup -> trim_bios_range
        # keeps the first page reserved): "e820: update [mem 0x00000000-0x00000fff]
        # usable ==> reserved".
        t.update(0, 0x1000, E820Type.RAM, E820Type.RESERVED)
        return t

    def _add_checked(self, start: int, last: int, type_: E820Type) -> None:
        if last < start:
            raise E820Error(f"range end {last:#x} before its start {start:#x}")
        self._set(start, last + 1, type_)

    # -- the kernel's edits (e820__range_update / e820__range_remove) ------

    def _set(self, start: int, end: int, type_: E820Type | None) -> None:
        """Make [start, end) of ``type_`` (None: a hole), merging neighbours."""
        if end <= start:
            return
        out: list[E820Entry] = []
        for e in self._entries:
            if e.end <= start or e.start >= end:
                out.append(e)
                continue
            if e.start < start:
                out.append(E820Entry(e.start, start, e.type))
            if e.end > end:
                out.append(E820Entry(end, e.end, e.type))
        if type_ is not None:
            out.append(E820Entry(start, end, type_))
        out.sort()
        merged: list[E820Entry] = []
        for e in out:
            if merged and merged[-1].end == e.start and merged[-1].type is e.type:
                merged[-1] = E820Entry(merged[-1].start, e.end, e.type)
            else:
                merged.append(e)
        self._entries = merged

    def update(self, start: int, end: int, old: E820Type, new: E820Type) -> None:
        """Retype the parts of [start, end) that are ``old`` to ``new``."""
        for e in list(self._entries):
            lo, hi = max(e.start, start), min(e.end, end)
            if lo < hi and e.type is old:
                self._set(lo, hi, new)

    def remove(self, start: int, end: int, old: E820Type | None = None) -> None:
        """Drop the parts of [start, end) that are ``old`` (any type if None)."""
        for e in list(self._entries):
            lo, hi = max(e.start, start), min(e.end, end)
            if lo < hi and (old is None or e.type is old):
                self._set(lo, hi, None)

    # -- queries --------------------------------------------------------

    @property
    def entries(self) -> tuple[E820Entry, ...]:
        return tuple(self._entries)

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Usable RAM, page-trimmed as memblock sees it ([start, end), 4K-aligned)."""
        out = []
        for e in self._entries:
            if e.type is E820Type.RAM:
                lo = (e.start + 4095) & ~4095
                hi = e.end & ~4095
                if lo < hi:
                    if out and out[-1][1] == lo:
                        out[-1] = (out[-1][0], hi)
                    else:
                        out.append((lo, hi))
        return out

    @property
    def max_pfn(self) -> int:
        """One past the last RAM page frame (``e820__end_of_ram_pfn``)."""
        return self.ram_ranges()[-1][1] >> 12

    def total_ram(self) -> int:
        return sum(hi - lo for lo, hi in self.ram_ranges())

    def is_region_memory(self, start: int, end: int) -> bool:
        """All of [start, end) is RAM (``memblock_is_region_memory``)."""
        for lo, hi in self.ram_ranges():
            if lo <= start and end <= hi:
                return True
        return False

    def __str__(self) -> str:
        return "\n".join(f"e820: {e}" for e in self._entries)

    def __repr__(self) -> str:
        return f"E820Table({len(self._entries)} entries, {self.total_ram() / GiB:.2f} GiB RAM)"
