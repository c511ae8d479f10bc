"""Mamba's selective scan as a native CPU kernel (forward and backward), built like native_scan.

Per (batch, channel) the N-dimensional state stays in registers/L1 while time runs: no [.., T, N]
tensor of all states is materialised in the forward. The backward recomputes the states of one
(batch, channel) into a T x N scratch buffer and walks time in reverse. Work is split across
batch rows; the gradients of A and D, shared by every row, go to per-row partial sums added up
in torch (no atomics). float32/float64, CPU.
"""
from __future__ import annotations

import ctypes

import torch
import wavefront.backends.scans.linear.native as native_scan
from wavefront.backends.disk_cache import KernelLibrary
from wavefront.backends.scans.selective.chunked import check_shapes
from wavefront.backends.scans.shapes import data_pointer

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#define SEL(NAME, T_, EXP)                                                                       \
void NAME##_fwd(const T_* u, const T_* dl, const T_* A, const T_* B, const T_* C, const T_* D,   \
                const T_* z, T_* y, T_* hlast, int64_t Bt, int64_t Dm, int64_t T, int64_t N) {   \
    _Pragma("omp parallel for schedule(static)")                                                 \
    for (int64_t bd = 0; bd < Bt * Dm; ++bd) {                                                   \
        int64_t b = bd / Dm, d = bd % Dm;                                                        \
        T_ h[256];                                                                               \
        for (int64_t n = 0; n < N; ++n) h[n] = 0;                                                \
        const T_* ub = u + bd * T; const T_* db = dl + bd * T;                                   \
        const T_* Ad = A + d * N; const T_* Bb = B + b * N * T; const T_* Cb = C + b * N * T;    \
        for (int64_t t = 0; t < T; ++t) {                                                        \
            T_ dt = db[t], du = dt * ub[t], acc = 0;                                             \
            for (int64_t n = 0; n < N; ++n) {                                                    \
                h[n] = EXP(dt * Ad[n]) * h[n] + du * Bb[n * T + t];                              \
                acc += h[n] * Cb[n * T + t];                                                     \
            }                                                                                    \
            if (D) acc += D[d] * ub[t];                                                          \
            if (z) { T_ zz = z[bd * T + t]; acc *= zz / (1 + EXP(-zz)); }                        \
            y[bd * T + t] = acc;                                                                 \
        }                                                                                        \
        for (int64_t n = 0; n < N; ++n) hlast[bd * N + n] = h[n];                                \
    }                                                                                            \
}                                                                                                \
void NAME##_bwd(const T_* u, const T_* dl, const T_* A, const T_* B, const T_* C, const T_* D,   \
                const T_* z, const T_* gy, T_* gu, T_* gdl, T_* gA_part, T_* gB, T_* gC,         \
                T_* gD_part, T_* gz, int64_t Bt, int64_t Dm, int64_t T, int64_t N) {             \
    _Pragma("omp parallel for schedule(static)")                                                 \
    for (int64_t b = 0; b < Bt; ++b) {                                                           \
        T_* hs = (T_*)malloc(sizeof(T_) * (T + 1) * N);                                          \
        for (int64_t d = 0; d < Dm; ++d) {                                                       \
            int64_t bd = b * Dm + d;                                                             \
            const T_* ub = u + bd * T; const T_* db = dl + bd * T; const T_* Ad = A + d * N;     \
            const T_* Bb = B + b * N * T; const T_* Cb = C + b * N * T;                          \
            for (int64_t n = 0; n < N; ++n) hs[n] = 0;  /* hs[(t+1)*N + n] = h_t */              \
            for (int64_t t = 0; t < T; ++t)                                                      \
                for (int64_t n = 0; n < N; ++n)                                                  \
                    hs[(t + 1) * N + n] = EXP(db[t] * Ad[n]) * hs[t * N + n] + db[t] * ub[t] * Bb[n * T + t]; \
            T_ g[256];                                                                           \
            for (int64_t n = 0; n < N; ++n) g[n] = 0;                                            \
            for (int64_t t = T - 1; t >= 0; --t) {                                               \
                T_ dt = db[t], gyt = gy[bd * T + t], gpre = gyt;                                 \
                if (z) {                                                                         \
                    T_ zz = z[bd * T + t], s = 1 / (1 + EXP(-zz)), pre = 0;                      \
                    for (int64_t n = 0; n < N; ++n) pre += hs[(t + 1) * N + n] * Cb[n * T + t];  \
                    if (D) pre += D[d] * ub[t];                                                  \
                    gz[bd * T + t] = gyt * pre * s * (1 + zz * (1 - s));                         \
                    gpre = gyt * zz * s;                                                         \
                }                                                                                \
                T_ gu_t = D ? gpre * D[d] : 0, gdt = 0;                                          \
                if (D) gD_part[bd] += gpre * ub[t];                                              \
                for (int64_t n = 0; n < N; ++n) {                                                \
                    T_ hn = hs[(t + 1) * N + n], hp = hs[t * N + n], e = EXP(dt * Ad[n]);        \
                    gC[(b * N + n) * T + t] += gpre * hn;                                        \
                    g[n] += gpre * Cb[n * T + t];          /* dL/dh_t */                         \
                    T_ ge = g[n] * hp;                     /* dL/d exp(dt A) */                  \
                    gdt += ge * Ad[n] * e + g[n] * Bb[n * T + t] * ub[t];                        \
                    gA_part[bd * N + n] += ge * dt * e;                                          \
                    gB[(b * N + n) * T + t] += g[n] * dt * ub[t];                                \
                    gu_t += g[n] * dt * Bb[n * T + t];                                           \
                    g[n] *= e;                             /* to h_{t-1} */                      \
                }                                                                                \
                gu[bd * T + t] = gu_t; gdl[bd * T + t] = gdt;                                    \
            }                                                                                    \
        }                                                                                        \
        free(hs);                                                                                \
    }                                                                                            \
}
SEL(wf_sel_f32, float, expf)
SEL(wf_sel_f64, double, exp)
"""
MAX_STATE = 256


def _declare(lib) -> None:
    for prefix in ("wf_sel_f32", "wf_sel_f64"):
        fwd, bwd = getattr(lib, prefix + "_fwd"), getattr(lib, prefix + "_bwd")
        fwd.restype = bwd.restype = None
        fwd.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4
        bwd.argtypes = [ctypes.c_void_p] * 15 + [ctypes.c_int64] * 4


KERNEL = KernelLibrary("selective", _SOURCE, native_scan._FLAGS, ("-lm",), declare=_declare)


def library():
    """The selective-scan kernels, built on first use and cached (None if they cannot be)."""
    return KERNEL.get()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z):
        Bt, Dm, T = u.shape
        N = A.shape[1]
        y = torch.empty_like(u)
        h = u.new_empty(Bt, Dm, N)
        fn = library().wf_sel_f32_fwd if u.dtype == torch.float32 else library().wf_sel_f64_fwd
        fn(*map(data_pointer, (u, delta, A, B, C, D, z, y, h)), Bt, Dm, T, N)
        ctx.save_for_backward(u, delta, A, B, C, D, z)
        ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, gy, _gh):
        u, delta, A, B, C, D, z = ctx.saved_tensors
        Bt, Dm, T = u.shape
        N = A.shape[1]
        gy = gy.contiguous()
        gu, gdl, gB, gC = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(B), torch.zeros_like(C)
        gA = u.new_zeros(Bt, Dm, N)
        gD = u.new_zeros(Bt, Dm) if D is not None else None
        gz = torch.empty_like(u) if z is not None else None
        fn = library().wf_sel_f32_bwd if u.dtype == torch.float32 else library().wf_sel_f64_bwd
        fn(*map(data_pointer, (u, delta, A, B, C, D, z, gy, gu, gdl, gA, gB, gC, gD, gz)), Bt, Dm, T, N)
        return gu, gdl, gA.sum(0), gB, gC, gD.sum(0) if gD is not None else None, gz


def selective_scan(u, delta, A, B, C, D=None, z=None):
    """Native selective scan (see selective_scan_reference for the math and shapes): (y, last state).

    >>> from wavefront.backends.scans.selective.naive import selective_scan_reference
    >>> args = (torch.rand(1, 2, 5), torch.rand(1, 2, 5), -torch.rand(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    >>> torch.allclose(selective_scan(*args)[0], selective_scan_reference(*args)[0], atol=1e-6)
    True
    """
    check_shapes(u, delta, A, B, C, D, z)
    if A.shape[1] > MAX_STATE:
        raise ValueError(f"state size N = {A.shape[1]} exceeds the kernel's {MAX_STATE}")
    tensors = [u, delta, A, B, C, D, z]
    dtype = u.dtype
    if dtype not in (torch.float32, torch.float64) or u.device.type != "cpu" or library() is None or \
            any(t is not None and (t.dtype != dtype or t.device != u.device) for t in tensors):
        raise TypeError(f"the native selective scan runs float32/float64 CPU tensors of one dtype "
                        f"(got {dtype} on {u.device}); {KERNEL.error}")
    return _SelectiveScan.apply(*[t.contiguous() if t is not None else None for t in tensors])
