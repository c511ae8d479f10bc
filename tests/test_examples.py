"""The examples run end to end (they check themselves against the reference)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, args, expect", [
    ("armt_diagonal.py", ["--segments", "6"], "speedup"),
    pytest.param("hf_llama_armt.py", [], "rel err", marks=pytest.mark.hf),
    ("inspect_schedules.py", [], "refused at step 1"),
])
def test_example_runs(script, args, expect):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    assert expect in out


def test_onnx_generate_matches_torch_with_onnxruntime_alone(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "onnx_generate.py"), "--onnx",
                          str(tmp_path / "g.onnx"), "--new-tokens", "12"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "tokens match" in out
