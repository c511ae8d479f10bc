"""Models built with the public ARMT code (its wrapper classes, duck-typed) run as they are."""
import pytest
import torch

import published_armt_standin
from conftest import SEG, ids_for, tiny_gpt2, tiny_llama
from published_armt_standin import AssociativeMemoryCell, AssociativeRecurrentWrapper
from wavefront.backends import TorchExecutor
from wavefront.scheduler import capture
from wavefront.testing import assert_close

pytestmark = pytest.mark.hf


def published(kind, n_mem=3):
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    torch.manual_seed(7)
    attr, wrap_pos = ("model.layers", False) if kind == "llama" else ("transformer.h", True)
    cell = AssociativeMemoryCell(base, num_mem_tokens=n_mem, d_mem=4, layers_attr=attr, wrap_pos=wrap_pos)
    return AssociativeRecurrentWrapper(cell, segment_size=SEG).double().eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_published_model_runs_as_is(kind, schedule):
    model = published(kind)
    rg = capture(model)
    assert rg.adapter == "published-armt" and rg.n_layers == 3 and rg.uniform
    assert [(link.producer, link.consumers) for link in rg.structure.state_links] == \
        [(l, (l,)) for l in range(3) for _ in range(2)]
    ids = ids_for(5, batch=2, short_last=1)
    ref = model(ids)
    out = TorchExecutor(rg).run(ids, schedule)
    assert_close(out.logits, ref, 1e-10, f"published {kind} {schedule}")


def test_adapter_uses_the_models_own_weights():
    model = published("llama")
    rg = capture(model)
    ids = ids_for(3)
    before = TorchExecutor(rg).run(ids).logits
    with torch.no_grad():
        model.memory_cell.layers[1].W_mv.weight.mul_(2.0)  # edit the published module in place
    after = TorchExecutor(rg).run(ids).logits
    assert not torch.equal(before[:, SEG:], after[:, SEG:])
    assert_close(after, model(ids), 1e-10, "after editing weights")


def test_unsupported_published_options_are_refused():
    model = published("llama")
    model.rmt_config["segment_alignment"] = "right"
    with pytest.raises(TypeError, match="segment_alignment"):
        capture(model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_optimize_runs_a_published_model_diagonally(kind):
    import wavefront
    model = published(kind)
    ids = ids_for(5, batch=2, short_last=2)
    ref = model(ids)
    fast = wavefront.optimize(model, verify=True)
    assert_close(fast(ids).logits, ref, 1e-9, f"optimized published {kind}")
    assert wavefront.last_schedule(fast).num_steps == 3 + 5 - 1
    assert "published-armt" in str(wavefront.explain(fast))


def test_published_model_exports_to_onnx_under_the_diagonal_schedule(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import wavefront
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    model = published("llama").float()
    path = str(tmp_path / "published.onnx")
    wavefront.export_onnx(wavefront.optimize(model), (ids_for(4, batch=1),), path)
    for n_segments in (2, 6):
        ids = ids_for(n_segments, batch=1)
        with torch.no_grad():
            assert_close(OnnxSegmentSession(path)(ids).logits, model(ids), 1e-4, f"published ARMT, S={n_segments}")


VARIANTS = {
    "experimental, 2 heads": dict(experimental=True, n_heads=2),
    "experimental, gating": dict(experimental=True, n_heads=2, gating=True),
    "experimental, 1 head": dict(experimental=True),
    "no correction": dict(correction=False),
}


def variant(options, kind="llama"):
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    torch.manual_seed(7)
    attr, wrap_pos = ("model.layers", False) if kind == "llama" else ("transformer.h", True)
    cell = AssociativeMemoryCell(base, num_mem_tokens=3, d_mem=4, layers_attr=attr, wrap_pos=wrap_pos, **options)
    return AssociativeRecurrentWrapper(cell, segment_size=SEG).double().eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_of_the_client_memory_code_run_exactly(name):
    """The client's own associate / update_mem run: its branch's rules, whatever they are."""
    import wavefront
    model = variant(VARIANTS[name])
    ids = ids_for(5, batch=2, short_last=2)
    ref = model(ids)
    for schedule in ("diagonal", "sequential"):
        fast = wavefront.optimize(model, schedule=schedule, verify=True)
        assert_close(fast(ids).logits, ref, 1e-9, f"{name}, {schedule}")


def test_a_zero_initialised_memory_projection_is_still_exact():
    """The public code starts W_mv at zero (memory a no-op until trained): the proof at bind time
    draws random memory weights too, and the model's own weights come back untouched."""
    import wavefront
    model = variant(VARIANTS["experimental, 2 heads"])
    with torch.no_grad():
        for layer in model.memory_cell.layers:
            layer.W_mv.weight.zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = wavefront.optimize(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        for layer in model.memory_cell.layers:
            layer.W_mv.weight.normal_()  # "trained": the memory now matters
    ids = ids_for(5, batch=2)
    assert_close(fast(ids).logits, model(ids), 1e-9, "after W_mv became non-zero")


class ReadAfterBlock(published_armt_standin.AssociativeLayerWrapper):
    """A client variant whose forward reads the memory after the block instead of before: code the
    adapter's glue does not follow."""

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        if not self.first_seg:
            h = self.associate(h) + h
        self.update_mem(h[:, -self.num_mem_tokens:])
        self.first_seg = False
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


def test_client_code_the_adapter_does_not_follow_runs_unchanged_with_the_reason():
    import wavefront
    model = published("llama")
    for i, w in enumerate(model.memory_cell.layers):
        w.__class__ = ReadAfterBlock
    ids = ids_for(4, batch=2)
    ref = model(ids)
    with pytest.warns(UserWarning, match="runs unchanged"):
        fast = wavefront.optimize(model, verify=True)
    assert isinstance(fast, wavefront.api.UnchangedModel)
    assert "segment 1" in fast.reason and "differs from the model's own forward" in fast.reason
    assert "runs unchanged" in str(wavefront.explain(fast)) and "runs unchanged" in str(wavefront.explain(model))
    assert torch.equal(fast(ids), ref)
    with pytest.raises(TypeError, match="differs from the model's own forward"):
        capture(model)


def test_load_state_dict_with_assign_reaches_every_published_parameter():
    """The memory tokens and the final norm included (parameters the cell reads directly)."""
    import wavefront
    model, other = published("llama"), published("llama", n_mem=3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = ids_for(4, batch=2)
    fast = wavefront.optimize(model)
    with torch.no_grad():
        fast(ids)
        fast(ids)
        model.load_state_dict(other.state_dict(), assign=True)
        assert_close(fast(ids).logits, other(ids), 1e-9, "after load_state_dict(assign=True)")


def test_a_multi_head_published_model_exports_and_runs_from_fresh_memory(tmp_path):
    """Its memory states are [heads, d_key / heads, d / heads] per layer: the session builds fresh
    memory of that shape (it assumed [d_key, d])."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import wavefront
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    model = variant(VARIANTS["experimental, 2 heads"]).float()
    path = str(tmp_path / "heads.onnx")
    wavefront.export_onnx(wavefront.optimize(model), (ids_for(3, batch=1),), path)
    ids = ids_for(4, batch=1)
    with torch.no_grad():
        assert_close(OnnxSegmentSession(path)(ids).logits, model(ids), 1e-4, "2-head published ARMT in onnxruntime")


class ZeroMemReadsTheLayer(published_armt_standin.AssociativeLayerWrapper):
    """As some public versions do: zero_mem takes its dtype from the wrapped layer."""

    def zero_mem(self):
        super().zero_mem()
        dtype = next(self.layer.parameters()).dtype
        self.W_mem, self.z = self.W_mem.to(dtype), self.z.to(dtype)


class TrainModeKeepsMemory(published_armt_standin.AssociativeRecurrentWrapper):
    """As the public wrapper does in training: the memory is left in the layers after forward."""

    def forward(self, input_ids):
        size = self.rmt_config["segment_size"]
        self.memory_cell.zero_mem()
        logits = [self.memory_cell(input_ids[:, i:i + size]) for i in range(0, input_ids.shape[1], size)]
        if not self.training:
            self.memory_cell.zero_mem()
        return torch.cat(logits, dim=1)


def test_a_zero_mem_that_reads_the_wrapped_layer_works():
    import wavefront
    model = published("llama")
    for w in model.memory_cell.layers:
        w.__class__ = ZeroMemReadsTheLayer
        w.zero_mem()
    ids = ids_for(4, batch=2)
    assert_close(wavefront.optimize(model)(ids).logits, model(ids), 1e-9, "zero_mem reading self.layer")


def test_client_code_that_fails_on_explicit_state_is_refused_not_a_crash():
    import wavefront

    class Broken(published_armt_standin.AssociativeLayerWrapper):
        def zero_mem(self):
            raise RuntimeError("needs something wavefront does not give")

    model = published("llama")
    for w in model.memory_cell.layers:
        w.__class__ = Broken
    with pytest.warns(UserWarning, match="runs unchanged"):
        fast = wavefront.optimize(model)
    assert isinstance(fast, wavefront.api.UnchangedModel) and "needs something" in fast.reason


def test_the_clients_own_state_is_neither_a_change_nor_erased():
    """The client's forward in training mode leaves its memory in the layers: no new capture for
    that, and optimize() itself (which runs the client's forward for its proof) keeps it."""
    import wavefront
    model = published("llama")
    model.__class__ = TrainModeKeepsMemory
    ids = ids_for(3, batch=2)
    fast = wavefront.optimize(model)
    with torch.no_grad():
        fast(ids)
        model.train()
        model(ids)
        model.eval()
        carried = [w.W_mem.clone() for w in model.memory_cell.layers]
        assert any(c.abs().sum() > 0 for c in carried)
        assert_close(fast(ids).logits, model(ids), 1e-9, "after the client's own training-mode call")
        assert fast.refreshed == ""
        model.train()
        model(ids)
        carried = [w.W_mem.clone() for w in model.memory_cell.layers]
        wavefront.optimize(model.eval())
    assert all(torch.equal(c, w.W_mem) for c, w in zip(carried, model.memory_cell.layers))
