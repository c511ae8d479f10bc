"""wavefront's on-disk cache: where built kernels, AOTInductor packages and exported ONNX graphs
live, how an entry is checked before it is used, and how a C kernel is built once and loaded.

Layout (the root is $WAVEFRONT_CACHE_DIR, default ~/.cache/wavefront, created mode 0700):

    <root>/<name>-<key>.so          C kernels (build_library)
    <root>/aot_inductor/<key>.pt2   AOTInductor packages (backends.aot_cell)
    <root>/onnx/<key>.onnx          exported graphs (wavefront/routes/onnxruntime.py)

Beside each entry, `<entry>.meta.json` records its key, size and sha256 (and what the builder
keeps with it, e.g. an AOT package's shape guard), and `<entry>.lock` serialises its builders.
An entry is used only if it is a regular file owned by this user, not writable by group or
others, and has the size and sha256 recorded for its key. Anything else is never loaded: an
entry of ours is removed and built again with a CacheWarning; one owned by another user is left
as it is and the entry is built in a private temporary folder instead. Builders of one key, in
threads or processes, take turns on its lock; an entry appears by atomic rename, whole or not
at all. To clear the cache delete the folder, or call clear_cache().
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings

from wavefront.contract.version import __version__

try:
    import fcntl
except ImportError:  # not POSIX: builders in other processes may race (atomic renames keep entries whole)
    fcntl = None

META = ".meta.json"
KINDS = ("", "aot_inductor", "onnx")  # the root itself holds the C kernels


class CacheWarning(UserWarning):
    """A cache entry or folder could not be trusted; the message says which, why, and what was done."""


def cache_root() -> str:
    """wavefront's cache folder ($WAVEFRONT_CACHE_DIR, default ~/.cache/wavefront), created with
    mode 0700 when missing (a folder that cannot be created is reported by cache_dir).

    >>> os.path.isdir(cache_root())
    True
    """
    root = os.environ.get("WAVEFRONT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wavefront")
    _make_private_dir(root)
    return root


def cache_dir(kind: str = "") -> str:
    """The folder of one kind of entry ("" for the root's C kernels, "aot_inductor", "onnx").
    Not created here (a failed build leaves nothing behind); if it exists but cannot be trusted
    (another user's, or writable by others without the sticky bit) a private temporary folder is
    returned instead, with a CacheWarning.

    >>> cache_dir("onnx") == os.path.join(cache_root(), "onnx")
    True
    """
    path = os.path.join(cache_root(), kind) if kind else cache_root()
    problem = _dir_problem(path) if os.path.lexists(path) else _dir_problem(os.path.dirname(path) or ".")
    if problem:
        private = os.path.join(private_dir(), kind)
        _warn_once(f"wavefront cache: the folder {problem}: entries go to the private folder {private} "
                   "instead (removed at exit)")
        return private
    return path


_private: list[str] = []


def private_dir() -> str:
    """A folder only this process uses (mode 0700, removed at exit): where entries are built when
    the cache cannot be trusted."""
    if not _private:
        _private.append(tempfile.mkdtemp(prefix="wavefront-cache-"))
        atexit.register(shutil.rmtree, _private[0], True)
    return _private[0]


@dataclasses.dataclass
class Entry:
    """A verified cache file: `path` to load, what its builder recorded with it (`extra`), and
    whether this call built it (False: found in the cache)."""
    path: str
    extra: dict
    built: bool


def cached_entry(path: str, key: str, build) -> Entry:
    """The entry `path` for `key`: checked and returned if sound, else built by build(tmp) (which
    writes the file `tmp` and may return a JSON-able dict kept beside it) and stored atomically.
    Builders of one path in other threads or processes wait for the first and then use its entry.

    >>> def write(tmp):
    ...     with open(tmp, "w") as f:
    ...         f.write("hi")
    ...     return {"words": 1}
    >>> path = os.path.join(tempfile.mkdtemp(), "hello.txt")
    >>> cached_entry(path, "k1", write).built, cached_entry(path, "k1", write).extra
    (True, {'words': 1})
    """
    if os.path.dirname(path):
        _make_private_dir(os.path.dirname(path))
    with entry_lock(path):
        entry = load_entry(path, key)
        if entry is not None:
            return entry
        foreign = _foreign(path)
        if foreign:  # never loaded, never replaced: built where only this process looks
            if os.path.dirname(os.path.abspath(path)) == private_dir():
                raise RuntimeError(f"wavefront cache: {foreign}, in this process's private folder")
            _warn_once(f"wavefront cache: {foreign}: it is never loaded nor replaced; the entry is built in the "
                       f"private folder {private_dir()} instead")
            return cached_entry(os.path.join(private_dir(), os.path.basename(path)), key, build)
        return store_entry(path, key, build)


def load_entry(path: str, key: str) -> Entry | None:
    """The entry at `path` if it is sound for `key` (see the module docstring), else None: one of
    ours that is not is removed, with a CacheWarning naming the file and the reason.

    >>> load_entry("/nonexistent/x.onnx", "k") is None
    True
    """
    status, reason, meta = _inspect(path, key)
    if status == "ok":
        return Entry(path, meta.get("extra") or {}, built=False)
    if status == "bad":
        warnings.warn(f"wavefront cache: {path} {reason}: removed, it is built again", CacheWarning, stacklevel=2)
        for p in (path, path + META):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    return None


def store_entry(path: str, key: str, build) -> Entry:
    """Build the entry into a unique temporary file beside `path` (mode 0600), hash it, write its
    metadata, then rename it into place (call under entry_lock(path))."""
    folder, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + os.path.splitext(base)[1], dir=folder or ".")
    os.close(fd)
    try:
        extra = build(tmp) or {}
        st = os.lstat(tmp)  # the builder may have replaced the file (a compiler's -o): make it private again
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise RuntimeError(f"building {path} left no file (or an empty one) at {tmp}")
        os.chmod(tmp, stat.S_IMODE(st.st_mode) & 0o700)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            sha = _sha256(f)
        meta = {"key": key, "size": st.st_size, "sha256": sha, "wavefront": _version(), "extra": extra}
        _write_atomic(path + META, json.dumps(meta, sort_keys=True).encode())  # first: a crash leaves no file unrecorded
        os.replace(tmp, path)
        _fsync_dir(folder or ".")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    final = os.lstat(path)
    _verified[path] = (_signature(final), sha)
    return Entry(path, extra, built=True)


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def entry_lock(path: str):
    """Hold the build lock of `path`: a threading lock and flock on `<path>.lock` (ours only: a lock
    file of another user's is not waited on; atomic renames still keep entries whole)."""
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(os.path.abspath(path), threading.Lock())
    with lock:
        fd = None
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o600)
            if fd is not None and os.fstat(fd).st_uid != os.geteuid():
                os.close(fd)
                fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock


def clear_cache(root: str | None = None) -> list[str]:
    """Delete this user's entries (with their metadata, lock and leftover temporary files) from
    the cache folders under `root` (default cache_root()); returns the paths removed. Deleting
    the whole folder does the same.

    >>> root = tempfile.mkdtemp()
    >>> _ = cached_entry(os.path.join(root, "onnx", "k.onnx"), "k", lambda tmp: os.truncate(tmp, 1))
    >>> [os.path.relpath(p, root) for p in clear_cache(root)]
    ['onnx/k.onnx', 'onnx/k.onnx.lock', 'onnx/k.onnx.meta.json']
    """
    removed = []
    for kind in KINDS:
        folder = os.path.join(root or cache_root(), kind)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            ours = kind or name.endswith((".so", META, ".lock")) or ".tmp" in name
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if ours and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    os.remove(path)
                    removed.append(path)
        if kind:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    _verified.clear()
    return removed


# -- checks -------------------------------------------------------------------------------------

_verified: dict[str, tuple] = {}  # path -> (stat signature, sha256) hashed in this process


def _signature(st) -> tuple:
    # ctime too: a write followed by resetting mtime (os.utime) still changes it
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _file_problem(st) -> tuple[str, bool] | None:
    """(why a file with this lstat cannot be trusted, whether it is another user's) or None."""
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})", True
    if stat.S_ISDIR(st.st_mode):
        return "is a folder", True  # not ours to remove
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file", False
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {oct(stat.S_IMODE(st.st_mode))})", False
    return None


def _inspect(path: str, key: str) -> tuple[str, str, dict | None]:
    """("ok", "", metadata), ("missing", ...), ("bad", reason, None): ours, to rebuild, or
    ("foreign", reason, None): another user's, never touched."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing", "", None
    problem = _file_problem(st)
    if problem:
        return ("foreign" if problem[1] else "bad"), problem[0], None
    try:
        mst = os.lstat(path + META)
    except FileNotFoundError:
        return "bad", "has no metadata beside it (size and sha256)", None
    problem = _file_problem(mst)
    if problem:
        return ("foreign" if problem[1] else "bad"), f"has metadata that {problem[0]}", None
    try:
        with _open_nofollow(path + META) as f:
            meta = json.loads(f.read())
        recorded_key, size, sha = meta["key"], int(meta["size"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return "bad", f"has unreadable metadata ({type(e).__name__})", None
    if recorded_key != key:
        return "bad", f"was built for another key ({recorded_key}, not {key})", None
    if st.st_size != size:
        return "bad", f"is {st.st_size} bytes, its metadata records {size} (truncated or changed)", None
    if _verified.get(path) == (_signature(st), sha):
        return "ok", "", meta
    with _open_nofollow(path) as f:
        if _signature(os.fstat(f.fileno())) != _signature(st):
            return "bad", "changed while it was being checked", None
        if _sha256(f) != sha:
            return "bad", "does not match its recorded sha256 (corrupt or replaced)", None
    _verified[path] = (_signature(st), sha)
    return "ok", "", meta


def _foreign(path: str) -> str:
    """Why the entry at `path` belongs to someone else (its file or metadata), or ""."""
    for p in (path, path + META):
        with contextlib.suppress(FileNotFoundError):
            problem = _file_problem(os.lstat(p))
            if problem and problem[1]:
                return f"{p} {problem[0]}"
    return ""


def _dir_problem(path: str) -> str:
    """Why entries must not live in the folder `path` ("" if they may)."""
    try:
        st = os.stat(path)  # a symlinked cache folder is judged by its target
    except OSError as e:
        return f"{path} cannot be used ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_uid not in (os.geteuid(), 0):
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:  # others could swap our entries
        return f"{path} is writable by group or others without the sticky bit (mode {oct(stat.S_IMODE(st.st_mode))})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return ""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CacheWarning, stacklevel=3)


def _make_private_dir(path: str) -> None:
    if os.path.lexists(path):
        return
    with contextlib.suppress(OSError):  # read-only, not allowed, ...: cache_dir reports it
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # makedirs' mode goes through the umask


def _open_nofollow(path: str):
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC), "rb")


def _sha256(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _version() -> str:
    return __version__


# -- C kernels ----------------------------------------------------------------------------------

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


def build_library(name: str, source: str, flags: list[str], libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` into a shared library once per (source, flags, compiler, CPU), kept as
    the cache entry `<root>/<name>-<key>.so`, and load it; `libs` (e.g. "-lm") go after the
    source on the command line, as linkers expect.

    >>> lib = build_library("doc_add", "int add(int a, int b) { return a + b; }", ["-shared", "-fPIC"])
    >>> lib.add(2, 3)
    5
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(repr((source, flags, libs, version, platform.machine(), _cpu_signature())).encode()
                         ).hexdigest()[:16]

    def compile_to(out: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, f"{name}.c")
            with open(src, "w") as f:
                f.write(source)
            res = subprocess.run([cc, *flags, src, "-o", out, *libs], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"compiling the {name} kernel failed: {res.stderr.strip()[:500]}")

    entry = cached_entry(os.path.join(cache_dir(), f"{name}-{key}.so"), key, compile_to)
    return ctypes.CDLL(entry.path)


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
