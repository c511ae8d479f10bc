"""The torch executor runs any valid schedule on the captured graph and equals the model's forward."""
import pytest
import torch

from conftest import ARMT_KINDS, N_LAYERS, SEG, SEGMENT_COUNTS, build, ids_for, tiny_armt, tiny_rmt
from wavefront.backends import TorchExecutor
from wavefront.models import MemoryState
from wavefront.scheduler import Schedule, ScheduleError, capture, diagonal, sequential
from wavefront.testing import assert_close

ALL_KINDS = ARMT_KINDS + ["rmt"]


def same_output(a, b):
    return torch.equal(a.logits, b.logits) and a.memory.segments_seen == b.memory.segments_seen and \
        all(torch.equal(x, y) for x, y in zip(a.memory.tensors, b.memory.tensors))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("S", SEGMENT_COUNTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_sequential_schedule_equals_forward(kind, S, batch):
    short = 2 if batch == 2 else 0  # a short last segment on the batch-2 runs
    ids = ids_for(S, batch=batch, short_last=short if S * SEG > short else 0)
    model = build(kind, torch.float64)
    assert same_output(TorchExecutor(capture(model)).run(ids, sequential(N_LAYERS, S)), model(ids))  # identical
    model32 = build(kind, torch.float32)
    out, ref = TorchExecutor(capture(model32)).run(ids, "sequential"), model32(ids)
    assert_close(out.logits, ref.logits, 1e-6, f"{kind} S={S} fp32 logits")
    for x, y in zip(out.memory.tensors, ref.memory.tensors):
        assert_close(x, y, 1e-6, f"{kind} S={S} fp32 memory")


@pytest.mark.parametrize("kind", ARMT_KINDS)
@pytest.mark.parametrize("S", [1, N_LAYERS + 2])
def test_diagonal_order_cell_by_cell_equals_forward(kind, S):
    model = build(kind)
    ids = ids_for(S, batch=2, short_last=1)
    assert same_output(TorchExecutor(capture(model)).run(ids, diagonal(N_LAYERS, S)), model(ids))


def test_streaming_through_the_executor():
    model = tiny_armt()
    ex = TorchExecutor(capture(model))
    ids = ids_for(5, batch=2, short_last=3)
    a = ex.run(ids[:, :2 * SEG], "diagonal")
    b = ex.run(ids[:, 2 * SEG:], "diagonal", memory=a.memory)
    whole = model(ids)
    assert torch.equal(torch.cat([a.logits, b.logits], 1), whole.logits)
    assert same_output(b, type(b)(b.logits, whole.memory)) and b.memory.segments_seen == 5


def test_rmt_diagonal_is_refused_with_the_step_named():
    ex = TorchExecutor(capture(tiny_rmt()))
    with pytest.raises(ScheduleError, match=f"step 1 runs cell \\(0, 1\\) but it needs cell \\({N_LAYERS - 1}, 0\\)"):
        ex.run(ids_for(3), "diagonal")


def test_gradients_flow_through_the_executor():
    model = tiny_armt()
    ids = ids_for(4, batch=2)
    model(ids).logits.pow(2).mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    TorchExecutor(capture(model)).run(ids, "diagonal").logits.pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, ref[n], 1e-12, f"grad {n}")


def test_wrong_schedule_and_input_errors():
    model = tiny_armt()
    ex = TorchExecutor(capture(model))
    with pytest.raises(ValueError, match="this input has 2 segments"):
        ex.run(ids_for(2), diagonal(N_LAYERS, 3))
    with pytest.raises(TypeError, match="Schedule or its name"):
        ex.run(ids_for(2), 42)
    with pytest.raises(ValueError, match="empty"):
        ex.run(torch.zeros(1, 0, dtype=torch.long))
    good = ex.run(ids_for(1, batch=2))
    with pytest.raises(ValueError, match="batch size"):
        ex.run(ids_for(1), memory=good.memory)
    with pytest.raises(TypeError, match="MemoryState"):
        ex.run(ids_for(1), memory=(1, 2))
    bad_order = Schedule("x", N_LAYERS, 1, tuple(((l, 0),) for l in reversed(range(N_LAYERS))))
    with pytest.raises(ScheduleError, match="hidden edge"):
        ex.run(ids_for(1), bad_order)
    assert isinstance(good.memory, MemoryState)


def test_finished_segments_release_their_state():
    """A segment's state dies once the next segment is done: at the last segment, the states of
    segments 0..S-3 must already be freed (only the last memory is returned)."""
    import dataclasses
    import gc
    import weakref

    S = 6
    refs, alive = [], []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(*args)
            refs.append(weakref.ref(out[1]))  # this segment's A_0
            if len(refs) == S:
                gc.collect()
                alive.extend(r() is not None for r in refs[:-2])
            return out

    rg = capture(tiny_armt())
    spied = dataclasses.replace(rg, layer_graphs=(Spy(rg.layer_graphs[0]),) + rg.layer_graphs[1:])
    with torch.no_grad():
        TorchExecutor(spied).run(ids_for(S), "sequential")
    assert len(alive) == S - 2 and not any(alive), alive
