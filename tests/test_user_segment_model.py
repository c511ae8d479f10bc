"""A segment model the user writes on the contract, with a memory that is not ARMT's, written the
natural way (zip over layers and state, a (slots, mass) pair per layer, a dict of states), gets
everything ARMT gets: diagonal batching exact in float64, the one program chosen at optimize(),
the compiled backends, and ONNX export with a dynamic segment count."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import wavefront
from wavefront.contract.segment import SegmentCell, SegmentRecurrentLM
from wavefront.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("slot_memory_lm", os.path.join(ROOT, "examples", "slot_memory_lm.py"))
slot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slot)

L, SEG = 3, 8


def slot_model(dtype=torch.float64, **kw):
    cfg = dict(n_layers=L, d=16, n_heads=2, n_slots=3, d_ff=32, segment_len=SEG, vocab_size=40, dtype=dtype)
    cfg.update(kw)
    return slot.slot_memory_lm(**cfg)


def ids(S, batch=2, short_last=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (batch, S * SEG - short_last), generator=g)


def _close(out, ref, tol, what):
    assert_close(out.logits, ref.logits, tol, f"{what} logits")
    for a, b in zip(out.memory.leaves(), ref.memory.leaves(), strict=True):
        assert_close(a, b, tol, f"{what} memory")
    assert out.memory.segments_seen == ref.memory.segments_seen


@pytest.mark.parametrize("S,short_last", [(2, 0), (2 * L + 1, 0), (L + 1, 3), (1, 0)])
def test_diagonal_batching_is_exact_in_float64(S, short_last):
    model = slot_model()
    fast = wavefront.optimize(model)
    assert fast.executor.program is not None, fast.executor.program_reason
    x = ids(S, short_last=short_last, seed=S)
    with torch.no_grad():
        out, ref = fast(x), model(x)
    _close(out, ref, 1e-12, f"S={S}")
    assert fast.executor.last_path == ("step by step" if short_last else "one program")
    assert type(out.memory.tensors[0]) is tuple and len(out.memory.tensors) == L  # the model's own structure


def test_streaming_and_gradients_match_the_models_own_forward():
    model = slot_model()
    fast = wavefront.optimize(model)
    x = ids(2 * L + 1)
    with torch.no_grad():
        first = fast(x[:, :2 * SEG])
        second = fast(x[:, 2 * SEG:], first.memory)
        ref = model(x)
    assert_close(torch.cat([first.logits, second.logits], 1), ref.logits, 1e-12, "streamed")
    fast(x).logits.square().mean().backward()
    mine = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).logits.square().mean().backward()
    for n, p in model.named_parameters():
        assert_close(mine[n], p.grad, 1e-10, f"grad {n}")


def test_the_one_program_exports_with_a_dynamic_segment_count(tmp_path):
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    model = slot_model()
    path = str(tmp_path / "slot.onnx")
    wavefront.export_onnx(wavefront.optimize(model), (ids(2),), path)  # checked in onnxruntime against the model
    session = OnnxSegmentSession(path)
    for S in (1, L, 2 * L + 1):
        x = ids(S, seed=S)
        _close(session(x), model(x), 1e-9, f"onnx S={S}")
    x = ids(4)
    head = session(x[:, :SEG])
    assert_close(session(x[:, SEG:], head.memory).logits, model(x).logits[:, SEG:], 1e-9, "onnx streamed")


@pytest.mark.parametrize("backend", ["onnxruntime"])
def test_the_onnxruntime_backend_runs_it(backend):
    model = slot_model()
    fast = wavefront.optimize(model, backend=backend, verify=True)
    x = ids(L + 2, short_last=2)
    _close(fast(x), model(x), 1e-9, backend)


class DictStateCell(SegmentCell):
    """The same layers, the state as a dict keyed by layer name, read with self.layers[i]."""

    def __init__(self, inner):
        super().__init__()
        self.embed, self.layers, self.norm, self.head = inner.embed, inner.layers, inner.norm, inner.head
        self.inner = inner

    def initial_state(self, batch, dtype, device):
        return {f"layer{i}": s for i, s in enumerate(self.inner.initial_state(batch, dtype, device))}

    def forward(self, input_ids, first, state):
        h = self.embed(input_ids)
        new = {}
        for i in range(len(self.layers)):
            slots, mass = state[f"layer{i}"]
            h, (slots, mass) = self.layers[i](h, (slots, mass), first)
            new[f"layer{i}"] = (slots, mass)
        return self.head(self.norm(h)), new


def test_a_dict_of_states_read_by_index_is_captured_and_batched():
    inner = slot_model().cell
    model = SegmentRecurrentLM(DictStateCell(inner), SEG).double().eval()
    fast = wavefront.optimize(model)
    assert fast.executor.program is not None, fast.executor.program_reason
    x = ids(L + 2)
    with torch.no_grad():
        _close(fast(x), model(x), 1e-12, "dict state")


class GlueCell(DictStateCell):
    """Something between layers (a scale): diagonal batching stays legal, the one program does not apply."""

    def forward(self, input_ids, first, state):
        h = self.embed(input_ids)
        new = {}
        for i in range(len(self.layers)):
            h, new[f"layer{i}"] = self.layers[i](h * 0.5, state[f"layer{i}"], first)
        return self.head(self.norm(h)), new


def test_glue_between_layers_runs_step_by_step_and_says_why():
    model = SegmentRecurrentLM(GlueCell(slot_model().cell), SEG).double().eval()
    fast = wavefront.optimize(model)
    assert fast.executor.program is None and "neither the previous layer's output" in fast.executor.program_reason
    assert "step by step (layer input 0" in str(wavefront.explain(fast))
    x = ids(L + 2)
    with torch.no_grad():
        _close(fast(x), model(x), 1e-12, "glue")


class ReadsNeighbourCell(DictStateCell):
    """Layer i reads layer i-1's memory too: not the one program's layout (but still legal)."""

    def forward(self, input_ids, first, state):
        h = self.embed(input_ids)
        new = {}
        for i in range(len(self.layers)):
            slots, mass = state[f"layer{i}"]
            if i:
                slots = slots + state[f"layer{i - 1}"][0]
            h, new[f"layer{i}"] = self.layers[i](h, (slots, mass), first)
        return self.head(self.norm(h)), new


def test_a_layer_reading_another_layers_state_is_not_batched_silently():
    model = SegmentRecurrentLM(ReadsNeighbourCell(slot_model().cell), SEG).double().eval()
    fast = wavefront.optimize(model)
    assert fast.executor.program is None
    x = ids(L + 2)
    with torch.no_grad():
        _close(fast(x), model(x), 1e-12, "neighbour state")


class MixesRowsCell(DictStateCell):
    """The part before the layers centres the batch (it mixes rows): folding segments into rows
    would change it, so the program is refused and the model runs step by step, exactly."""

    def forward(self, input_ids, first, state):
        h = self.embed(input_ids)
        h = h - h.mean(0, keepdim=True)
        new = {}
        for i in range(len(self.layers)):
            h, new[f"layer{i}"] = self.layers[i](h, state[f"layer{i}"], first)
        return self.head(self.norm(h)), new


def test_a_part_before_the_layers_that_mixes_rows_is_not_batched_over_segments():
    model = SegmentRecurrentLM(MixesRowsCell(slot_model().cell), SEG).double().eval()
    fast = wavefront.optimize(model)
    assert fast.executor.program is None and "neither per row nor" in fast.executor.program_reason
    x = ids(L + 2)
    with torch.no_grad():
        _close(fast(x), model(x), 1e-12, "rows mixed before the layers")


def test_the_example_script_builds_the_same_model_it_documents():
    model = slot.slot_memory_lm(n_layers=2)
    assert isinstance(model.cell, SegmentCell) and not any(isinstance(m, nn.Embedding) and m.num_embeddings != 128
                                                          for m in model.cell.embed.modules())
