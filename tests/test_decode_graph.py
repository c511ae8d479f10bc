"""The decode step as an ONNX graph (backends/onnx/decode_graph.py, decode_export.py): a plain
onnxruntime session fed a stream a few tokens at a time, every present_* handed back as past_*,
gives the model's own forward's logits for every token and, when a segment fills, its memory
(float64, 1e-9), at batch sizes the trace did not see; the cache empties at each segment's end;
what cannot export says why."""
import numpy as np
import pytest
import torch

import wavefront
from wavefront.models import ARMT, ARMTConfig
from wavefront.testing import assert_close

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.xdist_group("decode_graph")  # one export serves the module's tests

F64 = torch.float64
SEG = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=SEG, n_mem_tokens=2, d_mem=4,
                            vocab_size=64)).to(F64).eval()
    fast = wavefront.optimize(model)
    path = str(tmp_path_factory.mktemp("decode") / "step.onnx")
    wavefront.export_onnx(fast, (torch.randint(0, 64, (1, 6)),), path, decode=True)
    return model, fast, ort.InferenceSession(path, providers=["CPUExecutionProvider"]), path


def _feed(session, ids, pieces):
    from wavefront.backends.onnx.decode_export import decode_stream
    outs, at, past = [], 0, {}
    names = [o.name for o in session.get_outputs()]
    for n in pieces:
        out = dict(zip(names, session.run(None, {"input_ids": ids[:, at:at + n].numpy(), **past})))
        past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
        outs.append(out)
        at += n
    logits, _ = decode_stream(session, ids.numpy(), pieces)  # the helper the export's check uses: the same
    np.testing.assert_array_equal(logits, np.concatenate([o["logits"] for o in outs], axis=1))
    return outs


def test_the_memory_write_runs_only_in_the_call_that_ends_the_segment(exported):
    import onnx
    graph = onnx.load(exported[3]).graph
    (branch,) = [n for n in graph.node if n.op_type == "If"]
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert list(branch.output) == ["present_memory.0", "present_memory.1"]
    assert sum(n.op_type == "MatMul" for n in then.node) >= 4  # each layer's write: k, v, beta, A's update...


@pytest.mark.parametrize("batch,pieces", [(1, [1, 1, 1, 1, 1, 2, 1, 3]), (3, [3, 1, 2, 2, 4, 1])])
def test_a_plain_session_decodes_a_stream_exactly(exported, batch, pieces):
    model, _, session, _ = exported
    ids = torch.randint(0, 64, (batch, sum(pieces)), generator=torch.Generator().manual_seed(batch))
    outs = _feed(session, ids, pieces)
    with torch.no_grad():
        want = model(ids)
    assert_close(torch.from_numpy(np.concatenate([o["logits"] for o in outs], axis=1)), want.logits, 1e-9,
                 "logits of the decoded stream")
    at = 0
    for n, out in zip(pieces, outs):
        at += n
        full = at % SEG == 0
        assert int(out["present_segments_seen"]) == at // SEG
        assert out["present_key.0"].shape[2] == (0 if full else at % SEG)  # emptied when the segment ends
        if full:  # the memory the segment wrote, in the segment graph's layout [L, batch, ...]
            with torch.no_grad():
                memory = model(ids[:, :at]).memory
            A = torch.stack([memory.tensors[0], memory.tensors[2]])
            assert_close(torch.from_numpy(out["present_memory.0"]), A, 1e-9, f"memory after {at} tokens")


@pytest.mark.parametrize("pieces", [[3, 3], [SEG + 1]])
def test_more_tokens_than_the_segment_has_left_fail_naming_the_rule(exported, pieces):
    """The graph cannot give a longer segment: a piece crossing the segment's end fails in onnxruntime
    (the failing node's name says what was wrong) instead of growing the cache past a segment."""
    from wavefront.backends.onnx.decode_graph import TOO_MANY_TOKENS
    ids = torch.zeros(1, sum(pieces), dtype=torch.long)
    with pytest.raises(Exception, match=TOO_MANY_TOKENS):
        _feed(exported[2], ids, pieces)


def test_the_decode_graph_continues_the_optimized_model_s_memory(exported):
    """A stream prefilled by the optimized model (its memory stacked as the graphs name it)."""
    from wavefront.backends.onnx.decode_session import OnnxDecodeSession  # noqa: F401 (the same layout)
    from wavefront.passes.segment_plan import stack_state
    model, fast, session, _ = exported
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        memory = fast(ids[:, :8]).memory
        want = model(ids).logits[:, 8:]
    layout = fast.executor.program.plan.state_index
    past = {f"past_memory.{p}": t.numpy() for p, t in enumerate(stack_state(memory.leaves(), layout))}
    past["past_segments_seen"] = np.array(2, np.int64)
    out = session.run(["logits"], {"input_ids": ids[:, 8:].numpy(), **past})[0]
    assert_close(torch.from_numpy(out), want, 1e-9, "logits after a prefilled memory")


def test_what_cannot_export_a_decode_step_says_why(exported, tmp_path):
    from wavefront.backends.onnx.graphs import ExportError
    from wavefront.models.loop_models import LinearRecurrence
    with pytest.raises(ExportError, match="decode=True exports a segment model's decode step"):
        wavefront.export_onnx(LinearRecurrence(4), (torch.randn(1, 5, 4),), str(tmp_path / "a.onnx"), decode=True)
    torch.manual_seed(0)
    short = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=3, n_mem_tokens=2, d_mem=4))
    with pytest.raises(ExportError, match="segments of 4 tokens or more"):
        wavefront.export_onnx(short, (torch.zeros(1, 5, dtype=torch.long),), str(tmp_path / "b.onnx"), decode=True)
    _, fast, _, _ = exported
    fast._decoder._checked[(F64, "cpu")] = False  # as for a cell whose blocks take no cache
    fast._decoder._refused[(F64, "cpu")] = "no block of the cell took the key/value window"
    try:
        with pytest.raises(ExportError, match="does not export: torch.float64 on cpu: no block of the cell took"):
            wavefront.export_onnx(fast, (torch.zeros(1, 5, dtype=torch.long),), str(tmp_path / "c.onnx"), decode=True)
    finally:
        fast._decoder._checked.clear()
        fast._decoder._refused.clear()


def test_a_float64_graph_keeps_the_model_s_epsilons_at_float64(exported):
    """torch.onnx writes Python-float operands through float32 (1e-05 as 9.99999975e-06);
    backends/onnx/float_scalars.py puts the model's values back."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(exported[3]).graph
    tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                                     if a.HasField("t"))]
    consts = {float(numpy_helper.to_array(t).reshape(-1)[0]) for t in tensors
              if t.data_type == onnx.TensorProto.DOUBLE and numpy_helper.to_array(t).size == 1}
    assert 1e-05 in consts  # ARMT's memory epsilon
    assert float(np.float32(1e-05)) not in consts and float(np.float32(1e-06)) not in consts


@pytest.mark.hf
@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("gpt2", F64)])
def test_hugging_face_layers_export_their_decode_step(family, dtype, tmp_path):
    """The layers' cache seam inside the graph; GPT-2's learned positions at the window's offset
    (float64: its epsilons and GELU constants kept, checked at 1e-9 by the export itself)."""
    pytest.importorskip("transformers")
    import onnxruntime as ort
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from wavefront.models import wrap_armt
    torch.manual_seed(0)
    lm = (LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1)) if family == "llama" else
          GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)))
    model = wrap_armt(lm.to(dtype).eval(), segment_len=5, n_mem_tokens=2, d_mem=4)
    fast = wavefront.optimize(model)
    if fast.cached_decoder() is None:  # transformers 4.x GPT-2 takes layer_past tuples, not a Cache
        import transformers
        assert family == "gpt2" and transformers.__version__.startswith("4."), fast.decode_reason
        return
    path = str(tmp_path / "step.onnx")
    wavefront.export_onnx(fast, (torch.randint(0, 64, (1, 7)),), path, decode=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    outs = _feed(session, ids, [1, 4, 1, 3])
    with torch.no_grad():
        want = model(ids).logits
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert_close(torch.from_numpy(np.concatenate([o["logits"] for o in outs], axis=1)), want, tol, "logits")
