"""The chunked running-max scans (RWKV-4 WKV, xLSTM's mLSTM) against their step-by-step references
and against transformers' own functions: outputs, the returned state triple, gradients, long T."""
import pytest
import torch
from wavefront.backends.scans.logspace.chunked import chunked_mlstm, chunked_wkv
from wavefront.backends.scans.logspace.naive import mlstm_reference, wkv_reference

from wavefront.testing import assert_close

F64, F32 = torch.float64, torch.float32
TS = [1, 5, 64, 100]
# float32 at T = 100 against transformers' float32 loop, which rounds at every step (its own error
# against float64 reaches ~1.2e-5 on these inputs), and against float64 (ours: ~1e-6)
F32_VS_F32, F32_VS_F64 = 3e-5, 5e-6


def _wkv_inputs(lead, T, ch, dtype=F64, seed=0, key_scale=5.0, with_state=False):
    """Decays w in [-5, 3] (e^w up to 20: RWKV-4's init range), keys up to a few key_scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(ch, dtype=F32).uniform_(-5, 3, generator=g)
    u = torch.randn(ch, generator=g, dtype=F32)
    k = key_scale * torch.randn(*lead, T, ch, generator=g, dtype=F32)
    v = torch.randn(*lead, T, ch, generator=g, dtype=F32)
    state = None
    if with_state:  # a state as a previous call leaves it: den > 0, max near the keys
        state = (torch.randn(*lead, ch, generator=g, dtype=F32), torch.rand(*lead, ch, generator=g, dtype=F32) + 0.1,
                 key_scale * torch.randn(*lead, ch, generator=g, dtype=F32))
    # float32 draws cast up: transformers' CPU WKV rounds keys to float32 (key.float()) even in float64
    cast = (lambda x: x.to(dtype))
    return cast(w), cast(u), cast(k), cast(v), (tuple(map(cast, state)) if state else None)


def _mlstm_inputs(lead, T, dqk, dv, dtype=F64, seed=0, gate_scale=3.0, with_state=False, positive_qk=False):
    """Gate logits ~ gate_scale * N(0, 1), forget gates shifted to remember (f + 2)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*lead, T, dqk, generator=g, dtype=dtype) for _ in range(2))
    if positive_qk:  # n . q cannot cancel: a well-conditioned denominator for precision checks
        q, k = q.abs(), k.abs()
    v = torch.randn(*lead, T, dv, generator=g, dtype=dtype)
    i = gate_scale * torch.randn(*lead, T, generator=g, dtype=dtype)
    f = gate_scale * torch.randn(*lead, T, generator=g, dtype=dtype) + 2.0
    state = None
    if with_state:
        state = tuple(torch.randn(*lead, *shape, generator=g, dtype=dtype) for shape in ((dqk, dv), (dqk,), (1,)))
    return q, k, v, i, f, state


def _same_represented(state, ref, rtol, name):
    """A stabilised triple (value, normaliser, max) against another: the max itself, and the values
    rescaled to the reference's max (value * e^{m - m_ref}), which is what the triple stands for."""
    *vals, m = state
    *rvals, rm = ref
    assert_close(m, rm, rtol, f"{name} max")
    for x, rx in zip(vals, rvals):
        scale = torch.exp(m.double() - rm.double())
        while scale.dim() < rx.dim():
            scale = scale.unsqueeze(-1)
        assert_close(x.double() * scale, rx.double(), rtol, f"{name} value")


# ---------------------------------------------------------------- WKV

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("chunk", [None, 1, 7, 16])  # None: chunks of 4; 1: the stabilised step scan
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv_matches_the_reference_in_float64(T, chunk, with_state):
    w, u, k, v, state = _wkv_inputs((2,), T, 5, seed=T, with_state=with_state)
    out, st = chunked_wkv(w, u, k, v, state, chunk=chunk)
    ro, rst = wkv_reference(w, u, k, v, state)
    assert out.dtype == F64 and all(s.dtype == F64 for s in st)
    assert_close(out, ro, 1e-10, "outputs")
    for name, s, r in zip(("num", "den", "max"), st, rst):  # the triple itself, not only what it stands for
        assert_close(s, r, 1e-10, name)


def test_wkv_heads_and_batch_as_leading_dims():
    w, u, k, v, state = _wkv_inputs((2, 3), 37, 4, with_state=True)
    out, st = chunked_wkv(w, u, k, v, state, chunk=8)
    ro, rst = wkv_reference(w, u, k, v, state)
    assert_close(out, ro, 1e-10, "outputs")
    for s, r in zip(st, rst):
        assert_close(s, r, 1e-10, "state")


def _assert_same_gradients(outs, ref_outs, leaves, names):
    """The gradients of one random projection of the outputs and the returned state, both sides."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(x.shape, generator=g, dtype=F64) for x in outs]
    grads = torch.autograd.grad(sum((x * w).sum() for x, w in zip(outs, weights)), leaves)
    rgrads = torch.autograd.grad(sum((x * w).sum() for x, w in zip(ref_outs, weights)), leaves)
    for name, x, y in zip(names, grads, rgrads):
        assert_close(x, y, 1e-10, f"d/d{name}")


@pytest.mark.parametrize("T", [1, 45])
@pytest.mark.parametrize("chunk", [None, 1, 8])
def test_wkv_gradients_match_the_reference(T, chunk):
    w, u, k, v, state = _wkv_inputs((2,), T, 3, with_state=True)
    leaves = [x.requires_grad_() for x in (w, u, k, v, *state)]
    out, st = chunked_wkv(w, u, k, v, state, chunk=chunk)
    ro, rst = wkv_reference(w, u, k, v, state)
    _assert_same_gradients((out, *st), (ro, *rst), leaves, ("w", "u", "k", "v", "num0", "den0", "max0"))


@pytest.mark.hf
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv_matches_transformers(dtype, with_state):
    rwkv = pytest.importorskip("transformers.models.rwkv.modeling_rwkv")
    w, u, k, v, state = _wkv_inputs((2,), 100, 6, dtype=dtype, with_state=with_state)
    out, st = chunked_wkv(w, u, k, v, state)
    to, tst = rwkv.rwkv_linear_attention_cpu(w, u, k, v, state=state, return_state=True)
    tol = 1e-12 if dtype == F64 else F32_VS_F32
    assert out.dtype == to.dtype and [s.dtype for s in st] == [s.dtype for s in tst]
    assert_close(out, to, tol, "outputs")
    _same_represented(st, tst, tol, "state")
    if dtype == F32:  # both round differently: ours, at least, is within float32 rounding of float64
        ro, rst = rwkv.rwkv_linear_attention_cpu(*(x.double() for x in (w, u, k, v)), return_state=True,
                                                 state=[x.double() for x in state] if state else None)
        assert_close(out, ro, F32_VS_F64, "outputs vs float64")
        _same_represented(st, rst, F32_VS_F64, "state vs float64")
    # the triple is transformers' own: its next call continues from ours as from its own
    w2, u2, k2, v2, _ = _wkv_inputs((2,), 30, 6, dtype=dtype, seed=5)
    o_ours, _ = rwkv.rwkv_linear_attention_cpu(w, u, k2, v2, state=list(st), return_state=True)
    o_theirs, _ = rwkv.rwkv_linear_attention_cpu(w, u, k2, v2, state=list(tst), return_state=True)
    assert_close(o_ours, o_theirs, tol, "transformers continuing our state")
    o_back, _ = chunked_wkv(w, u, k2, v2, tuple(tst))
    assert_close(o_back, o_theirs, tol, "ours continuing transformers' state")


def test_wkv_state_carried_over_two_calls_equals_one():
    w, u, k, v, state = _wkv_inputs((2,), 100, 4, with_state=True)
    out, st = chunked_wkv(w, u, k, v, state, chunk=16)
    o1, s1 = chunked_wkv(w, u, k[:, :37], v[:, :37], state, chunk=16)
    o2, s2 = chunked_wkv(w, u, k[:, 37:], v[:, 37:], s1, chunk=16)
    assert_close(torch.cat([o1, o2], 1), out, 1e-10, "outputs")
    for a, b in zip(s2, st):
        assert_close(a, b, 1e-10, "state")


def test_wkv_naive_matches_chunked_at_long_T_with_large_keys_in_float64():
    w, u, k, v, state = _wkv_inputs((1,), 2048, 8, key_scale=10.0, with_state=True)
    out, st = chunked_wkv(w, u, k.clamp(-30, 30), v, state)
    ro, rst = wkv_reference(w, u, k.clamp(-30, 30), v, state)
    assert_close(out, ro, 1e-10, "outputs")
    for a, b in zip(st, rst):
        assert_close(a, b, 1e-10, "state")


@pytest.mark.parametrize("chunk, tol", [(None, 1e-5), (16, 1e-5), (1, 1e-4)])
def test_wkv_long_float32_with_large_keys_stays_finite_and_close(chunk, tol):
    """T = 8192, keys up to ~30 (e^k far beyond float32 without the max), decays up to e^{-20}; the
    float64 chunked result as the reference (the test above checks it against the step loop).
    Chunks of 4 or 16 land near 9e-7, held to 1e-5; chunks of one step round the state once a
    step, as the float32 step loop does (8e-6; the loop: 2.4e-5), held to the 1e-4 asked for."""
    T = 8192
    w, u, k, v, _ = _wkv_inputs((1,), T, 8, dtype=F32, key_scale=10.0)
    k = k.clamp(-30, 30)
    out, st = chunked_wkv(w, u, k, v, chunk=chunk)
    ro, rst = chunked_wkv(w.double(), u.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(s).all() for s in st)
    assert_close(out, ro, tol, "fp32 outputs")
    _same_represented(st, rst, tol, "fp32 state")


def test_wkv_weights_built_in_groups_of_chunks_match(monkeypatch):
    import wavefront.backends.scans.logspace.chunked as chunked
    w, u, k, v, state = _wkv_inputs((2,), 70, 4, with_state=True)
    out, st = chunked_wkv(w, u, k, v, state, chunk=8)
    monkeypatch.setattr(chunked, "WKV_BLOCK", 2 * 4 * 8 * 8 * 3)  # three chunks per block
    o_groups, st_groups = chunked_wkv(w, u, k, v, state, chunk=8)
    assert_close(o_groups, out, 1e-14, "outputs")
    for a, b in zip(st_groups, st):
        assert_close(a, b, 1e-14, "state")


def test_wkv_keys_beyond_the_exponent_range_stay_exact():
    w, u, k, v, _ = _wkv_inputs((2,), 200, 4, dtype=F32)
    k = 40.0 * k  # |k| in the hundreds: e^k overflows float32 and even float64 without the max
    out, st = chunked_wkv(w, u, k, v)
    ro, rst = wkv_reference(w.double(), u.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(s).all() for s in st)
    assert_close(out, ro, 1e-5, "outputs")  # T eps: ~5e-7 here
    # a float32 max of a few hundred is itself known only to ~|m| ulp, and so is what the triple stands
    # for: ~3e-5 here (the step-by-step float32 loop: ~5e-3)
    _same_represented(st, rst, 8 * torch.finfo(F32).eps * rst[2].abs().max().item(), "state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wkv_low_precision_accumulates_in_float32(dtype):
    w, u, k, v, _ = _wkv_inputs((2,), 100, 4, dtype=dtype)
    out, st = chunked_wkv(w, u, k, v)
    ro, _ = wkv_reference(w.double(), u.double(), k.double(), v.double())
    assert out.dtype == dtype and all(s.dtype == F32 for s in st)
    assert_close(out.double(), ro, 2e-2, "low precision outputs")


def test_wkv_bad_shapes_are_refused_with_the_shapes():
    w, u, k, v, _ = _wkv_inputs((2,), 10, 4)
    with pytest.raises(ValueError, match="k and v must be"):
        chunked_wkv(w, u, k, v[..., :3])
    with pytest.raises(ValueError, match="w and u must be"):
        chunked_wkv(w[:3], u, k, v)
    with pytest.raises(ValueError, match="state must be"):
        chunked_wkv(w, u, k, v, (k[:, 0], k[:, 0], k[:, 0, :3]))


# ---------------------------------------------------------------- mLSTM

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("with_state", [False, True])
def test_mlstm_matches_the_reference_in_float64(T, chunk, with_state):
    q, k, v, i, f, state = _mlstm_inputs((2, 2), T, 4, 3, seed=T, with_state=with_state)
    h, st = chunked_mlstm(q, k, v, i, f, state, chunk=chunk)
    rh, rst = mlstm_reference(q, k, v, i, f, state)
    assert h.dtype == F64 and all(s.dtype == F64 for s in st)
    assert [s.shape for s in st] == [s.shape for s in rst]
    assert_close(h, rh, 1e-10, "outputs")
    for name, s, r in zip(("C", "n", "m"), st, rst):
        assert_close(s, r, 1e-10, name)


@pytest.mark.parametrize("T", [1, 45])
@pytest.mark.parametrize("chunk", [None, 8])
def test_mlstm_gradients_match_the_reference(T, chunk):
    q, k, v, i, f, state = _mlstm_inputs((2, 2), T, 3, 4, gate_scale=5.0, with_state=True)
    leaves = [x.requires_grad_() for x in (q, k, v, i, f, *state)]
    h, st = chunked_mlstm(q, k, v, i, f, state, chunk=chunk)
    rh, rst = mlstm_reference(q, k, v, i, f, state)
    _assert_same_gradients((h, *st), (rh, *rst), leaves, ("q", "k", "v", "i", "f", "C0", "n0", "m0"))


def test_mlstm_eps_enters_through_the_max():
    """h depends on m through eps (added to the stabilised denominator): a chunked form that
    chose its own stabiliser would differ by ~eps; with a large eps the difference is plain."""
    q, k, v, i, f, state = _mlstm_inputs((1, 2), 50, 4, 4, gate_scale=5.0, with_state=True)
    h, st = chunked_mlstm(q, k, v, i, f, state, eps=0.5, chunk=16)
    rh, rst = mlstm_reference(q, k, v, i, f, state, eps=0.5)
    h0, _ = mlstm_reference(q, k, v, i, f, state, eps=0.0)
    assert_close(h, rh, 1e-10, "outputs, eps = 0.5")
    assert (h - h0).abs().max() > 1e-3  # eps matters here, so the test above can tell


@pytest.mark.hf
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("with_state", [False, True])
def test_mlstm_matches_transformers(dtype, with_state):
    X = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")
    if not hasattr(X, "mlstm_recurrent_sequence_native"):
        pytest.skip("transformers uses the external xlstm package here")
    from transformers import xLSTMConfig
    T, cut = 40, 32  # transformers' step loop is slow (~5 ms a step): a short T, its chunks of 16
    q, k, v, i, f, state = _mlstm_inputs((2, 2), T, 8, 4, dtype=dtype, gate_scale=5.0, with_state=with_state,
                                         positive_qk=(dtype == F32))
    kw = dict(zip(("c_initial", "n_initial", "m_initial"), state)) if state else {}
    tol = 1e-10 if dtype == F64 else F32_VS_F32
    h, st = chunked_mlstm(q, k, v, i, f, state)
    # the step function applied T times, its state in the compute dtype
    th, tst = X.mlstm_recurrent_sequence_native(q, k, v, i, f, return_last_states=True, dtype_state=dtype, **kw)
    assert h.dtype == th.dtype and [s.dtype for s in st] == [s.dtype for s in tst]
    assert_close(h, th, tol, "vs recurrent sequence")
    _same_represented(st, tst, tol, "state vs recurrent sequence")
    if dtype == F32:  # ours, at least, is within float32 rounding of float64
        rh, rst = X.mlstm_recurrent_sequence_native(*(x.double() for x in (q, k, v, i, f)), return_last_states=True,
                                                    dtype_state=F64, **{a: x.double() for a, x in kw.items()})
        assert_close(h, rh, F32_VS_F64, "outputs vs float64")
        _same_represented(st, rst, F32_VS_F64, "state vs float64")
    # the chunkwise kernel on the first 32 steps
    ch, cst = X.mlstm_chunkwise_native_autograd(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :], i[..., :cut],
                                                f[..., :cut], return_last_states=True, chunk_size=16, **kw)
    h_cut, st_cut = chunked_mlstm(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :], i[..., :cut], f[..., :cut], state)
    assert_close(h_cut, ch, tol, "vs chunkwise")
    _same_represented(st_cut, cst, tol, "state vs chunkwise")
    if dtype == F64:  # the backend keeps its step states in float32/16 only (inference_state_dtype)
        return
    # what the model calls: the inference backend (32 steps chunkwise, then 8 by the step function)
    backend = X.xLSTMBackend(xLSTMConfig(chunk_size=16))
    bh, bst = backend(q, k, v, i, f, mode="inference", **kw)
    assert_close(h, bh, tol, "vs the inference backend")
    _same_represented(st, bst, tol, "state vs the inference backend")
    # and continuing from our state after 32 steps
    bh, bst = backend(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], i[..., cut:], f[..., cut:],
                      c_initial=st_cut[0], n_initial=st_cut[1], m_initial=st_cut[2], mode="inference")
    assert_close(torch.cat([h_cut, bh], -2), h, tol, "backend continuing our state")
    _same_represented(bst, st, tol, "backend's final state")


def test_mlstm_state_carried_over_two_calls_equals_one():
    q, k, v, i, f, state = _mlstm_inputs((2, 2), 100, 4, 3, with_state=True)
    h, st = chunked_mlstm(q, k, v, i, f, state, chunk=16)
    cut = 37
    first, second = slice(None, cut), slice(cut, None)
    h1, s1 = chunked_mlstm(q[..., first, :], k[..., first, :], v[..., first, :], i[..., first], f[..., first], state,
                           chunk=16)
    h2, s2 = chunked_mlstm(q[..., second, :], k[..., second, :], v[..., second, :], i[..., second], f[..., second], s1,
                           chunk=16)
    assert_close(torch.cat([h1, h2], -2), h, 1e-10, "outputs")
    for a, b in zip(s2, st):
        assert_close(a, b, 1e-10, "state")


def test_mlstm_chunk_by_chunk_state_carry_matches(monkeypatch):
    import wavefront.backends.scans.logspace.chunked as chunked
    q, k, v, i, f, state = _mlstm_inputs((2,), 70, 4, 3, with_state=True)
    h, st = chunked_mlstm(q, k, v, i, f, state, chunk=8)
    monkeypatch.setattr(chunked, "ALL_STATES_AT_ONCE", 0)  # the loop over chunks
    h_loop, st_loop = chunked_mlstm(q, k, v, i, f, state, chunk=8)
    assert_close(h_loop, h, 1e-12, "outputs")
    for a, b in zip(st_loop, st):
        assert_close(a, b, 1e-12, "state")


def test_mlstm_naive_matches_chunked_at_long_T_with_large_gates_in_float64():
    q, k, v, i, f, _ = _mlstm_inputs((1, 1), 1024, 4, 4, gate_scale=15.0)
    h, st = chunked_mlstm(q, k, v, i, f)
    rh, rst = mlstm_reference(q, k, v, i, f)
    assert_close(h, rh, 1e-10, "outputs")
    for a, b in zip(st, rst):
        assert_close(a, b, 1e-10, "state")


@pytest.mark.parametrize("forget", ["any", "remember"])
def test_mlstm_long_float32_with_large_gates_stays_finite_and_close(forget):
    """T = 8192, gate logits up to 30 in magnitude; the float64 chunked result as the reference
    (the step loop in float64 takes seconds: the test above checks the two agree at long T). 1e-5,
    not a looser 1e-4: forget sums taken as b_i - b_j of cumulative sums land at 1.05e-5 here."""
    T = 8192
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, T, 8, generator=g).abs() for _ in range(2))
    v = torch.randn(1, 2, T, 8, generator=g)
    i = torch.empty(1, 2, T).uniform_(-30, 30, generator=g)
    f = torch.empty(1, 2, T).uniform_(-30 if forget == "any" else 3, 30, generator=g)
    h, st = chunked_mlstm(q, k, v, i, f)
    rh, rst = chunked_mlstm(q.double(), k.double(), v.double(), i.double(), f.double())
    assert torch.isfinite(h).all() and all(torch.isfinite(s).all() for s in st)
    assert_close(h, rh, 1e-5, "fp32 outputs")
    _same_represented(st, rst, 1e-5, "fp32 state")


def test_mlstm_low_precision_accumulates_in_float32():
    q, k, v, i, f, _ = _mlstm_inputs((2, 2), 100, 8, 4, gate_scale=5.0, positive_qk=True)
    h, st = chunked_mlstm(*(x.bfloat16() for x in (q, k, v, i, f)))
    rh, _ = mlstm_reference(*(x.bfloat16().double() for x in (q, k, v, i, f)))
    assert h.dtype == torch.bfloat16 and all(s.dtype == F32 for s in st)
    assert_close(h.double(), rh, 2e-2, "bf16 outputs")


def test_mlstm_bad_shapes_are_refused_with_the_shapes():
    q, k, v, i, f, _ = _mlstm_inputs((2,), 10, 4, 3)
    with pytest.raises(ValueError, match="q, k must be"):
        chunked_mlstm(q, k[..., :2], v, i, f)
    with pytest.raises(ValueError, match="i_gate, f_gate must be"):
        chunked_mlstm(q, k, v, i[..., :5], f)
    with pytest.raises(ValueError, match="state must be"):
        chunked_mlstm(q, k, v, i, f, (torch.zeros(2, 4, 3), torch.zeros(2, 4), torch.zeros(2)))
