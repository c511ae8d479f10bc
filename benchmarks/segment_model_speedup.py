"""A user's own segment model (examples/slot_memory_lm.py, not ARMT): its sequential forward vs
optimize(model) under the diagonal schedule, on the backends that run the one program.

    python benchmarks/segment_model_speedup.py                      # L=8, d=32, seg 16, S=64 (target >= 3x, best backend)
    python benchmarks/segment_model_speedup.py --backend aot_inductor

One JSON line per backend: both medians from the same run (interleaved), the ratio, the
relative error, the step-count bound L*S/(L+S-1) and how whole-segment calls ran.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from slot_memory_lm import slot_memory_lm  # noqa: E402

import wavefront  # noqa: E402
from wavefront.benchmarking import compare, emit  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", choices=["torch", "inductor", "aot_inductor"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--segment-len", type=int, default=16)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    cfg = dict(n_layers=args.layers, d=args.d, n_heads=4, n_slots=4, d_ff=2 * args.d, segment_len=args.segment_len,
               vocab_size=128)
    model = slot_memory_lm(**cfg)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.segments * args.segment_len))
    L, S = args.layers, args.segments
    for backend in args.backend or ["torch"]:
        fast = wavefront.optimize(model, backend=backend)
        with torch.inference_mode():
            err = rel_err(fast(ids).logits, model(ids).logits)
            rec = compare("segment_model_speedup", lambda: model(ids), lambda: fast(ids),
                          config={**cfg, "n_segments": S, "batch": args.batch, "backend": backend,
                                  "model": "examples/slot_memory_lm.py"},
                          dtype=torch.float32, error=err, repeats=args.repeats, warmup=2, baseline_label="sequential",
                          candidate_label="diagonal", quiet=True)
        rec.update(step_bound=L * S / (L + S - 1), path=fast.executor.last_path,
                   program=fast.executor.program_reason or "one program")
        emit(rec)


if __name__ == "__main__":
    main()
