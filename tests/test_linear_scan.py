"""The scan op in every form against the float64 reference: values, gradients, dtypes, the chooser."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wavefront.backends.chunked_scan import chunked_linear_scan
from wavefront.backends.linear_scan import choose_method, linear_scan
from wavefront.models.scan_reference import linear_scan_reference
from wavefront.testing import assert_close


def inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=dtype) * 0.6 + 0.4), torch.randn(shape, generator=g, dtype=dtype)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 4), st.booleans(), st.booleans())
def test_chunked_matches_the_reference(T, chunk, width, reverse, with_h0):
    a, b = inputs((2, T, width))
    h0 = torch.randn(2, width, dtype=torch.float64) if with_h0 else None
    assert_close(chunked_linear_scan(a, b, h0, 1, reverse, chunk=chunk), linear_scan_reference(a, b, h0, 1, reverse),
                 1e-12, f"T={T} chunk={chunk}")


@pytest.mark.parametrize("T", [1000, 4096, 16384])
def test_chunked_float32_long(T):
    a, b = inputs((1, T, 8))
    assert_close(chunked_linear_scan(a.float(), b.float(), chunk=128), linear_scan_reference(a, b), 1e-5, f"T={T}")


def test_chunked_low_precision_accumulates_in_float32():
    a, b = inputs((1, 4096, 16))
    out = chunked_linear_scan(a.bfloat16(), b.bfloat16(), chunk=64)
    assert out.dtype == torch.bfloat16
    ref = linear_scan_reference(a.bfloat16().double(), b.bfloat16().double())  # same rounded inputs
    assert_close(out, ref, 1e-2, "bf16")


def test_chunked_gradients():
    a, b = inputs((2, 37, 3))
    h0 = torch.randn(2, 3, dtype=torch.float64)
    args = tuple(t.clone().requires_grad_() for t in (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b, h0: chunked_linear_scan(a, b, h0, 1, True, chunk=8), args)


@pytest.mark.parametrize("method", ["native", "chunked", "loop", "auto"])
def test_every_method_agrees(method):
    a, b = inputs((3, 200, 5))
    assert_close(linear_scan(a, b, method=method), linear_scan_reference(a, b), 1e-12, method)


def test_cost_model():
    assert choose_method(torch.zeros(2, 1000, 4), 1)[0] == "native"
    assert choose_method(torch.zeros(2, 1000, 4, dtype=torch.bfloat16), 1) == ("chunked", 32)
    assert choose_method(torch.zeros(2, 8, 4, dtype=torch.bfloat16), 1)[0] == "loop"
    assert choose_method(torch.zeros(1, 20, 1 << 20, dtype=torch.float16), 1)[0] == "loop"
    with pytest.raises(ValueError, match="unknown scan method"):
        linear_scan(*inputs((1, 3)), method="magic")
