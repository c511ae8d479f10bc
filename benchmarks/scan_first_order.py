"""First-order linear scan h_t = a_t h_{t-1} + b_t on CPU: the Python loop, torch's
associative_scan (generic combine, eager), wavefront's chunked torch form and native kernel, and the memory roofline
(torch.add(a, b, out=h) on the same tensors), timed in one run on the same arrays. `native_s`
allocates its output like the loop does; `native_out_s` writes into a buffer like the roofline.

    python benchmarks/scan_first_order.py                       # channels {4, 256, 4096} x T {1k, 4k, 16k, 64k}
    python benchmarks/scan_first_order.py --channels 256 --T 4096

Layout [T, channels] (time-major, fp32). JAX (lax.scan / associative_scan) is the peer the
issue names; it is timed when installed (`pip install jax`), skipped otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import device_name, emit, time_fn  # noqa: E402

from wavefront.backends.scans.linear.chunked import chunked_linear_scan  # noqa: E402
from wavefront.backends.scans.linear.dispatch import choose_method  # noqa: E402
from wavefront.backends.scans.linear.native import native_linear_scan  # noqa: E402
from wavefront.backends.scans.linear.naive import linear_scan_reference  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402


def median(fn, repeats):
    return statistics.median(time_fn(fn, warmup=1, repeats=repeats))


def assoc_scan(a, b):
    from torch._higher_order_ops.associative_scan import associative_scan

    def combine(x, y):
        return (x[0] * y[0], y[0] * x[1] + y[1])

    return associative_scan(combine, (a, b), dim=0, combine_mode="generic")[1]


def jax_times(a, b, repeats):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    ja, jb = jnp.asarray(a.numpy()), jnp.asarray(b.numpy())
    scan = jax.jit(lambda a, b: jax.lax.scan(lambda h, ab: (ab[0] * h + ab[1],) * 2, jnp.zeros(a.shape[1]), (a, b))[1])
    assoc = jax.jit(lambda a, b: jax.lax.associative_scan(lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]), (a, b))[1])
    out = {}
    for name, fn in (("jax_scan", scan), ("jax_associative_scan", assoc)):
        out[name + "_s"] = median(lambda: fn(ja, jb).block_until_ready(), repeats)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, nargs="+", default=[4, 256, 4096])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-assoc", action="store_true", help="skip torch associative_scan (slow at long T)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for C in args.channels:
        for T in args.T:
            a = torch.rand(T, C) * 0.5 + 0.5
            b = torch.randn(T, C)
            out = torch.empty_like(a)
            ref = linear_scan_reference(a.double(), b.double(), dim=0)
            with torch.inference_mode():
                h = native_linear_scan(a, b, dim=0)
                rec = {"name": "scan_first_order", "device": device_name(), "dtype": "float32",
                       "config": {"channels": C, "T": T, "layout": "[T, C]"},
                       "loop_s": median(lambda: linear_scan_reference(a, b, dim=0), max(1, args.repeats // 2)),
                       "native_s": median(lambda: native_linear_scan(a, b, dim=0), args.repeats),
                       "native_out_s": median(lambda: native_linear_scan(a, b, dim=0, out=out), args.repeats),
                       "roofline_s": median(lambda: torch.add(a, b, out=out), args.repeats),
                       "chunked_s": median(lambda: chunked_linear_scan(a, b, dim=0, chunk=max(8, 1 << round(
                           math.log2(math.sqrt(T))))), args.repeats),
                       "auto_choice": choose_method(a, 0)[0],
                       "error": rel_err(h, ref)}
                if not args.skip_assoc and T * C <= 4096 * 4096:
                    rec["assoc_scan_s"] = median(lambda: assoc_scan(a, b), 1)
                rec.update(jax_times(a, b, args.repeats))
            rec["ratio"] = rec["loop_s"] / rec["native_s"]  # both allocate their output
            rec["vs_roofline"] = rec["native_out_s"] / rec["roofline_s"]  # both write into `out`
            jax_best = min((v for k, v in rec.items() if k.startswith("jax_")), default=None)
            if jax_best is not None:  # above 1: wavefront is ahead of JAX's best form
                rec["vs_jax_best"] = jax_best / rec["native_s"]
            emit(rec)


if __name__ == "__main__":
    main()
