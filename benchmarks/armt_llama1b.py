"""ARMT over a LLaMA-3.2-1B-shaped model (random init): sequential ARMT vs wavefront's diagonal
batching vs the same LLaMA with full attention (sdpa), at long contexts. Meant for a GPU:

    python benchmarks/armt_llama1b.py --device cuda --tokens 32768 131072      # bf16, 16 layers, d 2048
    python benchmarks/armt_llama1b.py --preset tiny --tokens 512               # CPU smoke run

As in the paper's benchmark the LM head is replaced by identity (hidden states out), so a 131k x
128k-vocab logits tensor does not dominate. One JSON line per length, all timings from one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import device_name, emit, time_fn  # noqa: E402

PRESETS = {
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, segment_len=1024,
                    n_mem_tokens=128, d_mem=64, dtype="bfloat16"),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, segment_len=64, n_mem_tokens=8,
                 d_mem=16, dtype="float32"),
}


def build(preset: str, device: str, max_tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import wavefront
    from wavefront.models import wrap_armt
    p = dict(PRESETS[preset])
    dtype = getattr(torch, p.pop("dtype"))
    seg, mem, d_mem = p.pop("segment_len"), p.pop("n_mem_tokens"), p.pop("d_mem")
    torch.manual_seed(0)
    cfg = LlamaConfig(**p, max_position_embeddings=max(max_tokens, seg + mem), attn_implementation="sdpa")
    lm = LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    lm.lm_head = torch.nn.Identity()
    armt = wrap_armt(lm, segment_len=seg, n_mem_tokens=mem, d_mem=d_mem).to(dtype=dtype, device=device).eval()
    return lm, armt, wavefront.optimize(armt), dict(PRESETS[preset]), dtype


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-full-attention", action="store_true")
    args = ap.parse_args(argv)
    from wavefront.testing import rel_err
    lm, armt, fast, cfg, dtype = build(args.preset, args.device, max(args.tokens))
    torch.set_grad_enabled(False)
    for n in args.tokens:
        ids = torch.randint(0, cfg["vocab_size"], (1, n), device=args.device)
        err = rel_err(fast(ids).logits.float(), armt(ids).logits.float())
        med = {}
        sides = {"sequential": lambda: armt(ids), "diagonal": lambda: fast(ids)}
        if not args.skip_full_attention:
            sides["full_attention"] = lambda: lm(ids, use_cache=False)
        for name, fn in sides.items():
            med[name] = statistics.median(time_fn(fn, warmup=1, repeats=args.repeats, device=args.device))
        rec = {"name": "armt_llama1b", "device": device_name(args.device), "dtype": str(dtype).replace("torch.", ""),
               "config": {**cfg, "tokens": n, "preset": args.preset}, **{f"{k}_s": v for k, v in med.items()},
               "ratio": med["sequential"] / med["diagonal"], "error": err,
               "batching": [g.mode for g in fast.batched.groups], "torch": torch.__version__}
        if "full_attention" in med:
            rec["ratio_vs_full_attention"] = med["full_attention"] / med["diagonal"]
        emit(rec)


if __name__ == "__main__":
    main()
