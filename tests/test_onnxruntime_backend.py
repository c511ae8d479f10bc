"""optimize(model, backend="onnxruntime"): exported once (cached on disk), run by an onnxruntime session."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import wavefront  # noqa: E402
from conftest import SEG, tiny_armt  # noqa: E402
from wavefront.backends.onnx.model_key import model_key  # noqa: E402
from wavefront.routes.onnxruntime import OnnxRuntimeModel  # noqa: E402
from wavefront.models import LinearRecurrence  # noqa: E402
from wavefront.testing import assert_close  # noqa: E402


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_armt_runs_every_batch_and_length_in_one_cached_graph(cache, monkeypatch):
    """One graph for every batch and length (a short last segment, fewer tokens than a segment, S > L),
    all in onnxruntime (torch never runs), exported once and opened from the disk cache after;
    generate() decodes in the decode-step graph."""
    model = tiny_armt(torch.float32)
    fast = wavefront.optimize(model, backend="onnxruntime", verify=True)
    assert isinstance(fast, OnnxRuntimeModel)
    torch_calls = []
    monkeypatch.setattr(fast.optimized, "run", lambda *a, **k: torch_calls.append(a))
    for B, T in ((2, SEG), (1, 7 * SEG + 2), (3, 2 * SEG - 1), (2, 1)):
        ids = torch.randint(0, 50, (B, T))
        out = fast(ids)
        with torch.no_grad():
            ref = model(ids)
        assert_close(out.logits, ref.logits, 1e-4, f"logits at {B} x {T}")
        for a, b in zip(out.memory.tensors, ref.memory.tensors):
            assert_close(a, b, 1e-4, "memory")
    ids = torch.randint(0, 50, (2, 5 * SEG))
    first = fast(ids[:, :2 * SEG])
    second = fast(ids[:, 2 * SEG:], first.memory)
    with torch.no_grad():
        assert_close(torch.cat([first.logits, second.logits], 1), model(ids).logits, 1e-4, "streamed")
    assert fast.exports == 1 and not torch_calls and len(list(cache.glob("onnx/*.onnx"))) == 1
    text = str(wavefront.explain(fast))
    assert "on backend onnxruntime" in text and "CPUExecutionProvider" in text
    names = [s.name for s in wavefront.stages(fast)]
    assert names[:5] == ["bind", "capture", "analyse", "rewrite", "program"] and names[-1] == "onnx export"
    again = wavefront.optimize(model, backend="onnxruntime")
    again(ids)
    assert again.export_time_s is None  # opened from the cache, not exported again

    # generate(): the prefill in this graph, every token in the decode-step graph (exported once);
    # the torch cell never runs a token; the tokens are torch's, labels give torch's loss
    prompt = torch.randint(0, 50, (2, SEG + 2), generator=torch.Generator().manual_seed(2))
    want = wavefront.optimize(model).generate(prompt, max_new_tokens=2 * SEG)
    cell_calls = []
    handle = model.cell.register_forward_pre_hook(lambda m, args: cell_calls.append(args[0].shape))
    try:
        got = fast.generate(prompt, max_new_tokens=2 * SEG)
        after_export = len(cell_calls)  # the export's trace and check ran the cell; the tokens must not
        assert torch.equal(fast.generate(prompt, max_new_tokens=2 * SEG), got)
    finally:
        handle.remove()
    assert len(cell_calls) == after_export and not torch_calls, "a token ran through torch"
    assert torch.equal(got, want) and not fast.decode_reason and fast.exports == 2
    assert {k[0] for k in fast.sessions} == {"segment graph", "decode step"}
    assert_close(fast(ids, labels=ids).loss, model(ids, labels=ids).loss, 1e-5, "loss under onnxruntime")


def test_the_cache_key_follows_the_weights():
    model = tiny_armt(torch.float32)
    before = model_key(model, ("segments", 1))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_key(model, ("segments", 1)) != before
    assert model_key(model, ("segments", 2)) != model_key(model, ("segments", 1))


@pytest.mark.parametrize("T", [1, 37, 5000])
def test_a_lifted_loop_model_runs_in_onnxruntime(cache, T):
    torch.manual_seed(0)
    model = LinearRecurrence(5).eval()
    fast = wavefront.optimize(model, backend="onnxruntime")
    x = torch.randn(2, T, 5)
    with torch.no_grad():
        assert_close(fast(x), model(x), 1e-4, f"T={T}")
