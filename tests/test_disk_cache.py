"""The on-disk cache (backends.disk_cache): an entry is checked before use (owner, mode, size,
sha256, key), rebuilt with a warning when it is ours and unsound, never loaded when it is
another user's, and built once when threads or processes ask for it at the same time."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from wavefront.backends.disk_cache import (META, CacheWarning, build_library, cache_dir, cache_root, cached_entry,
                                           clear_cache)

ADD = "int f(int a, int b) { return a + b; }"
SUB = "int f(int a, int b) { return a - b; }"
EVIL = "int f(int a, int b) { return 666; }"
FLAGS = ["-O0", "-shared", "-fPIC"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(root))
    return root


def _kernel(cache, name="add"):
    (path,) = cache.glob(f"{name}-*.so")
    return path


class Writer:
    """A builder writing `text`, counting its builds."""

    def __init__(self, text="entry contents", pause=0.0):
        self.text, self.pause, self.builds = text, pause, 0

    def __call__(self, tmp):
        self.builds += 1
        time.sleep(self.pause)  # widens the window in which concurrent builders overlap
        with open(tmp, "w") as f:
            f.write(self.text)
        return {"note": self.text}


def test_the_cache_folder_is_created_private_and_entries_are_recorded(cache):
    assert not cache.exists()
    assert cache_root() == str(cache)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert build_library("add", ADD, FLAGS).f(2, 3) == 5
    so = _kernel(cache)
    assert stat.S_IMODE(os.stat(so).st_mode) & 0o077 == 0
    assert os.path.exists(str(so) + META)
    path = os.path.join(cache_dir("onnx"), "k.onnx")
    cached_entry(path, "k", Writer())
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_a_truncated_kernel_is_rebuilt_with_a_warning_in_the_next_process(cache):
    # in subprocesses: loading a truncated .so can kill the process with SIGBUS
    script = ("import warnings; warnings.simplefilter('always')\n"
              "from wavefront.backends.disk_cache import build_library\n"
              f"print(build_library('add', {ADD!r}, {FLAGS!r}).f(2, 3))\n")
    env = {**os.environ, "WAVEFRONT_CACHE_DIR": str(cache)}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and first.stdout.strip() == "5", first.stderr
    so = _kernel(cache)
    size = so.stat().st_size
    os.truncate(so, size // 2)
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, f"the process died ({second.returncode}): {second.stderr[-2000:]}"
    assert second.stdout.strip() == "5"
    assert "truncated or changed" in second.stderr and "built again" in second.stderr
    assert so.stat().st_size == size


def _flip_a_byte_keeping_size_and_mtime(path):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _write_garbage_metadata(path):
    with open(path + META, "w") as f:
        f.write("{not json")


def _replace_by_a_symlink(path):
    os.rename(path, path + ".moved")
    os.symlink(path + ".moved", path)


@pytest.mark.parametrize("damage, reason", [
    (lambda p: os.truncate(p, 3), "truncated or changed"),
    (_flip_a_byte_keeping_size_and_mtime, "does not match its recorded sha256"),
    (lambda p: os.remove(p + META), "has no metadata"),
    (_write_garbage_metadata, "unreadable metadata"),
    (_replace_by_a_symlink, "not a regular file"),
    (lambda p: os.chmod(p, 0o666), "writable by group or others"),
    (lambda p: os.chmod(p + META, 0o646), "metadata that is writable by group or others"),
])
def test_an_unsound_entry_of_ours_is_rebuilt_with_a_warning(cache, damage, reason):
    path = os.path.join(cache_dir("onnx"), "k.onnx")
    writer = Writer()
    cached_entry(path, "k", writer)
    damage(path)
    with pytest.warns(CacheWarning, match=reason):
        entry = cached_entry(path, "k", writer)
    assert entry.built and writer.builds == 2 and entry.extra == {"note": "entry contents"}
    with open(path) as f:
        assert f.read() == "entry contents"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert not cached_entry(path, "k", writer).built  # sound again: found, not built


def test_another_keys_entry_copied_under_a_key_is_rejected(cache):
    folder = cache_dir("onnx")
    a, b = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    cached_entry(a, "a", Writer("AAAA"))
    cached_entry(b, "b", Writer("BBBB"))
    shutil.copy(a, b)  # the file alone: same size, other content
    with pytest.warns(CacheWarning, match="does not match its recorded sha256"):
        assert cached_entry(b, "b", Writer("BBBB")).built
    shutil.copy(a, b)
    shutil.copy(a + META, b + META)  # the file with its metadata: another key's
    with pytest.warns(CacheWarning, match="was built for another key"):
        assert cached_entry(b, "b", Writer("BBBB")).built
    with open(b) as f:
        assert f.read() == "BBBB"


def _built_in(folder, monkeypatch, name, source):
    """Build `source` in the cache `folder`; its .so's path."""
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(folder))
    build_library(name, source, FLAGS)
    (path,) = folder.glob(f"{name}-*.so")
    return path


def test_another_kernels_library_under_a_key_is_never_loaded(cache, tmp_path, monkeypatch):
    sub = _built_in(tmp_path / "other", monkeypatch, "calc", SUB)  # to learn SUB's file name
    add = _built_in(cache, monkeypatch, "calc", ADD)
    shutil.copy(add, cache / sub.name)  # ADD's library and metadata under SUB's key
    shutil.copy(str(add) + META, str(cache / sub.name) + META)
    with pytest.warns(CacheWarning, match="was built for another key"):
        assert build_library("calc", SUB, FLAGS).f(5, 3) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="simulating another user's file needs root (os.chown)")
def test_a_kernel_planted_by_another_user_is_never_loaded_nor_replaced(tmp_path, monkeypatch):
    real = _built_in(tmp_path / "learn", monkeypatch, "planted", ADD)  # to learn ADD's file name and metadata
    evil = _built_in(tmp_path / "evil", monkeypatch, "planted", EVIL)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a shared cache folder, as /tmp is: sticky, writable by all
    planted, forged = shared / real.name, shared / (real.name + META)
    shutil.copy(evil, planted)  # another library under our key, with metadata that matches it
    meta = json.loads((tmp_path / "learn" / (real.name + META)).read_text())
    meta.update(size=evil.stat().st_size, sha256=hashlib.sha256(evil.read_bytes()).hexdigest())
    forged.write_text(json.dumps(meta))
    for p in (planted, forged):
        os.chown(p, 12345, 12345)
        os.chmod(p, 0o644)
    before = planted.read_bytes()
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(shared))
    with pytest.warns(CacheWarning, match="owned by uid 12345.*never loaded nor replaced"):
        assert build_library("planted", ADD, FLAGS).f(2, 3) == 5
    assert planted.read_bytes() == before and os.stat(planted).st_uid == 12345  # left as it was


def test_a_cache_folder_others_can_write_is_not_used(cache):
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o777)  # no sticky bit: anyone could swap our entries
    with pytest.warns(CacheWarning, match="writable by group or others without the sticky bit"):
        assert build_library("loose", ADD, FLAGS).f(2, 3) == 5
    assert not list(cache.glob("loose-*.so"))


def test_four_threads_build_one_key_once(cache):
    path = os.path.join(cache_dir("onnx"), "k.onnx")
    writer, barrier, entries, errors = Writer(pause=0.3), threading.Barrier(4), [], []

    def build():
        barrier.wait()
        try:
            entries.append(cached_entry(path, "k", writer))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(entries) == 4
    assert writer.builds == 1 and sum(e.built for e in entries) == 1
    assert {e.path for e in entries} == {path} and all(e.extra == {"note": "entry contents"} for e in entries)


def test_three_processes_build_one_key_once(cache):
    path = os.path.join(cache_dir("onnx"), "k.onnx")
    log = cache / "builds.log"
    script = ("import sys, time\n"
              "from wavefront.backends.disk_cache import cached_entry\n"
              "def write(tmp):\n"
              f"    open({str(log)!r}, 'a').write('built\\n')\n"
              "    time.sleep(1.0)\n"
              "    open(tmp, 'w').write('entry contents')\n"
              f"entry = cached_entry({path!r}, 'k', write)\n"
              "print(open(entry.path).read())\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0 and out.strip() == "entry contents", err[-2000:]
    assert log.read_text() == "built\n"


def test_clear_cache_removes_our_entries(cache):
    build_library("add", ADD, FLAGS)
    cached_entry(os.path.join(cache_dir("onnx"), "k.onnx"), "k", Writer())
    removed = clear_cache()
    assert len(removed) == 6 and not list(cache.glob("add-*")) and not (cache / "onnx").exists()
