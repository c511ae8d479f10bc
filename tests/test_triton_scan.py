"""The Triton scan kernels against the float64 references (CPU: under TRITON_INTERPRET=1, tiny shapes)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
import wavefront.backends.scans.linear.triton as triton_scan  # noqa: E402
import wavefront.backends.scans.matrix.triton as triton_matrix  # noqa: E402
from wavefront.backends.scans.linear.dispatch import choose_method, linear_scan  # noqa: E402
from wavefront.backends.scans.matrix.dispatch import matrix_scan  # noqa: E402
from wavefront.backends.scans.linear.naive import linear_scan_reference  # noqa: E402
from wavefront.backends.scans.matrix.naive import matrix_scan_reference
from wavefront.testing import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_scan.available(DEVICE)[0], reason=triton_scan.available(DEVICE)[1])


def _f64(*xs):
    return [x.double().cpu() if x is not None else None for x in xs]


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 40), W=st.integers(1, 20), reverse=st.booleans(), with_h0=st.booleans(),
       dim=st.sampled_from([0, 1]))
def test_first_order_kernel_matches_the_reference(T, W, reverse, with_h0, dim):
    g = torch.Generator().manual_seed(T * 7 + W)
    shape = (T, W) if dim == 0 else (W, T)
    a, b = torch.rand(shape, generator=g), torch.randn(shape, generator=g)
    h0 = torch.randn(W, generator=g) if with_h0 else None
    a, b = a.to(DEVICE), b.to(DEVICE)
    out = triton_scan.triton_linear_scan(a, b, h0.to(DEVICE) if with_h0 else None, dim=dim, reverse=reverse,
                                         block_t=16, block_w=16)
    ref = linear_scan_reference(*_f64(a, b, h0), dim=dim, reverse=reverse)
    assert_close(out.cpu(), ref, 1e-5, "triton first-order scan")


def test_first_order_kernel_reads_a_time_last_layout_in_place():
    a, b = torch.rand(2, 3, 50, device=DEVICE), torch.randn(2, 3, 50, device=DEVICE)
    h0 = torch.randn(2, 3, device=DEVICE)
    out = triton_scan.triton_linear_scan(a, b, h0, dim=2, reverse=True, block_t=16, block_w=4)
    assert out.stride() == a.stride()
    assert_close(out.cpu(), linear_scan_reference(*_f64(a, b, h0), dim=2, reverse=True), 1e-5, "[B, C, T] layout")


@pytest.mark.parametrize("decay, form", [("additive", "chunked"), ("scalar", "chunked"), ("additive", "recurrent"),
                                         ("scalar", "recurrent"), ("per_dim", "recurrent")])
@pytest.mark.parametrize("T", [1, 21, 40])
def test_matrix_kernels_match_the_reference(decay, form, T):
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(2, 2, T, 5, generator=g), torch.randn(2, 2, T, 5, generator=g)
    v = torch.randn(2, 2, T, 6, generator=g)
    a = {"additive": None, "scalar": torch.rand(2, 2, T, generator=g), "per_dim": torch.rand(2, 2, T, 5, generator=g)}[decay]
    S0 = torch.randn(2, 2, 5, 6, generator=g)
    dev = [x.to(DEVICE) if x is not None else None for x in (q, k, v, a, S0)]
    o, S = triton_matrix.triton_matrix_scan(*dev, form=form, chunk=16, block_v=16)
    ro, rS = matrix_scan_reference(*_f64(q, k, v, a, S0))
    assert_close(o.cpu(), ro, 1e-5, "outputs")
    assert_close(S.cpu(), rS, 1e-5, "final state")


def test_chunked_refuses_per_dim_decay():
    q = torch.randn(1, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="form='recurrent'"):
        triton_matrix.triton_matrix_scan(q, q, q, torch.rand(1, 4, 3, device=DEVICE), form="chunked")


def test_forward_only_methods_refuse_when_gradients_are_needed():
    a = torch.rand(3, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="forward only"):
        linear_scan(a, a, method="triton")
    with pytest.raises(ValueError, match="forward only"):
        matrix_scan(a[None], a[None], a[None], method="triton")


def test_auto_picks_triton_only_on_cuda():
    a = torch.rand(4, 100)
    assert choose_method(a, 1)[0] != "triton"  # CPU: the native kernel (or torch forms)
    assert triton_scan.available("cpu")[0]  # ... although the interpreter could run it
