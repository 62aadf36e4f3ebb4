"""The firmware memory map (arch/x86/kernel/e820.c model).

An :class:`E820Table` is built from a pasted boot log (the kernel's own
``BIOS-e820: [mem 0x...-0x...] type`` lines, then its ``e820: update`` and
``e820: remove`` adjustments, in log order; every other line is ignored) or
from a RAM size, as QEMU lays out a PC (what the reference kernel of
``../shared/data/linux-6.1-under-qemu.md`` was booted on).

Both print formats are read: the classic one (``usable``, ``reserved``,
``ACPI data``...) and the one of newer kernels (7.x), which names RAM
``System RAM``, prints other ranges under names such as ``device reserved``
and adds ``BIOS-e820: [gap ...]`` lines; in a log of that format RAM is
``System RAM`` and every other name is reserved, and gap lines are ignored.

A log holds one boot: a second ``Linux version`` line, or a ``BIOS-e820``
table that starts over, is refused (:class:`E820Error` says where), because
the two maps would otherwise be merged into one that no machine had.
"""

from __future__ import annotations

import enum
import itertools
import re
from dataclasses import dataclass

__all__ = ["E820Entry", "E820Error", "E820Table", "E820Type", "parse_size", "sanitize"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class E820Error(ValueError):
    """A memory map or size that cannot be used; says what is wrong."""


class E820Type(enum.Enum):
    """Types as the kernel prints them (``e820_print_type``)."""

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

    @property
    def number(self) -> int:
        """The firmware's type number (``enum e820_type``,
        arch/x86/include/asm/e820/types.h): what decides overlaps."""
        return _TYPE_NUMBERS[self]


_TYPE_NUMBERS = {E820Type.RAM: 1, E820Type.RESERVED: 2, E820Type.ACPI: 3, E820Type.NVS: 4,
                 E820Type.UNUSABLE: 5, E820Type.PMEM: 7, E820Type.PRAM: 12,
                 E820Type.SOFT_RESERVED: 0xEFFFFFFF, E820Type.RESERVED_KERN: 128}
#: the names newer kernels (7.x) print for RAM in their BIOS-e820 table
_NEW_RAM_NAMES = ("System RAM",)


def _parse_bios_type(text: str, new_format: bool) -> tuple[E820Type, int]:
    """A BIOS-e820 line's type and its firmware number. ``type N`` keeps its
    number N for overlaps and is reserved to the kernel; in the 7.x format
    ``System RAM`` is RAM and any other name is reserved."""
    text = text.strip()
    if m := re.fullmatch(r"type (\d+)", text):
        return E820Type.RESERVED, int(m.group(1))
    if new_format and text in _NEW_RAM_NAMES:
        return E820Type.RAM, 1
    try:
        t = E820Type.parse(text)
    except E820Error:
        if not new_format:
            raise
        t = E820Type.RESERVED
    return t, t.number


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
_BIOS = re.compile(r"(?:BIOS-e820|BIOS-provided physical RAM map.*)?\bBIOS-e820:\s*" + _MEM
                   + r"\s+(?:\d+(?:\.\d+)?\s*[KMGTP]i?B\s+)?(.+?)\s*$")  # 7.x: optional size
_UPDATE = re.compile(r"\be820: update " + _MEM + r"\s+(.+?)\s+==>\s+(.+?)\s*$")
_REMOVE = re.compile(r"\be820: remove " + _MEM + r"\s+(.+?)\s*$")
_TIMESTAMP = re.compile(r"^\s*(<\d+>)?\s*\[\s*\d+\.\d+\]\s*")
_LINUX_VERSION = re.compile(r"\bLinux version \d")


def sanitize(entries: list[tuple[int, int, E820Type, int]]) -> list[E820Entry]:
    """Overlapping firmware ranges made disjoint the way Linux does it
    (``sanitize_e820_table``, now ``e820__update_table``, in
    arch/x86/kernel/e820.c): at every address the entry with the larger type
    number wins, "larger value takes precedence -- 1=usable, 2,3,4,4+=
    unusable"; so RAM never wins over anything else, whatever the order of
    the lines. ``entries``: (start, end, type, firmware type number)."""
    points = sorted({p for s, e, _t, _n in entries for p in (s, e)})
    out: list[E820Entry] = []
    for lo, hi in itertools.pairwise(points):
        cover = [(n, t) for s, e, t, n in entries if s <= lo and hi <= e]
        if not cover:
            continue
        _n, t = max(cover, key=lambda c: c[0])
        if out and out[-1].end == lo and out[-1].type is t:
            out[-1] = E820Entry(out[-1].start, hi, t)
        else:
            out.append(E820Entry(lo, hi, t))
    return out


class E820Table:
    """Sorted, non-overlapping ranges with a type each (holes are absent)."""

    def __init__(self, entries: list[E820Entry] | None = None):
        self._entries: list[E820Entry] = []
        for e in entries or []:
            self._set(e.start, e.end, e.type)
        #: entries of the firmware's own map (e820_table_firmware: the BIOS
        #: table sanitized, before the kernel's edits): one
        #: firmware_map_add_early each
        self.firmware_entries = len(self._entries)

    # -- construction ---------------------------------------------------

    @classmethod
    def from_dmesg(cls, text: str) -> E820Table:
        """The map the kernel ended up with, from its boot log: the
        ``BIOS-e820`` table (overlaps resolved as :func:`sanitize` does),
        then the ``e820: update`` / ``e820: remove`` edits in log order."""
        if not isinstance(text, str):
            raise E820Error(f"the boot log must be text (str), not {type(text).__name__}")
        lines = text.splitlines()
        bios_types = [m.group(3).strip() for ln in lines
                      if (m := _BIOS.search(_TIMESTAMP.sub("", ln)))]
        new_format = any(t in _NEW_RAM_NAMES for t in bios_types)
        versions = [no for no, raw in enumerate(lines, start=1) if _LINUX_VERSION.search(raw)]
        if len(versions) > 1:
            raise E820Error(f"the boot log holds more than one boot ('Linux version' at lines "
                            f"{', '.join(map(str, versions))}): keep only the lines of one boot")
        bios: list[tuple[int, int, E820Type, int]] = []
        table: E820Table | None = None
        last_start = -1
        for no, raw in enumerate(lines, start=1):
            line = _TIMESTAMP.sub("", raw)
            try:
                if m := _BIOS.search(line):
                    start, last = int(m.group(1), 16), int(m.group(2), 16)
                    if table is not None or start <= last_start:
                        raise E820Error("the BIOS-e820 table starts over here: the log holds "
                                        "more than one boot; keep only the lines of one boot")
                    if last < start:
                        raise E820Error(f"range end {last:#x} before its start {start:#x}")
                    t, num = _parse_bios_type(m.group(3), new_format)
                    bios.append((start, last + 1, t, num))
                    last_start = start
                elif (m := _UPDATE.search(line)) or _REMOVE.search(line):
                    if table is None:
                        table = cls(sanitize(bios))
                    if m:
                        start, last = int(m.group(1), 16), int(m.group(2), 16)
                        # 7.x names the types in its edits too ("System RAM ==>
                        # device reserved"): the same names as its table.
                        table.update(start, last + 1, _parse_bios_type(m.group(3), new_format)[0],
                                     _parse_bios_type(m.group(4), new_format)[0])
                    else:
                        m = _REMOVE.search(line)
                        start, last = int(m.group(1), 16), int(m.group(2), 16)
                        table.remove(start, last + 1, _parse_bios_type(m.group(3), new_format)[0])
            except E820Error as exc:
                raise E820Error(f"boot log line {no}: {exc}: {raw.strip()!r}") from None
        if not bios:
            raise E820Error("no 'BIOS-e820: [mem ...] type' lines in the boot log")
        if table is None:
            table = cls(sanitize(bios))
        table.firmware_entries = len(sanitize(bios))
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
        # With an AMD CPU (-cpu max reports AuthenticAMD) QEMU reserves the
        # HyperTransport hole below 1 TiB (pc_memory_init, AMD_HT_START).
        t._set(0xFD00000000, 1 << 40, E820Type.RESERVED)
        t.firmware_entries = len(t._entries)
        # The kernel's own edit at boot (e820__memory_setup -> trim_bios_range
        # keeps the first page reserved): "e820: update [mem 0x00000000-0x00000fff]
        # usable ==> reserved".
        t.update(0, 0x1000, E820Type.RAM, E820Type.RESERVED)
        return t

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
