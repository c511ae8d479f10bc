"""Python time loops lifted into scans (optimize() on modules with `for t in range(T)` loops).

Both sides in the same run, median of --repeats after warm-up, CPU fp32:
  - mingru: a user's minGRU module (outputs appended to a list, then stacked), B x d = 1 x 256,
    T in --T, and the issue-14 case B x T x d = 4 x 4096 x 64 (`time_loop_append_stack`);
    `first_call_s` is optimize() plus the first call at that T (analysis and tracing included:
    the capture cost must not grow with T);
  - deltanet: a user's gated DeltaNet loop (4 heads x 32, T = half the append/stack T), run as
    the chunked delta-rule scan; `grad_error` is the input gradient's error against the loop's;
  - gla: a user's gated linear attention loop (matrix state 4 heads x 64 x 64), run as the
    chunked matrix-state scan; `generic_scan_s` is the generic lifting (all T states held);
  - rg_lru: RecurrentGemma's RG-LRU `_rnn_scan` method alone (loop vs lifted), and the whole
    small RecurrentGemmaForCausalLM (where attention and projections also count).
Errors are relative to a float64 run of the original loop.

    python benchmarks/time_loops.py [--T 1024 4096 16384] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare, time_fn  # noqa: E402

import wavefront  # noqa: E402
from wavefront.models import MinGRU  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402
from wavefront.time_loops.model import model_time_loops  # noqa: E402


def bench_mingru(T: int, repeats: int, d: int = 256, B: int = 1, name: str = "time_loop_mingru"):
    torch.manual_seed(0)
    model = MinGRU(d)
    x = torch.randn(B, T, d)
    with torch.inference_mode():
        t0 = time.perf_counter()
        fast = wavefront.optimize(model)
        out = fast(x)
        first = time.perf_counter() - t0
        ref64 = model.double()(x.double())
        model.float()
        compare(name, lambda: model(x), lambda: fast(x), config={"B": B, "d": d, "T": T},
                dtype=torch.float32, error=rel_err(out, ref64), repeats=repeats, baseline_label="loop",
                candidate_label="wavefront", extra={"first_call_s": first})


def bench_rg_lru(T: int, repeats: int):
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=3, vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=1, lru_width=256, attention_window_size=16, conv1d_width=4,
               block_types=["recurrent", "recurrent", "attention"])
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**cfg)).eval()
    rg = model.model.layers[0].temporal_block.rg_lru
    lifted = next(lf for m, lf in model_time_loops(model) if lf.name == "_rnn_scan")
    fast_scan = types.MethodType(lifted.function, rg)
    x, g = torch.randn(1, T, cfg["lru_width"]), torch.rand(1, T, cfg["lru_width"])
    reset = torch.zeros(1, T, 1, dtype=torch.bool)
    with torch.inference_mode():
        ref64, _ = rg._rnn_scan(x.double(), g.double(), reset, None, acc_dtype=torch.float64)
        err = rel_err(fast_scan(x, g, reset, None)[0], ref64)
        compare("time_loop_rg_lru", lambda: rg._rnn_scan(x, g, reset, None), lambda: fast_scan(x, g, reset, None),
                config={"B": 1, "lru_width": cfg["lru_width"], "T": T}, dtype=torch.float32, error=err,
                repeats=repeats, baseline_label="loop", candidate_label="wavefront")
        ids = torch.randint(0, cfg["vocab_size"], (1, T))
        fast = wavefront.optimize(model)
        err = rel_err(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        compare("time_loop_recurrent_gemma_model", lambda: model(ids, use_cache=False),
                lambda: fast(ids, use_cache=False), config={**cfg, "T": T}, dtype=torch.float32, error=err,
                repeats=repeats, baseline_label="transformers", candidate_label="wavefront")


def bench_gla(T: int, repeats: int, decay: str = "scalar"):
    """A user's gated linear attention loop (matrix state per head): the loop, the routed chunked
    matrix scan (what optimize() runs), and the generic first-order scan over all T states."""
    import wavefront.time_loops.runner as loop_lift
    from wavefront.models import GatedLinearAttention
    torch.manual_seed(0)
    model = GatedLinearAttention(256, 4, 64, decay)
    x = torch.randn(1, T, 256)
    with torch.inference_mode():
        fast = wavefront.optimize(model)
        out = fast(x)
        ref64 = model.double()(x.double())
        model.float()
        extra = {"decay": decay, "routed": "chunked matrix-state" in str(wavefront.explain(fast))}
        match = loop_lift.match_matrix_step
        loop_lift.match_matrix_step = lambda *a: None  # the generic lifting alone, for comparison
        try:
            generic = wavefront.optimize(model)
            generic(x)
            extra["generic_scan_s"] = statistics.median(
                time_fn(lambda: generic(x), warmup=1, repeats=max(1, repeats // 2)))
        except Exception as e:  # e.g. over the memory guard at long T
            extra["generic_scan_s"] = f"not run: {type(e).__name__}"
        finally:
            loop_lift.match_matrix_step = match
        compare("time_loop_gla", lambda: model(x), lambda: fast(x), config={"B": 1, "d_model": 256, "heads": 4,
                "d_head": 64, "T": T}, dtype=torch.float32, error=rel_err(out, ref64), repeats=repeats,
                baseline_label="loop", candidate_label="wavefront", extra=extra)


def bench_deltanet(T: int, repeats: int, gated: bool = True):
    """A user's DeltaNet loop (4 heads x 32), run as the chunked delta-rule scan: forward timed,
    the error of outputs and of the input gradient against the loop's, in float32."""
    from wavefront.models import DeltaNet
    torch.manual_seed(0)
    model = DeltaNet(128, 4, 32, gated=gated)
    x = torch.randn(1, T, 128, requires_grad=True)
    fast = wavefront.optimize(model)
    out, ref = fast(x), model(x)
    (g_fast,) = torch.autograd.grad(out.pow(2).sum(), x)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    with torch.inference_mode():
        compare("time_loop_deltanet", lambda: model(x), lambda: fast(x), config={"B": 1, "heads": 4, "d_head": 32,
                "T": T, "gated": gated}, dtype=torch.float32, error=rel_err(out, ref), repeats=repeats,
                baseline_label="loop", candidate_label="wavefront", extra={"grad_error": rel_err(g_fast, g_ref)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true", help="only the user module (no transformers models)")
    ap.add_argument("--append-stack-T", type=int, default=4096, help="T of the 4 x T x 64 append/stack loop")
    args = ap.parse_args(argv)
    bench_mingru(args.append_stack_T, args.repeats, d=64, B=4, name="time_loop_append_stack")
    bench_deltanet(args.append_stack_T // 2, args.repeats)
    for T in args.T:
        bench_mingru(T, args.repeats)
        bench_gla(T, args.repeats)
        if not args.skip_hf:
            bench_rg_lru(T, args.repeats)


if __name__ == "__main__":
    main()
