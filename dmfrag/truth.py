"""Ground truth from a real kernel's memory (see :mod:`guestkernel.truth`,
which reads it; re-exported here), and the real-kernel harness's capture of
it: :func:`capture_on_pause` dumps the guest at each ``dumpwait`` pause and
reads its state at once."""

from __future__ import annotations

import time
from pathlib import Path

from guestkernel.truth import (
    NO_PAGEBLOCK,
    START_KERNEL_MAP,
    TRUTH_VERSION,
    KernelState,
    TruthError,
    check_drgn,
    compare_free,
    compare_tables,
    extract,
    find_vmcoreinfo,
    load_states,
    model_tables,
    save_states,
    state_bytes,
    truth_path,
    vmcoreinfo_from_core,
    walk_tables,
)

__all__ = ["NO_PAGEBLOCK", "START_KERNEL_MAP", "TRUTH_VERSION", "KernelState", "TruthError",
           "capture_on_pause", "check_drgn", "compare_free", "compare_tables", "extract",
           "find_vmcoreinfo", "load_states", "model_tables", "save_states", "state_bytes",
           "truth_path", "vmcoreinfo_from_core", "walk_tables"]


def capture_on_pause(work: Path, vmlinux: Path, states: list[KernelState],
                     timings: list[dict] | None = None):
    """An ``on_pause`` for :meth:`dmfrag.realkernel.RealKernel.run`: at a
    ``@@PAUSE dump POINT PADDR SIZE`` line, dump the guest (QEMU's
    ``dump-guest-memory``), read its state at once, delete the dump.
    Returns True when it handled the line."""
    def on_pause(hmp, console: str) -> bool:
        line = console.rstrip().rsplit("\n", 1)[-1].strip()
        parts = line.split()
        if len(parts) < 5 or parts[1] != "dump":
            return False
        point, paddr = parts[2], int(parts[3], 16)
        core = Path(work) / f"core-{time.monotonic_ns()}-{point}"
        t0 = time.perf_counter()
        try:
            said = hmp(f"dump-guest-memory {core}")
            if not core.exists():
                raise TruthError(f"dump-guest-memory at {point!r} wrote nothing: {said.strip()}")
            t1 = time.perf_counter()
            size = core.stat().st_size
            state = extract(core, vmlinux, vmcoreinfo=vmcoreinfo_from_core(core, paddr),
                            point=point)
        finally:
            core.unlink(missing_ok=True)
        states.append(state)
        if timings is not None:
            timings.append({"point": point, "dump_s": t1 - t0, "extract_s": state.seconds,
                            "dump_bytes": size})
        return True
    return on_pause


