"""A list a lifted loop appends to and the function then only stacks (`outs.append(h)` ... then
`torch.stack(outs, d)`) gets the scan's stacked outputs directly: no list of T tensors, exact,
with gradients, and exportable at a dynamic length. Any other use of the list keeps the list."""
import os

import pytest
import torch
from torch import nn

import wavefront
from wavefront.models import MinGRU
from wavefront.testing import assert_close
from wavefront.time_loops.runner import LoopRunner

F64 = torch.float64


class Gated(nn.Module):
    """h_t = a_t h_{t-1} + (1 - a_t) x_t, appended; stacked on `dim` (or torch.stack's default)."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        hs = []
        for t in range(x.shape[1]):
            a = torch.sigmoid(x[:, t])
            h = a * h + (1 - a) * x[:, t]
            hs.append(h)
        if self.dim is None:
            return torch.stack(hs)
        return torch.stack(hs, dim=self.dim) if self.dim < 0 else torch.stack(hs, self.dim)


class GatedBackwards(nn.Module):
    """The same gate run from the last step, appending as it goes."""

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        hs = []
        for t in reversed(range(x.shape[1])):
            a = torch.sigmoid(x[:, t])
            h = a * h + (1 - a) * x[:, t]
            hs.append(h)
        return torch.stack(hs, 1)


class KeepsTheList(nn.Module):
    """The list is read after the loop (its last element): it must hold the T tensors."""

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        hs = []
        for t in range(x.shape[1]):
            h = 0.5 * h + x[:, t]
            hs.append(h)
        return torch.stack(hs, 1), hs[-1]


class StartsNonEmpty(nn.Module):
    """The list holds the initial state before the loop: the stack has T + 1 entries."""

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        hs = [h]
        for t in range(x.shape[1]):
            h = 0.5 * h + x[:, t]
            hs.append(h)
        return torch.stack(hs, 1)


def _deferred(fast) -> list[str]:
    return [o.stacked for _, lf in fast.loops for s in lf.sites for o in s.outputs]


@pytest.mark.parametrize("dim", [None, 0, 1, 2, -1, -3])
def test_a_stacked_list_takes_the_scan_outputs_directly_exactly_with_gradients(dim):
    model = Gated(dim)
    x = torch.randn(3, 11, 5, dtype=F64, requires_grad=True)
    fast = wavefront.optimize(model, verify=True)
    out, ref = fast(x), model(x)
    assert all(_deferred(fast)) and "ran as a scan" in str(wavefront.explain(fast))
    assert out.shape == ref.shape and out.is_contiguous()
    assert_close(out, ref, 1e-12, f"stack dim {dim}")
    g_out, = torch.autograd.grad((out * torch.arange(out.numel(), dtype=F64).reshape(out.shape)).sum(), x)
    g_ref, = torch.autograd.grad((ref * torch.arange(ref.numel(), dtype=F64).reshape(ref.shape)).sum(), x)
    assert_close(g_out, g_ref, 1e-12, f"gradients, stack dim {dim}")


def test_a_reversed_loop_stacks_in_the_order_it_appended():
    model = GatedBackwards()
    x = torch.randn(2, 9, 4, dtype=F64)
    fast = wavefront.optimize(model)
    assert_close(fast(x), model(x), 1e-12, "reversed appends")
    assert all(_deferred(fast))


@pytest.mark.parametrize("T", [1, 2, 7])
def test_any_length_and_the_declined_empty_loop(T):
    model = Gated(1)
    fast = wavefront.optimize(model)
    x = torch.randn(2, T, 3, dtype=F64)
    assert_close(fast(x), model(x), 1e-12, f"T={T}")


@pytest.mark.parametrize("cls", [KeepsTheList, StartsNonEmpty])
def test_any_other_use_of_the_list_keeps_the_list(cls):
    model = cls()
    fast = wavefront.optimize(model)
    assert _deferred(fast) == [""]  # proved from the source: the list is looked at, or starts non-empty
    x = torch.randn(2, 6, 3, dtype=F64)
    for got, want in zip(*(o if isinstance(o, tuple) else (o,) for o in (fast(x), model(x)))):
        assert_close(got, want, 1e-12, cls.__name__)
    assert "ran as a scan" in str(wavefront.explain(fast))


def test_stacked_gives_what_torch_stack_gives_and_refuses_a_bad_dim():
    y = torch.randn(4, 2, 3)
    for d in range(-3, 3):
        got = LoopRunner.stacked(y, [], d)
        assert torch.equal(got, torch.stack(list(y), d)) and got.is_contiguous()
        assert got.data_ptr() != y.data_ptr()  # its own storage, as torch.stack's
    with pytest.raises(IndexError, match="Dimension out of range"):
        LoopRunner.stacked(y, [], 3)
    assert torch.equal(LoopRunner.stacked(None, list(y), 1), torch.stack(list(y), 1))  # the original loop ran


def test_an_appending_loop_exports_with_a_dynamic_length(tmp_path):
    pytest.importorskip("onnxruntime")
    from wavefront.backends.onnx.graphs import run_onnx
    model = MinGRU(4).double().eval()
    path = os.fspath(tmp_path / "mingru.onnx")
    proto = wavefront.export_onnx(model, (torch.randn(2, 8, 4, dtype=F64),), path)
    assert "Scan" in {n.op_type for n in proto.graph.node}
    for T in (1, 5, 33):  # (the batch stays the example's: only the time dim is dynamic)
        x = torch.randn(2, T, 4, dtype=F64)
        with torch.no_grad():
            assert_close(run_onnx(path, (x,))[0], model(x), 1e-9, f"onnxruntime, T={T}")


def test_a_list_the_model_reads_is_refused_at_export_not_frozen(tmp_path):
    pytest.importorskip("onnxruntime")
    from wavefront.export import ExportError
    with pytest.raises(ExportError, match="appended to the list `hs`.*write them into a tensor"):
        wavefront.export_onnx(KeepsTheList(), (torch.randn(1, 9, 4),), os.fspath(tmp_path / "k.onnx"))
