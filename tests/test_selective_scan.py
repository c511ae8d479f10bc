"""Mamba's selective scan: the native kernel against the float64 reference, values and gradients."""
import pytest
import torch

from wavefront.backends.scans.selective.native import selective_scan
from wavefront.backends.scans.selective.naive import selective_scan_reference
from wavefront.testing import assert_close


def args(Bt=2, D=3, T=17, N=4, dtype=torch.float64, seed=0, with_d=True, with_z=True):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(Bt, D, T, generator=g, dtype=dtype), torch.rand(Bt, D, T, generator=g, dtype=dtype),
           -torch.rand(D, N, generator=g, dtype=dtype), torch.randn(Bt, N, T, generator=g, dtype=dtype),
           torch.randn(Bt, N, T, generator=g, dtype=dtype)]
    out.append(torch.randn(D, generator=g, dtype=dtype) if with_d else None)
    out.append(torch.randn(Bt, D, T, generator=g, dtype=dtype) if with_z else None)
    return out


@pytest.mark.parametrize("T", [1, 17, 1000])
@pytest.mark.parametrize("with_d, with_z", [(True, True), (False, False), (True, False)])
def test_matches_the_reference(T, with_d, with_z):
    a = args(T=T, with_d=with_d, with_z=with_z)
    y, h = selective_scan(*a)
    yr, hr = selective_scan_reference(*a)
    assert_close(y, yr, 1e-12, "y")
    assert_close(h, hr, 1e-12, "last state")


def test_float32_long_against_float64():
    a = args(Bt=1, D=8, T=4096, N=16)
    y, _ = selective_scan(*[t.float() for t in a])
    assert_close(y, selective_scan_reference(*a)[0], 1e-4, "fp32 T=4096")


@pytest.mark.parametrize("with_d, with_z", [(True, True), (False, False)])
def test_gradients(with_d, with_z):
    a = [t.clone().requires_grad_() if t is not None else None for t in args(T=9, with_d=with_d, with_z=with_z)]
    live = [t for t in a if t is not None]

    def f(*xs):
        it = iter(xs)
        return selective_scan(*[next(it) if t is not None else None for t in a])[0]

    assert torch.autograd.gradcheck(f, live)


def test_bad_input():
    a = args()
    with pytest.raises(ValueError, match="selective_scan shapes"):
        selective_scan(a[0], a[1], a[2][:, :2], *a[3:])
    with pytest.raises(TypeError, match="float32/float64 CPU"):
        selective_scan(*[t.half() if t is not None else None for t in a])
