"""Loops with several carries (wavefront/time_loops/several_carries.py): a running max scanned
first and values affine given it (xLSTM's mLSTM step loop), or values each affine in itself; bodies
that branch on shapes (traced per shape); functions reached through functools.partial objects on a
module; a carry rounded inside its step is left as a loop."""
import functools

import pytest
import torch

import wavefront
from wavefront.testing import assert_close

F64 = torch.float64


def mlstm_step(q, k, v, i, f, C, n, m, eps=1e-6, **kwargs):
    """One mLSTM step as transformers writes it: shape checks, a running max, a matrix readout."""
    B, H, d = q.shape
    if C.shape != (B, H, d, v.shape[-1]) or m.shape != (B, H, 1):
        raise ValueError("state of the wrong shape")
    lf = torch.nn.functional.logsigmoid(f)
    m_new = torch.max(lf + m, i)
    fa, ia = torch.exp(lf + m - m_new), torch.exp(i - m_new)
    C = fa[:, :, :, None] * C.clone() + ia[:, :, :, None] * (k[:, :, :, None] @ v[:, :, None, :])
    n = fa * n + ia * k
    qs = q * d ** -0.5
    num = (qs[:, :, None, :] @ C).squeeze(2)
    den = (qs[:, :, None, :] @ n[:, :, :, None]).squeeze(2)
    return num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps), (C, n, m_new)


def mlstm_sequence(q, k, v, i, f, state=None, **kwargs):
    B, H, T, d = q.shape
    if state is None:
        C, n, m = (q.new_zeros(B, H, d, v.shape[-1]), q.new_zeros(B, H, d), q.new_zeros(B, H, 1))
    else:
        C, n, m = state
    hs = []
    for t in range(T):
        h, (C, n, m) = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None], f[:, :, t, None], C, n, m,
                                  **kwargs)
        hs.append(h)
    return torch.stack(hs, dim=-2), (C, n, m)


class Call(torch.nn.Module):
    """A module whose forward calls a module-level function (where the loop is)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class MLSTM(torch.nn.Module):
    def forward(self, *args, **kwargs):
        return mlstm_sequence(*args, **kwargs)


class Bound(torch.nn.Module):
    """The sequence function bound in a partial held on the module (xLSTM's `_inference_fn`)."""

    def __init__(self):
        super().__init__()
        self.kernel = functools.partial(functools.partial(mlstm_sequence, eps=1e-6), extra="ignored")

    def forward(self, *args):
        return self.kernel(*args)


def _inputs(B, T, d=4, dv=5, H=3, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, d, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g, dtype=F64)
    i, f = (6 * torch.randn(B, H, T, generator=g, dtype=F64) for _ in range(2))  # gates far beyond exp's range
    xs = [q, k, v, i, f]
    return [x.requires_grad_() for x in xs] if requires_grad else xs


@pytest.mark.parametrize("B,T", [(1, 1), (2, 37), (2, 64)])
def test_an_mlstm_step_loop_runs_as_a_running_max_scan_with_gradients(B, T):
    model = MLSTM()
    xs = _inputs(B, T, requires_grad=True)
    ref, ref_state = model(*xs)
    ref_grads = torch.autograd.grad(ref.sum() + ref_state[0].sum() + ref_state[1].sum(), xs)
    fast = wavefront.optimize(model)
    out, state = fast(*xs)
    assert_close(out, ref, 1e-12, "outputs")
    for name, s, r in zip("Cnm", state, ref_state):
        assert_close(s, r, 1e-12, name)
    grads = torch.autograd.grad(out.sum() + state[0].sum() + state[1].sum(), xs)
    for name, g, r in zip("qkvif", grads, ref_grads):
        assert_close(g, r, 1e-10, f"d{name}")
    said = str(wavefront.explain(fast))
    assert "carries `C`, `n`, `m`: ran as a running-max scan" in said


def test_a_state_handed_back_continues_the_scan():
    model, fast = MLSTM(), None
    q, k, v, i, f = _inputs(2, 30)
    fast = wavefront.optimize(model)
    _, state = fast(q[:, :, :11], k[:, :, :11], v[:, :, :11], i[:, :, :11], f[:, :, :11])
    out, last = fast(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], i[:, :, 11:], f[:, :, 11:], state)
    ref, ref_last = model(q, k, v, i, f)
    assert_close(out, ref[:, :, 11:], 1e-12, "continued outputs")
    for s, r in zip(last, ref_last):
        assert_close(s, r, 1e-12, "continued state")


def test_a_body_that_branches_on_shapes_is_planned_once_per_shape():
    """mlstm_step checks shapes and unpacks q.shape: traced per shape, and the new **kwargs dict of
    every call does not make a new plan."""
    model = MLSTM()
    fast = wavefront.optimize(model)
    from wavefront.time_loops.model import model_time_loops
    (_, lifted), = [(t, lf) for t, lf in model_time_loops(model) if lf.name == "mlstm_sequence"]
    plans = lifted.runner._plans  # shared by every model calling mlstm_sequence (other tests' too)
    for B in (1, 2):
        xs = _inputs(B, 9, seed=B)
        assert_close(fast(*xs, eps=1e-6)[0], model(*xs, eps=1e-6)[0], 1e-12, f"batch {B}")
        planned = len(plans)
        for _ in range(2):
            assert_close(fast(*xs, eps=1e-6)[0], model(*xs, eps=1e-6)[0], 1e-12, f"batch {B} again")
        assert len(plans) == planned  # the same shapes and an equal **kwargs: the plan is reused
    xs = _inputs(2, 9, d=6, seed=3)
    assert_close(fast(*xs, eps=1e-6)[0], model(*xs, eps=1e-6)[0], 1e-12, "another head size")


def test_a_function_bound_in_a_partial_on_the_module_is_lifted_and_the_partial_put_back():
    model = Bound()
    original = model.kernel
    xs = _inputs(2, 20)
    fast = wavefront.optimize(model)
    out, _ = fast(*xs)
    assert_close(out, model(*xs)[0], 1e-12, "outputs")
    assert model.kernel is original  # restored after the call
    assert "mlstm_sequence line" in str(wavefront.explain(fast))
    assert "ran as a running-max scan" in str(wavefront.explain(fast))
    with pytest.raises(IndexError):
        model(xs[0], xs[1][:, :, :3], *xs[2:])
    with pytest.raises(IndexError):
        fast(xs[0], xs[1][:, :, :3], *xs[2:])  # a bad call raises as the model's own does ...
    assert model.kernel is original  # ... and the partial is put back


def two_independent(x, y, h, g):
    for t in range(x.shape[1]):
        h = torch.sigmoid(x[:, t]) * h + y[:, t]
        g = 0.5 * g - torch.tanh(y[:, t])
    return h, g


def coupled(x, h, g):
    for t in range(x.shape[1]):
        h = 0.5 * h + g
        g = g * torch.sigmoid(x[:, t])
    return h, g


def test_carries_each_affine_in_itself_run_as_separate_scans_with_gradients():
    torch.manual_seed(0)
    x, y = (torch.randn(3, 50, 4, dtype=F64, requires_grad=True) for _ in range(2))
    h0, g0 = (torch.randn(3, 4, dtype=F64, requires_grad=True) for _ in range(2))
    model = Call(two_independent)
    ref = model(x, y, h0, g0)
    ref_grads = torch.autograd.grad(ref[0].sum() + ref[1].sum(), [x, y, h0, g0])
    fast = wavefront.optimize(model)
    out = fast(x, y, h0, g0)
    for o, r in zip(out, ref):
        assert_close(o, r, 1e-12, "carries")
    for g, r in zip(torch.autograd.grad(out[0].sum() + out[1].sum(), [x, y, h0, g0]), ref_grads):
        assert_close(g, r, 1e-12, "gradients")
    assert "ran as a scan of 2 carries" in str(wavefront.explain(fast))


def test_carries_that_feed_each_other_are_left_as_a_loop_with_the_reason():
    x, h0, g0 = torch.randn(2, 9, 3, dtype=F64), torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    model = Call(coupled)
    fast = wavefront.optimize(model)
    assert all(torch.equal(a, b) for a, b in zip(fast(x, h0, g0), model(x, h0, g0)))
    assert "2 carries (g, h) that are not each affine in itself" in str(wavefront.explain(fast))


def rounded(x, h):
    for t in range(x.shape[1]):
        h = (0.9 * h + x[:, t]).to(torch.bfloat16).to(x.dtype)
    return h


def kept_in_float32(x, h):
    for t in range(x.shape[1]):
        h = (0.9 * h.to(torch.float32) + x[:, t]).to(torch.float32)
    return h


def test_a_carry_rounded_inside_its_step_is_left_as_a_loop():
    x, h0 = torch.randn(2, 12, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    model = Call(rounded)
    fast = wavefront.optimize(model)
    assert torch.equal(fast(x, h0), model(x, h0))
    assert "converted to torch.bfloat16" in str(wavefront.explain(fast))


def test_a_carry_the_loop_keeps_in_float32_is_scanned_in_float32():
    """float64 inputs, a carry converted to float32 every step: the scan runs in float32 too (not
    silently in float64), so it agrees with the loop to float32 rounding and returns float32."""
    torch.manual_seed(0)
    x, h0 = torch.randn(2, 300, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    model = Call(kept_in_float32)
    fast = wavefront.optimize(model)
    out, ref = fast(x, h0), model(x, h0)
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref, 1e-5, "float32 carry")
    assert "ran as a scan" in str(wavefront.explain(fast))


@pytest.mark.hf
@pytest.mark.parametrize("T", [1, 30, 70])
def test_transformers_xlstm_runs_its_step_loop_as_a_running_max_scan(T):
    """xLSTM binds its mLSTM functions in partials on the backend module; the chunkwise kernel
    takes whole 64-token chunks and the step loop the rest (all of it below 64 tokens)."""
    from wavefront import hf_families
    if "xlstm" not in hf_families.available():
        pytest.skip("this transformers has no xLSTM")
    model = hf_families.build("xlstm")
    ids = hf_families.example_ids("xlstm", 2, T)
    backends = [m for m in model.modules() if "_inference_fn" in vars(m)]
    originals = [m._inference_fn for m in backends]
    fast = wavefront.optimize(model)
    with torch.no_grad():
        out, ref = fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits
    assert_close(out, ref, 1e-5, "logits")
    assert [m._inference_fn for m in backends] == originals
    said = str(wavefront.explain(fast))
    if T > 1:  # a single token takes the step kernel directly: no loop runs
        assert "mlstm_recurrent_sequence_native line" in said and "ran as a running-max scan" in said


# --- what an adversarial review found (each was silently different, or crashed, before its fix)

def _branchy_step(k, w, xt, c, m):
    if m.shape[-1] == 1:  # a different path for a fresh, unbroadcast state
        c = c + 100.0
    mn = torch.max(m + w, k)
    return 0.5 * c + torch.exp(k - mn) * xt, mn


def branchy(k, w, x, c, m):
    for t in range(k.shape[1]):
        c, m = _branchy_step(k[:, t], w[:, t], x[:, t], c, m)
    return c, m


def reads_old_max(k, x, c, m):
    ys = []
    for t in range(k.shape[1]):
        ys.append(m.sum(-1))  # the max before the step, reduced: its shape matters
        mn = torch.maximum(m, k[:, t])
        c = torch.exp(m - mn) * c + torch.exp(k[:, t] - mn) * x[:, t]
        m = mn
    return torch.stack(ys, 1), c, m


def running_max_values(k, x, c, m):
    ys = []
    for t in range(k.shape[1]):
        mn = torch.maximum(m, k[:, t])
        c = torch.exp(m - mn) * c + torch.exp(k[:, t] - mn) * x[:, t]
        m = mn
        ys.append(c + m)
    return torch.stack(ys, 1), c, m


def constant_decay(k, x, c, m):
    for t in range(k.shape[1]):
        mn = torch.max(m + (-0.1), k[:, t])
        c = torch.exp(m - 0.1 - mn) * c + torch.exp(k[:, t] - mn) * x[:, t]
        m = mn
    return c, m


def through_a_tensors_dtype(x, y16, h):
    for t in range(x.shape[1]):
        h = (0.9 * h + x[:, t]).to(y16.dtype).to(x.dtype)
    return h


def _prefix_step(h, window):
    if window.shape[1] > 1:  # a shape that depends on the index: traced with shapes, it cannot run under vmap
        return 0.5 * h + window.mean(1)
    return h + window[:, 0]


def prefix_mean(x, h):
    for t in range(x.shape[1]):
        h = _prefix_step(h, x[:, :t + 1])
    return h


def test_a_shape_branching_body_whose_carry_widens_on_the_first_step_is_left_as_a_loop():
    g = torch.Generator().manual_seed(0)
    k, x = (torch.randn(2, 20, 3, generator=g, dtype=F64) for _ in range(2))
    w = -torch.rand(2, 20, 3, generator=g, dtype=F64)
    c0, m0 = torch.zeros(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64)  # m widens to [2, 3] on step 1
    model = Call(branchy)
    fast = wavefront.optimize(model)
    assert all(torch.equal(a, b) for a, b in zip(fast(k, w, x, c0, m0), model(k, w, x, c0, m0)))
    assert "changes its shape or dtype on the first step" in str(wavefront.explain(fast))


def test_outputs_reading_a_carry_that_widens_on_the_first_step_are_not_read_widened():
    k, x = torch.randn(2, 5, 3, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    model = Call(reads_old_max)
    fast = wavefront.optimize(model)
    for T in (1, 5):
        args = (k[:, :T], x[:, :T], torch.zeros(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64))
        assert all(torch.equal(a, b) for a, b in zip(fast(*args), model(*args)))
    assert "widens from (2, 1) to (2, 3)" in str(wavefront.explain(fast))


def test_gradients_at_ties_of_the_max_are_the_loops():
    k = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64).unsqueeze(-1).requires_grad_()
    x, c0 = torch.ones(1, 8, 1, dtype=F64), torch.zeros(1, 1, dtype=F64)
    m0 = torch.zeros(1, 1, dtype=F64, requires_grad=True)  # ties with k's zeros everywhere
    model = Call(running_max_values)
    fast = wavefront.optimize(model)
    out, ref = fast(k, x, c0, m0), model(k, x, c0, m0)
    for o, r in zip(out, ref):
        assert_close(o, r, 1e-12, "values")
    grads = torch.autograd.grad(out[0].sum() + out[1].sum(), [k, m0])
    for g, r in zip(grads, torch.autograd.grad(ref[0].sum() + ref[1].sum(), [k, m0])):
        assert_close(g, r, 1e-12, "gradients at ties")
    assert "ran as a running-max scan" in str(wavefront.explain(fast))


@pytest.mark.parametrize("m_dtype", [torch.float16, torch.float32, F64])
def test_a_constant_in_the_max_takes_the_dtype_the_max_is_kept_in(m_dtype):
    """m + (-0.1): a Python float until the max widens to the gates' float64 on the first step."""
    k, x = 3 * torch.randn(2, 30, 3, dtype=F64), torch.randn(2, 30, 3, dtype=F64)
    args = (k, x, torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=m_dtype))
    model = Call(constant_decay)
    fast = wavefront.optimize(model)
    for o, r in zip(fast(*args), model(*args)):
        assert_close(o, r, 1e-12, "carries")


def test_a_rounding_named_through_a_tensors_dtype_is_seen():
    x, y16, h0 = torch.randn(2, 50, 3, dtype=F64), torch.zeros(1, dtype=torch.float16), torch.zeros(2, 3, dtype=F64)
    model = Call(through_a_tensors_dtype)
    fast = wavefront.optimize(model)
    assert torch.equal(fast(x, y16, h0), model(x, y16, h0))
    assert "converted to torch.float16" in str(wavefront.explain(fast))


def test_a_body_vmap_cannot_run_is_left_as_a_loop_with_the_reason():
    x, h0 = torch.randn(2, 9, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    model = Call(prefix_mean)
    fast = wavefront.optimize(model)
    assert torch.equal(fast(x, h0), model(x, h0))
    assert "running it as a scan failed" in str(wavefront.explain(fast))


def test_a_two_carry_method_is_explained_before_any_call():
    class TwoCarries(torch.nn.Module):
        def forward(self, x, y, h, g):
            for t in range(x.shape[1]):
                h = torch.sigmoid(x[:, t]) * h + y[:, t]
                g = 0.5 * g - y[:, t]
            return h, g
    fast = wavefront.optimize(TwoCarries())
    assert "2 carries, each affine in itself" in str(wavefront.explain(fast))


def decayed(x, h, decay=0.5):
    for t in range(x.shape[1]):
        h = decay * h + x[:, t]
    return h


def test_a_partial_the_call_itself_replaces_is_kept():
    class Reassign(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel, self.calls = functools.partial(decayed, decay=0.5), 0

        def forward(self, x, h):
            out = self.kernel(x, h)
            self.calls += 1
            self.kernel = functools.partial(decayed, decay=0.5 + 0.1 * self.calls)
            return out
    x, h0 = torch.randn(2, 20, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    model, twin = Reassign(), Reassign()
    fast = wavefront.optimize(model)
    for _ in range(3):
        assert torch.equal(fast(x, h0), twin(x, h0))
        assert model.kernel.keywords == twin.kernel.keywords


def test_a_partial_subclass_is_not_rebuilt_as_a_plain_partial():
    class Doubling(functools.partial):
        def __call__(self, *args, **kwargs):
            return 2 * super().__call__(*args, **kwargs)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = Doubling(decayed, decay=0.5)

        def forward(self, x, h):
            return self.kernel(x, h)
    x, h0 = torch.randn(2, 20, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    model = Holder()
    fast = wavefront.optimize(model)
    assert torch.equal(fast(x, h0), model(x, h0))


def scaled(x, h, options):
    for t in range(x.shape[1]):
        h = options["decay"][0] * h + x[:, t]
    return h


class Options(dict):
    def __getitem__(self, key):
        return [0.25]


def test_plans_are_not_reused_for_changed_nested_lists_dict_subclasses_or_signed_zeros():
    x, h0 = torch.randn(2, 20, 3, dtype=F64), torch.ones(2, 3, dtype=F64)
    model = Call(scaled)
    fast = wavefront.optimize(model)
    nested = [0.5]
    options = {"decay": nested}
    assert torch.equal(fast(x, h0, options), model(x, h0, options))
    nested[0] = 0.9  # mutated in place, then an equal-looking fresh dict
    assert torch.equal(fast(x, h0, {"decay": nested}), model(x, h0, {"decay": nested}))
    assert torch.equal(fast(x, h0, {"decay": [0.5]}), model(x, h0, {"decay": [0.5]}))
    assert torch.equal(fast(x, h0, Options(decay=[0.5])), model(x, h0, Options(decay=[0.5])))
    for zero in (0.0, -0.0):  # 1 / (h * 0.0) is +inf, 1 / (h * -0.0) is -inf
        assert torch.equal(1 / fast(x, h0, {"decay": [zero]}) - 1 / x[:, -1], 1 / model(x, h0, {"decay": [zero]})
                           - 1 / x[:, -1])


def test_a_modules_train_eval_flag_read_in_the_body_is_not_baked_in():
    class Gated(torch.nn.Module):
        def forward(self, x, h):
            for t in range(x.shape[1]):
                h = (0.5 if self.training else 0.9) * h + x[:, t]
            return h
    x, h0 = torch.randn(2, 20, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)
    model = Gated()
    fast = wavefront.optimize(model)
    for mode in (True, False, True):
        model.train(mode)
        assert_close(fast(x, h0), model(x, h0), 1e-12, f"training={mode}")


def test_planning_leaves_the_modules_buffers_and_the_rng_as_they_were():
    """The runner runs a step once to record dtypes: a module in the body that updates a buffer
    (BatchNorm in training) or draws numbers must not be advanced by it."""
    class Normed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3).double()

        def forward(self, x, h):
            for t in range(x.shape[1]):
                h = torch.sigmoid(self.norm(x[:, t])) * h + x[:, t]
            return h
    x, h0 = torch.randn(4, 6, 3, dtype=F64), torch.zeros(4, 3, dtype=F64)
    model = Normed()
    fast = wavefront.optimize(model)
    before = model.norm.running_mean.clone()
    torch.manual_seed(1)
    fast(x, h0)
    drawn = torch.rand(())
    twin = Normed()
    twin.load_state_dict({**model.state_dict(), "norm.running_mean": before,
                          "norm.num_batches_tracked": model.norm.num_batches_tracked * 0})
    torch.manual_seed(1)
    twin(x, h0)
    assert torch.equal(drawn, torch.rand(()))  # the RNG advanced as the loop alone advances it
    assert_close(model.norm.running_mean, twin.norm.running_mean, 1e-12, "running mean")
