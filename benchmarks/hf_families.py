"""Every recurrent family in transformers (small random configs, wavefront.hf_families): the
model's own CPU path vs wavefront.optimize(model), the whole model, both timed in one run
(interleaved, median of --repeats after a warm-up), fp32, batch 1, no cache.

Each JSON line names the family, the route optimize() took and what it ran (the kernel-seam
functions filled, or the loops lifted), the logits' relative error against transformers' own path
and the ratio (transformers / wavefront). Targets (issue 14): error <= 1e-4 everywhere, never
slower; >= 5x for the loop-based paths (Mamba, FalconMamba, Jamba, RWKV, RecurrentGemma) and
>= 1.5x for the chunked-torch ones, at T = 2048-4096.

    python benchmarks/hf_families.py [--families mamba qwen3_next ...] [--T 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare  # noqa: E402

import wavefront  # noqa: E402
from wavefront import hf_families  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402


def what_ran(fast) -> str:
    """One line: the route and what it substituted or lifted."""
    if fast.route == "unchanged":
        return "unchanged: " + fast.reason
    rewrites = " | ".join(line.strip() for text in fast.rewrites() for line in text.splitlines()
                          if "runs as" in line or "ran as" in line or "scan" in line)
    return f"{fast.route}: {rewrites}"


def bench_family(name: str, T: int, repeats: int) -> dict:
    model = hf_families.build(name)
    ids = hf_families.example_ids(name, 1, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = wavefront.optimize(model)
    with torch.inference_mode():
        err = rel_err(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        return compare(f"hf_family_{name}", lambda: model(ids, use_cache=False), lambda: fast(ids, use_cache=False),
                       config={"family": name, "T": T, "batch": 1, "model": type(model).__name__},
                       dtype=torch.float32, error=err, repeats=repeats, baseline_label="transformers",
                       candidate_label="wavefront", extra={"route": fast.route, "ran": what_ran(fast)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=None, help="default: every family this transformers has")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    for name in args.families or hf_families.available():
        bench_family(name, args.T, args.repeats)


if __name__ == "__main__":
    main()
