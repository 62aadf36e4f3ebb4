"""Real Linux kernels in the loop: boot one of Debian's 5.10, 6.1 and 7.2
builds under QEMU (TCG) with a given RAM size, run a workload in a busybox
initramfs, and collect ``/proc/meminfo`` and ``/proc/vmstat`` at named
points plus the boot log.

Everything comes from Debian's packages: ``qemu-system-x86``,
``busybox-static`` and ``cpio`` installed with apt, the kernel package
fetched with ``apt-get download`` into a cache folder and unpacked there.
6.1 comes from the machine's own suite (bookworm); 5.10 (bullseye) and 7.2
(sid) through a sources list of the project's own, in the cache, naming
that suite on the archive the machine's apt already uses (read from its
sources: no host is written in this code), passed to apt with
``-o Dir::Etc::sourcelist=... -o Dir::Etc::sourceparts=- -o
Dir::State::Lists=...``.
Each kernel package is pinned to one version (:data:`KERNELS`)
and its file checked against the SHA256 apt's own metadata gives for that
version (``apt-cache show PKG=VERSION``) every time it is used, cached or
not; it is unpacked into a fresh temporary folder and renamed into place,
so two runs at once never see a half-unpacked kernel.
The guest helpers (BPF program loading through the ``bpf`` syscall,
``memfd_secret``) are C sources in ``dmfrag/guest`` built statically with
the host's gcc.

The workloads' shell steps are declared in :mod:`dmfrag.registry`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .registry import VFREE_MODULE, UnknownWorkload, guest_names, guest_steps, modules_for

__all__ = [
    "DEFAULT_KERNEL",
    "KERNELS",
    "KERNEL_PACKAGE",
    "KERNEL_PACKAGE_VERSION",
    "WORKLOAD_STEPS",
    "InitHooks",
    "KernelPackage",
    "RealKernel",
    "RealKernelError",
    "RealRun",
    "build_with_gcc",
    "cache_dir",
]



@dataclass(frozen=True)
class KernelPackage:
    """One Debian kernel build: its package pinned to an exact version."""

    #: the name of its record in guestkernel.versions ("5.10", "6.1", "7.2")
    name: str
    package: str
    #: the package's exact Debian version: the one the model was checked on
    version: str
    #: the Debian suite it comes from; None: the machine's own apt sources
    suite: str | None
    #: ``uname -r``
    release: str
    #: the kernel image inside the package
    vmlinuz: str
    #: where its modules are inside the package that holds them
    modules: str | None
    #: (package, version) holding the modules when not the image's own
    #: (7.2: linux-modules-..., compressed .ko.xz)
    modules_package: tuple[str, str] | None = None
    #: (package, version, path of vmlinux in it): the debug symbols drgn
    #: reads a dump with (Debian's ``-dbg`` package of the same build)
    debug_package: tuple[str, str, str] | None = None
    #: (package, version) pairs to build modules for this kernel with:
    #: Debian's linux-headers (the flavour's and the common part) and
    #: linux-kbuild (fixdep, modpost, objtool), unpacked into the cache
    headers: tuple[tuple[str, str], ...] = ()
    #: (package, version) of the suite's libc6, for kbuild tools built
    #: against a newer glibc than the machine's (sid's need 2.38): they run
    #: through that libc's loader, fetched only when needed
    build_libc: tuple[str, str] | None = None
    #: make variables a module build sets beside ``CC=gcc``: the host's gcc
    #: stands in for the one Debian built with (gcc-10 for 5.10, gcc-16 for
    #: 7.2), so options it lacks are turned off
    make_overrides: tuple[str, ...] = ()


KERNELS: dict[str, KernelPackage] = {
    "5.10": KernelPackage("5.10", "linux-image-5.10.0-32-amd64", "5.10.223-1", "bullseye",
                          "5.10.0-32-amd64", "boot/vmlinuz-5.10.0-32-amd64",
                          "lib/modules/5.10.0-32-amd64/kernel",
                          debug_package=("linux-image-5.10.0-32-amd64-dbg", "5.10.223-1",
                                         "usr/lib/debug/boot/vmlinux-5.10.0-32-amd64"),
                          headers=(("linux-headers-5.10.0-32-amd64", "5.10.223-1"),
                                   ("linux-headers-5.10.0-32-common", "5.10.223-1"),
                                   ("linux-kbuild-5.10", "5.10.223-1"))),
    "6.1": KernelPackage("6.1", "linux-image-6.1.0-56-amd64", "6.1.192-2", None,
                         "6.1.0-56-amd64", "boot/vmlinuz-6.1.0-56-amd64",
                         "lib/modules/6.1.0-56-amd64/kernel",
                         debug_package=("linux-image-6.1.0-56-amd64-dbg", "6.1.192-2",
                                        "usr/lib/debug/boot/vmlinux-6.1.0-56-amd64"),
                         # the headers depend on linux-kbuild-6.1 >= 6.1.192-2; the
                         # archive keeps only the newest (-3)
                         headers=(("linux-headers-6.1.0-56-amd64", "6.1.192-2"),
                                  ("linux-headers-6.1.0-56-common", "6.1.192-2"),
                                  ("linux-kbuild-6.1", "6.1.192-3"))),
    # 7.2's image package holds only the kernel; its modules are in
    # linux-modules-7.2.13+deb14-amd64 (compressed .ko.xz), fetched the same way.
    "7.2": KernelPackage("7.2", "linux-binary-7.2.13+deb14-amd64", "7.2.13-1", "sid",
                         "7.2.13+deb14-amd64", "usr/lib/modules/7.2.13+deb14-amd64/vmlinuz",
                         "usr/lib/modules/7.2.13+deb14-amd64/kernel",
                         ("linux-modules-7.2.13+deb14-amd64", "7.2.13-1"),
                         ("linux-image-7.2.13+deb14-amd64-dbg", "7.2.13-1",
                          "usr/lib/debug/lib/modules/7.2.13+deb14-amd64/vmlinux"),
                         headers=(("linux-headers-7.2.13+deb14-amd64", "7.2.13-1"),
                                  ("linux-headers-7.2.13+deb14-common", "7.2.13-1"),
                                  ("linux-kbuild-7.2.13+deb14", "7.2.13-1")),
                         build_libc=("libc6", "2.43-7"),
                         # gcc-12 has no -fmin-function-alignment (gcc 14): kbuild
                         # falls back to -falign-functions, as for older compilers
                         make_overrides=("CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=",)),
}
DEFAULT_KERNEL = "6.1"
# The 6.1 package's names, as earlier releases of this module exported them.
KERNEL_PACKAGE = KERNELS["6.1"].package
KERNEL_PACKAGE_VERSION = KERNELS["6.1"].version
KERNEL_VERSION = KERNELS["6.1"].release
#: written into the unpacked folder: which package file it came from
_STAMP = ".dmfrag-package"
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
         "cpio": "cpio", "gcc": "gcc", "make": "make", "apt-get": "apt", "dpkg-deb": "dpkg"}
HELPERS = ("bpf_load", "secretmem", "age", "dumpwait")
#: guest kernel modules of the project's own, built per kernel
#: (:meth:`RealKernel.helper_module`)
MODULE_HELPERS = (VFREE_MODULE,)
_GUEST_SRC = Path(__file__).resolve().parent / "guest"


@dataclass(frozen=True)
class InitHooks:
    """What a run adds to the guest's init and to QEMU (all empty: the init
    script is byte for byte the plain one)."""

    #: shell lines run at the start of each ``snap`` and at its end
    snap_pre: str = ""
    snap_post: str = ""
    #: shell lines run right after the boot snapshot
    after_boot: str = ""
    #: name -> host file, copied to the guest's /bin
    binaries: dict[str, Path] = field(default_factory=dict)
    #: added to QEMU's command line
    qemu_args: tuple[str, ...] = ()


def _hook(lines: str) -> str:
    return "".join(f"\n{line}" for line in lines.splitlines() if line.strip())


class RealKernelError(RuntimeError):
    """The real-kernel harness cannot run: says what is missing or what failed."""


def cache_dir() -> Path:
    base = os.environ.get("DMFRAG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dmfrag")
    return Path(base)


@dataclass
class RealRun:
    ram: str
    workload: tuple[str, ...]
    #: the kernel that ran (a key of KERNELS)
    kernel: str = DEFAULT_KERNEL
    snapshots: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    boot_log: str = ""
    trace: str = ""
    console: str = ""
    symbols: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: ``run(truth=True)``: the kernel's state at each snapshot point
    #: (dmfrag.truth.KernelState) and each dump's timings
    states: list = field(default_factory=list)
    dumps: list[dict] = field(default_factory=list)

    def meminfo(self, point: str) -> dict[str, int]:
        return self.snapshots[point]["meminfo"]

    def vmstat(self, point: str) -> dict[str, int]:
        return self.snapshots[point]["vmstat"]

    def e820_lines(self) -> str:
        return "\n".join(line for line in self.boot_log.splitlines() if "e820" in line)


#: name -> the guest's shell lines, derived from :data:`dmfrag.registry.REGISTRY`
#: (the one list of workloads); kept for importers of this name. Each step
#: ends with a snapshot named after it; "boot" is always first.
WORKLOAD_STEPS: dict[str, list[str]] = {name: list(guest_steps(name)) for name in guest_names()}

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Kernel messages stay in the ring buffer (dumped at the end) instead of
# landing on the console in the middle of a snapshot or of that dump.
dmesg -n 1
snap() {{{snap_pre}
  # a run taking memory dumps (dmfrag.truth) holds still here for the host
  [ -n "$DMFRAG_DUMP" ] && /bin/dumpwait "$1"
  # a recording run (dmfrag.recorder) marks the point in the trace first
  [ -w /sys/kernel/tracing/trace_marker ] && echo "dmfrag_snap $1" > /sys/kernel/tracing/trace_marker
  echo "@@SNAP $1"
  cat /proc/meminfo
  echo "@@VMSTAT"
  cat /proc/vmstat
  echo "@@END"{snap_post}
}}
{prologue}
snap boot{after_boot}
{steps}
{epilogue}
echo "@@DMESG"
dmesg
echo "@@END"
echo "@@DONE"
poweroff -f
"""


def _machine_archive() -> str:
    """The Debian archive URI the machine's own apt sources use (the first
    source with the ``main`` component that is not a security archive)."""
    entries: list[tuple[str, str, str]] = []      # (uri, suites, components)
    d = Path("/etc/apt/sources.list.d")
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        for block in _read(f).split("\n\n") if _read(f) else []:
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.MULTILINE))
            if fields.get("Enabled", "yes").lower() != "no" and "URIs" in fields:
                entries.append((fields["URIs"].split()[0], fields.get("Suites", ""),
                                fields.get("Components", "")))
    for f in [Path("/etc/apt/sources.list"), *(sorted(d.glob("*.list")) if d.is_dir() else [])]:
        for line in (_read(f) or "").splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line.strip())
            if m:
                entries.append((m.group(1), m.group(2), m.group(3)))
    for uri, suites, components in entries:
        if "main" in components.split() and "security" not in suites and "debian" in uri:
            return uri
    raise RealKernelError("found no Debian archive with 'main' in the machine's apt sources "
                          "(/etc/apt/sources.list, /etc/apt/sources.list.d): cannot fetch "
                          "kernels of other suites")


class RealKernel:
    def __init__(self, cache: Path | None = None, *, install: bool = False,
                 kernel: str = DEFAULT_KERNEL):
        self.cache = Path(cache) if cache else cache_dir()
        self.install = install
        try:
            self.spec = KERNELS[kernel]
        except KeyError:
            raise RealKernelError(f"no real kernel {kernel!r}; known: "
                                  f"{', '.join(KERNELS)}") from None

    # -- apt -------------------------------------------------------------------

    def _apt(self, *args: str) -> list[str]:
        """An apt command line for this kernel's suite: the machine's own
        sources, or a sources list of the cache's naming the suite."""
        cmd, rest = args[0], list(args[1:])
        suite = self.spec.suite
        if suite is None:
            return [cmd, *rest]
        base = self.cache / f"apt-{suite}"
        (base / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        src = base / "sources.list"
        if not src.exists():
            keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
            signed = f"[signed-by={keyring}] " if keyring.exists() else ""
            src.write_text(f"deb {signed}{_machine_archive()} {suite} main\n")
        return [cmd, "-o", f"Dir::Etc::sourcelist={src}", "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State::Lists={base / 'lists'}", *rest]

    # -- set-up -------------------------------------------------------------

    def check_tools(self) -> None:
        missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
        if missing and self.install and os.geteuid() == 0:
            pkgs = sorted(set(missing.values()))
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
            r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
                               capture_output=True, text=True,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)
            if r.returncode:
                raise RealKernelError(f"apt-get install {' '.join(pkgs)} failed:\n{r.stderr[-2000:]}")
            missing = {t: p for t, p in TOOLS.items() if shutil.which(t) is None}
        if missing:
            pkgs = " ".join(sorted(set(missing.values())))
            raise RealKernelError(
                f"missing {', '.join(sorted(missing))}: install them with "
                f"`apt-get install {pkgs}` (or pass install=True / --install as root)")
        busybox = shutil.which("busybox")
        out = subprocess.run(["file", "-L", busybox], capture_output=True, text=True,
                             check=False).stdout if shutil.which("file") else "statically linked"
        if "dynamically linked" in out:
            raise RealKernelError("busybox is dynamically linked: install busybox-static")

    def kernel_dir(self) -> Path:
        """The unpacked kernel package (downloaded once into the cache,
        its hash checked against apt's metadata, unpacked atomically)."""
        return self._package_dir(self.spec.package, self.spec.version, self.spec.vmlinuz)

    def modules_dir(self) -> Path:
        """The unpacked package holding the kernel's modules (the image's
        own, or ``modules_package``, fetched and checked the same way)."""
        if self.spec.modules_package is None:
            return self.kernel_dir()
        pkg, version = self.spec.modules_package
        return self._package_dir(pkg, version, self.spec.modules)

    def debug_vmlinux(self) -> Path:
        """The kernel's vmlinux with debug symbols (for drgn): only that
        file of the pinned ``-dbg`` package (some 800 MB to 1.2 GB, its
        SHA256 checked like the kernel's), unpacked once into the cache.
        The package file is deleted once its vmlinux is out."""
        if self.spec.debug_package is None:
            raise RealKernelError(f"no debug package is known for kernel {self.spec.name}")
        package, version, member = self.spec.debug_package
        name = Path(member).name

        def extract(deb: Path, tmp: Path) -> None:
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) as dpkg:
                r = subprocess.run(["tar", "-x", "-C", str(tmp), f"./{member}"],
                                   stdin=dpkg.stdout, capture_output=True, text=True,
                                   check=False)
                dpkg.stdout.close()
                dpkg.wait()
            if r.returncode or dpkg.returncode or not (tmp / member).is_file():
                raise RealKernelError(f"cannot take {member} out of {deb.name}: "
                                      f"{r.stderr.strip()[-500:]}")
            os.replace(tmp / member, tmp / name)
            shutil.rmtree(tmp / member.split("/")[0], ignore_errors=True)
            deb.unlink(missing_ok=True)      # only the vmlinux is kept
        return self._package_dir(package, version, name, extract) / name

    def _package_dir(self, package: str, version: str, marker: str,
                     extract: Callable[[Path, Path], None] | None = None) -> Path:
        """The pinned package unpacked into the cache (once: the folder's
        stamp names the package file's SHA256), atomically: into a fresh
        temporary folder, then renamed into place. ``extract(deb, tmp)``
        unpacks only part of it (default: all of it, ``dpkg-deb -x``)."""
        root = self.cache / package
        self.cache.mkdir(parents=True, exist_ok=True)
        sha = self._expected_sha256(package, version)
        stamp = f"{package}={version} sha256:{sha}"
        if (root / marker).exists() and _read(root / _STAMP) == stamp:
            return root
        deb = self._verified_deb(package, version, sha)
        tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=self.cache))
        try:
            if extract is not None:
                extract(deb, tmp)
            else:
                _dpkg_x(deb, tmp)
            (tmp / _STAMP).write_text(stamp)
            if root.exists():             # an older or unchecked unpack: move it aside first
                old = Path(tempfile.mkdtemp(prefix=f".{package}.old.", dir=self.cache))
                try:
                    os.replace(root, old / "k")
                except OSError:
                    pass                  # another run moved it first
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, root)
            except OSError:
                # another run put its unpack in place between the two renames
                if not ((root / marker).exists() and _read(root / _STAMP) == stamp):
                    raise RealKernelError(f"cannot put the unpacked package at {root}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return root

    def _expected_sha256(self, package: str | None = None, version: str | None = None) -> str:
        """The SHA256 apt's metadata gives for the pinned package version."""
        spec = f"{package or self.spec.package}={version or self.spec.version}"
        r = subprocess.run(self._apt("apt-cache", "show", spec), capture_output=True, text=True,
                           check=False)
        if r.returncode or "SHA256:" not in r.stdout:
            subprocess.run(self._apt("apt-get", "update", "-qq"), capture_output=True,
                           check=False)
            r = subprocess.run(self._apt("apt-cache", "show", spec), capture_output=True,
                               text=True, check=False)
        m = re.search(r"^SHA256:\s*([0-9a-f]{64})\s*$", r.stdout, re.MULTILINE)
        if r.returncode or m is None:
            raise RealKernelError(f"apt knows no {spec} with a SHA256 (apt-cache show: "
                                  f"{(r.stderr or r.stdout).strip()[-300:] or 'nothing'}); the "
                                  f"package cannot be checked, so it is not used")
        return m.group(1)

    def _verified_deb(self, package: str, version: str, sha: str) -> Path:
        """The pinned package file in the cache, its SHA256 checked; fetched
        with ``apt-get download PKG=VERSION`` when absent or wrong."""
        deb = self.cache / f"{package}_{version}_amd64.deb"
        if deb.exists() and _sha256(deb) == sha:
            return deb
        spec = f"{package}={version}"
        tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=self.cache))
        try:
            r = subprocess.run(self._apt("apt-get", "download", spec), cwd=tmp,
                               capture_output=True, text=True, check=False)
            if r.returncode:
                subprocess.run(self._apt("apt-get", "update", "-qq"), capture_output=True,
                               check=False)
                r = subprocess.run(self._apt("apt-get", "download", spec), cwd=tmp,
                                   capture_output=True, text=True, check=False)
            got = list(tmp.glob("*.deb"))
            if r.returncode or len(got) != 1:
                raise RealKernelError(f"apt-get download {spec} failed: "
                                      f"{r.stderr.strip()[-500:]}")
            digest = _sha256(got[0])
            if digest != sha:
                raise RealKernelError(f"apt-get download {spec}: SHA256 {digest} is not the "
                                      f"{sha} apt's metadata gives; not used")
            os.replace(got[0], deb)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return deb

    def helpers(self) -> dict[str, Path]:
        """Static guest helpers, built once per source: the binary's name
        carries the source's hash, so checkouts with different sources
        sharing one cache never run each other's helper."""
        return {name: build_with_gcc(_GUEST_SRC / f"{name}.c", self.cache / "helpers", name,
                                     ["-static", "-O2"])
                for name in HELPERS}

    def module_build_dir(self) -> Path:
        """The kernel's module build tree (``make -C`` it with ``M=``):
        the pinned linux-headers and linux-kbuild packages, each checked
        against apt's SHA256, unpacked together into the cache once. The
        flavour's Makefile names the common part by its absolute path under
        /usr/src: it is pointed at the unpacked copy instead. kbuild tools
        linked against a newer glibc than the machine's run through the
        suite's own libc6 loader (``build_libc``), each behind a small
        shell wrapper in its place."""
        if not self.spec.headers:
            raise RealKernelError(f"no headers packages are known for kernel {self.spec.name}")
        shas = [(p, v, self._expected_sha256(p, v)) for p, v in self.spec.headers]
        stamp = " ".join(f"{p}={v} sha256:{sha}" for p, v, sha in shas)
        root = self.cache / f"kbuild-{self.spec.release}"
        build = root / "usr" / "src" / f"linux-headers-{self.spec.release}"
        if (build / "Makefile").exists() and _read(root / _STAMP) == stamp:
            return build
        tmp = Path(tempfile.mkdtemp(prefix=f".kbuild-{self.spec.release}.", dir=self.cache))
        try:
            for p, v, sha in shas:
                _dpkg_x(self._verified_deb(p, v, sha), tmp)
            mk = tmp / build.relative_to(root) / "Makefile"
            if not mk.exists():
                raise RealKernelError(f"{self.spec.headers[0][0]} has no {mk.relative_to(tmp)}")
            # the final path, not tmp's: the tree is renamed into place below
            mk.write_text(re.sub(r"(?m)(^include |^KBUILD_OUTPUT=)/usr/src/",
                                 rf"\g<1>{root}/usr/src/", mk.read_text()))
            self._wrap_new_glibc_tools(tmp, root)
            (tmp / _STAMP).write_text(stamp)
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return build

    def _wrap_new_glibc_tools(self, tmp: Path, root: Path) -> None:
        """Put a wrapper in place of each kbuild executable that needs a
        newer glibc than the machine's: it runs the binary with the suite's
        libc6 (``build_libc``, unpacked beside the tree)."""
        from elftools.elf.elffile import ELFFile
        from elftools.elf.gnuversions import GNUVerNeedSection

        def version(text: str) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", text))
        host = version(os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0")
        needy = []
        for exe in sorted((tmp / "usr" / "lib").glob("linux-kbuild-*/**/*")):
            if not exe.is_file() or exe.is_symlink() or not os.access(exe, os.X_OK):
                continue
            with open(exe, "rb") as fh:
                if fh.read(4) != b"\x7fELF":
                    continue
                fh.seek(0)
                need = max((version(aux.name) for sec in ELFFile(fh).iter_sections()
                            if isinstance(sec, GNUVerNeedSection)
                            for _, auxes in sec.iter_versions() for aux in auxes
                            if aux.name.startswith("GLIBC_")), default=())
            if need > host:
                needy.append(exe)
        if not needy:
            return
        if self.spec.build_libc is None:
            raise RealKernelError(f"kbuild tools of {self.spec.name} need a newer glibc than "
                                  f"the machine's ({', '.join(e.name for e in needy)}) and no "
                                  f"build_libc is known")
        pkg, ver = self.spec.build_libc
        _dpkg_x(self._verified_deb(pkg, ver, self._expected_sha256(pkg, ver)), tmp / "libc")
        lib = root / "libc" / "usr" / "lib" / "x86_64-linux-gnu"
        for exe in needy:
            real = exe.with_name(exe.name + ".bin")
            os.replace(exe, real)
            exe.write_text(f'#!/bin/sh\nexec {lib}/ld-linux-x86-64.so.2 --library-path '
                           f'{lib}:/usr/lib/x86_64-linux-gnu {root / real.relative_to(tmp)} '
                           f'"$@"\n')
            exe.chmod(0o755)

    def helper_module(self, name: str) -> Path:
        """A guest kernel module of the project's (``dmfrag/guest/NAME.c``)
        built for this kernel with the host's gcc in :meth:`module_build_dir`;
        the file's name carries the source's hash, as the helpers' do."""
        if name not in MODULE_HELPERS:
            raise RealKernelError(f"no guest module {name!r}; known: {', '.join(MODULE_HELPERS)}")
        src = _GUEST_SRC / f"{name}.c"
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        out = self.cache / "modules" / self.spec.release / f"{name}-{digest}.ko"
        if out.exists():
            return out
        build = self.module_build_dir()
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.cache))
        try:
            shutil.copy(src, work / src.name)
            (work / "Makefile").write_text(f"obj-m := {name}.o\n")
            r = subprocess.run(["make", "-C", str(build), f"M={work}", "CC=gcc",
                                # no pahole here: no BTF for the module
                                "CONFIG_DEBUG_INFO_BTF_MODULES=", *self.spec.make_overrides,
                                "modules"], capture_output=True, text=True, check=False)
            if r.returncode or not (work / f"{name}.ko").exists():
                raise RealKernelError(f"building guest module {name} for {self.spec.name} "
                                      f"failed:\n{(r.stderr or r.stdout)[-3000:]}")
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(work / f"{name}.ko", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return out

    def module_path(self, name: str) -> Path:
        """A module file of the kernel's package (a ``.ko.xz`` is
        decompressed once into the cache: the model reads its sections, the
        guest's busybox insmod takes plain files)."""
        if self.spec.modules is None:
            raise RealKernelError(f"the {self.spec.name} kernel's package lists no modules")
        root = self.modules_dir() / self.spec.modules
        found = list(root.rglob(f"{name}.ko"))
        if found:
            return found[0]
        packed = list(root.rglob(f"{name}.ko.xz"))
        if not packed:
            raise RealKernelError(f"module {name}.ko is not in the {self.spec.name} kernel's "
                                  f"package")
        import lzma
        out = self.cache / "modules" / self.spec.release / f"{name}.ko"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            tmp.write_bytes(lzma.decompress(packed[0].read_bytes()))
            os.replace(tmp, out)
        return out

    # -- initramfs ----------------------------------------------------------

    def build_initramfs(self, workload: tuple[str, ...], dest: Path, *,
                        prologue: str = "", epilogue: str = "",
                        hooks: InitHooks | None = None) -> Path:
        """A gzip'd newc cpio: busybox, the helpers, module files, /init
        (``prologue`` runs before the boot snapshot, ``epilogue`` after the
        last step: a recording run's tracing set-up and read-out)."""
        try:
            steps = "\n".join(line for w in workload for line in guest_steps(w))
        except UnknownWorkload as exc:
            raise RealKernelError(str(exc)) from None
        root = dest.with_suffix(".d")
        shutil.rmtree(root, ignore_errors=True)
        for d in ("bin", "proc", "sys", "dev", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(shutil.which("busybox"), root / "bin" / "busybox")
        for name, exe in self.helpers().items():
            shutil.copy(exe, root / "bin" / name)
        if "ptwalk" in workload:
            shutil.copy(os.environ["DMFRAG_PTWALK_KO"], root / "lib" / "modules" / "ptwalk.ko")
        if any(w.startswith("vfree-reset") for w in workload):
            shutil.copy(self.helper_module(VFREE_MODULE),
                        root / "lib" / "modules" / f"{VFREE_MODULE}.ko")
        if any(w == "modules" or w.startswith("module-churn") for w in workload):
            (root / "lib" / "modules" / "wl").mkdir()
            for m in modules_for(self.spec.name):
                shutil.copy(self.module_path(m), root / "lib" / "modules" / "wl" / f"{m}.ko")
        init = root / "init"
        h = hooks or InitHooks()
        for name, exe in h.binaries.items():
            shutil.copy(exe, root / "bin" / name)
        init.write_text(_INIT.format(steps=steps, prologue=prologue, epilogue=epilogue,
                                     snap_pre=_hook(h.snap_pre), snap_post=_hook(h.snap_post),
                                     after_boot=_hook(h.after_boot)))
        init.chmod(init.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        r = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                           input="\n".join(files).encode(), capture_output=True, check=False)
        if r.returncode:
            raise RealKernelError(f"cpio failed: {r.stderr.decode()[-500:]}")
        dest.write_bytes(gzip.compress(r.stdout, compresslevel=1))
        shutil.rmtree(root, ignore_errors=True)
        return dest

    # -- boot ---------------------------------------------------------------

    def run(self, ram: str = "8G", workload: tuple[str, ...] | list[str] = (),
            append: str = "", timeout: float = 180.0, *, prologue: str = "",
            epilogue: str = "", serial_file: Path | None = None,
            on_pause: Callable[[Callable[[str], str], str], None] | None = None,
            truth: bool = False, hooks: InitHooks | None = None,
            trace_start: bool = False) -> RealRun:
        """Boot with ``-m RAM``, run the workload, return the snapshots.
        ``serial_file``: the guest's second serial port (ttyS1) is written to
        that file (a recording run sends its trace there, not to the console).
        ``on_pause``: when the guest prints a line starting ``@@PAUSE``, the
        machine is stopped (QEMU's monitor), ``on_pause(hmp, console)`` runs
        with a function sending one HMP command (``gva2gpa ADDR``,
        ``dump-guest-memory FILE`` ...) and the console so far (its last line
        the pause line), and the machine goes on.
        ``truth``: dump the guest at each snapshot point and read its whole
        state (:mod:`dmfrag.truth`; drgn and the kernel's debug vmlinux,
        fetched once): the run's ``states``.
        ``trace_start`` (with ``truth``): also dump the guest when its
        first page event is traced (:class:`dmfrag.truth.TraceStartCapture`;
        a run whose command line enables the kmem events): its state comes
        first in ``states``, point ``trace-start``.
        ``hooks``: lines the guest's init runs around each snapshot and
        after the boot one, binaries put in its /bin and arguments added to
        QEMU's command line (an access capture's plugin and markers:
        :mod:`dmfrag.capture`)."""
        workload = tuple(workload)
        self.check_tools()
        states: list = []
        dumps: list[dict] = []
        early = None
        gdb_sock = self.cache / "runs" / f"gdb-{os.getpid()}-{time.monotonic_ns()}.sock"
        if trace_start and not truth:
            raise RealKernelError("trace_start dumps the guest: it needs truth=True")
        if truth:
            from .truth import TraceStartCapture, capture_on_pause, check_drgn
            check_drgn()
            (self.cache / "runs").mkdir(parents=True, exist_ok=True)
            if trace_start:
                early = TraceStartCapture(self.cache / "runs", self.debug_vmlinux(), gdb_sock)
            capture = capture_on_pause(self.cache / "runs", self.debug_vmlinux(), states, dumps,
                                       early=early)
            prologue = f"{prologue}\nDMFRAG_DUMP=1"
            user_pause = on_pause

            def on_pause(hmp, console):
                if not capture(hmp, console) and user_pause is not None:
                    user_pause(hmp, console)
        kdir = self.kernel_dir()
        work = self.cache / "runs"
        work.mkdir(parents=True, exist_ok=True)
        initrd = self.build_initramfs(workload, work / f"initrd-{os.getpid()}-{'-'.join(workload) or 'boot'}.gz",
                                      prologue=prologue, epilogue=epilogue, hooks=hooks)
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", ram,
               *_unreserved_ram(ram), "-smp", "1", "-nographic", "-no-reboot", "-kernel", str(kdir / self.spec.vmlinuz),
               "-initrd", str(initrd), "-append",
               f"console=ttyS0 nokaslr secretmem.enable=1 panic=-1 {append}".strip(),
               *(hooks.qemu_args if hooks is not None else ()),
               *(["-S", "-gdb", f"unix:{gdb_sock},server=on,wait=off"] if early else [])]
        sock = work / f"monitor-{os.getpid()}-{time.monotonic_ns()}.sock"
        if serial_file is not None or on_pause is not None:
            monitor = f"unix:{sock},server=on,wait=off" if on_pause else "none"
            cmd[cmd.index("-nographic")] = "-display"
            cmd[cmd.index("-no-reboot"):cmd.index("-no-reboot")] = [
                "none", "-monitor", monitor, "-serial", "stdio",
                *(["-serial", f"file:{serial_file}"] if serial_file is not None else [])]
        t0 = time.monotonic()
        try:
            if on_pause is None:
                r = subprocess.run(cmd, capture_output=True, timeout=timeout,
                                   stdin=subprocess.DEVNULL, check=False)
            else:
                r = _run_pausing(cmd, timeout, sock, on_pause,
                                 early.on_start if early is not None else None)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace")
            raise RealKernelError(f"the guest did not finish within {timeout:.0f} s (killed); "
                                  f"last output:\n{out[-1500:]}") from None
        finally:
            initrd.unlink(missing_ok=True)
            sock.unlink(missing_ok=True)
            gdb_sock.unlink(missing_ok=True)
            if early is not None:
                early.discard()          # a dump no later note came to read
        out = r.stdout.decode(errors="replace")
        if "@@DONE" not in out:
            err = r.stderr.decode(errors="replace").strip()
            raise RealKernelError(f"the guest stopped before its workload finished "
                                  f"(qemu exit {r.returncode})"
                                  + (f"; qemu said: {err[-1500:]}" if err else "")
                                  + (f"; last output:\n{out[-2000:]}" if out.strip() else ""))
        run = RealRun(ram, workload, kernel=self.spec.name, seconds=time.monotonic() - t0,
                      console=out, states=states, dumps=dumps)
        _parse(out, run)
        return run


class _Hmp:
    """One HMP session on QEMU's monitor socket: ``hmp(command)`` sends a
    command line and returns what the monitor printed for it."""

    def __init__(self, sock: Path, timeout: float) -> None:
        import socket
        self.mon = socket.socket(socket.AF_UNIX)
        self.mon.settimeout(max(1.0, timeout))
        self.mon.connect(str(sock))
        self.buf = b""
        self._prompt()

    def _prompt(self) -> str:
        while b"(qemu) " not in self.buf:
            chunk = self.mon.recv(65536)
            if not chunk:
                raise RealKernelError("QEMU's monitor closed")
            self.buf += chunk
        text, _, self.buf = self.buf.partition(b"(qemu) ")
        return text.decode(errors="replace")

    def __call__(self, command: str) -> str:
        self.mon.sendall(command.encode() + b"\n")
        out = self._prompt()
        # HMP echoes the command line first
        return out.split("\n", 1)[1] if "\n" in out else out

    def close(self) -> None:
        self.mon.close()


def _run_pausing(cmd: list[str], timeout: float, sock: Path,
                 on_pause: Callable[[Callable[[str], str], str], None] | None,
                 on_start: Callable[[Callable[[], _Hmp], float], None] | None = None
                 ) -> subprocess.CompletedProcess:
    """Run QEMU reading its console as it comes; at each ``@@PAUSE`` line
    stop the machine through the monitor socket, call ``on_pause``, go on.
    ``on_start(open_hmp, deadline)`` runs in a thread beside the console
    from the moment QEMU starts (a machine started with ``-S`` waits for
    it); when it fails, QEMU is stopped and its error raised."""
    import threading
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    lines: list[bytes] = []
    err: list[bytes] = []
    t_err = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    t_err.start()
    deadline = time.monotonic() + timeout
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    monitor_lock = threading.Lock()
    start_error: list[BaseException] = []
    t_start = None
    if on_start is not None:
        def open_hmp() -> _Hmp:
            return _Hmp(sock, deadline - time.monotonic())

        def starter() -> None:
            try:
                with monitor_lock:
                    on_start(open_hmp, deadline)
            except BaseException as exc:   # noqa: BLE001 - raised again in the caller's thread
                start_error.append(exc)
                proc.kill()
        t_start = threading.Thread(target=starter, daemon=True)
        t_start.start()
    try:
        for raw in iter(proc.stdout.readline, b""):
            lines.append(raw)
            if raw.startswith(b"@@PAUSE") and on_pause is not None:
                with monitor_lock:
                    hmp = _Hmp(sock, deadline - time.monotonic())
                    try:
                        hmp("stop")
                        try:
                            on_pause(hmp, b"".join(lines).decode(errors="replace"))
                        finally:
                            hmp("cont")
                    finally:
                        hmp.close()
        proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if t_start is not None:
        t_start.join(max(1.0, deadline - time.monotonic()))
        if start_error:
            raise start_error[0]
    t_err.join(5)
    out = b"".join(lines)
    if time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(cmd, timeout, output=out)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, b"".join(err))


def build_with_gcc(src: Path, out_dir: Path, stem: str, args: list[str],
                   suffix: str = "") -> Path:
    """``src`` compiled with the host's gcc (``args``) once per source text
    into ``out_dir``: the file's name carries the source's hash, so
    checkouts with different sources sharing one cache never run each
    other's build; written aside and renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stem}-{hashlib.sha256(src.read_bytes()).hexdigest()[:16]}{suffix}"
    if out.exists():
        return out
    tmp = out_dir / f".{out.name}.{os.getpid()}"
    r = subprocess.run(["gcc", *args, "-o", str(tmp), str(src)], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        raise RealKernelError(f"building {src.name} failed:\n{r.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def _dpkg_x(deb: Path, dest: Path) -> None:
    """Unpack a package file into ``dest`` (``dpkg-deb -x``)."""
    r = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        raise RealKernelError(f"dpkg-deb -x {deb.name} failed: {r.stderr.strip()[-500:]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


_KV = re.compile(r"^(\w+):?\s+(\d+)")



def _unreserved_ram(ram: str) -> list[str]:
    """QEMU options for a guest larger than half this machine's memory: its
    RAM as a backend mapped without a reservation (``reserve=off``,
    MAP_NORESERVE), so that the host's overcommit heuristic does not refuse
    it (a 32G or 64G guest on a 24G machine: "cannot set up guest memory").
    A booting guest touches little of it (its memmap, deferred-init
    sections as they are used). Same guest layout; none for smaller guests."""
    from guestkernel.e820 import E820Error, parse_size
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        size = parse_size(ram)
    except (ValueError, OSError, E820Error):
        return []              # (a size QEMU cannot read: its own error says so)
    if size <= host // 2:
        return []
    return ["-object", f"memory-backend-ram,id=pc.ram,size={size},reserve=off",
            "-machine", "memory-backend=pc.ram"]


def _parse(out: str, run: RealRun) -> None:
    lines = out.replace("\r", "").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("@@SNAP "):
            name = line.split(None, 1)[1].strip()
            meminfo, vmstat, cur = {}, {}, None
            cur = meminfo
            i += 1
            while i < len(lines) and not lines[i].startswith("@@END"):
                if lines[i].startswith("@@VMSTAT"):
                    cur = vmstat
                elif m := _KV.match(lines[i]):
                    cur[m.group(1)] = int(m.group(2))
                i += 1
            run.snapshots[name] = {"meminfo": meminfo, "vmstat": vmstat}
        elif line.startswith(("@@SYMS", "@@TRACE", "@@DMESG")):
            i, body = _block(lines, i + 1)
            if line.startswith("@@SYMS"):
                for sym in body:
                    parts = sym.split()
                    if len(parts) >= 3:
                        run.symbols[parts[2]] = int(parts[0], 16)
            elif line.startswith("@@TRACE"):
                run.trace = "".join(b + "\n" for b in body)
            else:
                run.boot_log = "".join(b + "\n" for b in body)
        i += 1


def _block(lines: list[str], i: int) -> tuple[int, list[str]]:
    """The lines from ``i`` up to the next @@END; returns (index of @@END, lines)."""
    start = i
    while i < len(lines) and not lines[i].startswith("@@END"):
        i += 1
    return i, lines[start:i]
