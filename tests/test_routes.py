"""One route registry, one result family: every optimize() result is an Optimized that names its
route, verifies through the one path, explains from what it recorded, pickles with its options
and exports itself; a model no route applies to runs unchanged with the reason."""
import os
import pickle

import pytest
import torch
from torch import nn

import wavefront
from conftest import N_LAYERS, ids_for, tiny_armt
from wavefront.contract.checks import VerificationError
from wavefront.models import ElmanRNN, LinearRecurrence, MinGRU
from wavefront.routes import registry


class Plain(nn.Module):
    """No segment cell, no time loop, no kernel seam."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _models():
    return {"segment recurrence": (tiny_armt(), (ids_for(N_LAYERS + 1),)),
            "time loops": (MinGRU(4).double(), (torch.randn(2, 9, 4, dtype=torch.float64),)),
            "unchanged": (Plain(), (torch.randn(2, 3),))}


@pytest.mark.parametrize("route", ["segment recurrence", "time loops", "unchanged"])
def test_every_result_is_an_optimized_naming_its_route(route):
    model, args = _models()[route]
    with pytest.warns(UserWarning, match="runs unchanged") if route == "unchanged" else _nothing():
        fast = wavefront.optimize(model, verify=True)
    assert isinstance(fast, wavefront.Optimized) and fast.route == route and fast.model is model
    with torch.no_grad():
        out, ref = fast(*args), model(*args)
    got = out.logits if hasattr(out, "logits") else out
    want = ref.logits if hasattr(ref, "logits") else ref
    assert (got - want).abs().max().item() <= 1e-9 * want.abs().max().item()
    assert not fast.verify or route == "unchanged"  # verified on the first call (nothing to verify unchanged)
    assert fast.explain().schedule == {"segment recurrence": "diagonal", "time loops": "loops as scans",
                                       "unchanged": "unchanged"}[route]
    assert str(wavefront.explain(fast)) == str(fast.explain())
    back = pickle.loads(pickle.dumps(fast))
    assert type(back) is type(fast) and back.route == fast.route and back.options == fast.options


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("route", ["segment recurrence", "time loops"])
def test_verify_is_one_path_that_catches_a_wrong_result_on_every_route(route, monkeypatch):
    """A fast path that drifts by 1e-6 (far above float64's 1e-9) is caught, whatever the route."""
    model, args = _models()[route]
    fast = wavefront.optimize(model, verify=True)
    cls = type(fast)
    honest = cls.run

    def drifting(self, *a, **k):
        out = honest(self, *a, **k)
        if hasattr(out, "logits"):
            return type(out)(out.logits * (1 + 1e-6), out.memory)
        return out * (1 + 1e-6)

    monkeypatch.setattr(cls, "run", drifting)
    with torch.no_grad(), pytest.raises(VerificationError, match="differs from the reference"):
        fast(*args)
    assert fast.verify  # not marked verified after a failure: the next call is checked again


def test_a_model_no_route_applies_to_runs_unchanged_says_why_and_exports(tmp_path):
    model = Plain()
    with pytest.warns(UserWarning, match="no segment adapter recognises Plain"):
        fast = wavefront.optimize(model)
    assert isinstance(fast, wavefront.UnchangedModel)
    why = str(wavefront.explain(model))
    assert "no segment adapter recognises Plain" in why and "no method of its modules holds a Python time loop" in why
    assert str(wavefront.explain(fast)) == why
    assert [s.name for s in wavefront.stages(fast)] == ["unchanged"]
    pytest.importorskip("onnxruntime")
    x = torch.randn(2, 5, 3)
    proto = wavefront.export_onnx(fast, (x,), os.fspath(tmp_path / "plain.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["wavefront.kind"] == "unchanged" and "nothing rewritten" in meta["wavefront.rewrites"]


def test_options_are_checked_once_before_any_route():
    for model in (Plain(), MinGRU(2), tiny_armt()):
        with pytest.raises(ValueError, match="unknown backend 'tpu'"):
            wavefront.optimize(model, backend="tpu")
        with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
            wavefront.optimize(model, schedule="zigzag")


def test_the_first_route_that_applies_is_chosen_by_structure():
    assert registry.choose_route(tiny_armt())[0].name == "segment recurrence"
    assert registry.choose_route(MinGRU(2))[0].name == "time loops"
    assert registry.choose_route(ElmanRNN(2))[0].name == "time loops"  # found, even if left as a loop
    assert registry.choose_route(Plain()) == (None, [])
    assert [r.name for r in registry.ROUTES] == ["kernel substitution", "segment recurrence", "time loops"]


def test_the_onnxruntime_backend_wraps_the_torch_route_and_reads_its_record():
    pytest.importorskip("onnxruntime")
    model = LinearRecurrence(4)
    fast = wavefront.optimize(model, backend="onnxruntime", verify=True)
    assert fast.route == "onnxruntime" and fast.optimized.route == "time loops" and fast.model is model
    keys = list(fast.state_dict())  # the user's weights once, under the torch route's module
    assert keys == ["optimized." + k for k in fast.optimized.state_dict()] and len(keys) == len(set(keys))
    x = torch.randn(1, 6, 4)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max().item() < 1e-5
    assert not fast.verify
    assert [s.name for s in wavefront.stages(fast)][-1] == "onnx export"
    assert "onnxruntime" in str(wavefront.explain(fast))


def test_a_class_typed_into_a_repl_runs_unchanged_and_says_its_source_is_missing():
    src = (
        "class Typed(nn.Module):\n"
        "    def forward(self, x):\n"
        "        h = torch.zeros_like(x[:, 0])\n"
        "        for t in range(x.shape[1]):\n"
        "            h = 0.5 * h + x[:, t]\n"
        "        return h\n")
    ns = {"nn": nn, "torch": torch}
    exec(compile(src, "<stdin>", "exec"), ns)  # as `python - < model.py` or a REPL defines it: no source to read
    model = ns["Typed"]()
    with pytest.warns(UserWarning, match=r"the source of Typed.forward \(defined in <stdin>\) is not available"):
        fast = wavefront.optimize(model)
    assert isinstance(fast, wavefront.UnchangedModel)
    assert "define it in a file" in str(wavefront.explain(fast)) and "define it in a file" in str(wavefront.explain(model))
    x = torch.randn(2, 5, 3)
    assert torch.equal(fast(x), model(x))
