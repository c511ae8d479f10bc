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


def test_armt_matches_torch_with_a_short_last_segment_and_streaming(cache):
    model = tiny_armt(torch.float32)
    fast = wavefront.optimize(model, backend="onnxruntime", verify=True)
    assert isinstance(fast, OnnxRuntimeModel)
    for T in (SEG, 7 * SEG + 2, 2 * SEG - 1):  # S < L, S > L with a short tail, one whole + one short segment
        ids = torch.randint(0, 50, (2, T))
        out = fast(ids)
        with torch.no_grad():
            ref = model(ids)
        assert_close(out.logits, ref.logits, 1e-4, f"logits at T={T}")
        for a, b in zip(out.memory.tensors, ref.memory.tensors):
            assert_close(a, b, 1e-4, "memory")
    ids = torch.randint(0, 50, (2, 5 * SEG))
    first = fast(ids[:, :2 * SEG])
    second = fast(ids[:, 2 * SEG:], first.memory)
    with torch.no_grad():
        assert_close(torch.cat([first.logits, second.logits], 1), model(ids).logits, 1e-4, "streamed")
    text = str(wavefront.explain(fast))
    assert "on backend onnxruntime" in text and "CPUExecutionProvider" in text


def test_the_export_is_cached_on_disk(cache):
    model = tiny_armt(torch.float32)
    ids = torch.randint(0, 50, (1, 3 * SEG))
    first = wavefront.optimize(model, backend="onnxruntime")
    first(ids)
    assert first.export_time_s is not None and len(list(cache.glob("onnx/*.onnx"))) == 1
    again = wavefront.optimize(model, backend="onnxruntime")
    again(ids)
    assert again.export_time_s is None  # opened from the cache, not exported again


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
