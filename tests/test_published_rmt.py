"""Models built with the public RMT code (memory from the top layer into the next segment)."""
import pytest
import torch

import wavefront
from conftest import N_LAYERS, SEG, ids_for, tiny_gpt2, tiny_llama
from published_rmt_standin import MemoryCell, RecurrentWrapper
from wavefront.testing import assert_close

pytestmark = pytest.mark.hf


def published_rmt(kind):
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    torch.manual_seed(3)
    return RecurrentWrapper(MemoryCell(base, 3, wrap_pos=kind == "gpt2"), segment_size=SEG).double().eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_diagonal_is_refused_naming_the_top_to_bottom_edge(kind):
    model = published_rmt(kind)
    with pytest.raises(ValueError, match=rf"edge \({N_LAYERS - 1}, s\) -> \(0, s\+1\)"):
        wavefront.optimize(model)
    explanation = wavefront.explain(model, n_segments=4)
    assert not explanation.verdict.diagonal_legal and explanation.adapter == "published-rmt"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_sequential_schedule_is_exact(kind):
    model = published_rmt(kind)
    ids = ids_for(4, batch=2, short_last=1)
    ref = model(ids)
    fast = wavefront.optimize(model, schedule="sequential", verify=True)
    assert_close(fast(ids).logits, ref, 1e-10, f"published RMT over {kind}")
    assert wavefront.last_schedule(fast).num_steps == N_LAYERS * 4
