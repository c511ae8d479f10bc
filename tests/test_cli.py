"""The `wavefront` command end to end on tiny configs (in process, plus one real console run)."""
import json
import os
import subprocess
import sys

import onnx
import pytest

from wavefront.cli import CLIError, main

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
    (["bench", "scan", "--T", "-5"], "--T must be at least 1, got -5"),
    (["bench", "scan", "--T", "0"], "--T must be at least 1, got 0"),
    (["bench", "scan", "--T", "64", "-5"], "--T must be at least 1, got -5"),
    (["bench", "scan", "--channels", "0"], "--channels must be at least 1, got 0"),
    (["bench", "scan", "--channels", "-3"], "--channels must be at least 1, got -3"),
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


RAISING_FILE = """
import sys

def make_runtime():
    raise RuntimeError("no weights here")

def make_zero():
    return 1 / 0

def make_assert():
    assert False, "shapes disagree"

def make_exit():
    sys.exit("bye")

def make_interrupt():
    raise KeyboardInterrupt
"""


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("wavefront: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("factory, raised", [("make_runtime", "RuntimeError: no weights here"),
                                             ("make_zero", "ZeroDivisionError: division by zero"),
                                             ("make_assert", "AssertionError: shapes disagree"),
                                             ("make_exit", "SystemExit: bye")])
def test_a_factory_that_raises_is_one_line_naming_it(tmp_path, capsys, monkeypatch, factory, raised):
    f = tmp_path / "raising.py"
    f.write_text(RAISING_FILE)
    argv = ["inspect", "--file", str(f), "--factory", factory]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"{factory}()" in err and raised in err
    monkeypatch.setenv("WAVEFRONT_TRACEBACK", "1")  # ... and the traceback is still there on request
    with pytest.raises(CLIError) as info:
        main(argv)
    assert raised.split(":")[0] in repr(info.value.__cause__)


def test_ctrl_c_in_a_factory_still_interrupts(tmp_path):
    f = tmp_path / "raising.py"
    f.write_text(RAISING_FILE)
    with pytest.raises(KeyboardInterrupt):
        main(["inspect", "--file", str(f), "--factory", "make_interrupt"])


def test_a_file_that_exits_while_imported_says_where_to_move_its_script_code(tmp_path, capsys):
    f = tmp_path / "train.py"
    f.write_text("import sys\nsys.exit(2)  # e.g. argparse at the top level, parsing wavefront's own argv\n")
    assert main(["inspect", "--file", str(f)]) == 2
    assert "exited while being imported" in _one_line_error(capsys)


def test_file_on_a_directory_is_one_line(tmp_path, capsys):
    assert main(["inspect", "--file", str(tmp_path)]) == 2
    assert f"--file {tmp_path} is a directory" in _one_line_error(capsys)


BAD_FORWARD_FILE = """
import torch
from torch import nn

class Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.lin(h) + x[:, t]
        return h

def make_model():
    return Loop(), (torch.randn(1, 3, 5),)  # width 5, the model's is 4: its forward raises
"""


def test_an_error_in_the_users_model_is_one_line_pointing_at_it(tmp_path, capsys):
    f = tmp_path / "loop.py"
    f.write_text(BAD_FORWARD_FILE)
    assert main(["inspect", "--file", str(f)]) == 2
    err = _one_line_error(capsys)
    assert "RuntimeError" in err and "must match the size" in err and f"{f} line 13, in forward" in err


def _unusable_path(tmp_path, kind: str) -> str:
    if kind == "a directory":
        return str(tmp_path)
    if kind == "in a missing folder":
        return str(tmp_path / "missing" / "out")
    (tmp_path / "plain.txt").write_text("")
    return str(tmp_path / "plain.txt" / "out")  # "under a regular file": refused even for root


@pytest.mark.parametrize("cmd, flag", [("export", "-o"), ("inspect", "--html"), ("inspect", "--trace")])
@pytest.mark.parametrize("kind, said", [("a directory", "is a directory"), ("in a missing folder", "does not exist"),
                                        ("under a file", "is a file, not a folder")])
def test_an_unusable_output_path_is_refused_before_the_model_is_built(tmp_path, capsys, cmd, flag, kind, said):
    f = tmp_path / "raising.py"
    f.write_text(RAISING_FILE)
    path = _unusable_path(tmp_path, kind)
    assert main([cmd, "--file", str(f), "--factory", "make_runtime", flag, path]) == 2
    err = _one_line_error(capsys)
    assert f"{flag} {path}" in err and said in err and "no weights here" not in err  # the factory never ran


def test_an_output_path_over_the_model_file_is_refused(tmp_path, capsys):
    f = tmp_path / "mine.py"
    f.write_text(USER_FILE)
    assert main(["export", "--file", str(f), "-o", str(f)]) == 2
    assert "would overwrite your --file" in _one_line_error(capsys)
    assert f.read_text() == USER_FILE


def test_an_output_path_in_an_unwritable_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write into a read-only folder (root), so there is no unwritable one to test")
        assert main(["export", "armt-tiny", "-o", str(locked / "m.onnx")]) == 2
        assert f"cannot write in {locked}" in _one_line_error(capsys)
    finally:
        locked.chmod(0o700)
