"""The e820 input: text or Path (never a guess), overlaps as Linux's
sanitizer resolves them, one boot per log, the 7.x print format, and the
RAM limit named with its number."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestkernel.boot import BootError, e820__memory_setup
from guestkernel.e820 import E820Entry, E820Error, E820Table, E820Type

DATA = Path(__file__).parent / "data"
GiB = 1 << 30


def test_a_str_is_always_text_and_a_path_is_read():
    log = DATA / "dmesg-e820-example.log"
    t_path, text = e820__memory_setup(log, None)
    t_text, _ = e820__memory_setup(log.read_text(), None)
    assert t_path.entries == t_text.entries and text == log.read_text()
    # a one-line str naming a file is text, not a file name: it is never opened
    with pytest.raises(E820Error, match="no 'BIOS-e820"):
        e820__memory_setup(str(log), None)
    with pytest.raises(E820Error, match="no 'BIOS-e820"):
        e820__memory_setup("/etc/passwd", None)
    with pytest.raises(E820Error, match="no 'BIOS-e820"):
        e820__memory_setup("", None)
    # one line with no newline is text too
    one = "BIOS-e820: [mem 0x0000000000000000-0x000000003fffffff] usable"
    assert e820__memory_setup(one, None)[0].total_ram() == GiB


def test_an_empty_or_missing_file_says_so(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(BootError, match="is empty"):
        e820__memory_setup(empty, None)
    with pytest.raises(BootError, match="cannot read the e820 boot log .*No such file"):
        e820__memory_setup(tmp_path / "nope.log", None)
    with pytest.raises(BootError, match="Is a directory"):
        e820__memory_setup(tmp_path, None)
    binary = tmp_path / "bin.log"
    binary.write_bytes(b"\xff\xfe\x00BIOS")
    with pytest.raises(BootError, match="is not text"):
        e820__memory_setup(binary, None)


def test_overlaps_the_higher_type_number_wins_whatever_the_order():
    """sanitize_e820_table: "larger value takes precedence -- 1=usable,
    2,3,4,4+=unusable"; the old rule (the later line wins) would have made
    the hole usable again in the second log."""
    a = ("BIOS-e820: [mem 0x0000000000000000-0x000000003fffffff] usable\n"
         "BIOS-e820: [mem 0x0000000010000000-0x0000000010ffffff] ACPI NVS\n")
    b = ("BIOS-e820: [mem 0x0000000000000000-0x0000000000ffffff] reserved\n"
         "BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable\n")
    ta = E820Table.from_dmesg(a)
    assert ta.entries == (E820Entry(0, 0x10000000, E820Type.RAM),
                          E820Entry(0x10000000, 0x11000000, E820Type.NVS),
                          E820Entry(0x11000000, 0x40000000, E820Type.RAM))
    tb = E820Table.from_dmesg(b)
    assert tb.entries == (E820Entry(0, 0x1000000, E820Type.RESERVED),
                          E820Entry(0x1000000, 0x40000000, E820Type.RAM))
    # an unknown firmware type keeps its number: type 20 beats ACPI data (3)
    c = ("BIOS-e820: [mem 0x0000000000000000-0x000000003fffffff] usable\n"
         "BIOS-e820: [mem 0x0000000000100000-0x00000000001fffff] ACPI data\n"
         "BIOS-e820: [mem 0x0000000000180000-0x000000000027ffff] type 20\n")
    tc = E820Table.from_dmesg(c)
    assert tc.entries[1:3] == (E820Entry(0x100000, 0x180000, E820Type.ACPI),
                               E820Entry(0x180000, 0x280000, E820Type.RESERVED))


def test_two_boots_in_one_log_are_refused():
    one = (DATA / "dmesg-e820-example.log").read_text()
    with pytest.raises(E820Error, match=r"more than one boot \('Linux version' at lines 1, "):
        E820Table.from_dmesg(one + one)
    bios = [ln for ln in one.splitlines() if "BIOS-e820" in ln or "e820: " in ln]
    with pytest.raises(E820Error, match="boot log line 15: the BIOS-e820 table starts over here"):
        E820Table.from_dmesg("\n".join(bios + bios))
    with pytest.raises(E820Error, match="table starts over"):
        E820Table.from_dmesg("BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable\n"
                             "BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable\n")


#: a synthetic boot log in the 7.x format (System RAM, device reserved, gap
#: lines, lines with and without the size column, a reserved range at
#: 0xfd00000000 as QEMU's recent machines have)
LOG_72 = """\
[    0.000000] Linux version 7.2.0 (builder@host) (gcc 14) #1 SMP PREEMPT_DYNAMIC
[    0.000000] BIOS-provided physical RAM map:
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] System RAM
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff]      1.0 KiB device reserved
[    0.000000] BIOS-e820: [gap 0x00000000000a0000-0x00000000000effff]
[    0.000000] BIOS-e820: [mem 0x00000000000f0000-0x00000000000fffff]     64.0 KiB device reserved
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000007ffdffff]      2.0 GiB System RAM
[    0.000000] BIOS-e820: [mem 0x000000007ffe0000-0x000000007fffffff]    128.0 KiB device reserved
[    0.000000] BIOS-e820: [gap 0x0000000080000000-0x00000000fffbffff]
[    0.000000] BIOS-e820: [mem 0x00000000fffc0000-0x00000000ffffffff]    256.0 KiB device reserved
[    0.000000] BIOS-e820: [gap 0x0000000100000000-0x000000fcffffffff]
[    0.000000] BIOS-e820: [mem 0x000000fd00000000-0x000000ffffffffff]     12.0 GiB device reserved
[    0.000000] e820: update [mem 0x00000000-0x00000fff] usable ==> reserved
"""


def test_the_7x_print_format_is_read():
    t = E820Table.from_dmesg(LOG_72)
    assert t.ram_ranges() == [(0x1000, 0x9F000), (0x100000, 0x7FFE0000)]
    assert E820Entry(0xFD00000000, 0x10000000000, E820Type.RESERVED) in t.entries
    assert E820Entry(0x9FC00, 0xA0000, E820Type.RESERVED) in t.entries
    # the classic format still refuses a name it does not know
    with pytest.raises(E820Error, match="unknown e820 type 'bogus'"):
        E820Table.from_dmesg("BIOS-e820: [mem 0x0000000000000000-0x000000003fffffff] usable\n"
                             "BIOS-e820: [mem 0x0000000040000000-0x000000004fffffff] bogus\n")


def test_the_7x_log_boots_the_7x_record():
    from guestkernel import Kernel
    k = Kernel.boot(e820=LOG_72)
    assert k.profile.name == "7.2"
    assert k.meminfo()["MemTotal"] > 0


def test_the_ram_limit_is_named_with_its_number():
    from emu.machine import MAX_RAM_BYTES
    with pytest.raises(BootError) as exc:
        e820__memory_setup(None, "1T")
    msg = str(exc.value)
    assert f"must end at or below {MAX_RAM_BYTES:#x}" in msg
    assert "1023.998 GiB" in msg and "a RAM size is at most 1047549M" in msg
    big = ("BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable\n"
           "BIOS-e820: [mem 0x0000000000100000-0x000000ffffffffff] usable\n")
    with pytest.raises(BootError, match="the e820 map's RAM ends at 0x10000000000, beyond"):
        e820__memory_setup(big, None)


@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "memblock").glob("*.log.gz")))
def test_qemu_layout_is_the_logged_map_entry_for_entry(name):
    """QEMU's PC layout as the committed boot logs print it: every entry,
    the reserved HyperTransport hole below 1 TiB an AMD CPU gets included,
    and the firmware map's entry count (one firmware_map_add_early each)."""
    import gzip
    log = gzip.decompress((DATA / "memblock" / name).read_bytes()).decode()
    real = E820Table.from_dmesg(log)
    model = E820Table.qemu_pc(name.split("-")[2].split(".")[0])
    assert real.entries == model.entries
    assert real.firmware_entries == model.firmware_entries == (7 if "2G" in name else 8)
    assert model.entries[-1].start == 0xFD00000000 and model.entries[-1].end == 1 << 40
