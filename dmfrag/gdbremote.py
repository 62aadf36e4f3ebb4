"""A minimal client of GDB's remote serial protocol, enough to stop a QEMU
guest at a kernel function: QEMU's gdbstub (``-gdb unix:PATH,server=on``
with ``-S``) holds the vCPU until a client continues it. Used by
:mod:`dmfrag.realkernel` to dump a guest at the first traced page event
(the state the recorder cannot see: what Linux allocated before tracing
started).

Packets are ``$data#cs`` (``cs``: the sum of data's bytes mod 256, two hex
digits), each acknowledged with ``+``. Under TCG a breakpoint (``Z0``) is
the translator's, so guest memory is never patched. The commands used:
``?`` (why stopped), ``Z0``/``z0`` (set/clear a breakpoint), ``c``
(continue: the reply is the next stop), ``g`` (registers: RIP is the 17th
64-bit value on x86-64) and ``D`` (detach: the guest runs on).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Self

__all__ = ["GdbRemote", "GdbRemoteError"]


class GdbRemoteError(RuntimeError):
    """The stub refused a command, closed, or did not answer in time."""


def _packet(data: str) -> bytes:
    raw = data.encode()
    return b"$" + raw + b"#" + f"{sum(raw) & 0xFF:02x}".encode()


class GdbRemote:
    """One connection to a gdbstub on a Unix socket."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise GdbRemoteError(f"no gdbstub listens on {path}") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the wire -------------------------------------------------------------

    def _recv(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise GdbRemoteError("the gdbstub did not answer in time") from None
        if not chunk:
            raise GdbRemoteError("the gdbstub closed the connection")
        self._buf += chunk

    def _read_packet(self, timeout: float | None = None) -> str:
        old = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while True:
                self._buf = self._buf.lstrip(b"+")
                start = self._buf.find(b"$")
                end = self._buf.find(b"#", start + 1) if start >= 0 else -1
                if start >= 0 and end >= 0 and len(self._buf) >= end + 3:
                    data = self._buf[start + 1:end]
                    cs = int(self._buf[end + 1:end + 3], 16)
                    self._buf = self._buf[end + 3:]
                    if sum(data) & 0xFF != cs:
                        self.sock.sendall(b"-")
                        continue
                    self.sock.sendall(b"+")
                    return data.decode(errors="replace")
                self._recv()
        finally:
            self.sock.settimeout(old)

    def command(self, data: str, timeout: float | None = None) -> str:
        """Send one packet and return the stub's reply packet."""
        self.sock.sendall(_packet(data))
        return self._read_packet(timeout)

    # -- what the harness uses ------------------------------------------------

    def _ok(self, data: str) -> None:
        reply = self.command(data)
        if reply != "OK":
            raise GdbRemoteError(f"the gdbstub refused {data!r}: {reply or 'not supported'}")

    def set_breakpoint(self, addr: int) -> None:
        self._ok(f"Z0,{addr:x},1")

    def clear_breakpoint(self, addr: int) -> None:
        self._ok(f"z0,{addr:x},1")

    def cont(self, timeout: float) -> str:
        """Continue; wait (up to ``timeout`` s) for the next stop reply."""
        reply = self.command("c", timeout)
        if not reply or reply[0] not in "ST":
            raise GdbRemoteError(f"the guest did not stop at a breakpoint: {reply!r}")
        return reply

    def rip(self) -> int:
        regs = self.command("g")
        if len(regs) < 17 * 16:
            raise GdbRemoteError(f"a short register reply ({len(regs)} hex digits)")
        return int.from_bytes(bytes.fromhex(regs[16 * 16:17 * 16]), "little")

    def detach(self) -> None:
        """Leave the guest running (QEMU's stub answers OK and resumes)."""
        try:
            self._ok("D")
        except GdbRemoteError:
            pass
