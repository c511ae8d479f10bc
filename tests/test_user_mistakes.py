"""A user's mistake gets one clear error; what users naturally do with a module works."""
import copy
import io
import pickle

import pytest
import torch

import wavefront
from conftest import ids_for, tiny_armt
from wavefront.models import MinGRU
from wavefront.testing import assert_close


@pytest.mark.parametrize("thing", ["hello", 3, None, [torch.nn.Linear(2, 2)]])
def test_optimize_refuses_what_is_not_a_module(thing):
    with pytest.raises(TypeError, match=r"optimize\(\) takes a torch.nn.Module"):
        wavefront.optimize(thing)


@pytest.mark.parametrize("what", ["armt", "loops"])
def test_an_optimized_model_saves_loads_and_copies(what):
    model = tiny_armt() if what == "armt" else MinGRU(8).double()
    x = ids_for(4, batch=2) if what == "armt" else torch.randn(2, 12, 8, dtype=torch.float64)
    fast = wavefront.optimize(model)
    with torch.no_grad():
        ref = fast(x)
    logits = (lambda out: out.logits) if what == "armt" else (lambda out: out)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    for back in (torch.load(buf, weights_only=False), copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert type(back) is type(fast) and back is not fast
        with torch.no_grad():
            assert_close(logits(back(x)), logits(ref), 1e-12, f"{what} restored")
        assert back.model is not model  # its own copy of the weights


@pytest.mark.parametrize("backend", ["inductor", "aot_inductor"])
def test_a_backend_that_does_not_apply_to_the_route_is_refused_not_ignored(backend):
    """Options are checked once for every route: a time-loop model asked to compile its (absent)
    batched layer cell used to run eager without a word."""
    with pytest.raises(ValueError, match=f"backend='{backend}' does not apply to MinGRU: it runs by time loops.*"
                                         "compile the batched layer cell"):
        wavefront.optimize(MinGRU(4), backend=backend)
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        wavefront.optimize(MinGRU(4), schedule="zigzag")
