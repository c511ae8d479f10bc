"""onnxruntime (CPU provider, or CUDA with --device cuda and onnxruntime-gpu) vs torch eager, both
under wavefront's rewrites, in the same run (median of --repeats after warm-up):
  - armt: ARMT on the "small" preset (L=8, d=256, d_ff=688, segment 128, M=16, S=64), diagonal
    schedule: torch's executor vs the exported graph (the batched cell in a Scan over steps);
  - scan: the first-order scan h_t = a_t h_{t-1} + b_t on [T, channels]: torch's linear_scan
    (the native kernel on CPU) vs its exported chunked form in onnxruntime.
Target (issue 5): onnxruntime diagonal at least as fast as torch eager diagonal. The export time
(once per shape; then cached on disk) is reported apart.

    python benchmarks/onnxruntime_speed.py [--preset small] [--channels 4 256 4096] [--T 1024 4096 16384 65536]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare, emit  # noqa: E402
from presets import ARMT_PRESETS, split_preset  # noqa: E402

import wavefront  # noqa: E402
from wavefront.backends.scans.linear.dispatch import linear_scan  # noqa: E402
from wavefront.backends.onnx.session import PROVIDERS, Session  # noqa: E402
from wavefront.models import ARMT, ARMTConfig  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402


MAX_SCAN_ELEMENTS = 1 << 26


class FirstOrderScan(nn.Module):
    def forward(self, a, b):
        return linear_scan(a, b, dim=0)


def _armt_both_ways(preset: str, segments: int | None, device: str):
    """The preset's ARMT (seed 0) optimized for torch and for onnxruntime, and ids of `segments`
    whole segments (None: the preset's count)."""
    cfg, S = split_preset(preset)
    torch.manual_seed(0)
    model = ARMT(ARMTConfig(**cfg)).to(device).eval()
    S = S if segments is None else segments
    ids = torch.randint(0, cfg["vocab_size"], (1, S * cfg["segment_len"]), device=device)
    return cfg, S, ids, wavefront.optimize(model), wavefront.optimize(model, backend="onnxruntime")


def bench_armt(preset: str, repeats: int, device: str):
    cfg, S, ids, eager, ort_model = _armt_both_ways(preset, None, device)
    with torch.inference_mode():
        ort_model(ids)  # exports (or opens the cached graph)
        err = rel_err(ort_model(ids).logits, eager(ids).logits)
        compare("onnxruntime_armt", lambda: eager(ids), lambda: ort_model(ids), config={**cfg, "n_segments": S},
                dtype=torch.float32, device=device, error=err, repeats=repeats, baseline_label="torch_diagonal",
                candidate_label="onnxruntime_diagonal",
                extra={"export_s": ort_model.export_time_s, "providers": ort_model.last_session.providers})


def bench_generate(preset: str, segments: int, new: int, repeats: int, device: str):
    cfg, _, prompt, eager, ort_model = _armt_both_ways(preset, segments, device)
    want = eager.generate(prompt, max_new_tokens=new)
    got = ort_model.generate(prompt, max_new_tokens=new)  # exports both graphs (or opens the cached ones)
    error = float((got.cpu() != want.cpu()).float().mean())  # the fraction of tokens that differ
    providers = {kind: s.providers for (kind, _), s in ort_model.sessions.items()}
    rec = compare("onnxruntime_generate", lambda: eager.generate(prompt, max_new_tokens=new),
                  lambda: ort_model.generate(prompt, max_new_tokens=new),
                  config={**cfg, "prompt_segments": segments, "new_tokens": new, "batch": 1}, dtype=torch.float32,
                  device=device, error=error, repeats=repeats, baseline_label="torch_generate",
                  candidate_label="onnxruntime_generate", quiet=True,
                  extra={"providers": providers, "decode_reason": ort_model.decode_reason})
    rec["tokens_per_s"] = new / rec["onnxruntime_generate_s"]
    rec["torch_tokens_per_s"] = new / rec["torch_generate_s"]
    emit(rec)


def bench_scan(channels: list[int], Ts: list[int], repeats: int, device: str):
    import onnx
    from wavefront.backends.onnx.graphs import to_onnx as _to_onnx
    path = os.path.join(tempfile.mkdtemp(), "scan.onnx")
    a, b = torch.rand(1024, 8), torch.randn(1024, 8)
    shapes = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},) * 2
    onnx.save(_to_onnx(FirstOrderScan(), (a, b), shapes), path)
    session = Session(path, PROVIDERS if device == "cuda" else ("CPUExecutionProvider",))
    for C in channels:
        for T in Ts:
            if T * C > MAX_SCAN_ELEMENTS:  # the exported chunked form holds ~log2(chunk) copies: 4096 x 64k ran out of 24 GB
                continue
            a = (torch.rand(T, C) * 0.5 + 0.5).to(device)
            b = torch.randn(T, C).to(device)
            with torch.inference_mode():
                (h,) = session.run(a, b)
                err = rel_err(h, linear_scan(a.double(), b.double(), dim=0, method="loop").cpu())
                compare("onnxruntime_scan", lambda: linear_scan(a, b, dim=0), lambda: session.run(a, b),
                        config={"channels": C, "T": T}, dtype=torch.float32, device=device, error=err,
                        repeats=repeats, baseline_label="torch", candidate_label="onnxruntime",
                        extra={"providers": session.providers})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(ARMT_PRESETS), default="small")
    ap.add_argument("--channels", type=int, nargs="+", default=[4, 256, 4096])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gen-segments", type=int, default=8, help="prompt segments of the generate comparison")
    ap.add_argument("--gen-new", type=int, default=64, help="new tokens of the generate comparison")
    ap.add_argument("--skip-scan", action="store_true")
    args = ap.parse_args(argv)
    bench_armt(args.preset, args.repeats, args.device)
    bench_generate(args.preset, args.gen_segments, args.gen_new, args.repeats, args.device)
    if not args.skip_scan:
        bench_scan(args.channels, args.T, args.repeats, args.device)


if __name__ == "__main__":
    main()
