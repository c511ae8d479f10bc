"""The (gated) delta rule as a native CPU kernel, forward only (inference).

For t = 1..T: S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t, with g
None (DeltaNet), one log decay per step (gated DeltaNet) or one per key dim (KDA: row i of S
scaled by exp(g_t[i])). Per sequence (a batch row and head) the [dk, dv] state stays in cache
while time runs; each step is two passes over it: a read-only one for the old answer
err = v - (a S)^T k (the decay a, one factor per row of S, folded into k), then the decay, the
rank-1 write and the read o = S^T q fused, S[i, :] = a_i S[i, :] + beta k_i err. Folding the
decay in saves a store pass over S (1.1-1.4x for gated inputs). Both run their inner loops over
dv, which the compiler vectorises. On a CPU this recurrent form does less
arithmetic than the chunked (WY) form, which pays for [C, C] blocks and a triangular solve per
chunk, so it is the faster one there; the chunked torch form stays for gradients, other devices
and export (wavefront.backends.scans.delta.dispatch chooses). float32 / float64.
"""
from __future__ import annotations

import ctypes

import torch
import wavefront.backends.scans.linear.native as native_scan
from wavefront.backends.disk_cache import KernelLibrary
from wavefront.backends.scans.delta.chunked import _check
from wavefront.backends.scans.shapes import data_pointer

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
/* g: NULL (no decay), [L, T] (per_dim = 0) or [L, T, dk] (per_dim = 1); scratch: [L, dv + dk].
   The decay a (one factor per row of S) is folded into both passes, so the first only reads S:
   err = v - (a S)^T k = v - sum_i (a_i k_i) S[i, :], then S[i, :] = a_i S[i, :] + beta k_i err. */
#define DELTA(NAME, T_, EXP)                                                                     \
void NAME(const T_* q, const T_* k, const T_* v, const T_* beta, const T_* g, const T_* S0,      \
          T_* o, T_* Sout, T_* scratch, int64_t L, int64_t T, int64_t dk, int64_t dv,            \
          int per_dim) {                                                                         \
    _Pragma("omp parallel for schedule(static)")                                                 \
    for (int64_t l = 0; l < L; ++l) {                                                            \
        T_* S = Sout + l * dk * dv;                                                              \
        T_* err = scratch + l * (dv + dk);                                                       \
        T_* a = err + dv;                                                                        \
        if (S0) memcpy(S, S0 + l * dk * dv, sizeof(T_) * dk * dv);                               \
        else memset(S, 0, sizeof(T_) * dk * dv);                                                 \
        for (int64_t i = 0; i < dk; ++i) a[i] = 1;                                               \
        const T_* ql = q + l * T * dk; const T_* kl = k + l * T * dk;                            \
        const T_* vl = v + l * T * dv; T_* ol = o + l * T * dv;                                  \
        const T_* bl = beta + l * T;                                                             \
        const T_* gl = g ? g + l * T * (per_dim ? dk : 1) : 0;                                   \
        for (int64_t t = 0; t < T; ++t) {                                                        \
            const T_* qt = ql + t * dk; const T_* kt = kl + t * dk;                              \
            const T_* vt = vl + t * dv; T_* ot = ol + t * dv;                                    \
            if (gl && per_dim) for (int64_t i = 0; i < dk; ++i) a[i] = EXP(gl[t * dk + i]);      \
            else if (gl) { T_ at = EXP(gl[t]); for (int64_t i = 0; i < dk; ++i) a[i] = at; }     \
            /* pass 1 (reads S): err = v - (a S)^T k */                                          \
            for (int64_t j = 0; j < dv; ++j) err[j] = vt[j];                                     \
            for (int64_t i = 0; i < dk; ++i) {                                                   \
                T_ aki = a[i] * kt[i];                                                           \
                const T_* Si = S + i * dv;                                                       \
                _Pragma("GCC ivdep")                                                             \
                for (int64_t j = 0; j < dv; ++j) err[j] -= aki * Si[j];                          \
            }                                                                                    \
            /* pass 2: S[i, :] = a_i S[i, :] + beta k_i err, o = S^T q */                        \
            for (int64_t j = 0; j < dv; ++j) ot[j] = 0;                                          \
            T_ bt = bl[t];                                                                       \
            for (int64_t i = 0; i < dk; ++i) {                                                   \
                T_ ai = a[i], bki = bt * kt[i], qi = qt[i];                                      \
                T_* Si = S + i * dv;                                                             \
                _Pragma("GCC ivdep")                                                             \
                for (int64_t j = 0; j < dv; ++j) {                                               \
                    Si[j] = ai * Si[j] + bki * err[j];                                           \
                    ot[j] += qi * Si[j];                                                         \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}
DELTA(wf_delta_f32, float, expf)
DELTA(wf_delta_f64, double, exp)
"""


def _declare(lib) -> None:
    for name in ("wf_delta_f32", "wf_delta_f64"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4 + [ctypes.c_int]


KERNEL = KernelLibrary("delta_rule", _SOURCE, native_scan._FLAGS, ("-lm",), declare=_declare)


def library():
    """The kernel, built on first use and cached (None if it cannot be)."""
    return KERNEL.get()


def applies(q, k, v, beta, g=None, S0=None) -> bool:
    """Float32/float64 CPU tensors of one dtype, g None, [..., T] or [..., T, dk], the library
    built, not under torch.export (a ctypes call cannot be traced)."""
    tensors = [t for t in (q, k, v, beta, g, S0) if t is not None]
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and all(t.dtype == q.dtype and t.device.type == "cpu" for t in tensors)
            and (g is None or g.dim() in (q.dim() - 1, q.dim()))
            and not torch.compiler.is_exporting() and library() is not None)


def native_delta_rule(q, k, v, beta, g=None, S0=None):
    """(o, last state) of the (gated) delta rule; the contract of
    wavefront.backends.scans.delta.naive.delta_rule_reference, no autograd.

    Writing the same key twice with beta = 1 overwrites the value; with beta = 1/2 and the state
    halved before the second step, 2 is stored as 1, decays to 1/2 and goes halfway to 3:

    >>> k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> v = torch.tensor([[2.0], [3.0]])
    >>> native_delta_rule(k, k, v, torch.tensor([1.0, 1.0]))[0][:, 0]
    tensor([2., 3.])
    >>> o, S = native_delta_rule(k, k, v, torch.tensor([0.5, 0.5]), g=torch.log(torch.tensor([1.0, 0.5])))
    >>> o[:, 0]
    tensor([1.0000, 1.7500])
    """
    _check(q, k, v, beta, g, S0)
    if not applies(q, k, v, beta, g, S0):
        raise TypeError("the native delta rule runs float32/float64 CPU tensors of one dtype "
                        f"(got {q.dtype} on {q.device}); {KERNEL.error or ''}".rstrip("; "))
    *lead, T, dk = q.shape
    dv = v.shape[-1]
    L = 1
    for n in lead:
        L *= n
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    s0 = None if S0 is None else S0.contiguous()
    o = q.new_empty(*lead, T, dv)
    S = q.new_empty(*lead, dk, dv)
    scratch = q.new_empty(L, dv + dk)
    fn = library().wf_delta_f32 if q.dtype == torch.float32 else library().wf_delta_f64
    fn(*map(data_pointer, (q, k, v, beta, g, s0, o, S, scratch)), L, T, dk, dv,
       int(g is not None and g.dim() == q.dim()))
    return o, S


__all__ = ["applies", "library", "native_delta_rule"]
