"""Whole-segment inference calls run the diagonal schedule as one program (memory stacked per layer,
hidden states per lane): exact against the sequential model, and only where it applies."""
import pytest
import torch

import wavefront
from conftest import N_LAYERS, SEGMENT_COUNTS, ids_for, tiny_armt
from wavefront.testing import assert_close


@pytest.mark.parametrize("batch", [1, 2])
def test_the_program_is_exact_in_float64_for_every_segment_count(batch):
    model = tiny_armt(torch.float64)
    fast = wavefront.optimize(model)
    assert fast.executor.program is not None  # chosen at optimize(), on a synthetic input
    with torch.no_grad():
        for S in SEGMENT_COUNTS:
            ids = ids_for(S, batch=batch, seed=S)
            out, ref = fast(ids), model(ids)
            assert fast.executor.last_path == "one program"
            assert_close(out.logits, ref.logits, 1e-12, f"logits S={S}")
            for a, b in zip(out.memory.tensors, ref.memory.tensors):
                assert_close(a, b, 1e-12, f"memory S={S}")
            assert out.memory.segments_seen == S
            assert wavefront.last_schedule(fast).num_steps == N_LAYERS + S - 1


def test_streaming_through_the_program_continues_the_memory():
    model = tiny_armt(torch.float64)
    fast = wavefront.optimize(model)
    ids = ids_for(2 * N_LAYERS + 1, batch=2)
    with torch.no_grad():
        first = fast(ids[:, :12])
        second = fast(ids[:, 12:], first.memory)
        assert_close(torch.cat([first.logits, second.logits], 1), model(ids).logits, 1e-12, "streamed")


def test_training_calls_and_short_segments_run_step_by_step():
    model = tiny_armt(torch.float64)
    fast = wavefront.optimize(model)
    ids = ids_for(N_LAYERS + 1, batch=1)
    out = fast(ids)  # gradients needed: the step-by-step executor (the program reads stacks as plain tensors)
    assert fast.executor.last_path == "step by step"
    out.logits.sum().backward()
    assert model.cell.layers[0].memory.W_mk.weight.grad is not None
    with torch.no_grad():
        fast(ids_for(N_LAYERS + 1, batch=1, short_last=2))
    assert fast.executor.last_path == "step by step"  # a short last segment: step by step too
    assert "one program" in str(wavefront.explain(fast))


def test_a_hybrid_stack_says_why_it_runs_step_by_step():
    model = tiny_armt(torch.float64, d_ff_per_layer=(32, 48, 32))
    fast = wavefront.optimize(model)
    with torch.no_grad():
        ids = ids_for(N_LAYERS + 1, batch=1)
        fast(ids)
        assert_close(fast(ids).logits, model(ids).logits, 1e-12, "hybrid")
    assert fast.executor.program is None and "2 layer kinds" in fast.executor.program_reason
    assert "step by step (the layer stack has 2 layer kinds" in str(wavefront.explain(fast))


@pytest.mark.parametrize("S", [2, N_LAYERS + 2])
def test_warm_up_and_drain_steps_run_only_their_active_lanes(S):
    model = tiny_armt(torch.float64)
    fast = wavefront.optimize(model)
    with torch.no_grad():
        cell, widths = fast.batched.groups[0].cell, []
        run = cell.run_folded
        cell.run_folded = lambda params, values, **kw: (widths.append(values[0].shape[0]), run(params, values, **kw))[1]
        ids = ids_for(S, batch=2)
        assert_close(fast(ids).logits, model(ids).logits, 1e-12, "narrowed lanes")
    L = N_LAYERS
    assert fast.executor.program is not None
    assert widths == [min(L, t + 1) - max(0, t - S + 1) for t in range(L + S - 1)]
