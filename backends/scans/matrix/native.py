"""The scalar-decay matrix-state scan as a native CPU kernel, forward only (inference).

S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t with one decay a_t per step (Mamba-2's SSD,
RetNet, Lightning attention, plain linear attention with a = 1). Per sequence (a batch row and
head) the [dk, dv] state stays in cache while time runs; each step is dk fused row updates and
reads, which the compiler vectorises over dv. On a CPU this recurrent form does the same
arithmetic as the chunked form's matmuls without their [C, C] blocks and padding, so it is the
faster one there; the chunked torch form stays for gradients and other devices
(wavefront.backends.scans.matrix.dispatch chooses). float32 / float64.
"""
from __future__ import annotations

import ctypes

import torch
import wavefront.backends.scans.linear.native as native_scan
from wavefront.backends.disk_cache import KernelLibrary
from wavefront.backends.scans.matrix.chunked import check_shapes
from wavefront.backends.scans.shapes import data_pointer

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define MSCAN(NAME, T_)                                                                          \
void NAME(const T_* q, const T_* k, const T_* v, const T_* a, const T_* S0, T_* o, T_* Sout,      \
          int64_t L, int64_t T, int64_t dk, int64_t dv) {                                        \
    _Pragma("omp parallel for schedule(static)")                                                 \
    for (int64_t l = 0; l < L; ++l) {                                                            \
        T_* S = Sout + l * dk * dv;                                                              \
        if (S0) memcpy(S, S0 + l * dk * dv, sizeof(T_) * dk * dv);                               \
        else memset(S, 0, sizeof(T_) * dk * dv);                                                 \
        const T_* ql = q + l * T * dk; const T_* kl = k + l * T * dk;                            \
        const T_* vl = v + l * T * dv; T_* ol = o + l * T * dv;                                  \
        for (int64_t t = 0; t < T; ++t) {                                                        \
            T_ at = a ? a[l * T + t] : (T_)1;                                                    \
            const T_* vt = vl + t * dv; T_* ot = ol + t * dv;                                    \
            for (int64_t j = 0; j < dv; ++j) ot[j] = 0;                                          \
            for (int64_t i = 0; i < dk; ++i) {                                                   \
                T_ ki = kl[t * dk + i], qi = ql[t * dk + i];                                     \
                T_* Si = S + i * dv;                                                             \
                for (int64_t j = 0; j < dv; ++j) {                                               \
                    Si[j] = at * Si[j] + ki * vt[j];                                             \
                    ot[j] += qi * Si[j];                                                         \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}
MSCAN(wf_mscan_f32, float)
MSCAN(wf_mscan_f64, double)
"""


def _declare(lib) -> None:
    for name in ("wf_mscan_f32", "wf_mscan_f64"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4


KERNEL = KernelLibrary("matrix_scan", _SOURCE, native_scan._FLAGS, declare=_declare)


def library():
    """The kernel, built on first use and cached (None if it cannot be)."""
    return KERNEL.get()


def applies(q, k, v, decay, S0) -> bool:
    """Float32/float64 CPU tensors of one dtype, a scalar (or no) decay, the library built, not
    under torch.export (a ctypes call cannot be traced)."""
    tensors = [t for t in (q, k, v, decay, S0) if t is not None]
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and all(t.dtype == q.dtype and t.device.type == "cpu" for t in tensors)
            and (decay is None or decay.dim() == q.dim() - 1)
            and not torch.compiler.is_exporting() and library() is not None)


def native_matrix_scan(q, k, v, decay=None, S0=None):
    """(o, last state) of the scalar-decay matrix scan; the contract of
    wavefront.backends.scans.matrix.naive.matrix_scan_reference, no autograd.

    >>> o, S = native_matrix_scan(torch.ones(1, 3, 2), torch.ones(1, 3, 2), torch.ones(1, 3, 4))
    >>> o[0, :, 0]
    tensor([2., 4., 6.])
    """
    check_shapes(q, k, v, decay, S0)  # the kernel indexes every tensor by q's sizes
    if not applies(q, k, v, decay, S0):
        raise TypeError("the native matrix scan runs float32/float64 CPU tensors of one dtype with a scalar decay "
                        f"per step (got {q.dtype} on {q.device}); {KERNEL.error or ''}".rstrip("; "))
    *lead, T, dk = q.shape
    dv = v.shape[-1]
    L = 1
    for n in lead:
        L *= n
    q, k, v = (x.contiguous() for x in (q, k, v))
    a = None if decay is None else decay.contiguous()
    s0 = None if S0 is None else S0.expand(*lead, dk, dv).contiguous()
    o = q.new_empty(*lead, T, dv)
    S = q.new_empty(*lead, dk, dv)
    fn = library().wf_mscan_f32 if q.dtype == torch.float32 else library().wf_mscan_f64
    fn(*map(data_pointer, (q, k, v, a, s0, o, S)), L, T, dk, dv)
    return o, S


__all__ = ["applies", "library", "native_matrix_scan"]
