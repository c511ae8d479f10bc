#!/usr/bin/env bash
# Everything GPU-related in one command (a lent GPU machine's time is short: one call, all runs).
#   bash benchmarks/gpu_suite.sh            # writes JSON lines to $OUT (or benchmarks/results/)
# Needs torch with CUDA and transformers on the machine; installs wavefront from this tree.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
TAG="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))' 2>/dev/null || echo gpu)"
python3 -m pip install -q --no-deps -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$DEST/gpu-$TAG.txt" 2>&1
# 1. ARMT over a LLaMA-3.2-1B-shaped model, bf16: sequential vs diagonal vs full attention
python3 benchmarks/armt_llama1b.py --device cuda --tokens 32768 131072 --repeats 3 | tee "$DEST/armt_llama1b-$TAG.jsonl"
# 2. diagonal batching on the issue's CPU presets, run on the GPU for comparison
python3 - <<'PY' | tee "$DEST/diagonal_speedup-$TAG.jsonl"
import json, statistics, sys, time, torch, wavefront
sys.path.insert(0, "benchmarks")
from presets import split_preset
from wavefront.models import ARMT, ARMTConfig
from wavefront.testing import rel_err
for name in ("dispatch", "small"):
    cfg, S = split_preset(name)
    torch.manual_seed(0)
    m = ARMT(ARMTConfig(**cfg)).cuda().eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, S * cfg["segment_len"]), device="cuda")
    f = wavefront.optimize(m)
    with torch.inference_mode():
        err = rel_err(f(ids).logits, m(ids).logits)
        t = {"sequential": [], "diagonal": []}
        for _ in range(5):
            for k, fn in (("sequential", lambda: m(ids)), ("diagonal", lambda: f(ids))):
                torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
                t[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(json.dumps({"name": "diagonal_speedup", "device": torch.cuda.get_device_name(0), "dtype": "float32",
                      "config": {**cfg, "n_segments": S, "preset": name}, "sequential_s": med["sequential"],
                      "diagonal_s": med["diagonal"], "ratio": med["sequential"] / med["diagonal"], "error": err}))
PY
# 3. the diagonal-batching and HF tests on CUDA tensors are CPU tests today; run the suite for regressions
python3 -m pytest -q -p no:cacheprovider tests/test_diagonal.py tests/test_hf_armt.py 2>&1 | tail -3 | tee "$DEST/pytest-$TAG.txt"
