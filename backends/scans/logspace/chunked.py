"""Chunked, exactly stabilised scans for the running-max recurrences (RWKV-4 WKV, xLSTM's mLSTM).

Both are affine recurrences with exponential gates, h_t = e^{g_t} h_{t-1} + e^{x_t} (value_t),
kept as (stabilised value, max): the pair (s, m) stands for s * e^m. In log space the weight of
step j at step i is e^{x_j + g_{j+1} + ... + g_i}: a lower-triangular [C, C] matrix of log weights
per chunk of C steps, built by broadcasting (WKV: the decay is one constant per channel, so the
log weight is x_j - (i - 1 - j) e^w) or by a masked cumulative sum of the log forget gates (mLSTM).
Every exp is taken after subtracting a max that its row attains (per row, per channel where the
gate is per channel), so every weight is at most 1 and nothing overflows at any T or gate size.

Across chunks only the chunk-to-chunk recurrence of the stabilised state remains. Its max is a
max-plus scan (m_c = max(m_{c-1} + g_c, x_c): log2(n) steps of Hillis-Steele over the chunks),
and with the maxima known the stabilised values follow a first-order linear scan whose
coefficients e^{m_{c-1} + g_c - m_c} are at most 1 (linear_scan; a loop over chunks when all
chunk states at once would be too many). The returned state is the reference's own triple:
the same max (up to rounding), so it can be handed to transformers' functions or back here.

mLSTM (chunks of 64 by default) turns each chunk into [C, C] @ [C, d] matmuls, as transformers'
chunkwise kernels do. WKV's decay is a scalar per channel: a chunk's [C, C] weights per channel
share nothing and only multiply the exps, so it runs with chunks of 1 step by default (the
max-plus scan and one stabilised first-order scan); larger chunks are exact as well.

float64 inputs are computed in float64, float16/bfloat16/float32 in float32; outputs come back
in the input dtype, states in the compute dtype (as transformers returns them).
"""
from __future__ import annotations

import torch
from wavefront.backends.scans.linear.dispatch import linear_scan
from wavefront.backends.scans.logspace.naive import WKV_EMPTY_MAX
from wavefront.backends.scans.shapes import compute_dtype

ALL_STATES_AT_ONCE = 1 << 22  # mLSTM: elements of chunk states (n x state) held at once; above: chunk by chunk
WKV_BLOCK = 1 << 24  # WKV: elements of the [chunks, ch, C, C] weight tensor built at once; above: in groups


def maxplus_scan(g: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, dim: int) -> torch.Tensor:
    """All y_c = max(y_{c-1} + g_c, x_c) along `dim` with y_{-1} = x0 (x's shape without `dim`),
    by Hillis-Steele doubling: the maps y -> max(y + g, x) compose to (g1 + g2, max(x1 + g2, x2)).

    >>> maxplus_scan(torch.full((4,), -1.0), torch.tensor([0.0, 5.0, 1.0, 2.0]), torch.tensor(3.0), 0)
    tensor([2., 5., 4., 3.])
    """
    g, x = torch.movedim(g, dim, 0), torch.movedim(x, dim, 0)
    d = 1
    while d < x.shape[0]:
        x = torch.cat([x[:d], torch.maximum(x[:-d] + g[d:], x[d:])], 0)
        g = torch.cat([g[:d], g[:-d] + g[d:]], 0)
        d *= 2
    return torch.movedim(torch.maximum(x0.unsqueeze(0) + g, x), 0, dim)


def _decayed_cummax(x: torch.Tensor, x0: torch.Tensor, decay: torch.Tensor, dim: int) -> torch.Tensor:
    """maxplus_scan with one constant g = -decay at every position (broadcast over x without
    `dim`): y_c = max(x0 - (c + 1) decay, max_{c' <= c} x_c' - (c - c') decay); the window decays are
    d * decay, each rounded once, so nothing accumulates.

    >>> _decayed_cummax(torch.tensor([0.0, 5.0, 1.0, 2.0]), torch.tensor(3.0), torch.tensor(1.0), 0)
    tensor([2., 5., 4., 3.])
    """
    x = torch.movedim(x, dim, 0)
    n, d = x.shape[0], 1
    while d < n:
        x = torch.cat([x[:d], torch.maximum(x[:-d] - d * decay, x[d:])], 0)
        d *= 2
    ahead = torch.arange(1, n + 1, dtype=x.dtype, device=x.device).reshape(n, *([1] * (x.dim() - 1)))
    return torch.movedim(torch.maximum(x0.unsqueeze(0) - ahead * decay, x), 0, dim)


def _pad_steps(x: torch.Tensor, pad: int, fill: float, dim: int) -> torch.Tensor:
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim)


def chunked_wkv(w, u, k, v, state=None, chunk: int | None = None, *, decay_rate=None):
    """(out, (num, den, max)) of RWKV-4's WKV; the same contract and state triple as
    wavefront.backends.scans.logspace.naive.wkv_reference (and transformers' rwkv_linear_attention_cpu).

    w, u: [ch]; k, v: [..., T, ch]; state: (num, den, max), each [..., ch], or None (0, 0, -1e38).
    Returns (out [..., T, ch] in k's dtype, (num, den, max) in the compute dtype), the triple the
    reference returns (max_t = max(max_{t-1} - e^w, k_t)), so either side can continue from it.

    chunk: steps per chunk, 4 by default. The decay is one scalar per channel, so the weights inside
    a chunk are a [C, C] block per channel with nothing to share between channels: no matmul, and
    C times the exps of the step loop. With C = 1 every step is its own chunk and the recurrence
    is the max-plus scan of the running max plus one stabilised first-order scan (coefficients
    e^{m_{t-1} - e^w - m_t} <= 1), 4 exps a step like the loop, but also one rounding of the state
    a step like the loop. Measured on one CPU thread, B=1, 256 channels, T=4096, float32: forward
    C=1 90 ms, C=4 130 ms, C=16 400 ms (the step loop: ~600 ms); forward and backward C=1 180 ms,
    C=4 263 ms, C=16 626 ms. Error at T=8192 against float64 (keys up to 30, e^w up to 20): C=1
    8.3e-6, C=4 9.5e-7, C=16 8.0e-7 (the float32 step loop: 2.4e-5).

    >>> from wavefront.backends.scans.logspace.naive import wkv_reference
    >>> _ = torch.manual_seed(0)
    >>> w, u = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    >>> k, v = 20 * torch.randn(2, 37, 3, dtype=torch.float64), torch.randn(2, 37, 3, dtype=torch.float64)
    >>> out, state = chunked_wkv(w, u, k, v, chunk=8)
    >>> ro, rstate = wkv_reference(w, u, k, v)
    >>> all(torch.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in zip((out, *state), (ro, *rstate)))
    True
    """
    if k.dim() < 2 or v.shape != k.shape:
        raise ValueError(f"k and v must be [..., T, ch] alike, got {tuple(k.shape)} and {tuple(v.shape)}")
    *lead, T, ch = k.shape
    if w is None:  # the decay given as its rate e^w (log decay -decay_rate per step), without a log/exp round trip
        w = decay_rate
    if w.shape[-1:] != (ch,) or u.shape[-1:] != (ch,) or w.dim() != 1 or u.dim() != 1:
        raise ValueError(f"w and u must be [ch] = [{ch}], got {tuple(w.shape)} and {tuple(u.shape)}")
    if state is not None and any(s.shape != (*lead, ch) for s in state):
        raise ValueError(f"state must be (num, den, max), each {(*lead, ch)}, got {[tuple(s.shape) for s in state]}")
    ct = compute_dtype(w, u, k, v, *(state or ()))
    dev = k.device
    if T == 0:
        if state is not None:
            return k.new_zeros(k.shape), tuple(s.to(ct) for s in state)
        zero = torch.zeros(*lead, ch, dtype=ct, device=dev)
        return k.new_zeros(k.shape), (zero, zero.clone(), torch.full_like(zero, WKV_EMPTY_MAX))
    C = chunk or 4
    n = (T + C - 1) // C  # not -(-T // C): ONNX divides truncating toward zero
    pad = n * C - T
    ew = torch.exp(w.to(ct)) if decay_rate is None else decay_rate.to(ct)  # the decay per step is e^{-ew}
    u = u.to(ct)
    kc = _pad_steps(k.to(ct), pad, 0.0, -2).reshape(*lead, n, C, ch)  # padded steps only follow the end
    vc = _pad_steps(v.to(ct), pad, 0.0, -2).reshape(*lead, n, C, ch)
    if state is None:
        N0 = torch.zeros(*lead, ch, dtype=ct, device=dev)
        D0 = torch.zeros_like(N0)
        m0 = torch.full_like(N0, WKV_EMPTY_MAX)
    else:
        N0, D0, m0 = (s.to(ct) for s in state)
    # Every max below is a constant to autograd (the maxima only pick the scale each value is kept
    # at; what the values stand for does not depend on them), which saves the backward of the
    # max-plus scan. The two places where a max is part of the answer get their gradient back by a
    # factor e^{m - m'} that is exactly 1 in value (m' = m + (x - x.detach())): the given state
    # (num0, den0 stand for num0 e^{max0}) and the returned one (its max is k_j* - (T-1-j*) e^w).
    m0c = m0.detach()
    if m0.requires_grad:
        scale0 = torch.exp(m0 - m0c)
        N0, D0 = N0 * scale0, D0 * scale0
    steps = torch.arange(C, device=dev, dtype=ct)

    # Every exponent is (log value - max) taken first, both of the keys' size, then the decay added:
    # rounded to its own size, not the keys' (max_{t-1} - e^w - max_t rounds at |max| ulp a step: the
    # step loop's float32 state drifts by 5e-3 with keys of a few hundred, this one by 1e-6).
    # What each chunk adds to the state by its end: log weights k_j - (C - 1 - j) ew, stabilised by their max
    lag_end = (C - 1 - steps)[:, None] * ew  # [C, ch]
    with torch.no_grad():
        m_add = (kc - lag_end).amax(-2)  # [..., n, ch]
        # across chunks: the max by a max-plus scan, then the stabilised (num, den) by a linear scan
        m_end = _decayed_cummax(m_add, m0c, C * ew, dim=-2)  # [..., n, ch]
        m_in = torch.cat([m0c.unsqueeze(-2), m_end[..., :-1, :]], -2)
    w_end = torch.exp((kc - m_add.unsqueeze(-2)) - lag_end)
    add = torch.stack([(w_end * vc).sum(-2), w_end.sum(-2)], -1)  # [..., n, ch, 2]: (num, den)
    a = torch.exp((m_in - m_end) - C * ew)  # <= 1
    b = torch.exp(m_add - m_end).unsqueeze(-1) * add
    h0 = torch.stack([N0, D0], -1)
    after = linear_scan(a.unsqueeze(-1).expand_as(b).contiguous(), b.contiguous(), h0, dim=len(lead))
    s_in = torch.cat([h0.unsqueeze(-3), after[..., :-1, :, :]], -3)  # [..., n, ch, 2]: the state entering each chunk

    # outputs: row i of a chunk weighs step j < i by k_j - (i - 1 - j) ew, itself by u + k_i (the
    # bonus), the state entering the chunk by m_in - i ew; the row max is subtracted before the exp.
    # Channels first, so the [C, C] blocks are contiguous.
    lag = steps[:, None] - 1 - steps[None, :]  # i - 1 - j
    E = torch.where(lag >= 0, -lag * ew[:, None, None],
                    torch.where(lag == -1, u[:, None, None], torch.tensor(float("-inf"), dtype=ct, device=dev)))
    kt, vt = kc.transpose(-1, -2), vc.transpose(-1, -2)  # [..., n, ch, C]
    state_lag = steps * ew[:, None]  # [ch, C]: the entering state's log scale at row i is m_in - state_lag
    N_in, D_in = s_in[..., 0].unsqueeze(-1), s_in[..., 1].unsqueeze(-1)
    group = max(1, WKV_BLOCK // max(1, (k.numel() // max(T, 1)) * C * C))  # chunks per weight block
    outs = []
    for s in range(0, n, group):
        sl = slice(s, s + group)
        k_j = kt[..., sl, :, None, :]  # [..., g, ch, 1, C (j)]; the log weights are k_j + E [..., g, ch, C (i), C (j)]
        m_in_g = m_in[..., sl, :, None]
        with torch.no_grad():
            M = torch.maximum((k_j + E).amax(-1), m_in_g - state_lag)
        W = torch.exp((k_j - M.unsqueeze(-1)) + E)
        e_state = torch.exp((m_in_g - M) - state_lag)
        num = (W * vt[..., sl, :, None, :]).sum(-1) + e_state * N_in[..., sl, :, :]
        den = W.sum(-1) + e_state * D_in[..., sl, :, :]
        outs.append(num / den)
    out = torch.cat(outs, -3).transpose(-1, -2).reshape(*lead, n * C, ch)[..., :T, :]

    # the final state: the state entering the last chunk carried r = T - (n - 1) C steps
    r = T - (n - 1) * C
    lag_r = (r - 1 - steps[:r])[:, None] * ew  # [r, ch]
    with torch.no_grad():
        m_last = torch.maximum(m_in[..., -1, :] - r * ew, (kc[..., -1, :r, :] - lag_r).amax(-2))
    w_r = torch.exp((kc[..., -1, :r, :] - m_last.unsqueeze(-2)) - lag_r)
    e_state = torch.exp((m_in[..., -1, :] - m_last) - r * ew)
    num = e_state * s_in[..., -1, :, 0] + (w_r * vc[..., -1, :r, :]).sum(-2)
    den = e_state * s_in[..., -1, :, 1] + w_r.sum(-2)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (w, k, m0)):
        # the max's own gradient: that of its source, the decayed initial max or the largest decayed key
        # (its value, rounded differently at T e^w, is not used)
        ahead = T - 1 - torch.arange(T, device=dev, dtype=ct)  # steps of decay from step j to the end
        src = torch.cat([(m0 - T * ew).unsqueeze(-2), k.to(ct) - ahead[:, None] * ew], -2)
        grad_only = src.amax(-2)
        grad_only = grad_only - grad_only.detach()
        m_ret = m_last + grad_only
        back = torch.exp(m_last - m_ret)  # 1 in value; d(num e^{-m}) = ... - num dm
        return out.to(k.dtype), (num * back, den * back, m_ret)
    return out.to(k.dtype), (num, den, m_last)


def chunked_mlstm(q, k, v, i_gate, f_gate, state=None, eps: float = 1e-6, chunk: int | None = None):
    """(h, (C, n, m)) of xLSTM's mLSTM; the same contract and state triple as
    wavefront.backends.scans.logspace.naive.mlstm_reference (transformers' mlstm_recurrent_step_native
    applied T times, and its chunkwise kernels).

    q, k: [..., T, dqk]; v: [..., T, dv]; i_gate, f_gate (pre-activations): [..., T]; state:
    (C [..., dqk, dv], n [..., dqk], m [..., 1]) or None (zeros). chunk: 64 by default.

    >>> from wavefront.backends.scans.logspace.naive import mlstm_reference
    >>> _ = torch.manual_seed(0)
    >>> q, k, v = (torch.randn(2, 37, d, dtype=torch.float64) for d in (4, 4, 3))
    >>> i, f = (10 * torch.randn(2, 37, dtype=torch.float64) for _ in range(2))
    >>> h, (C, n, m) = chunked_mlstm(q, k, v, i, f, chunk=8)
    >>> rh, (rC, rn, rm) = mlstm_reference(q, k, v, i, f)
    >>> all(torch.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in ((h, rh), (C, rC), (n, rn), (m, rm)))
    True
    """
    *lead, T, dqk = q.shape
    dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q, k must be [..., T, dqk] and v [..., T, dv] alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if i_gate.shape != q.shape[:-1] or f_gate.shape != q.shape[:-1]:
        raise ValueError(f"i_gate, f_gate must be [..., T] = {tuple(q.shape[:-1])}, got {tuple(i_gate.shape)}, "
                         f"{tuple(f_gate.shape)}")
    want = [(*lead, dqk, dv), (*lead, dqk), (*lead, 1)]
    if state is not None and [tuple(s.shape) for s in state] != want:
        raise ValueError(f"state must be (C, n, m) of shapes {want}, got {[tuple(s.shape) for s in state]}")
    ct = compute_dtype(q, k, v, i_gate, f_gate, *(state or ()))
    dev = q.device
    if state is None:
        S0 = torch.zeros(*lead, dqk, dv + 1, dtype=ct, device=dev)  # [C | n]: n rides along as a last column
        m0 = torch.zeros(*lead, dtype=ct, device=dev)
    else:
        S0 = torch.cat([state[0].to(ct), state[1].to(ct).unsqueeze(-1)], -1)
        m0 = state[2].to(ct).squeeze(-1)
    if T == 0:
        return v.new_zeros(v.shape), (S0[..., :dv], S0[..., dv], m0.unsqueeze(-1))
    C = chunk or 64
    n = (T + C - 1) // C  # not -(-T // C): ONNX divides truncating toward zero
    pad = n * C - T  # identity steps after the end (forget gate 1, input gate 0): the state passes unchanged
    qc = _pad_steps(q.to(ct) * dqk ** -0.5, pad, 0.0, -2).reshape(*lead, n, C, dqk)
    kc = _pad_steps(k.to(ct), pad, 0.0, -2).reshape(*lead, n, C, dqk)
    vc = torch.cat([v.to(ct), torch.ones(*lead, T, 1, dtype=ct, device=dev)], -1)  # [v | 1]: numerator and denominator
    vc = _pad_steps(vc, pad, 0.0, -2).reshape(*lead, n, C, dv + 1)
    log_f = _pad_steps(torch.nn.functional.logsigmoid(f_gate.to(ct)), pad, 0.0, -1).reshape(*lead, n, C)
    ig = _pad_steps(i_gate.to(ct), pad, float("-inf"), -1).reshape(*lead, n, C)

    # intra-chunk: log D[i, j] = log f_{j+1} + ... + log f_i + i_j (j <= i), the forget sum taken by a
    # masked cumulative sum down i, not as b_i - b_j of cumulative sums (that difference loses the
    # absolute precision of b, which is tens of thousands after a few strongly forgetting chunks)
    idx = torch.arange(C, device=dev)
    after_j = idx[:, None] > idx[None, :]
    log_D = torch.where(after_j, log_f.unsqueeze(-1), torch.zeros((), dtype=ct, device=dev)).cumsum(-2)
    log_D = torch.where(after_j | (idx[:, None] == idx[None, :]), log_D + ig.unsqueeze(-2),
                        torch.tensor(float("-inf"), dtype=ct, device=dev))
    b = log_f.cumsum(-1)  # [..., n, C]: log forget from the chunk's start through step i
    g = b[..., -1]  # the whole chunk's log forget
    log_end = log_D[..., -1, :]  # step j's log weight in the chunk's end state
    m_end = maxplus_scan(g, log_end.amax(-1), m0, dim=-1)  # [..., n]: m after each chunk, exactly the stepwise m
    m_in = torch.cat([m0.unsqueeze(-1), m_end[..., :-1]], -1)
    # m_t = max(b_i + m_in, max_j log D[i, j]) is the stepwise running max itself (it enters the
    # output through eps and e^{-m}, so it is kept exact, with its gradient)
    m_t = torch.maximum(b + m_in.unsqueeze(-1), log_D.amax(-1))  # [..., n, C]
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp(log_D - m_t.unsqueeze(-1))
    q_in = qc * torch.exp(b + (m_in.unsqueeze(-1) - m_t)).unsqueeze(-1)  # q scaled to the entering state's log scale
    nd = scores @ vc  # [..., n, C, dv + 1]

    a = torch.exp(g + (m_in - m_end))  # <= 1: chunk-to-chunk coefficient of the stabilised state
    k_end = kc * torch.exp(log_end - m_end.unsqueeze(-1)).unsqueeze(-1)
    if n * S0.numel() <= ALL_STATES_AT_ONCE:
        U = k_end.transpose(-1, -2) @ vc  # [..., n, dqk, dv + 1]: what each chunk adds to the state
        after = linear_scan(a[..., None, None].expand_as(U).contiguous(), U.contiguous(), S0, dim=len(lead))
        S_in = torch.cat([S0.unsqueeze(-3), after[..., :-1, :, :]], -3)
        nd = nd + q_in @ S_in
        S_last = after[..., -1, :, :]
    else:  # too many chunk states to hold: carry one from chunk to chunk
        S, inter = S0, []
        for c in range(n):
            inter.append(q_in[..., c, :, :] @ S)
            S = a[..., c, None, None] * S + k_end[..., c, :, :].transpose(-1, -2) @ vc[..., c, :, :]
        nd = nd + torch.stack(inter, -3)
        S_last = S
    den = torch.maximum(nd[..., dv:].abs(), torch.exp(-m_t).unsqueeze(-1)) + eps
    h = (nd[..., :dv] / den).reshape(*lead, n * C, dv)[..., :T, :]
    return h.to(q.dtype), (S_last[..., :dv], S_last[..., dv], m_end[..., -1:])


__all__ = ["chunked_mlstm", "chunked_wkv", "maxplus_scan"]
