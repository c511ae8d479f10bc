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
# 2. diagonal batching on the issue's presets, on the GPU
python3 benchmarks/diagonal_speedup.py --device cuda --preset dispatch --preset small --flops | tee "$DEST/diagonal_speedup-$TAG.jsonl"
python3 benchmarks/diagonal_speedup.py --device cuda --preset dispatch --preset small --backend aot_inductor | tee -a "$DEST/diagonal_speedup-$TAG.jsonl"
# 3. scans: first-order at (8, 1536, T = 1k..128k) as GB/s vs a device copy; matrix state (Triton vs torch)
python3 benchmarks/scan_device.py --device cuda | tee "$DEST/scan_device-$TAG.jsonl"
# 4. the Triton kernels' tests, compiled for the GPU this time (not the interpreter)
python3 -m pip install -q "triton>=3.0" 2>/dev/null
python3 -m pytest -q -p no:cacheprovider tests/test_triton_scan.py 2>&1 | tail -3 | tee "$DEST/pytest-triton-$TAG.txt"
# 5. onnxruntime with the CUDA provider vs torch on the segment graph, generate() through the segment
#    and decode-step graphs, and the scan. onnxruntime-gpu never beside onnxruntime (they write the same
#    files): its own venv, torch taken from the machine's site-packages, its onnxruntime shadowed.
python3 -m venv --system-site-packages /tmp/ort-gpu && /tmp/ort-gpu/bin/python -m pip install -q onnx onnxscript onnxruntime-gpu \
  && /tmp/ort-gpu/bin/python -m pip install -q --no-deps -e . \
  && /tmp/ort-gpu/bin/python -c 'import onnxruntime as o; p = o.get_available_providers(); print(o.__file__, p); assert "CUDAExecutionProvider" in p' \
  && /tmp/ort-gpu/bin/python benchmarks/onnxruntime_speed.py --device cuda | tee "$DEST/onnxruntime_speed-$TAG.jsonl"
# 6. the diagonal-batching and HF tests on CUDA tensors are CPU tests today; run the suite for regressions
python3 -m pytest -q -p no:cacheprovider tests/test_diagonal.py tests/test_hf_armt.py 2>&1 | tail -3 | tee "$DEST/pytest-$TAG.txt"
