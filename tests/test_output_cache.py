"""The native scan's output-buffer cache never hands out memory that anything can still reach."""
import queue
import re

import pytest
import torch

import wavefront.backends.scans.linear.output_cache as output_cache
from wavefront.backends.scans.linear.native import native_linear_scan
from wavefront.backends.scans.linear.output_cache import OUTPUTS, clear_output_cache

SHAPE = (1024, 1024)  # float32: 4 MB, large enough to be cached


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setenv("WAVEFRONT_SCAN_CACHE_MB", "64")
    clear_output_cache()
    yield
    clear_output_cache()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPE, generator=g) * 0.6 + 0.4, torch.randn(SHAPE, generator=g)


def scan(a, b):
    with torch.no_grad():
        return native_linear_scan(a, b, dim=0)


def on_storage(st):
    return torch.empty(0).set_(st, 0, SHAPE)


# Ways user code keeps an output's memory alive after dropping the tensor itself, and how to read it back.
KEEPERS = {
    "untyped_storage": (lambda out: out.untyped_storage(), on_storage),
    "storage of a view": (lambda out: out[3:].untyped_storage(), on_storage),
    "view": (lambda out: out[3:], lambda v: torch.cat([torch.full((3, SHAPE[1]), float("nan")), v])),
    "numpy": (lambda out: out.numpy(), torch.from_numpy),
    "dlpack": (lambda out: torch.utils.dlpack.to_dlpack(out), torch.from_dlpack),
}


@pytest.mark.parametrize("keeper", list(KEEPERS))
def test_memory_still_reachable_is_never_reused(keeper):
    keep, read = KEEPERS[keeper]
    a, b = inputs()
    out = scan(a, b)
    want = out.clone()
    kept = keep(out)
    del out
    others = [scan(a * 0.5, b) for _ in range(3)]  # same size: would take a dropped buffer
    got = read(kept)
    if keeper == "view":
        got, want = got[3:], want[3:]
    assert torch.equal(got, want), "a scan overwrote memory the user still holds"
    assert all(o.data_ptr() != got.data_ptr() for o in others)


def test_dropped_buffer_is_reused_once_nothing_reaches_it():
    a, b = inputs()
    out = scan(a, b)
    ptr, st = out.data_ptr(), out.untyped_storage()
    del out
    assert scan(a, b).data_ptr() != ptr  # the storage object still holds it
    del st
    again = scan(a, b)
    assert again.data_ptr() == ptr and torch.equal(again, scan(a, b))


def _second_mapping(out):
    """The shared-memory pages behind `out`, mapped a second time, as another process sees them."""
    st = out.untyped_storage()
    if torch.multiprocessing.get_sharing_strategy() == "file_system":
        return torch.UntypedStorage._new_shared_filename_cpu(*st._share_filename_cpu_())
    fd, size = st._share_fd_cpu_()
    return torch.UntypedStorage._new_shared_fd_cpu(fd, size)


def test_shared_memory_is_never_reused():
    a, b = inputs()
    out = scan(a, b)
    want = out.clone()
    out.share_memory_()
    other_process = on_storage(_second_mapping(out))
    del out
    _ = [scan(a * 0.5, b) for _ in range(3)]
    assert torch.equal(other_process, want), "a scan overwrote memory another process maps"


def _child(inbox, outbox):
    out, want = inbox.get()
    outbox.put("ready")
    inbox.get()  # the parent has dropped `out` and scanned again
    outbox.put(torch.equal(out, want))


def test_output_sent_to_another_process_is_not_reused():
    ctx = torch.multiprocessing.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(inbox, outbox), daemon=True)
    child.start()
    try:
        a, b = inputs()
        out = scan(a, b)
        inbox.put((out, out.clone()))
        assert outbox.get(timeout=300) == "ready"
        del out
        _ = [scan(a * 0.5, b) for _ in range(3)]
        inbox.put("go")
        assert outbox.get(timeout=300) is True, "a scan overwrote an output the child process holds"
    except queue.Empty:
        pytest.fail("the child process did not answer")
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.terminate()


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf", ""])
def test_bad_cache_size_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("WAVEFRONT_SCAN_CACHE_MB", value)
    with pytest.raises(ValueError, match=r"WAVEFRONT_SCAN_CACHE_MB must be a number of megabytes \(0 turns the "
                                         r"cache off\), got " + re.escape(repr(value))):
        scan(*inputs())


@pytest.mark.parametrize("value, mb", [("0", 0), ("0.5", 0.5), (" 64 ", 64)])
def test_cache_size_values(monkeypatch, value, mb):
    monkeypatch.setenv("WAVEFRONT_SCAN_CACHE_MB", value)
    assert output_cache.OutputCache.limit_bytes() == int(mb * 2**20)


def test_cache_off_keeps_nothing(monkeypatch):
    monkeypatch.setenv("WAVEFRONT_SCAN_CACHE_MB", "0")
    a, b = inputs()
    assert torch.equal(scan(a, b), scan(a, b))
    assert OUTPUTS.cached_bytes == 0
