"""An optimized model sees every change the user makes to the model after optimize()."""
import warnings

import pytest
import torch

import wavefront
from conftest import SEG, build, ids_for, tiny_armt
from wavefront.passes.lanes.block_clones import LaneBlock
from wavefront.testing import assert_close, rel_err


def _dropout_gpt2(p=0.3):
    """An ARMT over a tiny GPT-2 whose blocks drop out (attention and residual) with probability p."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32, bos_token_id=0,
                         eos_token_id=0, resid_pdrop=p, attn_pdrop=p, embd_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).double()
    torch.manual_seed(1)
    return wavefront.models.wrap_armt(base, segment_len=SEG, n_mem_tokens=3, d_mem=4).double()


def _spread(f, ids, n=4):
    """Mean absolute difference between consecutive calls' logits: how much dropout moves them."""
    outs = [f(ids).logits.detach() for _ in range(n)]
    return sum((a - b).abs().mean().item() for a, b in zip(outs, outs[1:])) / (n - 1)


@pytest.mark.hf
def test_train_and_eval_reach_the_lane_clones_of_hugging_face_blocks():
    model = _dropout_gpt2().eval()
    fast = wavefront.optimize(model)
    ids = ids_for(5, batch=2)
    with torch.no_grad():
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "eval")
        model.train()
        fast(ids)
        clones = [m for m in fast.batched.groups[0].cell.folded.modules() if isinstance(m, LaneBlock)]
        assert clones and all(m.training for b in clones for m in b.clone.modules())
        torch.manual_seed(0)
        spread_model = _spread(model, ids)
        torch.manual_seed(0)
        spread_fast = _spread(fast, ids)
    print(f"dropout spread: model {spread_model:.4f}, optimized {spread_fast:.4f}")
    assert spread_model > 0 and 0.7 < spread_fast / spread_model < 1.4
    model.eval()
    with torch.no_grad():
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "eval again")


@pytest.mark.hf
def test_training_with_dropout_under_the_diagonal_schedule():
    model = _dropout_gpt2().train()
    fast = wavefront.optimize(model)
    ids = ids_for(5, batch=2)
    torch.manual_seed(0)
    loss = fast(ids).logits.square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert fast.batched.groups[0].mode == "fold" and fast.batched.groups[0].cell.checked
    model.eval()
    with torch.no_grad():  # the check ran in eval mode; the model's modes are back as they were
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "after training")


@pytest.mark.hf
def test_vmap_batched_kinds_draw_dropout_per_lane():
    model = _dropout_gpt2().train()
    fast = wavefront.optimize(model)
    cell = fast.batched.groups[0].cell
    cell.fallback_reason = "forced for this test"  # the kind runs through torch.func.vmap
    ids = ids_for(5, batch=2)
    torch.manual_seed(0)
    spread_model = _spread(model, ids)
    torch.manual_seed(0)
    spread_fast = _spread(fast, ids)
    assert 0.7 < spread_fast / spread_model < 1.4


def test_a_failed_self_check_never_leaves_the_unchecked_path_in_use():
    model = tiny_armt()
    ids = ids_for(5, batch=2)
    layer = model.cell.layers[1]
    real = layer.forward

    def fails_once(*args, **kwargs):
        layer.forward = real
        raise RuntimeError("the layer failed during the check")

    layer.forward = fails_once
    fast = wavefront.optimize(model)  # the fold checks itself in optimize(): the failure is reported, not used
    cell = fast.batched.groups[0].cell
    assert not cell.checked
    assert fast.executor.program is None and "failed during the check" in fast.executor.program_reason
    with torch.no_grad():
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "after the failed check")
    assert cell.checked


@pytest.mark.parametrize("kind", ["armt", pytest.param("llama", marks=pytest.mark.hf)])
def test_load_state_dict_with_assign_is_seen(kind):
    model = build(kind)
    other = build(kind, seed=5)
    fast = wavefront.optimize(model)
    ids = ids_for(4, batch=2)
    with torch.no_grad():
        fast(ids)
        fast(ids)  # the one-program path is in use from here
        model.load_state_dict(other.state_dict(), assign=True)
        assert_close(fast(ids).logits, other(ids).logits, 1e-9, "after load_state_dict(assign=True)")
    assert "new tensor object" in fast.refreshed


def test_in_place_weight_changes_are_seen_without_a_new_capture():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(4)
    with torch.no_grad():
        fast(ids)
        fast(ids)
        model.cell.memory.mul_(3.0)
        model.cell.layers[1].memory.W_mv.weight.add_(0.5)
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "after in-place changes")
    assert fast.refreshed == ""


def test_an_in_place_change_of_one_layers_buffer_is_seen_on_the_one_program_path():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(4, batch=2)
    with torch.no_grad():
        fast(ids)
        fast(ids)
        assert fast.executor.program is not None
        model.cell.layers[2].block.inv_freq.mul_(1.5)  # one layer's rotary table: no longer shared
        out = fast(ids)
        assert_close(out.logits, model(ids).logits, 1e-9, "after a buffer change in one layer")
        assert fast.executor.program is None
    assert "step by step" in str(wavefront.explain(fast))


def test_a_changed_constant_is_seen():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(4)
    with torch.no_grad():
        fast(ids)
        for layer in model.cell.layers:
            layer.block.attn_norm.eps = 0.5  # baked into the traced graph as a constant
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "after changing eps")
    assert "eps" in fast.refreshed and "eps" in str(wavefront.explain(fast))


def test_a_replaced_module_is_seen():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(4)
    with torch.no_grad():
        fast(ids)
        model.cell.lm_head = torch.nn.Linear(16, 50, bias=True).double()
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "after replacing the head")


def test_model_to_another_dtype_is_seen():
    model = tiny_armt()
    fast = wavefront.optimize(model)
    ids = ids_for(4)
    with torch.no_grad():
        fast(ids)
        model.float()
        out = fast(ids)
        assert out.logits.dtype == torch.float32
        assert rel_err(out.logits, model(ids).logits) < 1e-5


@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_a_layer_appended_after_optimize_is_seen(schedule):
    import copy
    model = tiny_armt()
    fast = wavefront.optimize(model, schedule=schedule)
    ids = ids_for(4, batch=2)
    with torch.no_grad():
        fast(ids)
        model.cell.layers.append(copy.deepcopy(model.cell.layers[2]))
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, f"after appending a layer ({schedule})")
    assert fast.rg.n_layers == 4 and "gained or lost" in fast.refreshed


class _Scaled(torch.nn.Module):
    """A head scaled by a plain tensor attribute (not a buffer): torch.fx bakes the object in."""

    def __init__(self, head):
        super().__init__()
        self.head, self.scale = head, torch.tensor(2.0, dtype=torch.float64)

    def forward(self, x):
        return self.head(x) * self.scale


def test_a_replaced_plain_tensor_attribute_is_seen():
    model = tiny_armt()
    model.cell.lm_head = _Scaled(model.cell.lm_head)
    fast = wavefront.optimize(model)
    ids = ids_for(4, batch=2, short_last=1)  # the step-by-step path reads the captured graph's constant
    with torch.no_grad():
        fast(ids)
        model.cell.lm_head.scale = torch.tensor(-3.0, dtype=torch.float64)
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "after replacing a tensor attribute")


def test_vmap_lanes_draw_different_dropout_masks_in_one_call():
    from torch import fx
    from wavefront.passes.lanes.signature import LaneSignature
    from wavefront.passes.lanes.vmap_cell import VmapLaneCell
    template = fx.symbolic_trace(torch.nn.Dropout(0.5))
    g = fx.Graph()
    x, first = g.placeholder("x"), g.placeholder("first")
    call = g.call_module("layer", (x,))
    cell = VmapLaneCell(template, LaneSignature(call, first))
    lanes = torch.ones(2, 3, 64).expand(2, 3, 64)  # the same input in both lanes
    (out,), _ = cell({}, [lanes])
    assert not torch.equal(out[0], out[1])
