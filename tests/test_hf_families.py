"""optimize() on every recurrent family in transformers (wavefront.hf_families: small random
configs): it runs, equals the model's own path, and says what it found; where transformers has the
kernel seam, the recurrent kernels are wavefront's, and every module calling them gives the same
output as with transformers' fallback."""
import warnings

import pytest
import torch

import wavefront
from wavefront import hf_families
from wavefront.testing import assert_close

pytestmark = pytest.mark.hf
pytest.importorskip("transformers")


def _outputs_of(model, classes, run):
    """The output tensors of every module of `classes`, in call order, during run()."""
    seen, hooks = [], []
    for m in model.modules():
        if type(m).__name__ in classes:
            hooks.append(m.register_forward_hook(lambda mod, a, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                 else out)))
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return result, seen


@pytest.mark.parametrize("name", hf_families.available())
def test_every_family_runs_exactly_and_explains_what_ran(name, monkeypatch):
    import wavefront.routes.kernels as routes_kernels
    from wavefront.routes.kernel_seam import find_seams
    model = hf_families.build(name)
    ids = hf_families.example_ids(name, 2, 300)  # not a multiple of any chunk size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "runs unchanged" is said as a warning
        fast = wavefront.optimize(model, verify=True)
    calls = {}
    for api, fn in list(routes_kernels._CALLS.items()):
        monkeypatch.setitem(routes_kernels._CALLS, api, lambda *a, _api=api, _fn=fn, **k:
                            (calls.__setitem__(_api, calls.get(_api, 0) + 1), _fn(*a, **k))[1])
    seams = find_seams(model)
    callers = {c for s in seams for c in s.callers}
    with torch.no_grad():
        fast(ids, use_cache=False)  # the verifying call (it also runs the model's own forward)
        out, mixed = _outputs_of(model, callers, lambda: fast(ids, use_cache=False).logits)
        ref, own = _outputs_of(model, callers, lambda: model(ids, use_cache=False).logits)
    assert_close(out, ref, 1e-4, f"{name} logits")
    assert len(mixed) == len(own)
    for i, (a, b) in enumerate(zip(mixed, own)):
        assert_close(a, b, 1e-4, f"{name} {sorted(callers)} call {i}")
    text = str(wavefront.explain(fast))
    recurrent = [s for s in routes_kernels.substitutable(seams) if s.api in wavefront.kernels.RECURRENT]
    if recurrent:  # transformers 5.x: the seam is filled, and the filled recurrent kernels ran
        assert fast.route == "kernel substitution"
        assert any(calls.get(s.api) for s in recurrent), calls
        for s in recurrent:
            assert f"{s.name} [{s.api}]: runs as wavefront.kernels.{s.api}" in text
    elif fast.route == "unchanged":
        assert "runs unchanged" in text and fast.reason in text
    else:
        assert fast.route == "time loops" and "loop over" in text


def test_a_model_with_only_short_convolutions_runs_unchanged_and_says_so():
    if "lfm2" not in hf_families.available():
        pytest.skip("this transformers has no LFM2")
    model = hf_families.build("lfm2")
    with pytest.warns(UserWarning, match="runs unchanged"):
        fast = wavefront.optimize(model)
    from wavefront.routes.kernel_seam import find_seams
    if find_seams(model):  # transformers 5.x: the seam holds only causal_conv1d
        assert "not recurrences wavefront scans (causal_conv1d" in fast.reason
