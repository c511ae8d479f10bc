"""Diagonal batching: exact against the sequential model, forward and backward, and safe."""
import pytest
import torch
from torch import nn

import wavefront
from conftest import ARMT_KINDS, N_LAYERS, SEG, SEGMENT_COUNTS, VOCAB, build, ids_for, tiny_armt, tiny_rmt
from wavefront.models.opaque import OpaqueModule
from wavefront.contract.segment import SegmentCell, SegmentRecurrentLM
from wavefront.passes.diagonal import DiagonalBatchingIllegal, diagonal_batching
from wavefront.passes.lanes.stacking import LayersNotStackable
from wavefront.scheduler import capture
from wavefront.testing import assert_close, rel_err


def check_outputs(out, ref, rtol, what):
    assert_close(out.logits, ref.logits, rtol, f"{what} logits")
    for i, (x, y) in enumerate(zip(out.memory.tensors, ref.memory.tensors)):
        assert_close(x, y, rtol, f"{what} memory {i}")
    assert out.memory.segments_seen == ref.memory.segments_seen


@pytest.mark.parametrize("kind", ARMT_KINDS)
@pytest.mark.parametrize("S", SEGMENT_COUNTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_diagonal_equals_sequential_float64(kind, S, batch):
    model = build(kind)
    ids = ids_for(S, batch=batch, short_last=2 if batch == 2 and S * SEG > 2 else 0)
    ref = model(ids)
    fast = wavefront.optimize(model)
    check_outputs(fast(ids), ref, 1e-9, f"{kind} S={S} B={batch}")
    sched = wavefront.last_schedule(fast)
    assert sched.num_steps == N_LAYERS + S - 1
    for t, step in enumerate(sched.steps):
        assert set(step) == {(l, s) for l in range(N_LAYERS) for s in range(S) if l + s == t}


@pytest.mark.parametrize("kind", ARMT_KINDS)
def test_diagonal_float32(kind):
    model = build(kind, torch.float32)
    S = 2 * N_LAYERS + 1
    ids = ids_for(S, batch=2, short_last=1)
    check_outputs(wavefront.optimize(model)(ids), model(ids), 1e-4, f"{kind} fp32")


@pytest.mark.parametrize("kind", ARMT_KINDS)
def test_gradients_equal_sequential(kind):
    model = build(kind)
    ids = ids_for(N_LAYERS + 2, batch=2, short_last=1)
    target = torch.randn(ids.shape[0], ids.shape[1], VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss_of(out):
        return ((out.logits - target) ** 2).mean() + sum(t.pow(2).mean() for t in out.memory.tensors)

    loss_of(model(ids)).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = wavefront.optimize(model)
    loss_of(fast(ids)).backward()
    assert len(ref) > 10
    for n, p in model.named_parameters():
        if n in ref:
            assert_close(p.grad, ref[n], 1e-8, f"grad {n}")


def test_streaming_through_the_optimized_model():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(7, batch=2, short_last=3)
    whole = model(ids)
    a = fast(ids[:, :2 * SEG])
    b = fast(ids[:, 2 * SEG:], memory=a.memory)
    assert_close(torch.cat([a.logits, b.logits], 1), whole.logits, 1e-9, "streamed logits")
    check_outputs(b, type(b)(b.logits, whole.memory), 1e-9, "streamed memory")
    assert wavefront.last_schedule(fast).num_steps == N_LAYERS + 5 - 1


def unique_storage_bytes(model):
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ARMT_KINDS)
def test_parameters_become_views_of_the_stacks(kind):
    model = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    bytes_before = unique_storage_bytes(model)
    fast = wavefront.optimize(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p for n, p in model.named_parameters()} == params_before  # same Parameter objects
    assert unique_storage_bytes(model) <= 1.05 * bytes_before
    group = fast.batched.groups[0]
    name = group.stack.names[0]
    for i, l in enumerate(group.layers):
        t = dict(fast.rg.layer_graphs[l].named_parameters())[name]
        assert t.data_ptr() == group.stack.stacks[name][i].data_ptr()


def test_stale_stacks_are_rebuilt_after_model_to():
    model = tiny_armt(dtype=torch.float32)
    fast = wavefront.optimize(model)
    ids = ids_for(4)
    fast(ids)
    model.double()  # re-points every parameter and buffer: capture and stacks must follow
    out = fast(ids)
    assert out.logits.dtype == torch.float64
    for layer in fast.rg.layer_graphs:  # no captured graph still holds a float32 buffer
        assert all(b.dtype == torch.float64 for b in layer.buffers())
    check_outputs(out, model(ids), 1e-9, "after .double()")
    with torch.no_grad():  # in-place edits are seen through the shared storage
        model.cell.layers[1].memory.W_mv.weight.mul_(1.5)
    check_outputs(fast(ids), model(ids), 1e-9, "after in-place edit")
    stacks_before = fast.batched.groups[0].stack
    fast(ids)
    assert fast.batched.groups[0].stack is stacks_before  # no needless re-capture when nothing moved


def test_rmt_is_refused_naming_the_edge_and_runs_sequentially():
    rmt = tiny_rmt()
    with pytest.raises(DiagonalBatchingIllegal, match=rf"\({N_LAYERS - 1}, s\) -> \(0, s\+1\).*schedule='sequential'"):
        wavefront.optimize(rmt)
    ids = ids_for(4, batch=2)
    slow = wavefront.optimize(rmt, schedule="sequential", verify=True)
    check_outputs(slow(ids), rmt(ids), 0.0, "rmt sequential")
    assert wavefront.last_schedule(slow).num_steps == N_LAYERS * 4


def test_hybrid_stack_is_batched_per_kind():
    model = tiny_armt(d_ff_per_layer=(32, 48, 32))
    fast = wavefront.optimize(model)
    assert [g.layers for g in fast.batched.groups] == [(0, 2), (1,)]
    ids = ids_for(6, batch=2, short_last=1)
    check_outputs(fast(ids), model(ids), 1e-9, "hybrid")


def test_vmap_path_is_exact_too():
    model = tiny_armt()
    rg = capture(model)
    from wavefront.backends import TorchExecutor
    br = diagonal_batching(rg, fold=False)
    assert [g.mode for g in br.groups] == ["vmap"]
    ids = ids_for(5, batch=2, short_last=2)
    check_outputs(TorchExecutor(rg, br).run(ids, "diagonal"), model(ids), 1e-9, "vmap")


class RowMixingLayer(nn.Module):
    """Mixes batch rows (a batch-norm-like centring): lane folding would be wrong for it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, h, m):
        y = self.proj(h + m)
        y = y - y.mean(0, keepdim=True)
        return y, y.mean(1)


class RowMixingCell(SegmentCell):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([RowMixingLayer() for _ in range(3)])

    def initial_state(self, batch, dtype, device):
        return tuple(torch.zeros(batch, 1, 4, dtype=dtype, device=device) for _ in range(3))

    def forward(self, input_ids, first, state):
        h = self.embed(input_ids)
        new = []
        for i, layer in enumerate(self.layers):
            out = layer(h, state[i])
            h = out[0]
            new.append(out[1].unsqueeze(1))
        return h, tuple(new)


def test_fold_self_check_falls_back_to_vmap_for_row_mixing_layers():
    torch.manual_seed(0)
    model = SegmentRecurrentLM(RowMixingCell(), segment_len=3).double()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 10, (2, 14))
    check_outputs(fast(ids), model(ids), 1e-9, "row mixing")
    assert fast.batched.groups[0].mode == "vmap"
    assert "differed from the layers' own forward" in fast.batched.groups[0].cell.fallback_reason


def test_verify_catches_a_wrong_batched_cell():
    model = tiny_armt()
    fast = wavefront.optimize(model, verify=True)
    cell = fast.batched.groups[0].cell
    real = cell.forward

    def broken(params, lanes, layers=None):
        leaves, spec = real(params, lanes, layers)
        return [x + 1e-3 for x in leaves], spec

    cell.forward = broken
    with pytest.raises(wavefront.VerificationError, match="max relative error"):
        fast(ids_for(4))


def test_tied_layers_cannot_be_stacked():
    model = tiny_armt()
    model.cell.layers[2].block.q_proj.weight = model.cell.layers[0].block.q_proj.weight
    with pytest.raises(LayersNotStackable, match="tied weights"):
        wavefront.optimize(model)


def test_explain_reports_structure_verdict_and_steps():
    text = str(wavefront.explain(tiny_armt(), n_segments=5))
    assert "diagonal batching: legal" in text and "sequential 15, diagonal 7" in text
    rmt = wavefront.explain(tiny_rmt(), n_segments=5)
    assert not rmt.verdict.diagonal_legal and rmt.schedule == "sequential" and rmt.steps == {"sequential": 15}
    fast = wavefront.optimize(tiny_armt())
    fast(ids_for(4))
    text = str(wavefront.explain(fast))
    assert "steps for 4 segments" in text and "batched by fold" in text


def test_bad_input_is_rejected_and_nothing_changes():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = fast(ids_for(2, batch=2))
    kept = [t.clone() for t in good.memory.tensors]
    with pytest.raises(ValueError, match="empty"):
        fast(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        fast(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="batch size"):
        fast(ids_for(1, batch=1), memory=good.memory)
    with pytest.raises(ValueError, match="unknown schedule"):
        wavefront.optimize(model, schedule="zigzag")
    with pytest.raises(ValueError, match="unknown backend"):
        wavefront.optimize(model, backend="tpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(kept, good.memory.tensors))
    short = fast(ids_for(1, short_last=SEG - 1))  # input shorter than one segment
    assert short.logits.shape[1] == 1


def test_nan_propagates_exactly_as_in_the_reference():
    model = tiny_armt()
    with torch.no_grad():
        model.cell.embed_stage.embed.weight[7] = float("nan")
    ids = ids_for(5, batch=2)
    ids[ids == 7] = 8
    ids[0, SEG + 2] = 7  # row 0, segment 1: NaN there and, through memory, in every later segment
    ref = model(ids)
    out = wavefront.optimize(model)(ids)
    assert torch.equal(torch.isnan(out.logits), torch.isnan(ref.logits))
    assert torch.isnan(ref.logits[0, 2 * SEG:]).all() and not torch.isnan(ref.logits[0, :SEG]).any()
    assert not torch.isnan(ref.logits[1]).any()
    finite = ~torch.isnan(ref.logits)  # rel_err fails on any NaN: compare the finite entries
    assert rel_err(out.logits[finite], ref.logits[finite]) <= 1e-9


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.hf
def test_hugging_face_blocks_are_lane_folded(kind):
    model = build(kind)
    fast = wavefront.optimize(model)
    ids = ids_for(N_LAYERS + 2, batch=2, short_last=1)
    check_outputs(fast(ids), model(ids), 1e-9, f"{kind} folded")
    assert [g.mode for g in fast.batched.groups] == ["fold"]  # the first-call check against vmap passed


class PReLUBlock(OpaqueModule):
    """An opaque block holding a parameter leaf lane folding does not know (PReLU's slope)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.act = nn.PReLU()

    def forward(self, h, ctx=()):
        return h + self.act(self.proj(h))


def test_opaque_block_with_an_unknown_parameter_leaf_is_batched_by_vmap():
    from wavefront.models import ARMTLayer
    model = tiny_armt()
    with torch.no_grad():
        for i, layer in enumerate(model.cell.layers):
            model.cell.layers[i] = ARMTLayer(PReLUBlock(16).double(), layer.memory, layer.n_mem_tokens)
            model.cell.layers[i].block.act.weight.fill_(0.1 * (i + 1))
    fast = wavefront.optimize(model)
    group = fast.batched.groups[0]
    assert group.mode == "vmap" and "PReLU" in group.reason
    ids = ids_for(5, batch=2, short_last=2)
    check_outputs(fast(ids), model(ids), 1e-9, "vmap fallback")


def test_changing_a_shared_buffer_switches_the_kind_to_vmap():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(5, batch=2)
    fast(ids)
    with torch.no_grad():  # rotary tables folded as shared: make one layer's differ
        model.cell.layers[1].block.inv_freq.mul_(1.01)
    check_outputs(fast(ids), model(ids), 1e-9, "after a shared buffer changed")
    assert "buffer that was equal in every layer changed" in fast.batched.groups[0].cell.fallback_reason
