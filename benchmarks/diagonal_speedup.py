"""Sequential ARMT (the model's own forward) vs wavefront's diagonal batching, CPU by default.

    python benchmarks/diagonal_speedup.py --preset dispatch   # L=8, d=64, d_ff=128, seg 32, M=8, S=64 (target >= 5.5x)
    python benchmarks/diagonal_speedup.py --preset small      # L=8, d=256, d_ff=688, seg 128, M=16, S=64 (issue 13: >= 1.6x; 1.3-1.5x on 2 CPU cores)

Prints one JSON line per preset: both medians from the same run, the ratio, the step-count
bound L*S/(L+S-1), the relative error, and (with --flops) achieved GFLOP/s of both sides next to
a large single matmul's GFLOP/s on the same machine.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import emit, time_fn  # noqa: E402
from presets import ARMT_PRESETS, split_preset  # noqa: E402

from wavefront.bench_families import diagonal_speedup  # noqa: E402


def armt_flops(c: dict, batch: int) -> float:
    """Multiply-add FLOPs (x2) of one forward over n_segments full segments."""
    d, f, M, dm, T, V = c["d_model"], c["d_ff"], c["n_mem_tokens"], c["d_mem"], c["segment_len"], c["vocab_size"]
    dk, n = 6 * dm, T + M
    per_cell = 2 * n * (4 * d * d + 3 * d * f) + 4 * n * n * d  # projections, MLP, QK^T and AV
    per_cell += 2 * n * (d * dm + dk * d + dk)  # read
    per_cell += 2 * M * (d * dm + d * d + d) + 4 * M * dk * d  # write
    per_seg = c["n_layers"] * per_cell + 2 * T * d * V
    return batch * c["n_segments"] * per_seg


def matmul_gflops(dtype, device: str = "cpu") -> float:
    a = torch.randn(2048, 2048, dtype=dtype, device=device)
    b = torch.randn(2048, 2048, dtype=dtype, device=device)
    times = time_fn(lambda: a @ b, warmup=2, repeats=5, device=device)
    return 5 * 2 * 2048 ** 3 / sum(times) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(ARMT_PRESETS), action="append")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--flops", action="store_true", help="also report GFLOP/s against a large matmul")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--backend", default="torch", choices=["torch", "inductor", "aot_inductor"],
                    help="inductor: torch.compile of the batched cell; aot_inductor: AOTInductor package of it (tens of seconds cold on a CPU)")
    args = ap.parse_args(argv)
    for preset in args.preset or ["dispatch", "small"]:
        cfg, S = split_preset(preset)
        rec = diagonal_speedup(preset, backend=args.backend, batch=args.batch, repeats=args.repeats,
                               device=args.device)
        if args.flops:
            flops = armt_flops({**cfg, "n_segments": S}, args.batch)
            rec["gflops_sequential"] = flops / rec["sequential_s"] / 1e9
            rec["gflops_diagonal"] = flops / rec["diagonal_s"] / 1e9
            rec["gflops_matmul_2048"] = matmul_gflops(torch.float32, args.device)
        emit(rec)


if __name__ == "__main__":
    main()
