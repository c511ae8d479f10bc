"""The benchmark scripts run and print well-formed JSON lines (no timing is asserted)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, args, fields", [
    ("executor_overhead.py", ["--quick", "--repeats", "1"], ["forward_s", "executor_s", "overhead"]),
    ("diagonal_speedup.py", ["--preset", "tiny", "--repeats", "1", "--flops"],
     ["sequential_s", "diagonal_s", "step_bound", "gflops_diagonal", "gflops_matmul_2048"]),
    ("time_loops.py", ["--T", "64", "--append-stack-T", "64", "--repeats", "1"], ["wavefront_s"]),
    ("scan_device.py", ["--device", "cpu", "--T", "40", "--batch", "1", "--channels", "8", "--heads", "2", "--d", "4",
                        "--repeats", "1"], ["seconds", "gbps", "form"]),
    ("onnxruntime_speed.py", ["--preset", "tiny", "--channels", "4", "--T", "64", "--repeats", "1",
                              "--gen-segments", "2", "--gen-new", "3"],
     ["name", "providers"]),
    ("segment_model_speedup.py", ["--layers", "2", "--segments", "3", "--repeats", "1"],
     ["sequential_s", "diagonal_s", "step_bound", "path"]),
    ("scan_matrix.py", ["--T", "40", "--heads", "2", "--dk", "4", "--dv", "4", "--repeats", "1"], ["loop_s", "chunked_s"]),
    ("generate.py", ["--preset", "tiny", "--segments", "2", "--new", "3", "--repeats", "1", "--kv-preset", "tiny",
                     "--kv-new", "5"], ["tokens_per_s"]),
    ("distributed.py", ["--layers", "2", "--d-model", "32", "--segment-len", "8", "--segments", "3", "--T-linear", "256",
                        "--T-matrix", "64", "--width", "8", "--dk", "8", "--dv", "8", "--repeats", "1"],
     ["seconds", "baseline_s"]),
])
def test_script_prints_json_lines(script, args, fields):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records
    for rec in records:
        for key in ["name", "device", "dtype", "config", "ratio", "error", *fields]:
            assert key in rec, key
        assert rec["error"] < 1e-3


def test_scan_benchmark_prints_json_lines():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scan_first_order.py"), "--channels", "4",
                          "--T", "64", "--repeats", "1"], capture_output=True, text=True, check=True, timeout=300).stdout
    (rec,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for key in ["loop_s", "chunked_s", "native_s", "native_out_s", "roofline_s", "assoc_scan_s", "ratio", "vs_roofline",
                "error", "auto_choice"]:
        assert key in rec, key
    assert rec["error"] < 1e-5


@pytest.mark.hf
def test_hf_families_benchmark_prints_json_lines():
    pytest.importorskip("transformers")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "hf_families.py"), "--families", "mamba",
           "--T", "40", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["config"]["family"] for r in records] == ["mamba"]
    for rec in records:
        assert {"transformers_s", "wavefront_s", "ratio", "error", "route", "ran"} <= set(rec) and rec["error"] < 1e-4
