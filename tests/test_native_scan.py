"""The native first-order scan against the float64 reference: values, gradients, layouts, fallback."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wavefront.backends.scans.linear.native as ns
from wavefront.backends.scans.linear.native import native_linear_scan
from wavefront.backends.scans.linear.naive import linear_scan_reference
from wavefront.testing import assert_close


def inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=dtype) * 0.6 + 0.4  # decays in (0.4, 1)
    b = torch.randn(shape, generator=g, dtype=dtype)
    return a, b


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=2), st.integers(1, 70), st.integers(0, 2),
       st.booleans(), st.booleans())
def test_matches_the_reference_exactly(outer_inner, T, where, reverse, with_h0):
    shape = list(outer_inner)
    dim = min(where, len(shape))
    shape.insert(dim, T)
    a, b = inputs(tuple(shape))
    h0 = torch.randn(*(s for i, s in enumerate(shape) if i != dim), dtype=torch.float64) if with_h0 else None
    got = native_linear_scan(a, b, h0, dim, reverse)
    assert torch.equal(got, linear_scan_reference(a, b, h0, dim, reverse))  # same operations, same order


@pytest.mark.parametrize("T", [1, 1000, 4096, 16384])
def test_float32_long_sequences_against_float64(T):
    a, b = inputs((2, T, 64))
    ref = linear_scan_reference(a, b)
    assert_close(native_linear_scan(a.float(), b.float()), ref, 1e-5, f"fp32 T={T}")


@pytest.mark.parametrize("dim, reverse", [(1, False), (1, True), (0, False), (2, True)])
def test_gradients(dim, reverse):
    a, b = inputs((2, 5, 3))
    a.requires_grad_(), b.requires_grad_()
    h0 = torch.randn(*(s for i, s in enumerate(a.shape) if i != dim), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, h0: native_linear_scan(a, b, h0, dim, reverse), (a, b, h0))
    w = torch.randn(a.shape, dtype=torch.float64)
    (native_linear_scan(a, b, h0, dim, reverse) * w).sum().backward()
    got = [t.grad.clone() for t in (a, b, h0)]
    for t in (a, b, h0):
        t.grad = None
    (linear_scan_reference(a, b, h0, dim, reverse) * w).sum().backward()
    for x, y in zip(got, (a.grad, b.grad, h0.grad)):
        assert_close(x, y, 1e-12, "grad")


def test_out_buffer_for_inference():
    a, b = inputs((3, 50, 4))
    out = torch.empty_like(a)
    with torch.no_grad():
        got = native_linear_scan(a, b, out=out)
    assert got is out and torch.equal(out, linear_scan_reference(a, b))
    with pytest.raises(ValueError, match="out= is for inference"):
        native_linear_scan(a.requires_grad_(), b, out=out)
    with pytest.raises(ValueError, match="contiguous"):
        native_linear_scan(a.detach(), b, out=out.transpose(0, 1))


def test_bad_input_is_refused():
    a, b = inputs((2, 4))
    with pytest.raises(ValueError, match="must match in shape"):
        native_linear_scan(a, b[:, :3])
    with pytest.raises(ValueError, match="h0 must have shape"):
        native_linear_scan(a, b, torch.zeros(3))
    with pytest.raises(TypeError, match="float32/float64/complex CPU"):
        native_linear_scan(a.half(), b.half())


def test_build_is_cached_and_missing_compiler_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ns, "KERNEL", ns.KernelLibrary("scan", ns._SOURCE, ns._FLAGS, declare=ns._declare))
    assert ns.available() == (True, "")
    built = list(tmp_path.glob("scan-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(ns, "KERNEL", ns.KernelLibrary("scan", ns._SOURCE, ns._FLAGS, declare=ns._declare))
    monkeypatch.setenv("CC", "/nonexistent/cc")  # the cache key asks the compiler for its version
    ok, why = ns.available()
    assert not ok and "nonexistent" in why


@pytest.mark.parametrize("reverse", [False, True])
def test_complex_values_and_gradients(reverse):
    g = torch.Generator().manual_seed(3)
    mag = torch.rand(2, 40, 3, generator=g, dtype=torch.float64) * 0.5 + 0.5
    a = torch.polar(mag, torch.rand(2, 40, 3, generator=g, dtype=torch.float64) * 6.28)
    b = torch.randn(2, 40, 3, generator=g, dtype=torch.complex128)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.complex128)
    assert_close(native_linear_scan(a, b, h0, 1, reverse), linear_scan_reference(a, b, h0, 1, reverse), 1e-12, "c128")
    assert_close(native_linear_scan(a.to(torch.complex64), b.to(torch.complex64), h0.to(torch.complex64), 1, reverse),
                 linear_scan_reference(a, b, h0, 1, reverse), 1e-5, "c64")
    args = tuple(t[:, :4].clone().requires_grad_() if t.dim() == 3 else t.clone().requires_grad_() for t in (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b, h0: native_linear_scan(a, b, h0, 1, reverse), args)


def test_dropped_large_outputs_are_reused_and_held_ones_never(monkeypatch):
    monkeypatch.setenv("WAVEFRONT_SCAN_CACHE_MB", "64")
    from wavefront.backends.scans.linear.output_cache import OUTPUTS, clear_output_cache
    clear_output_cache()
    a, b = inputs((1024, 1024), torch.float32)  # 4 MB: large enough to cache
    ref = linear_scan_reference(a, b, dim=0)
    with torch.no_grad():
        first = native_linear_scan(a, b, dim=0)
        ptr = first.data_ptr()
        held = native_linear_scan(a, b, dim=0)  # `first` is still alive: a buffer of its own
        assert held.data_ptr() != ptr and torch.equal(first, ref)
        view = first[:, -1]
        del first
        other = native_linear_scan(a * 0.5, b, dim=0)  # a view keeps the storage: not reused
        assert other.data_ptr() != ptr and torch.equal(view, ref[:, -1])
        del view, other
        again = native_linear_scan(a, b, dim=0)  # now nothing references it
        assert again.data_ptr() == ptr and torch.equal(again, ref)
    assert 0 < OUTPUTS.cached_bytes <= 64 << 20
    x = a.clone().requires_grad_()
    out = native_linear_scan(x, b, dim=0)
    loss, kept = (out * ref).sum(), out.data_ptr()
    del out  # the graph still saves the output: it must not be handed out again
    with torch.no_grad():
        assert native_linear_scan(a, b, dim=0).data_ptr() != kept
    loss.backward()
    x64 = a.double().requires_grad_()
    (linear_scan_reference(x64, b.double(), dim=0) * ref.double()).sum().backward()
    assert_close(x.grad, x64.grad, 1e-5, "gradient")
    clear_output_cache()
    monkeypatch.setenv("WAVEFRONT_SCAN_CACHE_MB", "0")
    with torch.no_grad():
        native_linear_scan(a, b, dim=0)
    assert OUTPUTS.cached_bytes == 0
