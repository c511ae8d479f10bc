"""The chunked matrix-state scan against the step-by-step reference: outputs, final state, gradients."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wavefront.backends.scans.matrix.chunked import chunked_matrix_scan
from wavefront.backends.scans.matrix.naive import matrix_scan_reference
from wavefront.testing import assert_close

F64 = torch.float64
DECAYS = ["additive", "scalar", "per_dim"]


def _inputs(decay, lead, T, dk, dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*lead, T, dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(*lead, T, dv, generator=g, dtype=dtype)
    a = {"additive": None, "scalar": torch.rand(*lead, T, generator=g, dtype=dtype),
         "per_dim": torch.rand(*lead, T, dk, generator=g, dtype=dtype)}[decay]
    return q, k, v, a


@settings(max_examples=25, deadline=None)
@given(decay=st.sampled_from(DECAYS), T=st.integers(1, 80), chunk=st.integers(1, 33), dk=st.integers(1, 5),
       dv=st.integers(1, 5), heads=st.integers(1, 3), with_state=st.booleans())
def test_matches_the_reference_in_float64(decay, T, chunk, dk, dv, heads, with_state):
    q, k, v, a = _inputs(decay, (2, heads), T, dk, dv, seed=T)
    S0 = torch.randn(2, heads, dk, dv, dtype=F64) if with_state else None
    o, S = chunked_matrix_scan(q, k, v, a, S0, chunk=chunk)
    ro, rS = matrix_scan_reference(q, k, v, a, S0)
    assert_close(o, ro, 1e-12, "outputs")
    assert_close(S, rS, 1e-12, "final state")


@pytest.mark.parametrize("decay", DECAYS)
def test_gradients_match_the_reference(decay):
    q, k, v, a = _inputs(decay, (2,), 45, 3, 4)
    S0 = torch.randn(2, 3, 4, dtype=F64)
    leaves = [x.requires_grad_() for x in (q, k, v, a, S0) if x is not None]
    o, S = chunked_matrix_scan(q, k, v, a, S0, chunk=8)
    ro, rS = matrix_scan_reference(q, k, v, a, S0)
    w = torch.randn_like(o)
    g = torch.autograd.grad((o * w).sum() + S.sum(), leaves)
    rg = torch.autograd.grad((ro * w).sum() + rS.sum(), leaves)
    for x, y in zip(g, rg):
        assert_close(x, y, 1e-10, "gradient")


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("T", [1024, 4096, 16384])
def test_float32_within_1e5_of_the_float64_reference(decay, T):
    q, k, v, a = _inputs(decay, (1,), T, 4, 4)
    if a is not None:
        a = 0.9 + 0.1 * a  # long memory: the hard case for accumulated rounding
    o, S = chunked_matrix_scan(*(x.float() if x is not None else None for x in (q, k, v, a)))
    ro, rS = matrix_scan_reference(q, k, v, a)
    assert_close(o, ro, 1e-5, "fp32 outputs")
    assert_close(S, rS, 1e-5, "fp32 state")


def test_zero_decays_and_underflowing_products_stay_finite():
    q, k, v, a = _inputs("per_dim", (2,), 300, 3, 3)
    a = a * 1e-3
    a[..., 100, :] = 0.0
    o, S = chunked_matrix_scan(q.float(), k.float(), v.float(), a.float())
    ro, rS = matrix_scan_reference(q, k, v, a)
    assert torch.isfinite(o).all()
    assert_close(o, ro, 1e-5, "outputs")


def test_bfloat16_accumulates_in_float32():
    q, k, v, a = _inputs("scalar", (2,), 200, 4, 4)
    o, _ = chunked_matrix_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), a.bfloat16())
    ro, _ = matrix_scan_reference(*(x.bfloat16().double() for x in (q, k, v, a)))
    assert o.dtype == torch.bfloat16
    assert_close(o.double(), ro, 2e-2, "bf16")


def test_bad_shapes_are_refused_with_the_shapes():
    q, k, v, a = _inputs("scalar", (2,), 10, 3, 4)
    with pytest.raises(ValueError, match="q, k must be"):
        chunked_matrix_scan(q, k[..., :2], v, a)
    with pytest.raises(ValueError, match="decay must be"):
        chunked_matrix_scan(q, k, v, a[..., :5])


@pytest.mark.parametrize("decay", ["additive", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_native_kernel_equals_the_reference_and_serves_inference_only(decay, dtype):
    import wavefront.backends.scans.matrix.native as native
    from wavefront.backends.scans.matrix.dispatch import matrix_scan
    if native.library() is None:
        pytest.skip(f"no C compiler here: {native.KERNEL.error}")
    q, k, v, a = _inputs(decay, (2, 3), 45, 5, 4, dtype=dtype)
    S0 = torch.randn(2, 3, 5, 4, dtype=dtype)
    for s0 in (None, S0):
        o, S = native.native_matrix_scan(q, k, v, a, s0)
        ro, rS = matrix_scan_reference(q, k, v, a, s0)
        assert_close(o, ro, 1e-12 if dtype == F64 else 1e-6, "o")
        assert_close(S, rS, 1e-12 if dtype == F64 else 1e-6, "last state")
    calls = []
    real = native.native_matrix_scan
    native.native_matrix_scan = lambda *args: calls.append(1) or real(*args)
    try:
        matrix_scan(q, k, v, a, S0)  # no gradient needed: the native kernel
        matrix_scan(q.requires_grad_(), k, v, a, S0)[0].sum().backward()  # gradients: the chunked form
    finally:
        native.native_matrix_scan = real
    assert calls == [1] and q.grad is not None
    with pytest.raises(ValueError, match="forward only"):
        matrix_scan(q, k, v, a, S0, method="native")
