"""wavefront's on-disk cache: where built kernels, AOTInductor packages and exported ONNX graphs
live, and how a C kernel is built once per machine and loaded.

Everything cached sits under cache_root() ($WAVEFRONT_CACHE_DIR, default ~/.cache/wavefront).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """The CPU's feature flags: builds use -march=native, so a cache shared between machines
    (a network home) must not hand one CPU's binary to another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_root() -> str:
    """wavefront's on-disk cache ($WAVEFRONT_CACHE_DIR, default ~/.cache/wavefront): built kernels,
    exported graphs."""
    return os.environ.get("WAVEFRONT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wavefront")


def build_library(name: str, source: str, flags: list[str], libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` into a shared library once per (source, flags, compiler) and load it;
    `libs` (e.g. "-lm") go after the source on the command line, as linkers expect."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(repr((source, flags, libs, version, platform.machine(), _cpu_signature())).encode()
                         ).hexdigest()[:16]
    os.makedirs(cache_root(), exist_ok=True)
    path = os.path.join(cache_root(), f"{name}-{key}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
            src = os.path.join(tmp, f"{name}.c")
            with open(src, "w") as f:
                f.write(source)
            out = os.path.join(tmp, f"{name}.so")
            res = subprocess.run([cc, *flags, src, "-o", out, *libs], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"compiling the {name} kernel failed: {res.stderr.strip()[:500]}")
            os.replace(out, path)  # atomic: concurrent builders never load a half-written file
    return ctypes.CDLL(path)


class KernelLibrary:
    """A C source built on first use (build_library) and loaded once per process; if it cannot
    be built, get() returns None and `error` says why (callers fall back or refuse)."""

    def __init__(self, name: str, source: str, flags: list[str], libs: tuple[str, ...] = (), declare=None):
        self.name, self.source, self.flags, self.libs, self.declare = name, source, flags, libs, declare
        self._lock = threading.Lock()
        self._tried, self._lib, self.error = False, None, ""

    def get(self) -> ctypes.CDLL | None:
        if self._tried:  # built (or failed) already: no lock on the per-call path
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    lib = build_library(self.name, self.source, self.flags, self.libs)
                    if self.declare is not None:
                        self.declare(lib)
                    self._lib = lib
                except Exception as e:  # no compiler, read-only cache, ...: fall back, say why
                    self.error = f"{type(e).__name__}: {e}"
                finally:
                    self._tried = True  # last: the unlocked fast path must see _lib already set
            return self._lib
