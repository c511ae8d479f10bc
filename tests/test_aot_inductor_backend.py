"""backend="aot_inductor": the batched cell compiled ahead of time (one cold compile here, about
half a minute on CI's CPU; the second model loads the cached package)."""
import os

import pytest
import torch

import wavefront
from conftest import N_LAYERS, build, ids_for, tiny_armt
from wavefront.backends.aot_cell import AotFoldedCell, ShapeGuard
from wavefront.backends.disk_cache import CacheWarning
from wavefront.testing import assert_close


def _count_runs(cell):
    """Wrap the package's guard: counts of calls it admitted (package) and refused (eager)."""
    counts = {"package": 0, "eager": 0, "lanes": []}
    admits = cell.compiled.guard.admits

    def counting(inputs):
        ok = admits(inputs)
        counts["package" if ok else "eager"] += 1
        counts["lanes"].append((inputs[0].shape[0], ok))
        return ok
    cell.compiled.guard.admits = counting
    return counts


def test_aot_backend_is_exact_over_shapes_it_was_not_built_for_and_freezes_no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path))
    model = tiny_armt(torch.float64)
    fast = wavefront.optimize(model, backend="aot_inductor")
    cell = fast.batched.groups[0].cell
    with torch.no_grad():
        ids = ids_for(N_LAYERS + 2, batch=2)
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "aot logits")
        assert isinstance(cell.compiled, AotFoldedCell) and cell.compiled.runner is not None, cell.compiled.reason
        assert not cell.compiled.loaded_from_cache and fast.compile_time_s > 0
        counts = _count_runs(cell)
        for n_segments, batch, short in ((2 * N_LAYERS + 1, 1, 0), (2, 3, 0), (N_LAYERS, 2, 2)):
            other = ids_for(n_segments, batch=batch, short_last=short, seed=n_segments)
            out = fast(other)
            ref = model(other)
            assert_close(out.logits, ref.logits, 1e-9, f"aot S={n_segments} batch={batch} short={short}")
            for a, b in zip(out.memory.leaves(), ref.memory.leaves()):
                assert_close(a, b, 1e-9, "aot memory")
    # every multi-lane call ran the package, every single-lane call the eager graph
    assert counts["package"] > 0 and all(ok == (lanes > 1) for lanes, ok in counts["lanes"])
    assert "AOTInductor" in str(wavefront.explain(fast))

    # Another model of the same shape loads the cached package and gets its own results: the
    # weights (and lane-invariant buffers) are inputs of the package, never frozen into it.
    other_model = tiny_armt(torch.float64, seed=7)
    other_fast = wavefront.optimize(other_model, backend="aot_inductor")
    with torch.no_grad():
        ids = ids_for(N_LAYERS + 2, batch=2)
        assert_close(other_fast(ids).logits, other_model(ids).logits, 1e-9, "aot, cached package, other weights")
    assert other_fast.batched.groups[0].cell.compiled.loaded_from_cache
    other_fast(ids).logits.sum().backward()  # training calls run the eager folded graph
    assert other_model.cell.layers[1].memory.W_mq.weight.grad is not None

    # A truncated package is never loaded (it silently disabled AOT for good): it is detected
    # and compiled again, with a warning. The "compiler" here writes the package compiled above
    # (a real one, without a second cold compile).
    package = cell.compiled.package_path
    good = open(package, "rb").read()
    os.truncate(package, len(good) // 2)
    compiled = []

    def compile_again(ep, package_path):
        compiled.append(package_path)
        with open(package_path, "wb") as f:
            f.write(good)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_again)
    third_model = tiny_armt(torch.float64, seed=3)
    with torch.no_grad(), pytest.warns(CacheWarning, match="truncated or changed"):
        third = wavefront.optimize(third_model, backend="aot_inductor")  # optimize() checks the program: loads it
        assert_close(third(ids).logits, third_model(ids).logits, 1e-9, "aot, package rebuilt")
    aot = third.batched.groups[0].cell.compiled
    assert len(compiled) == 1 and aot.runner is not None and aot.fallback is None and not aot.loaded_from_cache
    assert open(package, "rb").read() == good


def test_hugging_face_blocks_compile_ahead_of_time_and_read_their_state_live(tmp_path, monkeypatch):
    """A LLaMA-based ARMT: the shared norm weights inside its folded block are package inputs, so
    an in-place change (equal in every layer, as folding requires) is seen on the next call."""
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path))
    # LlamaRMSNorm computes in float32 even in a float64 model (hidden_states.to(torch.float32)):
    # compiled, that float32 arithmetic is fused and ordered differently, so agreement is at
    # float32's level (measured 8.6e-8), not float64's.
    tol = 1e-6
    model = build("llama", torch.float64)
    fast = wavefront.optimize(model, backend="aot_inductor")
    ids = ids_for(N_LAYERS + 2, batch=2)
    with torch.no_grad():
        assert_close(fast(ids).logits, model(ids).logits, tol, "aot, llama base")
        aot = fast.batched.groups[0].cell.compiled
        assert aot.runner is not None and aot.fallback is None, aot.reason
        assert any("layernorm" in name for name in aot.state)
        counts = _count_runs(fast.batched.groups[0].cell)
        for name, module in model.named_modules():
            if name.endswith("input_layernorm"):
                module.weight.mul_(1.5)
        assert_close(fast(ids).logits, model(ids).logits, tol, "aot, llama base, norm weights changed in place")
    assert counts["package"] > 0 and not fast.batched.groups[0].cell.fallback_reason


def test_a_cell_that_cannot_be_exported_takes_torch_compile_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("WAVEFRONT_CACHE_DIR", str(tmp_path))

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot export this\nsecond line")
    monkeypatch.setattr(torch.export, "export", refuse)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)  # no real compile here
    model = tiny_armt(torch.float64)
    fast = wavefront.optimize(model, backend="aot_inductor")
    with torch.no_grad():
        ids = ids_for(N_LAYERS + 2, batch=2)
        assert_close(fast(ids).logits, model(ids).logits, 1e-9, "torch.compile fallback")
    aot = fast.batched.groups[0].cell.compiled
    assert aot.runner is None and "cannot export this" in aot.reason and compiled[0]["dynamic"]
    assert "AOTInductor did not apply: RuntimeError: cannot export this" in str(wavefront.explain(fast))
    assert not (tmp_path / "aot_inductor").exists(), "nothing is cached for a cell that was not compiled ahead of time"


def test_shape_guard_ties_equal_symbols_and_checks_ranges():
    from torch.export import Dim

    class Add(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    n = Dim("n", min=2, max=10)
    ep = torch.export.export(Add(), (torch.zeros(4, 3), torch.zeros(4, 3)), dynamic_shapes=({0: n}, {0: n}))
    guard = ShapeGuard(ep, [torch.zeros(4, 3), torch.zeros(4, 3)])
    assert guard.admits([torch.zeros(5, 3), torch.zeros(5, 3)])
    assert not guard.admits([torch.zeros(5, 3), torch.zeros(6, 3)]), "tied sizes must stay equal"
    assert not guard.admits([torch.zeros(11, 3), torch.zeros(11, 3)]), "above the range"
    assert not guard.admits([torch.zeros(1, 3), torch.zeros(1, 3)]), "below the range"
    assert not guard.admits([torch.zeros(5, 4), torch.zeros(5, 4)]), "a static size changed"
    assert not guard.admits([torch.zeros(5, 3, 1), torch.zeros(5, 3)]), "rank"
    assert not guard.admits([torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3)]), "dtype"
    again = ShapeGuard.from_json(guard.to_json())  # what the disk cache keeps beside a package
    assert (again.checks, again.ranges) == (guard.checks, guard.ranges)


def test_a_graph_holding_module_state_is_refused():
    ep = torch.export.export(torch.nn.Linear(3, 2), (torch.zeros(4, 3),))
    with pytest.raises(Exception, match="module state"):
        ShapeGuard(ep, [torch.zeros(4, 3)])
