"""The exported segment graph as anyone runs it: a plain onnxruntime session, input_ids only.

One float64 ARMT graph exported at batch 1 serves every test here: other batches, any length
(a short last segment, fewer tokens than a segment), the memory inputs left out or given,
streaming, transformers-like names, and float64 exactness against the model's own forward.
"""
import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import wavefront  # noqa: E402
from conftest import N_LAYERS, SEG, tiny_armt  # noqa: E402
from wavefront.passes.segment_plan import stack_state  # noqa: E402
from wavefront.testing import assert_close  # noqa: E402

EXACT = 1e-9  # float64
pytestmark = pytest.mark.xdist_group("segment_graph")  # one worker: the module's one export serves all tests


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exported from a model in training mode with one module in eval (the modes must come back)."""
    model = tiny_armt(torch.float64).train()
    model.cell.norm.eval()
    modes = [m.training for m in model.modules()]
    path = str(tmp_path_factory.mktemp("onnx") / "armt.onnx")
    proto = wavefront.export_onnx(wavefront.optimize(model), (torch.randint(0, 50, (1, 2 * SEG)),), path)
    assert [m.training for m in model.modules()] == modes, "export changed the model's train/eval modes"
    return model.eval(), path, proto


def _layout(model):
    """ARMT's memory leaves (A_0, z_0, A_1, ...) as the graph stacks them: position p over the layers."""
    return [[2 * l, 2 * l + 1] for l in range(N_LAYERS)]


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the defaults-as-initializers note onnxruntime prints at load
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def test_inputs_and_outputs_are_named_like_transformers_exports(exported):
    _, path, _ = exported
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids"]  # everything else has a default
    assert sorted(i.name for i in session.get_overridable_initializers()) == [
        "past_memory.0", "past_memory.1", "past_segments_seen"]
    assert [o.name for o in session.get_outputs()] == ["logits", "present_segments_seen", "present_memory.0",
                                                      "present_memory.1"]
    assert session.get_inputs()[0].shape == ["batch", "tokens"]
    shapes = {o.name: o.shape for o in session.get_outputs()}
    assert shapes["logits"][:2] == ["batch", "tokens"] and shapes["present_memory.0"][:2] == [N_LAYERS, "batch"]


@pytest.mark.parametrize("batch,tokens", [(1, 1), (2, SEG - 1), (2, SEG), (3, SEG + 1), (2, (2 * N_LAYERS + 1) * SEG + 3),
                                          (1, 4 * SEG)])
def test_a_plain_session_runs_any_batch_and_length_exactly(exported, batch, tokens):
    """Exported at batch 1: other batches, a short last segment, fewer tokens than a segment, S > L."""
    model, path, _ = exported
    ids = torch.randint(0, 50, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
    logits, seen, *memory = _session(path).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        ref = model(ids)
    assert_close(torch.from_numpy(logits), ref.logits, EXACT, "logits")
    for got, want in zip(memory, stack_state(ref.memory.leaves(), _layout(model))):
        assert_close(torch.from_numpy(got), want, EXACT, "memory")
    assert int(seen) == ref.memory.segments_seen == -(-tokens // SEG)


def test_memory_given_streams_like_one_call(exported):
    """Pieces ending at segment boundaries, the memory and count handed on, equal one call; the
    fresh memory passed explicitly (at the batch) equals leaving it out."""
    model, path, _ = exported
    session = _session(path)
    ids = torch.randint(0, 50, (2, 5 * SEG + 2), generator=torch.Generator().manual_seed(1))
    first = session.run(None, {"input_ids": ids[:, :2 * SEG].numpy()})
    feed = {"input_ids": ids[:, 2 * SEG:].numpy(), "past_segments_seen": first[1],
            "past_memory.0": first[2], "past_memory.1": first[3]}
    second = session.run(None, feed)
    with torch.no_grad():
        ref = model(ids)
    assert_close(torch.from_numpy(np.concatenate([first[0], second[0]], 1)), ref.logits, EXACT, "streamed logits")
    assert int(second[1]) == 6
    zeros = {f"past_memory.{p}": np.zeros_like(first[2 + p]) for p in range(2)}
    explicit = session.run(None, {"input_ids": ids[:, :2 * SEG].numpy(), **zeros, "past_segments_seen": np.array(0)})
    for a, b in zip(explicit, first):
        np.testing.assert_array_equal(a, b)


def test_the_session_class_gives_the_models_memory(exported):
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    model, path, proto = exported
    meta = {p.key: p.value for p in proto.metadata_props}
    assert "wavefront.checked_at" not in meta  # a float64 ARMT computes in float64 throughout
    session = OnnxSegmentSession(path)
    ids = torch.randint(0, 50, (2, 3 * SEG + 4))
    first = session(ids[:, :SEG])
    out = session(ids[:, SEG:], first.memory)
    with torch.no_grad():
        ref = model(ids)
    assert_close(torch.cat([first.logits, out.logits], 1), ref.logits, EXACT, "logits")
    assert out.memory.segments_seen == 4
    for a, b in zip(out.memory.leaves(), ref.memory.leaves()):
        assert_close(a, b, EXACT, "memory")
    with pytest.raises(ValueError, match="memory"):
        session(ids[:1], out.memory)  # memory of batch 2 for a batch-1 input: the torch backend's message
