"""wavefront.stages(opt): every product optimize() made, with its time and a readable summary;
WAVEFRONT_DEBUG=1 prints them as they run, =2 adds each call's per-step timings."""
import pytest
import torch

import wavefront
from conftest import N_LAYERS, ids_for, tiny_armt
from wavefront.backends.segment_program import SegmentProgram
from wavefront.models import MinGRU
from wavefront.passes.dependence import Verdict
from wavefront.passes.diagonal import BatchedRecurrence
from wavefront.scheduler.recurrence_graph import RecurrenceGraph


def test_a_segment_model_keeps_every_product():
    fast = wavefront.optimize(tiny_armt())
    log = wavefront.stages(fast)
    assert [s.name for s in log] == ["bind", "capture", "analyse", "rewrite", "program"]
    products = {s.name: s.product for s in log}
    assert isinstance(products["capture"], RecurrenceGraph) and products["capture"] is fast.rg
    assert isinstance(products["analyse"], Verdict) and products["analyse"].diagonal_legal
    assert isinstance(products["rewrite"], BatchedRecurrence) and products["rewrite"] is fast.batched
    assert isinstance(products["program"], SegmentProgram) and products["program"] is fast.executor.program
    assert all(s.seconds >= 0 for s in log)
    text = str(log)
    assert f"{N_LAYERS} layers" in text and "legal" in text and "batched by fold" in text and "one program" in text
    with torch.no_grad():
        fast(ids_for(N_LAYERS + 1, batch=2))
    last = wavefront.stages(fast)[-1]
    assert last.name == "schedule (last call)" and last.product is wavefront.last_schedule(fast)


def test_a_stack_the_program_does_not_serve_says_why_in_its_stage():
    fast = wavefront.optimize(tiny_armt(d_ff_per_layer=(32, 48, 32)))
    program = next(s for s in wavefront.stages(fast) if s.name == "program")
    assert program.product is None and "2 layer kinds" in program.text


def test_other_routes_record_their_stages():
    lifted = wavefront.optimize(MinGRU(3))
    assert [s.name for s in wavefront.stages(lifted)] == ["find time loops", "lift loops"]
    assert "runs as a scan" in str(wavefront.stages(lifted))
    # onnxruntime's stages: tests/test_onnxruntime_backend.py (its one exported graph)
    with pytest.raises(TypeError, match="optimize the model first"):
        wavefront.stages(tiny_armt())
    from wavefront.api import UnchangedModel
    (stage,) = wavefront.stages(UnchangedModel(tiny_armt(), "a reason"))
    assert stage.name == "unchanged" and stage.text == "a reason"


def test_wavefront_debug_prints_the_stages_and_the_steps(monkeypatch, capsys):
    monkeypatch.setenv("WAVEFRONT_DEBUG", "1")
    fast = wavefront.optimize(tiny_armt())
    err = capsys.readouterr().err
    assert "[wavefront] capture (" in err and "[wavefront] program (" in err
    monkeypatch.setenv("WAVEFRONT_DEBUG", "2")
    with torch.no_grad():
        fast(ids_for(N_LAYERS + 1, batch=2))
    err = capsys.readouterr().err
    assert f"{2 * N_LAYERS} steps (one program)" in err and "per step (ms)" in err
    monkeypatch.setenv("WAVEFRONT_DEBUG", "lots")
    with pytest.raises(ValueError, match="WAVEFRONT_DEBUG must be 0, 1 or 2"):
        wavefront.optimize(tiny_armt())
