"""The real kernel's own memory accesses, captured under QEMU.

A TCG plugin of the project's (``capture.c`` here, built by
:func:`build_plugin` with the host's gcc against QEMU's plugin API version
1, declared in the file itself: no QEMU header or code is needed) records
the guest kernel's data accesses and instruction fetches to kernel
addresses while a workload runs (:func:`record_accesses`). The guest
switches it on and off with a marker instruction (the ``accmark`` helper);
the harness puts the switches around the workload's steps and takes them
out around each snapshot, so the harness's own ``cat /proc/meminfo`` is
not in the stream.

**What is captured.** ``boot``: from the machine's first instruction to
the moment the init script starts (firmware and the decompressor run at
low addresses and are not kernel addresses).

**Coalescing** (``coalesce``, on by default). TCG runs ``rep movs`` and
``rep stos`` one element at a time, the block executed again for each: a
64 KiB ``copy_from_user`` would be 65,536 one-byte stores and as many
fetches. A load or store continuing the previous one of its kind within
the 64-byte line its run started in is left out, with the re-fetch of the
same block before it: each is a TLB hit on the page just used, so walks
are unchanged and the access counts are counts of cache-line runs
(``coalesced`` says how many were left out). Any other workload: its steps
after the boot snapshot. Accesses are kept in windows of ``window``
consecutive ones; at most ``limit`` accesses are kept, the windows spread
evenly over the whole capture (when the buffer fills, every other window
is dropped: ``sample`` is the final keep rate, a power of two). Each
window is an unbroken run of the kernel's accesses; the replay runs the
windows back to back (the TLB is not flushed between them: a window's
first accesses see the previous window's translations, not the ones
skipped; at 65,536 accesses a window, the few hundred first-touch walks of
a window are under 1 % of it).

**The file** (``dmfrag accesses record -o A.npz``) is an access stream as
:mod:`dmfrag.accesses` reads it (``va``, ``kind``, ``size``) with
``window_index`` (uint64, each kept window's position since the capture
began, in windows) and ``meta`` (a JSON string: kernel, RAM, workload,
the plugin's counts, the address layout seen).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..accesses import AccessStream, layout_of, region_counts, save_accesses

__all__ = ["DEFAULT_LIMIT", "DEFAULT_WINDOW", "Capture", "CaptureError", "build_marker",
           "build_plugin", "load_capture", "record_accesses", "save_capture",
           "truth_path_of"]

_SRC = Path(__file__).resolve().parent / "capture.c"
_MARKER_SRC = Path(__file__).resolve().parent.parent / "guest" / "accmark.c"
#: accesses kept at most (9 bytes each in the plugin's buffer)
DEFAULT_LIMIT = 8 << 20
DEFAULT_WINDOW = 65536

class CaptureError(RuntimeError):
    """The capture cannot run or its output is not what the plugin writes."""


@dataclass
class Capture:
    stream: AccessStream
    window_index: np.ndarray
    meta: dict = field(default_factory=dict)
    #: ``record_accesses(truth=True)``: the kernel's state at each snapshot
    #: (dmfrag.truth.KernelState), read from memory dumps
    states: list = field(default_factory=list)

    def intervals(self) -> list[tuple[int, int]]:
        """The stretches the capture was on, in accesses seen: one per
        workload step for a capture of steps (each ends at its snapshot)."""
        out, start = [], None
        for what, at in self.meta.get("marks", []):
            if what == "on":
                start = at
            elif start is not None:
                out.append((start, at))
                start = None
        if start is not None:
            out.append((start, self.meta.get("seen", start)))
        return out

    def step(self, i: int) -> AccessStream:
        """The accesses of the ``i``-th step (:meth:`intervals`): the kept
        windows wholly inside it."""
        lo, hi = self.intervals()[i]
        w = int(self.meta["window"])
        n = len(self.stream)
        lengths = np.full(len(self.window_index), w, np.int64)
        if len(lengths):
            lengths[-1] = n - w * (len(lengths) - 1)
        start = self.window_index.astype(np.int64) * w
        inside = np.repeat((start >= lo) & (start + lengths <= hi), lengths)
        s = self.stream
        return AccessStream(s.va[inside], s.kind[inside], s.size[inside])


def _build(src: Path, out_dir: Path, stem: str, args: list[str], suffix: str = "") -> Path:
    """``src`` built once per source text (realkernel.build_with_gcc, as
    the guest helpers are), its failure a :class:`CaptureError`."""
    from ..realkernel import RealKernelError, build_with_gcc
    if shutil.which("gcc") is None:
        raise CaptureError("gcc is missing: apt-get install gcc")
    try:
        return build_with_gcc(src, out_dir, stem, args, suffix)
    except RealKernelError as exc:
        raise CaptureError(str(exc)) from None


def build_plugin(cache: Path) -> Path:
    """The capture plugin (a shared object QEMU loads with ``-plugin``)."""
    return _build(_SRC, cache / "plugins", "capture",
                  ["-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall"], ".so")


def build_marker(cache: Path) -> Path:
    """The guest's ``accmark`` (static, no C library)."""
    return _build(_MARKER_SRC, cache / "helpers", "accmark",
                  ["-static", "-nostdlib", "-O2", "-fno-stack-protector", "-fno-pie", "-no-pie",
                   "-s"])


def _read_output(prefix: Path) -> tuple[AccessStream, np.ndarray, dict]:
    try:
        txt = (prefix.parent / (prefix.name + ".txt")).read_text()
        va = np.fromfile(prefix.parent / (prefix.name + ".va"), np.uint64)
        raw = np.fromfile(prefix.parent / (prefix.name + ".kind"), np.uint8)
        win = np.fromfile(prefix.parent / (prefix.name + ".win"), np.uint64)
    except OSError as exc:
        raise CaptureError(f"the capture plugin wrote no output ({exc}): did QEMU load it?") \
            from None
    counts: dict = {}
    marks = []
    for line in txt.splitlines():
        parts = line.split()
        if parts[:1] == ["mark"] and len(parts) == 3:
            marks.append([parts[1], int(parts[2])])
        elif len(parts) == 2:
            counts[parts[0]] = int(parts[1])
    if len(va) != counts.get("kept") or len(raw) != len(va) \
            or len(win) != counts.get("windows"):
        raise CaptureError(f"the capture's files disagree with its counts ({counts}): "
                           f"{len(va)} addresses, {len(raw)} kinds, {len(win)} windows")
    stream = AccessStream(va, (raw & 3).astype(np.uint8),
                          (np.uint8(1) << (raw >> 4)).astype(np.uint8))
    counts["marks"] = marks
    return stream, win, counts


def record_accesses(kernel: str, ram: str, workload: tuple[str, ...], *,
                    limit: int = DEFAULT_LIMIT, window: int = DEFAULT_WINDOW,
                    coalesce: bool = True, truth: bool = False, timeout: float = 600.0,
                    install: bool = False, cache: Path | None = None,
                    measure_slowdown: bool = True) -> Capture:
    """Boot ``kernel`` with ``ram`` under QEMU with the capture plugin and
    run ``workload`` (guest steps as ``realkernel record`` takes them):
    ``("boot",)`` or ``()`` captures the boot, anything else its steps
    (a leading ``boot`` is ignored). ``measure_slowdown``: also boot once
    without the plugin (the same initramfs) for the capture's slowdown. ``truth``: the guest
    is also dumped at each snapshot (capture off meanwhile) and its state
    read (:mod:`dmfrag.truth`): the state the stream ran on, for a replay
    with no placement difference (``tlbcost --from-dump``)."""
    from ..realkernel import InitHooks, RealKernel, RealKernelError
    if limit < 2 * window or window < 1:
        raise CaptureError(f"limit ({limit}) must hold at least two windows of {window}")
    rk = RealKernel(cache, install=install, kernel=kernel)
    steps = tuple(w for w in workload if w != "boot")
    boot = not steps
    plugin = build_plugin(rk.cache)
    marker = build_marker(rk.cache)
    work = Path(tempfile.mkdtemp(prefix=".capture.", dir=rk.cache))
    prefix = work / "acc"
    args = (f"out={prefix},start={'on' if boot else 'off'},limit={limit},window={window},"
            f"coalesce={'on' if coalesce else 'off'}")
    if boot:
        # the capture is on from the start; the init script turns it off first
        hk = InitHooks(binaries={"accmark": marker}, qemu_args=("-plugin", f"{plugin},{args}"))
        prologue = "/bin/accmark off"
        epilogue = ""
    else:
        from ..registry import guest_steps
        last = [line.split()[1] for w in steps for line in guest_steps(w)
                if line.startswith("snap ")][-1]
        # on again after each snapshot but the last (the harness's exit is
        # not the workload's)
        hk = InitHooks(snap_pre="/bin/accmark off",
                       snap_post=f'[ -n "$DMFRAG_CAPTURE" ] && [ "$1" != "{last}" ] && '
                                 f'/bin/accmark on',
                       after_boot="DMFRAG_CAPTURE=1\n/bin/accmark on",
                       binaries={"accmark": marker}, qemu_args=("-plugin", f"{plugin},{args}"))
        prologue = ""
        epilogue = "DMFRAG_CAPTURE=\n/bin/accmark off"
    try:
        t0 = time.monotonic()
        try:
            run = rk.run(ram, steps, timeout=timeout, prologue=prologue, epilogue=epilogue,
                         hooks=hk, truth=truth)
        except RealKernelError as exc:
            raise CaptureError(str(exc)) from None
        captured_s = time.monotonic() - t0 - sum(d.get("dump_s", 0) + d.get("extract_s", 0)
                                                 for d in run.dumps)
        stream, win, counts = _read_output(prefix)
        plain_s = None
        if measure_slowdown:
            plain_hooks = dataclasses.replace(hk, qemu_args=())
            t0 = time.monotonic()
            try:
                rk.run(ram, steps, timeout=timeout, prologue=prologue, epilogue=epilogue,
                       hooks=plain_hooks)
            except RealKernelError as exc:
                raise CaptureError(f"the run without the plugin failed: {exc}") from None
            plain_s = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    levels = layout_of(stream.va)
    meta = {
        "format": "dmfrag-accesses-1",
        "kernel": kernel, "ram": ram, "workload": list(steps) or ["boot"],
        "captured": "boot" if boot else "steps",
        "coalesce": coalesce, "coalesced": counts["coalesced"],
        "seen": counts["seen"], "kept": counts["kept"], "windows": counts["windows"],
        "window": counts["window"], "sample": counts["sample"], "limit": counts["limit"],
        "marks": counts["marks"],
        "paging_levels": levels,
        "regions": region_counts(stream.va, levels) if levels else {},
        "kinds": {"load": int(np.count_nonzero(stream.kind == 0)),
                  "store": int(np.count_nonzero(stream.kind == 1)),
                  "fetch": int(np.count_nonzero(stream.kind == 2))},
        "guest_seconds_captured": round(captured_s, 2),
        "guest_seconds_plain": round(plain_s, 2) if plain_s else None,
        "capture_slowdown": round(captured_s / plain_s, 3) if plain_s else None,
        "snapshots": {p: {"DirectMap4k": run.meminfo(p).get("DirectMap4k"),
                          "DirectMap2M": run.meminfo(p).get("DirectMap2M"),
                          "DirectMap1G": run.meminfo(p).get("DirectMap1G")}
                      for p in run.snapshots},
    }
    return Capture(stream, win, meta, run.states)


def save_capture(path: str | Path, cap: Capture) -> Path | None:
    """Write the stream (``.npz``); its states, when it has them, beside it
    as ``X.truth.npz`` (returned)."""
    save_accesses(path, cap.stream, window_index=cap.window_index,
                  meta=np.array(json.dumps(cap.meta, sort_keys=True)))
    if not cap.states:
        return None
    from guestkernel.truth import save_states
    return save_states(truth_path_of(path), cap.states)


def truth_path_of(path: str | Path) -> Path:
    """``A.npz`` -> ``A.truth.npz``: where a capture's states are kept."""
    p = Path(path)
    return p.with_name(p.name[: -len(".npz")] + ".truth.npz" if p.name.endswith(".npz")
                       else p.name + ".truth.npz")


def load_capture(path: str | Path) -> Capture:
    """A stream file with its capture's metadata (``meta`` empty and one
    window of the whole stream for a stream brought from elsewhere)."""
    from ..accesses import load_accesses
    stream = load_accesses(path)
    meta: dict = {}
    win = np.zeros(1, np.uint64)
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if "meta" in data.files:
                meta = json.loads(str(data["meta"]))
            if "window_index" in data.files:
                win = data["window_index"].astype(np.uint64)
    return Capture(stream, win, meta)
