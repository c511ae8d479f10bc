"""The scan op in every form against the float64 reference: values, gradients, dtypes, the chooser."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wavefront.backends.scans.linear.chunked import chunked_linear_scan, exportable_linear_scan
from wavefront.backends.scans.linear.dispatch import choose_method, linear_scan
from wavefront.backends.scans.linear.naive import linear_scan_reference
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


FORMS = {"native": lambda *x, **k: linear_scan(*x, method="native", **k),
         "chunked": lambda *x, **k: linear_scan(*x, method="chunked", **k),
         "loop": lambda *x, **k: linear_scan(*x, method="loop", **k),
         "auto": lambda *x, **k: linear_scan(*x, method="auto", **k),
         "chunked_linear_scan": lambda *x, **k: chunked_linear_scan(*x, chunk=4, **k),
         "exportable_linear_scan": lambda *x, **k: exportable_linear_scan(*x, chunk=4, **k)}


@pytest.mark.parametrize("form", list(FORMS))
def test_dim_out_of_range_is_an_index_error_in_every_form(form):
    a, b = inputs((2, 5, 3))
    for dim in (3, 5, -4):
        with pytest.raises(IndexError, match=rf"Dimension out of range \(expected to be in range of \[-3, 2\], "
                                             rf"but got {dim}\)"):
            FORMS[form](a, b, dim=dim)
    assert_close(FORMS[form](a, b, dim=-3), linear_scan_reference(a, b, dim=0), 1e-12, form)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "exportable_linear_scan"])
def test_h0_must_match_in_every_form(form):
    a, b = inputs((2, 20, 3))
    a, b = a.float(), b.float()
    for h0 in (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, device="meta")):
        with pytest.raises(ValueError, match=rf"h0 must match a's dtype and device \(torch.float32 on cpu\), got "
                                             rf"{h0.dtype} on {h0.device}: pass h0.to\(a\)"):
            FORMS[form](a, b, h0)
    for h0 in (torch.zeros(3), torch.zeros(1, 3), torch.zeros(3, 2)):  # would broadcast, or right size wrong shape
        with pytest.raises(ValueError, match=r"h0 must have shape \(2, 3\) \(a without its time dim\)"):
            FORMS[form](a, b, h0)


def test_chunked_h0_matches_the_promoted_dtype_of_a_and_b():
    a, b = inputs((2, 20, 3))
    h0 = torch.randn(2, 3, dtype=torch.float64)
    out = chunked_linear_scan(a.float(), b, h0, chunk=4)
    assert out.dtype == torch.float64
    assert_close(out, linear_scan_reference(a.float().double(), b, h0), 1e-12, "promoted")
    with pytest.raises(ValueError, match=r"h0 must match the dtype of a and b promoted and device \(torch.float64"):
        chunked_linear_scan(a.float(), b, h0.float())


@pytest.mark.parametrize("form", ["chunked", "loop", "native"])
@pytest.mark.parametrize("reverse", [False, True])
def test_nan_and_inf_in_the_first_coefficient_propagate_like_the_reference(form, reverse):
    a, b = inputs((2, 40, 4))
    first = -1 if reverse else 0  # the first step in the scan's direction, where h_{-1} = 0
    a[0, first, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    got, ref = linear_scan(a, b, reverse=reverse, method=form), linear_scan_reference(a, b, reverse=reverse)
    assert torch.isnan(ref[0, :, :3]).all() and not torch.isnan(ref[:, :, 3]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def _triton():
    pytest.importorskip("triton")
    import wavefront.backends.scans.linear.triton as triton_scan
    ok, why = triton_scan.available("cpu")
    if not ok:
        pytest.skip(why)
    return triton_scan


def test_triton_checks_dim_and_h0():
    triton_scan = _triton()
    a, b = inputs((2, 6, 3))
    a, b = a.float(), b.float()
    with pytest.raises(IndexError, match=r"Dimension out of range \(expected to be in range of \[-3, 2\], but got 5\)"):
        triton_scan.triton_linear_scan(a, b, dim=5)
    for h0 in (torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, dtype=torch.float64)):
        with pytest.raises(ValueError, match="h0 must match a's dtype and device"):
            triton_scan.triton_linear_scan(a, b, h0)
    with pytest.raises(ValueError, match="h0 must have shape"):
        triton_scan.triton_linear_scan(a, b, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="a and b must have the same shape and device"):
        triton_scan.triton_linear_scan(a, b.to("meta"))


def test_triton_output_has_the_promoted_dtype_like_the_reference():
    triton_scan = _triton()
    a, b = inputs((2, 6, 3))
    out = triton_scan.triton_linear_scan(a.float(), b, block_t=4, block_w=4)
    assert out.dtype == torch.float64
    assert_close(out, linear_scan_reference(a.float().double(), b), 1e-6, "float32 accumulation")


@pytest.mark.parametrize("shape, dim", [((2, 6, 3), 1), ((2, 3, 4, 5), 2), ((4, 2, 3), 0), ((3, 5), 1)])
def test_triton_layouts_that_do_not_flatten(shape, dim):
    triton_scan = _triton()
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(shape, generator=g), torch.randn(shape, generator=g)
    h0 = torch.randn(*(s for i, s in enumerate(shape) if i != dim), generator=g)
    for reverse in (False, True):
        out = triton_scan.triton_linear_scan(a, b, h0, dim=dim, reverse=reverse, block_t=4, block_w=4)
        ref = linear_scan_reference(a.double(), b.double(), h0.double(), dim=dim, reverse=reverse)
        assert out.shape == a.shape and out.dtype == a.dtype
        assert_close(out, ref, 1e-5, f"{shape} along {dim}")
