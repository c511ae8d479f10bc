"""backend="inductor": one compile serves every lane count and segment length (one test: a cold
compile takes tens of seconds on CI's CPU)."""
import torch
from torch._dynamo.utils import counters

import wavefront
from conftest import N_LAYERS, ids_for, tiny_armt
from wavefront.testing import assert_close


def test_inductor_backend_is_exact_and_compiles_once_for_steps_and_whole_segment_programs():
    """One cold compile (tens of seconds on CI's CPU) serves it all: step-by-step calls with a short
    last segment at every lane width, then whole-segment calls running the one program over the
    active lanes, at several segment counts, without recompiling."""
    torch._dynamo.reset()
    model = tiny_armt(torch.float32)
    fast = wavefront.optimize(model, backend="inductor")
    ids = ids_for(N_LAYERS + 2, batch=2, short_last=1)
    with torch.no_grad():
        out = fast(ids)  # a short last segment: the step-by-step executor
        assert fast.executor.last_path == "step by step"
        assert_close(out.logits, model(ids).logits, 1e-4, "inductor logits")
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1 and fast.compile_time_s is not None and fast.compile_time_s > 0
        other = ids_for(2 * N_LAYERS + 1, batch=2, short_last=3)  # other widths, starts and lengths
        assert_close(fast(other).logits, model(other).logits, 1e-4, "inductor, other length")
        assert counters["stats"]["unique_graphs"] == graphs, "a new width or length recompiled"
        for n_segments in (N_LAYERS + 2, 2 * N_LAYERS + 1, 2):
            ids = ids_for(n_segments, batch=2)
            # the program's slices of its stacks reach the graph compiled above: a recompile would raise
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = fast(ids)
            assert fast.executor.last_path == "one program"
            assert_close(out.logits, model(ids).logits, 1e-4, f"compiled cell in the program, S={n_segments}")
    assert counters["stats"]["unique_graphs"] == graphs, "the program's calls recompiled"
    cell = fast.batched.groups[0].cell
    assert fast.executor.program is not None and cell.compiled is not None and not cell.compile_error
    text = str(wavefront.explain(fast))
    assert "backend inductor" in text and "one program, its batched cell compiled" in text
    fast(ids).logits.sum().backward()  # training calls run the eager folded graph
    assert model.cell.layers[1].memory.W_mq.weight.grad is not None


def test_a_failing_compiled_cell_falls_back_to_eager_and_says_why():
    model = tiny_armt(torch.float32)
    fast = wavefront.optimize(model)
    ids = ids_for(N_LAYERS + 1, batch=2)
    with torch.no_grad():
        fast(ids)  # first batched call: the fold checks itself against vmap

        def broken(*args, **kwargs):
            raise RuntimeError("unsupported by the compiler\nsecond line")

        cell = fast.batched.groups[0].cell
        cell.compiled = broken
        ids = ids_for(N_LAYERS + 1, batch=2, short_last=1)  # a short last segment: the step-by-step executor
        assert_close(fast(ids).logits, model(ids).logits, 1e-5, "after compile failure")
    assert cell.compiled is None and "unsupported by the compiler" in cell.compile_error
    assert "compile failed, running eager" in str(wavefront.explain(fast))
