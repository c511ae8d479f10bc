"""Overhead of the torch executor (sequential schedule, cell by cell on the captured graph) over
the model's own forward. Target: executor / forward <= 1.1x on the small config.

    python benchmarks/executor_overhead.py            # small config: L=8, d=256, d_ff=688, seg 128, M=16, S=64
    python benchmarks/executor_overhead.py --quick    # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import compare, emit  # noqa: E402
from presets import split_preset  # noqa: E402

from wavefront.backends import TorchExecutor  # noqa: E402
from wavefront.models import ARMT, ARMTConfig  # noqa: E402
from wavefront.scheduler import capture, sequential  # noqa: E402
from wavefront.testing import rel_err  # noqa: E402

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config, for a smoke run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    name = "tiny" if args.quick else "small"
    cfg, n_segments = split_preset(name)
    torch.manual_seed(0)
    model = ARMT(ARMTConfig(**cfg)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, n_segments * cfg["segment_len"]))
    ex = TorchExecutor(capture(model))
    sched = sequential(cfg["n_layers"], n_segments)
    with torch.inference_mode():
        err = rel_err(ex.run(ids, sched).logits, model(ids).logits)
        rec = compare("executor_overhead", lambda: model(ids), lambda: ex.run(ids, sched),
                config={**cfg, "n_segments": n_segments, "batch": args.batch, "schedule": "sequential",
                        "preset": name},
                dtype=torch.float32, error=err, repeats=args.repeats, baseline_label="forward",
                candidate_label="executor", extra={"target_overhead": 1.1}, quiet=True)
        rec["overhead"] = rec["executor_s"] / rec["forward_s"]
        emit(rec)


if __name__ == "__main__":
    main()
