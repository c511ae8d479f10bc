"""The plain references for the running-max-stabilised recurrences, one step at a time.

Both carry a state (value, normaliser, max) that stands for (value * e^max, normaliser * e^max):
the max is what keeps every exp at or below 1. The conventions follow transformers exactly
(rwkv_linear_attention_cpu; xLSTM's mlstm_recurrent_step_native), so a state from here can be
handed to them and back. float64 inputs are computed in float64, everything else in float32;
outputs come back in the input dtype, states in the compute dtype.
"""
from __future__ import annotations

import torch
from wavefront.backends.scans.shapes import compute_dtype

WKV_EMPTY_MAX = -1e38  # the max of an empty WKV state, as transformers starts it


def wkv_reference(w, u, k, v, state=None):
    """RWKV-4 WKV, one step at a time, as transformers' rwkv_linear_attention_cpu computes it.

    w (time_decay), u (time_first): [ch]; k, v: [..., T, ch]; state: (num, den, max), each
    [..., ch], or None for the empty state (0, 0, -1e38). With the decay a = exp(-exp(w)) and
    num, den standing for num * e^max, den * e^max:
      out_t = (num_{t-1} + e^{u + k_t} v_t) / (den_{t-1} + e^{u + k_t})
      num_t = a num_{t-1} + e^{k_t} v_t,  den_t = a den_{t-1} + e^{k_t},
      max_t = max(max_{t-1} - exp(w), k_t).
    Returns (out [..., T, ch] in k's dtype, (num, den, max) after the last step in the compute dtype).

    >>> out, (num, den, mx) = wkv_reference(torch.zeros(1), torch.zeros(1), torch.zeros(1, 2, 1),
    ...                                     torch.tensor([[[1.0], [3.0]]]))
    >>> out.flatten().tolist(), mx.flatten().tolist()
    ([1.0, 2.0], [0.0])
    """
    ct = compute_dtype(w, u, k, v, *(state or ()))
    w, u = w.to(ct), u.to(ct)
    decay = -torch.exp(w)
    if state is None:
        num = torch.zeros(k.shape[:-2] + k.shape[-1:], dtype=ct, device=k.device)
        den = torch.zeros_like(num)
        mx = torch.full_like(num, WKV_EMPTY_MAX)
    else:
        num, den, mx = (s.to(ct) for s in state)
    outs = []
    for t in range(k.shape[-2]):
        kt, vt = k[..., t, :].to(ct), v[..., t, :].to(ct)
        m_out = torch.maximum(mx, u + kt)  # stabiliser of the output: the state and the bonus term
        e_state, e_now = torch.exp(mx - m_out), torch.exp(u + kt - m_out)
        outs.append((e_state * num + e_now * vt) / (e_state * den + e_now))
        m_new = torch.maximum(mx + decay, kt)  # the decayed state and the new key
        e_state, e_now = torch.exp(mx + decay - m_new), torch.exp(kt - m_new)
        num, den, mx = e_state * num + e_now * vt, e_state * den + e_now, m_new
    out = torch.stack(outs, dim=-2) if outs else torch.zeros_like(k, dtype=ct)
    return out.to(k.dtype), (num, den, mx)


def mlstm_reference(q, k, v, i_gate, f_gate, state=None, eps: float = 1e-6):
    """xLSTM's mLSTM, one step at a time, as transformers' mlstm_recurrent_step_native applied T times.

    q, k: [..., T, dqk]; v: [..., T, dv]; i_gate, f_gate (pre-activations): [..., T]; state:
    (C [..., dqk, dv], n [..., dqk], m [..., 1]), or None for zeros (m starts at 0, not -inf).
    With C, n standing for C * e^m, n * e^m:
      m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)
      C_t = e^{logsigmoid(f_t) + m_{t-1} - m_t} C_{t-1} + e^{i_t - m_t} k_t v_t^T   (n_t likewise with k_t)
      h_t = C_t^T q~_t / (max(|n_t . q~_t|, e^{-m_t}) + eps),   q~_t = q_t / sqrt(dqk).
    eps is added to the stabilised denominator, so h depends on m: in unstabilised terms
    h_t = C~_t^T q~_t / (max(|n~_t . q~_t|, 1) + eps e^{m_t}).
    Returns (h [..., T, dv] in q's dtype, (C, n, m) after the last step in the compute dtype).

    >>> q = k = torch.ones(1, 2, 1); v = torch.tensor([[[2.0], [4.0]]])
    >>> h, (C, n, m) = mlstm_reference(q, k, v, torch.zeros(1, 2), torch.full((1, 2), 30.0), eps=0.0)
    >>> h.flatten().tolist(), m.flatten().tolist()
    ([2.0, 3.0], [0.0])
    """
    ct = compute_dtype(q, k, v, i_gate, f_gate, *(state or ()))
    dqk, dv = q.shape[-1], v.shape[-1]
    lead = q.shape[:-2]
    if state is None:
        C = torch.zeros(*lead, dqk, dv, dtype=ct, device=q.device)
        n = torch.zeros(*lead, dqk, dtype=ct, device=q.device)
        m = torch.zeros(*lead, 1, dtype=ct, device=q.device)
    else:
        C, n, m = (s.to(ct) for s in state)
    scale = dqk ** -0.5
    log_f = torch.nn.functional.logsigmoid(f_gate.to(ct))
    i_gate = i_gate.to(ct)
    hs = []
    for t in range(q.shape[-2]):
        qt, kt, vt = (x[..., t, :].to(ct) for x in (q, k, v))
        lf, it = log_f[..., t, None], i_gate[..., t, None]  # [..., 1]
        m_new = torch.maximum(lf + m, it)
        fa, ia = torch.exp(lf + m - m_new), torch.exp(it - m_new)
        C = fa[..., None] * C + ia[..., None] * (kt[..., :, None] * vt[..., None, :])
        n = fa * n + ia * kt
        m = m_new
        qs = qt * scale
        num = (qs[..., :, None] * C).sum(-2)
        den = (qs * n).sum(-1, keepdim=True)
        hs.append(num / (torch.maximum(den.abs(), torch.exp(-m)) + eps))
    h = torch.stack(hs, dim=-2) if hs else torch.zeros(*lead, 0, dv, dtype=ct, device=q.device)
    return h.to(q.dtype), (C, n, m)


__all__ = ["mlstm_reference", "wkv_reference"]
