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


def test_appended_outputs_only_stacked_export_with_a_dynamic_length(tmp_path):
    model = MinGRU(4).eval()
    path = str(tmp_path / "m.onnx")
    export_onnx(model, (torch.randn(1, 9, 4),), path)
    x = torch.randn(1, 23, 4)
    with torch.no_grad():
        assert_close(run_onnx(path, (x,))[0], model(x), 1e-4, "MinGRU at another length")


def test_a_loop_that_is_not_a_scan_is_refused_with_the_reason(tmp_path):
    with pytest.warns(UserWarning, match="no time loop can run as a scan"):
        with pytest.raises(ExportError, match="cannot be exported with a dynamic length: the carry enters `Linear`"):
            export_onnx(ElmanRNN(4), (torch.randn(1, 9, 4),), str(tmp_path / "e.onnx"))


def test_segment_models_that_cannot_export_say_why(tmp_path):
    from conftest import SEG, tiny_armt, tiny_rmt
    ids = torch.randint(0, 50, (1, 2 * SEG))
    with pytest.raises(ExportError, match="only the diagonal schedule runs as one program"):
        export_onnx(wavefront.optimize(tiny_armt(torch.float32), schedule="sequential"), (ids,), str(tmp_path / "s.onnx"))
    with pytest.raises(ExportError, match="2 layer kinds"):
        hybrid = tiny_armt(torch.float32, d_ff_per_layer=(32, 48, 32))
        export_onnx(wavefront.optimize(hybrid), (ids,), str(tmp_path / "h.onnx"))
    with pytest.raises(Exception, match=r"edge \(2, s\) -> \(0, s\+1\)"):  # RMT: the illegal edge, from optimize()
        export_onnx(tiny_rmt(torch.float32), (ids,), str(tmp_path / "r.onnx"))


@pytest.mark.hf
def test_a_float64_armt_over_hf_llama_exports_checked_at_the_precision_it_computes_in(tmp_path):
    """transformers' Llama computes its rotary tables in float32 even in a float64 model: the graph
    says so in its metadata and is checked at float32's tolerance (onnxruntime's float32 cos is an
    ulp from torch's); any batch and length still run."""
    from conftest import SEG, tiny_llama
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    from wavefront.models import wrap_armt
    model = wrap_armt(tiny_llama(torch.float64), SEG, 3, 4).eval()
    path = str(tmp_path / "llama_armt.onnx")
    proto = export_onnx(wavefront.optimize(model), (torch.randint(0, 50, (1, 2 * SEG)),), path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["wavefront.checked_at"].startswith("torch.float32: the model computes part of its math in float32 (")
    for batch, tokens in ((1, 1), (2, 5 * SEG + 3)):
        ids = torch.randint(0, 50, (batch, tokens))
        with torch.no_grad():
            assert_close(OnnxSegmentSession(path)(ids).logits, model(ids).logits, 1e-6, f"{batch} x {tokens}")


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
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=16, state_size=8, num_hidden_layers=2,
                                         expand=2, conv_kernel=4)).eval()
    path = str(tmp_path / "mamba.onnx")
    # transformers 5.x: the substituted selective scan; 4.x: its inlined loop, lifted, whose appended
    # outputs are only stacked (so they come out of the scan stacked: no list whose length export fixes)
    assert hasattr(mm, "mamba_selective_scan") or "slow_forward" in vars(mm.MambaMixer)
    proto = export_onnx(model, (torch.randint(0, 100, (1, 40)),), path, kwargs={"use_cache": False})
    assert "Scan" in {n.op_type for n in proto.graph.node}
    for T in (1, 37, 2048):
        ids = torch.randint(0, 100, (1, T))
        (logits,) = run_onnx(path, (ids,))
        with torch.no_grad():
            assert_close(logits, model(ids, use_cache=False).logits, 1e-4, f"Mamba logits at T={T}")


@pytest.mark.hf
def test_hf_mamba2_exports_through_the_kernel_seam_with_a_dynamic_length(tmp_path):
    """Mamba-2's SSD, filled with wavefront's mamba_chunk_scan_combined: the chunked matrix scan
    exports (its cumulative products by doubling, its chunk count without a negative floor division)."""
    pytest.importorskip("onnxruntime")
    m2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    if not hasattr(m2, "mamba2_chunk_scan"):
        pytest.skip("transformers 4.x has no kernel seam")
    from wavefront import hf_families
    model = hf_families.build("mamba2", num_hidden_layers=1)
    path = str(tmp_path / "mamba2.onnx")
    export_onnx(model, (hf_families.example_ids("mamba2", 1, 70),), path, kwargs={"use_cache": False})
    for T in (1, 64, 200):
        ids = hf_families.example_ids("mamba2", 1, T, seed=T)
        (logits,) = run_onnx(path, (ids,))
        with torch.no_grad():
            assert_close(logits, model(ids, use_cache=False).logits, 1e-4, f"Mamba-2 logits at T={T}")


def test_only_casts_of_float64_values_lower_the_precision_a_float64_graph_is_checked_at():
    """A bool mask made float32 rounds nothing (the check stays at float64's); a float64 value cast
    to float32 and computed on (transformers' rotary tables) is checked at float32's."""
    from onnx import TensorProto, helper
    from wavefront.backends.onnx.graphs import working_precision

    def graph(nodes, inputs):
        return helper.make_model(helper.make_graph(nodes, "g", inputs, [
            helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])]))
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])
    mask = graph([helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", ["mf"], ["md"], to=TensorProto.DOUBLE),
                  helper.make_node("Mul", ["x", "md"], ["y"])],
                 [x, helper.make_tensor_value_info("m", TensorProto.BOOL, [2])])
    assert working_precision(mask, torch.float64) == (torch.float64, "")
    rounded = graph([helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("Cos", ["xf"], ["c"]),
                     helper.make_node("Cast", ["c"], ["y"], to=TensorProto.DOUBLE)], [x])
    precision, why = working_precision(rounded, torch.float64)
    assert precision == torch.float32 and "1 casts of float64 values" in why
    assert working_precision(rounded, torch.float32) == (torch.float32, "")
