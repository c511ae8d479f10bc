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
import wavefront.kv_decode as kv_decode
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


def test_while_a_module_whose_code_reads_the_flag_trains_every_decode_call_runs_the_cell_itself():
    model = _armt()
    memory = model.cell.layers[1].memory
    memory.W_mk = nn.Sequential(memory.W_mk, nn.Dropout(0.0)).eval()  # in the write: left out of the graph
    decoder = CachedSegmentDecoder(model.cell, SEG)
    assert decoder.check(F64, "cpu") and decoder.logits_only is not None
    assert decoder.stream(None, 1, F64, "cpu").logits_only is decoder.logits_only
    memory.W_mk[0].train()  # a module whose code ignores the flag: the graph still serves
    assert decoder.stream(None, 1, F64, "cpu").logits_only is decoder.logits_only
    memory.W_mk[1].train()  # a dropout would draw (a batch norm would update its statistics)
    assert decoder.stream(None, 1, F64, "cpu").logits_only is None


def test_hooks_on_a_module_the_trace_ran_through_make_decoding_run_the_cell_itself():
    model = _armt()
    decoder = CachedSegmentDecoder(model.cell, SEG)
    assert decoder.check(F64, "cpu") and decoder.logits_only is not None
    seen = []
    handle = model.cell.layers[0].register_forward_hook(lambda m, args, out: seen.append(1))
    try:
        stream = decoder.stream(None, 1, F64, "cpu")
        assert stream.logits_only is None
        stream.feed(torch.zeros(1, 1, dtype=torch.long))
        assert seen == [1]  # the user's hook ran
    finally:
        handle.remove()
    handle = model.cell.lm_head.register_forward_hook(lambda m, args, out: None)  # a kept call: runs live
    try:
        assert decoder.stream(None, 1, F64, "cpu").logits_only is decoder.logits_only
    finally:
        handle.remove()


class _ScalingLayer(nn.Module):
    """A layer whose write scales the block's output in place before reading its memory rows."""

    def __init__(self, layer):
        super().__init__()
        self.block, self.memory = layer.block, layer.memory

    def forward(self, h, A, z, first, ctx=()):
        h = self.memory.read(h, A, z, first)
        h = self.block(h, ctx)
        m = h[:, -2:].clone()
        h.mul_(0.5)  # its result unused: fx's dead-code elimination would drop it, and the next layer reads h
        A, z = self.memory.write(m, A, z, first)
        return h, A, z


def test_an_in_place_op_the_graph_would_leave_out_is_refused():
    model = _armt()
    model.cell.layers[0] = _ScalingLayer(model.cell.layers[0])
    with pytest.raises(CaptureError, match=r"an op left out writes in place \(.*mul_"):
        logits_only_cell(model.cell)
    decoder = CachedSegmentDecoder(model.cell, SEG)
    assert decoder.check(F64, "cpu") and decoder.logits_only is None  # decoding runs the cell itself
    assert "writes in place" in decoder.logits_only_reason


def test_a_graph_proven_while_modules_train_is_the_one_handed_out_in_eval():
    """The proof runs the graph whatever the modes are now, so the graph handed out later is proven."""
    model = _armt().train()
    decoder = CachedSegmentDecoder(model.cell, SEG)
    proven = []
    real = kv_decode.DecodeStream.feed

    def feed(stream, ids):
        proven.append(stream.logits_only is not None)
        return real(stream, ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv_decode.DecodeStream, "feed", feed)
        assert decoder.check(F64, "cpu")
    assert proven and all(proven)


def test_a_second_check_waits_for_the_proof_in_flight():
    """Two generate() calls at once: the second must not take the graph (or the cell) before the
    first call's proof has decided which one is used."""
    import threading

    decoder = CachedSegmentDecoder(_armt().cell, SEG)
    proving, go, results = threading.Event(), threading.Event(), []
    prove = decoder._prove

    def slow_prove(dtype, device):
        proving.set()
        go.wait(30)
        prove(dtype, device)

    decoder._prove = slow_prove
    first = threading.Thread(target=lambda: results.append(decoder.check(F64, "cpu")))
    first.start()
    assert proving.wait(30)
    second = threading.Thread(target=lambda: results.append(decoder.check(F64, "cpu")))
    second.start()
    second.join(0.5)
    assert second.is_alive() and results == []  # held until the proof in flight ends
    go.set()
    first.join(30)
    second.join(30)
    assert results == [True, True] and decoder.logits_only is not None
