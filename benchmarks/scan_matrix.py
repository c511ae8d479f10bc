"""Matrix-state scan (linear attention / RetNet / GLA / Mamba-2 form) on CPU fp32: the step-by-step
loop vs wavefront's chunked scan, both in the same run, median of --repeats after warm-up; the
error is relative to a float64 run of the loop.

    python benchmarks/scan_matrix.py [--T 1024 4096 16384] [--heads 8] [--dk 64] [--dv 64]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare  # noqa: E402

from wavefront.backends.scans.matrix.chunked import chunked_matrix_scan  # noqa: E402
from wavefront.backends.scans.matrix.naive import matrix_scan_reference  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for T in args.T:
        q = torch.randn(1, args.heads, T, args.dk) / args.dk ** 0.5
        k = torch.randn(1, args.heads, T, args.dk) / args.dk ** 0.5
        v = torch.randn(1, args.heads, T, args.dv)
        for decay in ("additive", "scalar", "per_dim"):
            a = {"additive": None, "scalar": 0.9 + 0.1 * torch.rand(1, args.heads, T),
                 "per_dim": 0.9 + 0.1 * torch.rand(1, args.heads, T, args.dk)}[decay]
            with torch.inference_mode():
                ref, _ = matrix_scan_reference(q.double(), k.double(), v.double(), a.double() if a is not None else None)
                err = rel_err(chunked_matrix_scan(q, k, v, a)[0], ref)
                compare("scan_matrix", lambda: matrix_scan_reference(q, k, v, a), lambda: chunked_matrix_scan(q, k, v, a),
                        config={"decay": decay, "B": 1, "heads": args.heads, "T": T, "dk": args.dk, "dv": args.dv},
                        dtype=torch.float32, error=err, repeats=args.repeats, baseline_label="loop",
                        candidate_label="chunked")


if __name__ == "__main__":
    main()
