"""Benchmark families `wavefront bench` runs (benchmarks/ has the full scripts and grids).

Each function measures one configuration, both sides in the same run (median after warm-up),
and returns the JSON record wavefront.benchmarking.compare builds.
"""
from __future__ import annotations

import torch

import wavefront
from wavefront.backends.scans.linear.dispatch import choose_method, linear_scan
from wavefront.backends.scans.linear.naive import linear_scan_reference
from wavefront.benchmarking import compare
from wavefront.presets import example_model, split_preset
from wavefront.testing import rel_err


def diagonal_speedup(preset: str, *, backend: str = "torch", batch: int = 1, repeats: int = 5,
                     device: str = "cpu") -> dict:
    """The model's own sequential forward vs optimize(model) (diagonal schedule) on an ARMT preset.

    >>> rec = diagonal_speedup("tiny", repeats=1)
    >>> rec["n_steps"], rec["error"] < 1e-4
    (11, True)
    """

    cfg, S = split_preset(preset)
    model, _ = example_model(f"armt-{preset}")
    model = model.to(device)
    ids = torch.randint(0, cfg["vocab_size"], (batch, S * cfg["segment_len"]), device=device)
    fast = wavefront.optimize(model, backend=backend)
    L = cfg["n_layers"]
    with torch.inference_mode():
        err = rel_err(fast(ids).logits, model(ids).logits)
        rec = compare("diagonal_speedup", lambda: model(ids), lambda: fast(ids),
                      config={**cfg, "n_segments": S, "batch": batch, "preset": preset, "backend": backend},
                      dtype=torch.float32, device=device, error=err, repeats=repeats, baseline_label="sequential",
                      candidate_label="diagonal", quiet=True)
    rec["compile_s"] = fast.compile_time_s  # the first call's time when compiling (None for eager torch)
    rec["n_steps"] = L + S - 1
    rec["step_bound"] = L * S / (L + S - 1)
    rec["fraction_of_bound"] = rec["ratio"] / rec["step_bound"]
    rec["batching"] = [g.mode for g in fast.batched.groups]
    return rec


def first_order_scan(channels: int, T: int, *, repeats: int = 5) -> dict:
    """h_t = a_t h_{t-1} + b_t over [T, channels]: a Python loop vs wavefront's linear_scan.

    >>> first_order_scan(4, 64, repeats=1)["error"] < 1e-5
    True
    """

    a = torch.rand(T, channels) * 0.5 + 0.5
    b = torch.randn(T, channels)
    with torch.inference_mode():
        err = rel_err(linear_scan(a, b, dim=0), linear_scan_reference(a.double(), b.double(), dim=0))
        rec = compare("scan_first_order", lambda: linear_scan_reference(a, b, dim=0),
                      lambda: linear_scan(a, b, dim=0), config={"channels": channels, "T": T, "layout": "[T, C]"},
                      dtype=torch.float32, error=err, repeats=repeats, baseline_label="loop",
                      candidate_label="wavefront", quiet=True)
    rec["method"] = choose_method(a, 0)[0]
    return rec


FAMILIES = {"diagonal": "ARMT presets: the model's sequential forward vs the diagonal schedule",
            "scan": "first-order scan: a Python time loop vs wavefront's linear_scan"}
