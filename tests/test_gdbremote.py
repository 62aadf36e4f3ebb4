"""dmfrag.gdbremote against a stub that speaks GDB's remote protocol as
QEMU's does (acks, checksums, a stop reply on continue), and
dmfrag.truth.kernel_symbols on a real ELF file."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from dmfrag.gdbremote import GdbRemote, GdbRemoteError, _packet


class FakeStub:
    """A gdbstub on a Unix socket: answers each packet from ``replies``
    (a callable of the packet's data), records what it got."""

    def __init__(self, path: Path, replies, corrupt_first: bool = False) -> None:
        self.path, self.replies = path, replies
        self.got: list[str] = []
        self.corrupt_first = corrupt_first
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        buf = b""
        with conn:
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while True:
                    buf = buf.lstrip(b"+-")
                    start, end = buf.find(b"$"), buf.find(b"#")
                    if start < 0 or end < 0 or len(buf) < end + 3:
                        break
                    data = buf[start + 1:end].decode()
                    assert f"{sum(buf[start + 1:end]) & 0xFF:02x}".encode() == buf[end + 1:end + 3]
                    buf = buf[end + 3:]
                    self.got.append(data)
                    conn.sendall(b"+")
                    reply = self.replies(data)
                    if reply is None:
                        conn.close()
                        return
                    if self.corrupt_first:
                        self.corrupt_first = False
                        conn.sendall(b"$" + reply.encode() + b"#00")   # a bad checksum
                        ack = conn.recv(1)
                        assert ack == b"-"
                    conn.sendall(_packet(reply))


def _regs(rip: int) -> str:
    return "00" * 8 * 16 + rip.to_bytes(8, "little").hex() + "00" * 8 * 8


def test_breakpoint_continue_rip_and_detach(tmp_path):
    rip = 0xFFFFFFFF812B7340

    def replies(data: str) -> str | None:
        if data.startswith(("Z0,", "z0,")) or data == "D":
            return "OK"
        if data == "c":
            return "T05thread:01;"
        if data == "g":
            return _regs(rip)
        return ""
    stub = FakeStub(tmp_path / "gdb.sock", replies, corrupt_first=True)
    with GdbRemote(tmp_path / "gdb.sock", timeout=5) as g:
        g.set_breakpoint(rip)                 # answered once with a bad checksum: asked again
        assert g.cont(5).startswith("T05")
        assert g.rip() == rip
        g.clear_breakpoint(rip)
        g.detach()
    assert stub.got == [f"Z0,{rip:x},1", "c", "g", f"z0,{rip:x},1", "D"]


def test_a_refused_or_unanswered_command_is_one_clear_error(tmp_path):
    def replies(data: str) -> str | None:
        if data.startswith("Z0,"):
            return "E01"
        if data == "c":
            return "W00"                     # the guest exited instead of stopping
        return None                          # hang up
    FakeStub(tmp_path / "gdb.sock", replies)
    with GdbRemote(tmp_path / "gdb.sock", timeout=5) as g:
        with pytest.raises(GdbRemoteError, match="refused 'Z0,10,1': E01"):
            g.set_breakpoint(0x10)
        with pytest.raises(GdbRemoteError, match="did not stop at a breakpoint: 'W00'"):
            g.cont(5)
        with pytest.raises(GdbRemoteError, match="closed"):
            g.rip()


def test_no_stub_listening_is_an_error_after_the_timeout(tmp_path):
    with pytest.raises(GdbRemoteError, match="no gdbstub listens"):
        GdbRemote(tmp_path / "none.sock", timeout=0.2)


def test_packets_carry_their_checksum():
    assert _packet("c") == b"$c#63"
    assert _packet("g") == b"$g#67"
    assert _packet("?") == b"$?#3f"


def test_kernel_symbols_reads_the_symbol_table_once(tmp_path):
    """The addresses come from the ELF's .symtab (here a small shared
    object the host's compiler makes) and are kept beside it; a name the
    file lacks is a TruthError naming it."""
    import shutil
    import subprocess

    from dmfrag.truth import TruthError, kernel_symbols
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = tmp_path / "k.c"
    src.write_text("void trace_init(void) {}\nint first_event_probe(int x) { return x + 1; }\n")
    elf = tmp_path / "vmlinux"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", str(elf), str(src)], check=True)
    from elftools.elf.elffile import ELFFile
    with open(elf, "rb") as f:
        want = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab")
                .iter_symbols() if s.name in ("trace_init", "first_event_probe")}
    got = kernel_symbols(elf, ("trace_init", "first_event_probe"))
    assert got == want and all(want.values())
    cache = tmp_path / "vmlinux.symbols.json"
    assert cache.is_file()
    elf.write_bytes(b"not an elf any more")            # the cache answers now
    assert kernel_symbols(elf, ("trace_init",)) == {"trace_init": want["trace_init"]}
    with pytest.raises(TruthError, match="no symbol missing_fn"):
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(elf), str(src)], check=True)
        kernel_symbols(elf, ("missing_fn",))
