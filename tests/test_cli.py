"""The `wavefront` command end to end on tiny configs (in process, plus one real console run)."""
import json
import subprocess
import sys

import onnx
import pytest

from wavefront.cli import main

USER_FILE = """
from wavefront.models import ARMT, ARMTConfig

def make_model():
    return ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4))
"""


def test_inspect_prints_the_grid_and_writes_the_report_and_trace(tmp_path, capsys):
    html, trace = tmp_path / "r.html", tmp_path / "t.json"
    assert main(["inspect", "armt-tiny", "--segments", "3", "--html", str(html), "--trace", str(trace), "--quiet",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "diagonal schedule: 4 layers x 3 segments, 6 steps" in out and "step 2: (0, 2) (1, 1) (2, 0)" in out
    assert "measured on cpu" in out and "diagonal batching: legal" in out.lower()
    page = html.read_text()
    assert 'data-kind="diagonal"' in page and 'data-kind="sequential"' in page  # profiled side by side
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 12


def test_inspect_loads_a_users_file(tmp_path, capsys):
    f = tmp_path / "mine.py"
    f.write_text(USER_FILE)
    assert main(["inspect", "--file", str(f), "--segments", "2", "--schedule", "sequential"]) == 0
    assert "sequential schedule: 2 layers x 2 segments, 4 steps" in capsys.readouterr().out


LOOP_FILE = """
import torch
from wavefront.models import LinearRecurrence

def make_model():
    return LinearRecurrence(4), (torch.randn(1, 9, 4),)
"""


def test_a_time_loop_model_is_reported_and_exported(tmp_path, capsys):
    f, out = tmp_path / "loop.py", tmp_path / "loop.onnx"
    f.write_text(LOOP_FILE)
    assert main(["inspect", "--file", str(f)]) == 0
    assert "carry `h`: ran as a scan" in capsys.readouterr().out
    assert main(["export", "--file", str(f), "-o", str(out)]) == 0 and out.exists()
    assert main(["inspect", "--file", str(f), "--html", str(tmp_path / "x.html")]) == 2
    assert "this model has none" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--file", "/no/such/file.py"], "no such file"),
    (["inspect", "--file", "{file}", "--factory", "build"], "has no callable 'build'"),
    (["inspect"], "name an example model"),
    (["inspect", "rmt-tiny"], "state 'memory_tokens' is written by layer 3"),
    (["bench", "diagonal", "--preset", "huge"], "unknown preset(s) huge"),
    (["inspect", "armt-tiny", "--batch", "0"], "--batch must be at least 1"),
])
def test_user_mistakes_print_one_line_without_a_traceback(tmp_path, capsys, argv, message):
    f = tmp_path / "mine.py"
    f.write_text(USER_FILE)
    assert main([a.replace("{file}", str(f)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("wavefront: error: ")


def test_bench_prints_a_table_or_json_lines(capsys):
    assert main(["bench", "scan", "--channels", "4", "--T", "64", "--repeats", "1", "--quiet"]) == 0
    assert "loop ms" in capsys.readouterr().out
    assert main(["bench", "diagonal", "--preset", "tiny", "--repeats", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["name"] == "diagonal_speedup" and rec["n_steps"] == 11 and rec["error"] < 1e-4


def test_export_writes_a_checked_onnx_file(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "armt-tiny", "--segments", "2", "-o", str(out)]) == 0
    assert "checked against the model in onnxruntime" in capsys.readouterr().out
    assert any(n.op_type == "Scan" for n in onnx.load(str(out)).graph.node)


def test_console_entry_runs_the_demo():
    run = subprocess.run([sys.executable, "-m", "wavefront", "demo"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "diagonal schedule refused at step" in run.stdout and "bitwise identical" in run.stdout
    helptext = subprocess.run([sys.executable, "-m", "wavefront", "inspect", "--help"], capture_output=True, text=True)
    assert "--html PATH" in helptext.stdout and "armt-dispatch" in helptext.stdout
