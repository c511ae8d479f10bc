"""Diagonal batching of a standalone ARMT: build, optimize, check against the sequential model, time.

    python examples/armt_diagonal.py [--segments 32]
"""
import argparse
import time

import torch

import wavefront
from wavefront.models import ARMT, ARMTConfig
from wavefront.testing import rel_err

ap = argparse.ArgumentParser()
ap.add_argument("--segments", type=int, default=32)
args = ap.parse_args()

torch.manual_seed(0)
model = ARMT(ARMTConfig(n_layers=8, d_model=64, n_heads=4, d_ff=128, segment_len=32, n_mem_tokens=8, d_mem=16)).eval()
fast = wavefront.optimize(model, verify=True)  # raises if the first call differs from the sequential model
ids = torch.randint(0, 256, (1, args.segments * 32))

with torch.inference_mode():
    fast(ids), model(ids)  # warm-up (and the one-time verification)
    t0 = time.perf_counter()
    ref = model(ids)
    t1 = time.perf_counter()
    out = fast(ids)
    t2 = time.perf_counter()

print(wavefront.explain(fast))
print(f"sequential {1e3 * (t1 - t0):.1f} ms, diagonal {1e3 * (t2 - t1):.1f} ms, "
      f"speedup {(t1 - t0) / (t2 - t1):.2f}x, rel err {rel_err(out.logits, ref.logits):.1e}")
