"""Models built with the public ARMT code (its wrapper classes, duck-typed) run as they are."""
import pytest
import torch

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
    from wavefront.export_segments import OnnxSegmentSession
    model = published("llama").float()
    path = str(tmp_path / "published.onnx")
    wavefront.export_onnx(wavefront.optimize(model), (ids_for(4, batch=1),), path)
    for n_segments in (2, 6):
        ids = ids_for(n_segments, batch=1)
        with torch.no_grad():
            assert_close(OnnxSegmentSession(path)(ids).logits, model(ids), 1e-4, f"published ARMT, S={n_segments}")
