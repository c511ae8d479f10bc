"""The cell traced with its logits as its only output (wavefront/scheduler/logits_only.py), which
generate() runs for decode calls that leave their segment open: the same logits as the cell,
bitwise in float64, with the memory write left out; refused, with the reason, where the trace would
consult the key/value window or leaves nothing out; a graph that differs is caught by the
decoder's check, which then decodes through the cell itself."""
import pytest
import torch
from test_kv_decode import SEG, _armt, _hf_armt
from torch import nn
from wavefront.scheduler.capture import CaptureError
from wavefront.scheduler.logits_only import logits_only_cell

import wavefront
from wavefront.contract.kv_window import KVWindow, active_window
from wavefront.kv_decode import CachedSegmentDecoder

F64 = torch.float64


def _hf_llama_armt():
    return _hf_armt("llama")


@pytest.mark.parametrize("make", [_armt, _hf_llama_armt], ids=["armt", "hf-llama"])
def test_the_logits_equal_the_cell_s_bitwise_and_the_write_is_left_out(make):
    cell = make().cell
    graph = logits_only_cell(cell)
    written = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert not any(t.endswith(("W_mk", "W_mv", "W_mb")) for t in written)  # the write's projections are gone
    assert any(t.endswith("W_mq") for t in written)  # the read stays: the tokens read the memory
    ids = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = cell(ids, torch.tensor(True), cell.initial_state(2, F64, "cpu"))  # a written memory
        for offset in (0, 1):  # in a window, as decoding runs it, and from the written memory
            windows = [KVWindow([], 0, offset + 1), KVWindow([], 0, offset + 1)]
            with windows[0]:
                want = cell(ids[:, :offset + 1], torch.tensor(False), state)[0]
            with windows[1]:
                got = graph(ids[:, :offset + 1], torch.tensor(False), state)
            assert torch.equal(got, want)
            assert len(windows[1].present) == len(windows[0].present)  # the blocks took the window as live calls


class _PeekingLayer(nn.Module):
    """A layer whose own code (traced through, not a kept call) asks for the window."""

    def __init__(self, layer):
        super().__init__()
        self.inner, self.memory = layer, layer.memory  # the cell reads each layer's memory for its state

    def forward(self, h, A, z, first, ctx=()):
        if active_window() is not None and active_window().offset:
            h = h * 1.0
        return self.inner(h, A, z, first, ctx)


def test_a_trace_that_would_consult_the_window_is_refused():
    model = _armt()
    model.cell.layers[1] = _PeekingLayer(model.cell.layers[1])
    with pytest.raises(CaptureError, match=r"consults the key/value window \(\.offset\) at trace time"):
        logits_only_cell(model.cell)


class _AllLogitsCell(nn.Module):
    """A cell whose every op feeds its logits (its state passes through unchanged)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def initial_state(self, batch, dtype, device):
        return (torch.zeros(batch, 4, dtype=dtype, device=device),)

    def forward(self, input_ids, first, state):
        return self.layers[0](state[0]) + input_ids.sum(), state


def test_a_cell_with_nothing_to_leave_out_is_refused():
    with pytest.raises(CaptureError, match="nothing to leave out"):
        logits_only_cell(_AllLogitsCell())


def test_a_logits_only_graph_that_differs_is_caught_and_the_cell_itself_decodes(monkeypatch):
    import wavefront.kv_decode as kv_decode

    def off_by_a_little(cell):
        graph = logits_only_cell(cell)
        return lambda *args: graph(*args) + 1e-3

    monkeypatch.setattr(kv_decode, "logits_only_cell", off_by_a_little)
    model = _armt()
    decoder = CachedSegmentDecoder(model.cell, SEG)
    assert decoder.check(F64, "cpu") and decoder.logits_only is None, decoder.reason
    assert decoder.logits_only_reason.startswith("its decode calls differ from the cell's")
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    got = fast.generate(ids, max_new_tokens=6)
    assert fast.cached_decoder() is not None and fast.cached_decoder().logits_only is None
    want = ids
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, model(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)


def test_while_a_module_trains_every_decode_call_runs_the_cell_itself():
    model = _armt()
    decoder = CachedSegmentDecoder(model.cell, SEG)
    assert decoder.check(F64, "cpu") and decoder.logits_only is not None
    assert decoder.stream(None, 1, F64, "cpu").logits_only is decoder.logits_only
    model.cell.layers[1].memory.train()  # e.g. a BatchNorm in the write would update its statistics
    assert decoder.stream(None, 1, F64, "cpu").logits_only is None
