"""generate() on an optimized ARMT vs recomputing the optimized model on the growing sequence for
every new token (greedy, batch 1): both timed in one run, interleaved, median of --repeats after a
warm-up. The prompt is --segments full segments; --new tokens are generated. Prints one JSON line:
both times, the ratio (recompute / generate), generate's tokens per second (prefill included) and
the error (the fraction of generated tokens that differ, 0 when exact). Target (issue 15): >= 10x
at 40 segments and 48 new tokens. A second line times the key/value cache alone (--kv-preset, decoding
--kv-new tokens from a one-token prompt): generate with use_cache=False (each token's current
segment run whole) vs generate (the token in the window).

    python benchmarks/generate.py [--preset dispatch] [--segments 40] [--new 48] [--repeats 3]
                                  [--kv-preset small] [--kv-new 128]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare, emit  # noqa: E402
from presets import ARMT_PRESETS, split_preset  # noqa: E402

import wavefront  # noqa: E402
from wavefront.models import ARMT, ARMTConfig  # noqa: E402


def recompute_greedy(fast, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by running the whole growing sequence through the optimized model per token."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, fast(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(ARMT_PRESETS), default="dispatch")
    ap.add_argument("--segments", type=int, default=40)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-preset", choices=sorted(ARMT_PRESETS), default="small")
    ap.add_argument("--kv-new", type=int, default=128, help="tokens decoded in the key/value cache comparison")
    args = ap.parse_args(argv)
    cfg, _ = split_preset(args.preset)
    torch.manual_seed(0)
    model = ARMT(ARMTConfig(**cfg)).eval()
    fast = wavefront.optimize(model)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.segments * cfg["segment_len"]))
    got = fast.generate(prompt, max_new_tokens=args.new)
    want = recompute_greedy(fast, prompt, args.new)
    error = float((got[:, prompt.shape[1]:] != want[:, prompt.shape[1]:]).float().mean())
    rec = compare("generate_armt", lambda: recompute_greedy(fast, prompt, args.new),
                  lambda: fast.generate(prompt, max_new_tokens=args.new),
                  config={"preset": args.preset, **cfg, "prompt_segments": args.segments, "new_tokens": args.new,
                          "batch": 1}, dtype=torch.float32, error=error, repeats=args.repeats,
                  baseline_label="recompute", candidate_label="generate", quiet=True)
    rec["tokens_per_s"] = args.new / rec["generate_s"]
    emit(rec)
    kv_cache(args)


def kv_cache(args):
    """The key/value cache alone, decoding only (a one-token prompt, --kv-new tokens): generate with
    use_cache=False (each token's current segment run whole) vs generate (the token in the window)."""
    cfg, _ = split_preset(args.kv_preset)
    torch.manual_seed(0)
    fast = wavefront.optimize(ARMT(ARMTConfig(**cfg)).eval())
    prompt = torch.randint(0, cfg["vocab_size"], (1, 1))
    got = fast.generate(prompt, max_new_tokens=args.kv_new)
    error = float((fast.generate(prompt, max_new_tokens=args.kv_new, use_cache=False) != got).float().mean())
    rec = compare("generate_armt_kv_cache",
                  lambda: fast.generate(prompt, max_new_tokens=args.kv_new, use_cache=False),
                  lambda: fast.generate(prompt, max_new_tokens=args.kv_new),
                  config={"preset": args.kv_preset, **cfg, "prompt_tokens": 1, "new_tokens": args.kv_new, "batch": 1},
                  dtype=torch.float32, error=error, repeats=args.repeats, baseline_label="whole_segment",
                  candidate_label="kv_cache", quiet=True)
    rec["tokens_per_s"] = args.kv_new / rec["kv_cache_s"]
    emit(rec)

if __name__ == "__main__":
    main()
