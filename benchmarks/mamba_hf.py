"""Hugging Face Mamba (small random config) on CPU: transformers' own path vs wavefront.optimize
(the selective scan as a native kernel). Target (issue 4): >= 5x at T = 4k, logits rel err <= 1e-4.

    python benchmarks/mamba_hf.py [--T 4096] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare  # noqa: E402

import wavefront  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=1000, hidden_size=64, state_size=16, num_hidden_layers=4, expand=2, conv_kernel=4)
    model = MambaForCausalLM(MambaConfig(**cfg)).eval()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, cfg["vocab_size"], (1, args.T))
    with torch.inference_mode():
        err = rel_err(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        compare("mamba_hf", lambda: model(ids, use_cache=False), lambda: fast(ids, use_cache=False),
                config={**cfg, "T": args.T}, dtype=torch.float32, error=err, repeats=args.repeats,
                baseline_label="transformers", candidate_label="wavefront")


if __name__ == "__main__":
    main()
