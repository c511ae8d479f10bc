"""A fused native CPU kernel for first-order linear scans, built on first use and cached.

h_t = a_t * h_{t-1} + b_t is sequential in t but independent across channels, so the kernel
walks time in the outer loop and runs over contiguous channels in the inner loop, which the
compiler vectorises; OpenMP splits the channels across cores for wide inputs, each thread taking
one long contiguous run of every row (short runs per job cost 2-3x at 4096 channels). With 8
channels or fewer the carry stays in registers (reading it back from the output each step put a
store-to-load forward on the dependency chain: 2x). Large outputs come from a small cache of
dropped buffers (output_cache.py), so repeated calls skip the page zeroing. It is plain C called
through ctypes: no torch headers, so building it takes about a second with the system's C
compiler, once per machine; the .so is cached under $WAVEFRONT_CACHE_DIR (default
~/.cache/wavefront) keyed by the source, flags and compiler. Without a compiler, or for dtypes
and devices it does not cover, callers fall back to torch (`available()` says why).
Written by hand because no library ships a CPU scan at memory speed: torch's associative_scan
is generic and slow on CPU, and a Python loop pays dispatch per step.
"""
from __future__ import annotations

import ctypes
import sys

import torch
from wavefront.backends.disk_cache import KernelLibrary, build_library, cache_root  # noqa: F401 (re-exported)
from wavefront.backends.scans.linear.output_cache import OUTPUTS
from wavefront.backends.scans.shapes import check_h0, time_dim

_SOURCE = r"""
#include <stdint.h>
#include <omp.h>
#define NARROW_MAX 8
/* Steps 1..T-1 for w <= 8 channels with the carry held in locals: reading it back from the
   output each step would put a store-to-load forward (~5 cycles) on the dependency chain. The
   width is a constant in each case, so the compiler keeps c_ in registers. Same arithmetic. */
#define NARROW_W(T_, W)                                                                         \
    case W: {                                                                                   \
        T_ c_[W];                                                                               \
        const T_* y_first = y0 + (reverse ? T - 1 : 0) * inner + c0;                            \
        for (int k = 0; k < W; ++k) c_[k] = y_first[k];                                         \
        for (int64_t s = 1; s < T; ++s) {                                                       \
            int64_t t = reverse ? T - 1 - s : s;                                                \
            const T_* at = a0 + t * inner + c0; const T_* bt = b0 + t * inner + c0;              \
            T_* yt = y0 + t * inner + c0;                                                       \
            for (int k = 0; k < W; ++k) { c_[k] = at[k] * c_[k] + bt[k]; yt[k] = c_[k]; }      \
        }                                                                                       \
        return;                                                                                 \
    }
#define NARROW(NAME, T_)                                                                        \
static void NAME##_narrow(const T_* a0, const T_* b0, T_* y0, int64_t c0, int64_t w, int64_t T, \
                          int64_t inner, int reverse) {                                         \
    switch (w) { NARROW_W(T_, 1) NARROW_W(T_, 2) NARROW_W(T_, 3) NARROW_W(T_, 4)                \
                 NARROW_W(T_, 5) NARROW_W(T_, 6) NARROW_W(T_, 7) NARROW_W(T_, 8) }              \
}
#define SCAN(NAME, T_)                                                                          \
NARROW(NAME, T_)                                                                                \
void NAME(const T_* a, const T_* b, const T_* h0, T_* h, int64_t outer, int64_t T, int64_t inner, \
          int reverse) {                                                                        \
    /* split the channels only as far as the threads need: long contiguous rows per job */     \
    int64_t nt = outer * inner >= 16384 ? omp_get_max_threads() : 1; /* as the pragma decides */ \
    int64_t splits = outer >= nt ? 1 : (nt + outer - 1) / outer;                                 \
    int64_t BLOCK = ((inner + splits - 1) / splits + 15) / 16 * 16;                             \
    int64_t blocks = (inner + BLOCK - 1) / BLOCK;                                               \
    _Pragma("omp parallel for schedule(static) if (outer * inner >= 16384)")                     \
    for (int64_t job = 0; job < outer * blocks; ++job) {                                        \
        int64_t o = job / blocks, c0 = (job % blocks) * BLOCK;                                  \
        int64_t c1 = c0 + BLOCK < inner ? c0 + BLOCK : inner;                                   \
        const T_* a0 = a + o * T * inner; const T_* b0 = b + o * T * inner;                     \
        T_* y0 = h + o * T * inner;                                                             \
        for (int64_t s = 0; s < T; ++s) {                                                       \
            int64_t t = reverse ? T - 1 - s : s;                                                \
            const T_* at = a0 + t * inner; const T_* bt = b0 + t * inner; T_* yt = y0 + t * inner; \
            if (s == 0 && h0) {                                                                 \
                const T_* hp = h0 + o * inner;                                                  \
                for (int64_t c = c0; c < c1; ++c) yt[c] = at[c] * hp[c] + bt[c];                \
            } else if (s == 0) { /* h_{-1} = 0, still multiplied: a NaN or inf a_0 gives NaN */ \
                for (int64_t c = c0; c < c1; ++c) yt[c] = at[c] * (T_)0 + bt[c];                \
            } else {                                                                            \
                const T_* yp = reverse ? yt + inner : yt - inner;                               \
                for (int64_t c = c0; c < c1; ++c) yt[c] = at[c] * yp[c] + bt[c];                \
            }                                                                                   \
            if (s == 0 && c1 - c0 <= NARROW_MAX) { /* few channels: the carry in registers */     \
                NAME##_narrow(a0, b0, y0, c0, c1 - c0, T, inner, reverse);                       \
                break;                                                                          \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}
SCAN(wf_scan_f32, float)
SCAN(wf_scan_f64, double)

/* complex: interleaved (re, im) pairs, (a * h) + b written out in real arithmetic */
#define CSCAN(NAME, R_)                                                                         \
void NAME(const R_* a, const R_* b, const R_* h0, R_* h, int64_t outer, int64_t T, int64_t inner, \
          int reverse) {                                                                        \
    _Pragma("omp parallel for schedule(static) if (outer * inner >= 16384)")                     \
    for (int64_t job = 0; job < outer; ++job) {                                                 \
        const R_* a0 = a + 2 * job * T * inner; const R_* b0 = b + 2 * job * T * inner;         \
        R_* y0 = h + 2 * job * T * inner;                                                       \
        for (int64_t s = 0; s < T; ++s) {                                                       \
            int64_t t = reverse ? T - 1 - s : s;                                                \
            const R_* at = a0 + 2 * t * inner; const R_* bt = b0 + 2 * t * inner;              \
            R_* yt = y0 + 2 * t * inner;                                                        \
            const R_* yp = s == 0 ? (h0 ? h0 + 2 * job * inner : 0) : (reverse ? yt + 2 * inner : yt - 2 * inner); \
            for (int64_t c = 0; c < inner; ++c) { /* no h0: multiplied by zeros, as the reference */ \
                R_ ar = at[2 * c], ai = at[2 * c + 1], hr = yp ? yp[2 * c] : 0, hi = yp ? yp[2 * c + 1] : 0; \
                yt[2 * c] = (ar * hr - ai * hi) + bt[2 * c];                                    \
                yt[2 * c + 1] = (ar * hi + ai * hr) + bt[2 * c + 1];                            \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}
CSCAN(wf_scan_c64, float)
CSCAN(wf_scan_c128, double)
"""

_KERNELS = {torch.float32: "wf_scan_f32", torch.float64: "wf_scan_f64", torch.complex64: "wf_scan_c64",
            torch.complex128: "wf_scan_c128"}
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _declare(lib: ctypes.CDLL) -> None:
    for name in _KERNELS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]


KERNEL = KernelLibrary("scan", _SOURCE, _FLAGS, declare=_declare)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None if it cannot be built."""
    return KERNEL.get()


def available() -> tuple[bool, str]:
    """(usable, reason if not)."""
    return KERNEL.get() is not None, KERNEL.error


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _KERNELS and library() is not None


_HUGE_FROM = 4 << 20  # bytes: below this, first-touch page faults cost little
_MADV_HUGEPAGE = 14


def _fresh_like(a: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(a), asking Linux for transparent huge pages on a large buffer: its first
    touch then faults once per 2 MB instead of once per 4 kB (a fresh 64 MB output took 45 ms to
    touch in 4 kB pages and 15 ms in huge pages on this machine). A no-op where madvise fails."""
    h = torch.empty_like(a, memory_format=torch.contiguous_format)
    nbytes = h.numel() * h.element_size()
    if nbytes >= _HUGE_FROM and _LIBC is not None:
        p = h.data_ptr()
        start = (p + 4095) // 4096 * 4096
        length = (p + nbytes - start) // 4096 * 4096
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    return h


def _libc():
    try:
        import ctypes.util
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name) if name and sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()


def _run(a, b, h0, dim, reverse, out=None):
    """Raw kernel call on contiguous tensors: a, b [..., T, ...] with time at `dim`."""
    outer = 1
    for s in a.shape[:dim]:
        outer *= s
    T = a.shape[dim]
    inner = a.numel() // max(outer * T, 1)
    h = OUTPUTS.empty_like(a, _fresh_like) if out is None else out
    if a.numel() == 0:
        return h
    fn = getattr(library(), _KERNELS[a.dtype])
    fn(a.data_ptr(), b.data_ptr(), h0.data_ptr() if h0 is not None else None, h.data_ptr(), outer, T, inner,
       int(reverse))
    return h


def _overlap(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Do two contiguous tensors share any byte?"""
    x0, y0 = x.data_ptr(), y.data_ptr()
    return x.numel() > 0 and y.numel() > 0 and x0 < y0 + y.numel() * y.element_size() and \
        y0 < x0 + x.numel() * x.element_size()


def _shift(a, dim, reverse):
    """a_{t+1} (reverse=False) or a_{t-1} (reverse=True) along dim, zero past the end."""
    T = a.shape[dim]
    z = torch.zeros_like(a.narrow(dim, 0, 1))
    if reverse:
        return torch.cat([z, a.narrow(dim, 0, T - 1)], dim=dim)
    return torch.cat([a.narrow(dim, 1, T - 1), z], dim=dim)


class _NativeScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, dim, reverse):
        a, b = a.contiguous(), b.contiguous()
        h0c = h0.contiguous() if h0 is not None else None
        h = _run(a, b, h0c, dim, reverse)
        ctx.save_for_backward(a, h, h0c)
        ctx.dim, ctx.reverse, ctx.has_h0 = dim, reverse, h0 is not None
        return h

    @staticmethod
    def backward(ctx, g):
        a, h, h0 = ctx.saved_tensors
        dim, reverse = ctx.dim, ctx.reverse
        # dL/db_t = g_t + a_{t+1} dL/db_{t+1}: the same scan, run the other way on shifted a
        ac = a.conj().resolve_conj()  # complex gradients flow through conjugates; real: a itself
        db = _run(_shift(ac, dim, reverse).contiguous(), g.resolve_conj().contiguous(), None, dim, not reverse)
        T = a.shape[dim]
        first = torch.zeros_like(h.narrow(dim, 0, 1)) if h0 is None else h0.unsqueeze(dim)
        if reverse:
            prev = torch.cat([h.narrow(dim, 1, T - 1), first], dim=dim)
            edge = db.narrow(dim, T - 1, 1)
            a_edge = ac.narrow(dim, T - 1, 1)
        else:
            prev = torch.cat([first, h.narrow(dim, 0, T - 1)], dim=dim)
            edge = db.narrow(dim, 0, 1)
            a_edge = ac.narrow(dim, 0, 1)
        da = db * prev.conj()
        dh0 = (a_edge * edge).squeeze(dim) if ctx.has_h0 else None
        return da, db, dh0, None, None


def native_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                       reverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along `dim` with the native kernel (float32/64, complex64/128 on
    CPU), with
    autograd. Contiguous inputs with channels after the time dim run without any copy.
    `out` (inference only) reuses a buffer: a fresh multi-MB output costs more in page faults
    than the scan itself.

    >>> a = torch.full((1, 3), 0.5); b = torch.ones(1, 3)
    >>> native_linear_scan(a, b)
    tensor([[1.0000, 1.5000, 1.7500]])
    """
    # every check before a pointer is taken: the kernel reads raw memory of the dtype of a
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"a and b must match in shape, dtype and device: {tuple(a.shape)} {a.dtype} {a.device} vs "
                         f"{tuple(b.shape)} {b.dtype} {b.device}")
    dim = time_dim(dim, a.dim())
    if a.shape[dim] == 0:
        raise ValueError(f"the time dimension {dim} of shape {tuple(a.shape)} is empty")
    if h0 is not None:
        check_h0(h0, a, dim)
    if not supports(a):
        raise TypeError(f"the native scan runs float32/float64/complex CPU tensors (got {a.dtype} on {a.device}); "
                        f"{available()[1]}")
    if out is not None:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, h0)):
            raise ValueError("out= is for inference: autograd needs the states it saves, pass out=None")
        if out.shape != a.shape or out.dtype != a.dtype or out.device != a.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {a.dtype} CPU tensor of shape {tuple(a.shape)}, got "
                             f"{out.dtype} on {out.device} of shape {tuple(out.shape)}")
        a, b = a.contiguous(), b.contiguous()
        for name, x in (("a", a), ("b", b)):  # the same memory is fine: step t reads row t before writing it
            if _overlap(x, out) and x.data_ptr() != out.data_ptr():
                raise RuntimeError(f"out partly overlaps {name}: a step would overwrite {name} before reading it; "
                                   f"clone {name} or pass another out")
        h0 = h0.contiguous() if h0 is not None else None
        if h0 is not None and _overlap(h0, out):  # e.g. h0=out[:, -1] from the previous chunk, read after the write
            h0 = h0.clone()
        return _run(a, b, h0, dim, reverse, out)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, h0))):
        # no gradient needed: skip the autograd.Function (its bookkeeping is most of a short scan's time)
        return _run(a.contiguous(), b.contiguous(), h0.contiguous() if h0 is not None else None, dim, reverse)
    return _NativeScan.apply(a, b, h0, dim, reverse)
