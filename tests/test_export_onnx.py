"""export_onnx: scan-parallelized models as ONNX graphs with a dynamic length, run in onnxruntime (CPU)."""
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import wavefront  # noqa: E402
from wavefront.export import ExportError, export_onnx, run_onnx  # noqa: E402
from wavefront.models import ElmanRNN, LinearRecurrence, MinGRU  # noqa: E402
from wavefront.testing import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def exported_recurrence(tmp_path_factory):
    torch.manual_seed(0)
    model = LinearRecurrence(6).eval()
    path = str(tmp_path_factory.mktemp("onnx") / "recurrence.onnx")
    proto = export_onnx(model, (torch.randn(2, 50, 6),), path)
    return model, path, proto


def test_the_graph_keeps_the_scan_and_carries_metadata(exported_recurrence):
    _, _, proto = exported_recurrence
    ops = {n.op_type for n in proto.graph.node}
    assert "Scan" in ops and "Loop" not in ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["wavefront.version"] == wavefront.__version__ and meta["wavefront.kind"] == "time-loops"
    assert "LinearRecurrence.forward" in meta["wavefront.rewrites"] and "carry `h`" in meta["wavefront.rewrites"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[1], str)  # the time dim is symbolic in the graph


@pytest.mark.parametrize("T", [1, 37, 16384])
def test_onnxruntime_matches_torch_at_other_lengths(exported_recurrence, T):
    model, path, _ = exported_recurrence
    x = torch.randn(2, T, 6)
    (out,) = run_onnx(path, (x,))
    with torch.no_grad():
        assert_close(out, model(x), 1e-4, f"onnxruntime vs torch at T={T}")


def test_appended_outputs_are_refused_not_frozen(tmp_path):
    with pytest.raises(ExportError, match="appended to the list `outs`.*write them into a tensor"):
        export_onnx(MinGRU(4), (torch.randn(1, 9, 4),), str(tmp_path / "m.onnx"))


def test_a_loop_that_is_not_a_scan_is_refused_with_the_reason(tmp_path):
    with pytest.warns(UserWarning, match="no time loop can run as a scan"):
        with pytest.raises(ExportError, match="cannot be exported with a dynamic length: the carry enters `Linear`"):
            export_onnx(ElmanRNN(4), (torch.randn(1, 9, 4),), str(tmp_path / "e.onnx"))


def test_segment_models_are_refused_by_name(tmp_path):
    from conftest import tiny_armt, tiny_rmt
    with pytest.raises(ExportError, match="segment-recurrent model .* not supported yet"):
        export_onnx(tiny_armt(torch.float32), (torch.randint(0, 50, (1, 12)),), str(tmp_path / "a.onnx"))
    with pytest.raises(Exception, match=r"edge \(2, s\) -> \(0, s\+1\)"):  # RMT: the illegal edge, from optimize()
        export_onnx(tiny_rmt(torch.float32), (torch.randint(0, 50, (1, 12)),), str(tmp_path / "r.onnx"))


def test_a_missing_provider_is_an_error_not_a_silent_cpu_fallback(exported_recurrence):
    _, path, _ = exported_recurrence
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(RuntimeError, match="did not give the providers"):
        run_onnx(path, (torch.randn(1, 3, 6),), providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


@pytest.mark.hf
def test_hf_mamba_exports_with_a_dynamic_length(tmp_path):
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    if not hasattr(mm, "mamba_selective_scan"):
        pytest.skip("transformers 4.x Mamba appends its scan outputs to a list (refused, see the MinGRU test)")
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=16, state_size=8, num_hidden_layers=2,
                                         expand=2, conv_kernel=4)).eval()
    path = str(tmp_path / "mamba.onnx")
    proto = export_onnx(model, (torch.randint(0, 100, (1, 40)),), path, kwargs={"use_cache": False})
    assert "Scan" in {n.op_type for n in proto.graph.node}
    for T in (1, 37, 2048):
        ids = torch.randint(0, 100, (1, T))
        (logits,) = run_onnx(path, (ids,))
        with torch.no_grad():
            assert_close(logits, model(ids, use_cache=False).logits, 1e-4, f"Mamba logits at T={T}")
