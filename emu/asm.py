"""Assembly (keystone) and disassembly (capstone) for x86-64 guest code."""

from __future__ import annotations

import re
from functools import cache

import capstone
import keystone

__all__ = ["AssemblyError", "assemble", "disasm", "disasm_one"]


class AssemblyError(ValueError):
    """Guest assembly that does not assemble; names the offending line."""

    def __init__(self, message: str, line_no: int | None = None, line: str | None = None):
        where = f"line {line_no}: {line.strip()!r}: " if line_no is not None else ""
        super().__init__(f"{where}{message}")
        self.line_no = line_no
        self.line = line


@cache
def _ks() -> keystone.Ks:
    return keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)


@cache
def _cs(detail: bool) -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = detail
    return cs


def _split(text: str) -> list[str]:
    # Keystone takes ';' or newlines as separators; a line is what a user wrote
    # on one line of their text (statements joined with ';' share it).
    return text.splitlines()


def assemble(text: str, at: int = 0) -> bytes:
    """Assemble Intel-syntax x86-64 ``text`` placed at virtual address ``at``.

    Raises :class:`AssemblyError` naming the first line that fails. Keystone
    reports only a statement count for errors, so the text is assembled
    line by line to find the culprit once the whole text has failed (label
    references across lines make line-wise assembly unreliable in general,
    so it is only the diagnosis path)."""
    try:
        encoding, _ = _ks().asm(text, at)
    except keystone.KsError as exc:
        raise _locate_error(text, at, exc) from None
    if encoding is None:
        if text.strip():
            raise AssemblyError("assembles to nothing (only comments or directives?)")
        return b""
    return bytes(encoding)


_LABEL = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*:")
_IDENT = re.compile(r"[A-Za-z_.$][\w.$]*")


def _locate_error(text: str, at: int, exc: keystone.KsError) -> AssemblyError:
    lines = _split(text)
    labels = {m.group(1) for line in lines if (m := _LABEL.match(line))}
    for no, line in enumerate(lines, start=1):
        body = _LABEL.sub("", line.split("#", 1)[0]).strip()
        if not body:
            continue
        try:
            _ks().asm(body, at)
        except keystone.KsError as line_exc:
            if line_exc.errno == keystone.KS_ERR_ASM_SYMBOL_MISSING:
                missing = [w for w in _IDENT.findall(body.split(None, 1)[-1])
                           if w not in labels and w.lower() not in _REGISTERS]
                if not missing:
                    continue  # refers to a label defined on another line
                return AssemblyError(f"undefined symbol {missing[0]!r}", no, line)
            return AssemblyError(str(line_exc), no, line)
    return AssemblyError(str(exc))


_REGISTERS = frozenset(
    [f"r{i}" for i in range(8, 16)] + [f"r{i}{s}" for i in range(8, 16) for s in "dwb"]
    + ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "al", "bl", "cl", "dl", "ah", "bh", "ch", "dh", "sil", "dil", "bpl", "spl", "cr0", "cr2", "cr3", "cr4", "cs", "ds", "es", "fs", "gs", "ss", "byte", "word", "dword", "qword", "ptr", "xmmword"]
    + [f"xmm{i}" for i in range(16)])


def disasm(code: bytes, at: int = 0, count: int = 0) -> list[tuple[int, int, str]]:
    """(address, size, 'mnemonic op_str') for each instruction in ``code``."""
    return [(i.address, i.size, f"{i.mnemonic} {i.op_str}".strip())
            for i in _cs(False).disasm(code, at, count)]


def disasm_one(code: bytes, at: int = 0) -> capstone.CsInsn | None:
    """The first instruction of ``code`` decoded with operand details."""
    for insn in _cs(True).disasm(code, at, 1):
        return insn
    return None
