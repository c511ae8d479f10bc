"""The native kernels check what they are given before taking a pointer, and propagate NaN and
inf exactly like the reference (h_{-1} = 0 is multiplied, never skipped: inf * 0 = NaN)."""
import pytest
import torch

from wavefront.backends.scans.linear.native import native_linear_scan
from wavefront.backends.scans.selective.native import selective_scan
from wavefront.backends.scans.selective.chunked import selective_scan_torch
from wavefront.backends.scans.linear.naive import linear_scan_reference

COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) * 0.6 + 0.4, torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("h0_dtype", [torch.float64, torch.float16, torch.complex64])
def test_h0_of_another_dtype_is_refused(h0_dtype):
    a, b = inputs((2, 50, 3), torch.float32)
    with pytest.raises(ValueError, match=rf"h0 must match a's dtype and device \(torch.float32 on cpu\), got "
                                         rf"{h0_dtype} on cpu"):
        native_linear_scan(a, b, torch.zeros(2, 3, dtype=h0_dtype))


def test_h0_on_another_device_is_refused():
    a, b = inputs((2, 50, 3))
    with pytest.raises(ValueError, match=r"h0 must match a's dtype and device \(torch.float64 on cpu\), got "
                                         r"torch.float64 on meta"):
        native_linear_scan(a, b, torch.zeros(2, 3, dtype=torch.float64, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cuda"):
            native_linear_scan(a, b, torch.zeros(2, 3, dtype=torch.float64, device="cuda"))


def test_h0_of_any_layout_with_the_right_shape_is_read_as_values():
    a, b = inputs((2, 50, 3))
    h0 = torch.randn(3, 2, dtype=torch.float64).t()  # not contiguous
    assert torch.equal(native_linear_scan(a, b, h0), linear_scan_reference(a, b, h0))
    with pytest.raises(ValueError, match="h0 must have shape"):
        native_linear_scan(a, b, h0.t())


def test_out_on_another_device_is_refused():
    a, b = inputs((2, 50, 3))
    with torch.no_grad(), pytest.raises(ValueError, match="out must be a contiguous torch.float64 CPU tensor"):
        native_linear_scan(a, b, out=torch.empty(a.shape, dtype=a.dtype, device="meta"))


@pytest.mark.parametrize("dim", [3, 5, -4, -7])
def test_dim_out_of_range_is_an_index_error(dim):
    a, b = inputs((2, 5, 3))
    with pytest.raises(IndexError, match=rf"Dimension out of range \(expected to be in range of \[-3, 2\], "
                                         rf"but got {dim}\)"):
        native_linear_scan(a, b, dim=dim)
    with pytest.raises(IndexError, match=r"Dimension out of range"):
        linear_scan_reference(a, b, dim=dim)


@pytest.mark.parametrize("dim", [-1, -2, -3])
def test_negative_dims_count_from_the_end(dim):
    a, b = inputs((2, 5, 3))
    assert torch.equal(native_linear_scan(a, b, dim=dim), linear_scan_reference(a, b, dim=dim % 3))


def test_a_zero_dim_tensor_has_no_time_dim():
    with pytest.raises(IndexError, match="Dimension specified as 1 but tensor has no dimensions"):
        native_linear_scan(torch.tensor(0.5), torch.tensor(1.0))


def with_specials(shape, dtype, seed=0):
    """a with NaN, inf and -inf at the first and last step of some channels (the first step of
    either direction), and at one step in the middle."""
    a, b = inputs(shape, torch.float64, seed)
    T = shape[1]
    flat = a.reshape(shape[0], T, -1)
    W = flat.shape[-1]
    for k, v in enumerate([float("nan"), float("inf"), -float("inf")]):
        flat[0, 0, k % W] = v
        flat[-1, T - 1, (k + 1) % W] = v
    flat[0, T // 2, W - 1] = float("inf")
    if dtype.is_complex:
        g = torch.Generator().manual_seed(seed + 1)
        a = torch.complex(a, torch.rand(shape, generator=g, dtype=torch.float64) * 0.3)
        a[-1, 0, 0] = complex(0.5, float("inf"))  # an infinite imaginary part alone
        b = torch.complex(b, torch.randn(shape, generator=g, dtype=torch.float64))
    return a.to(dtype), b.to(dtype)


def assert_same(got, ref, tol):
    """NaN exactly where the reference has NaN (in each real component), infinities equal, finite
    values within tol of the float64 reference."""
    got, ref = got.to(ref.dtype), ref
    if ref.is_complex():
        got, ref = torch.view_as_real(got), torch.view_as_real(ref)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), "NaN in other places than the reference"
    assert torch.isnan(ref).any(), "the case tests no NaN"
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("width", [3, 8, 40, 8192])  # narrow (carry in registers) and wide (8192: OpenMP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
def test_nan_and_inf_in_a_propagate_like_the_reference(width, dtype, reverse):
    T = 6 if width == 8192 else 30
    a, b = with_specials((2, T, width), dtype)
    ref = linear_scan_reference(a.to(torch.complex128 if dtype.is_complex else torch.float64),
                                b.to(torch.complex128 if dtype.is_complex else torch.float64), reverse=reverse)
    tol = 1e-12 if dtype in (torch.float64, torch.complex128) else 1e-5
    assert_same(native_linear_scan(a, b, reverse=reverse), ref, tol)
    if not dtype.is_complex:  # float: the same operations in the same order as the reference, bit for bit
        torch.testing.assert_close(native_linear_scan(a, b, reverse=reverse), linear_scan_reference(a, b, reverse=reverse),
                                   rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_with_nan_and_inf_match_the_reference(reverse):
    # real only: with infinities, torch's own complex gradients depend on the order autograd adds
    # them in ((1 + 0j) + (inf - inf j) is NaN in torch, the other order is not)
    a, b = with_specials((2, 12, 5), torch.float64)
    w = torch.randn(a.shape, dtype=torch.float64)
    grads = []
    for scan in (native_linear_scan, linear_scan_reference):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        (scan(x, y, reverse=reverse) * w).sum().backward()  # a NaN loss, yet finite gradients in places
        grads.append((x.grad, y.grad))
    for got, ref in zip(*grads):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and not torch.isnan(ref).all()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("complex_", [False, True])
def test_gradcheck_without_h0(reverse, dim, complex_):
    a, b = inputs((2, 4, 3))
    if complex_:
        a, b = torch.polar(a, b), torch.complex(b, a)
    a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: native_linear_scan(a, b, None, dim, reverse), (a, b))


def selective_args(Bt=2, D=3, T=7, N=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(Bt, D, T, generator=g, dtype=torch.float64), torch.rand(Bt, D, T, generator=g, dtype=torch.float64),
            -torch.rand(D, N, generator=g, dtype=torch.float64), torch.randn(Bt, N, T, generator=g, dtype=torch.float64),
            torch.randn(Bt, N, T, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64),
            torch.randn(Bt, D, T, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("which, bad", [(5, torch.zeros(1, dtype=torch.float64)),  # D: one value, 3 channels
                                        (5, torch.zeros(3, 1, dtype=torch.float64)),
                                        (6, torch.zeros(2, 3, 1, dtype=torch.float64))])  # z: one step of 7
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_torch])
def test_selective_scan_refuses_d_and_z_of_the_wrong_shape(fn, which, bad):
    args = selective_args()
    args[which] = bad
    with pytest.raises(ValueError, match=r"selective_scan shapes: .* D \[channels\] .* z \[batch, channels, T\]"):
        fn(*args)


@pytest.mark.parametrize("which", range(7))
def test_selective_scan_refuses_meta_and_other_dtypes(which):
    for bad in (lambda t: t.to("meta"), lambda t: t.float()):
        args = selective_args()
        args[which] = bad(args[which])
        with pytest.raises(TypeError, match="float32/float64 CPU tensors of one dtype"):
            selective_scan(*args)


def test_out_overlapping_the_inputs():
    a, b = inputs((40, 3))
    ref = linear_scan_reference(a, b, dim=0)
    buf = torch.zeros(41, 3, dtype=torch.float64)
    buf[:-1] = b
    with torch.no_grad(), pytest.raises(RuntimeError, match="out partly overlaps b"):
        native_linear_scan(a, buf[:-1], dim=0, out=buf[1:])  # row t + 1 of b would be overwritten by h_t
    with torch.no_grad():
        assert torch.equal(native_linear_scan(a, b.clone(), dim=0, out=b), ref) and torch.equal(b, ref)  # in place


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("where", ["last state", "across rows"])
def test_h0_read_from_out_itself(reverse, where):
    a, b = inputs((2, 30, 4))
    out = torch.randn(2, 30, 4, dtype=torch.float64)
    if where == "last state":  # streaming: the previous chunk's last state, into the same buffer
        a, b, out = a[:1], b[:1], out[:1]
        h0 = out[:, -1]
    else:  # h0[1] is out[0, 2]: the scan of row 0 overwrites it before row 1 reads it
        h0 = out.view(-1)[4:12].view(2, 4)
    ref = linear_scan_reference(a, b, h0.clone(), reverse=reverse)
    with torch.no_grad():
        native_linear_scan(a, b, h0, reverse=reverse, out=out)
    assert torch.equal(out, ref)
