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


@pytest.fixture(scope="module")
def exported_armt(tmp_path_factory):
    from conftest import SEG, tiny_armt
    model = tiny_armt(torch.float32)
    path = str(tmp_path_factory.mktemp("onnx") / "armt.onnx")
    proto = wavefront.export_onnx(wavefront.optimize(model), (torch.randint(0, 50, (2, 4 * SEG)),), path)
    return model, path, proto


@pytest.mark.parametrize("n_segments", [1, 2, 7])  # S < L, S = L - 1 ... and S > L (L = 3)
def test_armt_diagonal_graph_runs_any_segment_count(exported_armt, n_segments):
    from conftest import SEG
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    model, path, _ = exported_armt
    ids = torch.randint(0, 50, (2, n_segments * SEG))
    out = OnnxSegmentSession(path)(ids)
    with torch.no_grad():
        ref = model(ids)
    assert_close(out.logits, ref.logits, 1e-4, "logits")
    for a, b in zip(out.memory.tensors, ref.memory.tensors):
        assert_close(a, b, 1e-4, "memory")
    assert out.memory.segments_seen == n_segments


def test_armt_graph_streams_in_pieces_and_records_its_schedule(exported_armt):
    from conftest import SEG
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    from wavefront.scheduler.schedule import Schedule
    model, path, proto = exported_armt
    ops = {n.op_type for n in proto.graph.node}
    assert "Scan" in ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert Schedule.from_json(meta["wavefront.schedule"]).num_steps == 3 + 4 - 1
    assert (meta["wavefront.segment_len"], meta["wavefront.n_layers"]) == (str(SEG), "3")
    session = OnnxSegmentSession(path)
    ids = torch.randint(0, 50, (2, 8 * SEG))
    first = session(ids[:, :3 * SEG])
    second = session(ids[:, 3 * SEG:], first.memory)
    with torch.no_grad():
        ref = model(ids)
    assert_close(torch.cat([first.logits, second.logits], 1), ref.logits, 1e-4, "streamed logits")
    with pytest.raises(ValueError, match=f"whole segments of {SEG} tokens; got {SEG + 2} tokens: pass {SEG} now"):
        session(ids[:, :SEG + 2])
    with pytest.raises(ValueError, match="exported for batch 2, got batch 1"):
        session(ids[:1, :SEG])


def test_segment_models_that_cannot_export_say_why(tmp_path):
    from conftest import SEG, tiny_armt, tiny_rmt
    ids = torch.randint(0, 50, (1, 2 * SEG))
    with pytest.raises(ExportError, match="whole segments of 6 tokens"):
        export_onnx(wavefront.optimize(tiny_armt(torch.float32)), (ids[:, :SEG + 1],), str(tmp_path / "p.onnx"))
    with pytest.raises(ExportError, match="only the diagonal schedule runs as one program"):
        export_onnx(wavefront.optimize(tiny_armt(torch.float32), schedule="sequential"), (ids,), str(tmp_path / "s.onnx"))
    with pytest.raises(ExportError, match="2 layer kinds"):
        hybrid = tiny_armt(torch.float32, d_ff_per_layer=(32, 48, 32))
        export_onnx(wavefront.optimize(hybrid), (ids,), str(tmp_path / "h.onnx"))
    with pytest.raises(Exception, match=r"edge \(2, s\) -> \(0, s\+1\)"):  # RMT: the illegal edge, from optimize()
        export_onnx(tiny_rmt(torch.float32), (ids,), str(tmp_path / "r.onnx"))


@pytest.mark.hf
def test_armt_over_hf_llama_exports_too(tmp_path):
    from conftest import SEG, tiny_llama
    from wavefront.backends.onnx.segments import OnnxSegmentSession
    from wavefront.models import wrap_armt
    model = wrap_armt(tiny_llama(torch.float32), SEG, 3, 4).eval()
    path = str(tmp_path / "llama_armt.onnx")
    export_onnx(wavefront.optimize(model), (torch.randint(0, 50, (1, 4 * SEG)),), path)
    for n_segments in (1, 5):
        ids = torch.randint(0, 50, (1, n_segments * SEG))
        with torch.no_grad():
            assert_close(OnnxSegmentSession(path)(ids).logits, model(ids).logits, 1e-4, f"S={n_segments}")


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


def test_export_leaves_the_models_train_eval_modes_as_they_were(tmp_path):
    pytest.importorskip("onnxruntime")
    import wavefront
    from conftest import ids_for, tiny_armt
    model = tiny_armt(torch.float32).train()
    model.cell.norm.eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    wavefront.export_onnx(wavefront.optimize(model), (ids_for(4),), str(tmp_path / "m.onnx"))
    assert [m.training for m in model.modules()] == modes


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
