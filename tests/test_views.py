"""Views of a schedule: per-step timings (profile), Chrome trace JSON, the HTML report (parsed, and
rendered in headless Chromium when installed), the matplotlib plot."""
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import wavefront
from conftest import N_LAYERS, ids_for, tiny_armt
from wavefront.passes.dependence import build_grid
from wavefront.scheduler import capture, diagonal, sequential
from wavefront.scheduler.timings import Timings


def test_profile_times_every_step_of_both_paths_and_leaves_the_results_alone():
    model = tiny_armt(torch.float32)
    fast = wavefront.optimize(model)
    with torch.no_grad():
        short = ids_for(N_LAYERS + 1, batch=2, short_last=2)  # step by step
        t1 = wavefront.profile(fast, short)
        assert t1.path == "step by step" and t1.num_steps == 2 * N_LAYERS
        whole = ids_for(N_LAYERS + 2, batch=2)  # whole segments: the one program
        plain = fast(whole).logits
        t2 = wavefront.profile(fast, whole)
        assert torch.equal(fast(whole).logits, plain)
    for t in (t1, t2):
        assert all(d > 0 for d in t.step_s) and t.steps_total_s <= t.total_s and t.clock == "perf_counter"
    assert t2.path == "one program" and t2.num_steps == wavefront.last_schedule(fast).num_steps == 2 * N_LAYERS + 1
    assert fast.executor.step_timer is None and fast.executor.program.step_timer is None
    with pytest.raises(TypeError, match="optimize the model first"):
        wavefront.profile(model, whole)


def fake_timings(schedule):
    return Timings(tuple(0.001 * (t + 1) for t in range(schedule.num_steps)), 0.1)


def test_chrome_trace_has_a_track_per_layer_a_slice_per_cell_and_a_flow_per_dependency(tmp_path):
    s = diagonal(3, 4)
    t = fake_timings(s)
    grid = build_grid(capture(tiny_armt()), 4)  # the edges come from the model's grid
    trace = json.loads(open(s.to_chrome_trace(str(tmp_path / "t.json"), timings=t, grid=grid)).read())
    ev = trace["traceEvents"]
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"layer 0", "layer 1", "layer 2"}
    slices = {(e["args"]["layer"], e["args"]["segment"]): e for e in ev if e["ph"] == "X"}
    assert len(slices) == 12 and all(e["tid"] == l + 1 for (l, _), e in slices.items())
    starts = t.step_start_s()
    for (l, s_), e in slices.items():
        step = l + s_
        assert e["args"]["step"] == step
        assert e["ts"] == pytest.approx(1e6 * starts[step]) and e["dur"] == pytest.approx(1e6 * t.step_s[step])
    flows = {}
    for e in ev:
        if e["ph"] in "sf":
            flows.setdefault(e["id"], {})[e["ph"]] = e
    assert len(flows) == grid.graph.number_of_edges() == 2 * 4 + 3 * 3
    by_kind = {}
    for f in flows.values():  # each arrow starts inside its source's slice and ends inside its target's
        src = next(x for x in slices.values() if x["tid"] == f["s"]["tid"] and x["ts"] <= f["s"]["ts"] < x["ts"] + x["dur"])
        dst = next(x for x in slices.values() if x["tid"] == f["f"]["tid"] and x["ts"] <= f["f"]["ts"] < x["ts"] + x["dur"])
        assert src["args"]["step"] < dst["args"]["step"] and f["f"]["bp"] == "e"
        by_kind[f["s"]["name"]] = by_kind.get(f["s"]["name"], 0) + 1
    assert by_kind == {"hidden": 8, "state": 9}
    assert trace["otherData"]["wavefront"]["schedule"]["kind"] == "diagonal"
    unit = json.loads(open(s.to_chrome_trace(str(tmp_path / "u.json"))).read())["traceEvents"]
    assert {e["dur"] for e in unit if e["ph"] == "X"} == {1000.0}
    assert not [e for e in unit if e["ph"] in "sf"]  # no grid: no guessed arrows
    with pytest.raises(ValueError, match="timings have 6 steps but the sequential schedule has 12"):
        sequential(3, 4).to_chrome_trace(str(tmp_path / "x.json"), timings=t)


def test_the_cli_trace_draws_the_models_own_edges_for_rmt(tmp_path):
    """RMT's memory flows from the top layer into the next segment's first: the trace says so."""
    from wavefront.cli import main
    path = str(tmp_path / "rmt.json")
    assert main(["inspect", "rmt-tiny", "--schedule", "sequential", "--segments", "3", "--trace", path, "--quiet"]) == 0
    events = json.loads(open(path).read())["traceEvents"]
    slices = {e["args"]["step"]: (e["args"]["layer"], e["args"]["segment"]) for e in events if e["ph"] == "X"}
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    state = {(starts[i]["tid"] - 1, ends[i]["tid"] - 1) for i in starts if starts[i]["name"] == "state"}
    L = max(l for l, _ in slices.values()) + 1
    assert state == {(L - 1, 0)}  # (L-1, s) -> (0, s+1), never (l, s-1) -> (l, s)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.panels, self.cells, self.titles, self._in_title = [], [], 0, [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.panels.append(a.get("data-kind"))
        self.cells += tag == "rect" and a.get("class") == "cell"
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.titles.append(data)

    def handle_endtag(self, tag):
        self._in_title = False


def test_html_report_is_self_contained_with_both_schedules_and_hover_details(tmp_path):
    s = diagonal(3, 4)
    path = s.to_html(str(tmp_path / "r.html"), timings=fake_timings(s), compare=sequential(3, 4))
    text = open(path, encoding="utf-8").read()
    page = _Page()
    page.feed(text)
    assert page.panels == ["diagonal", "sequential"]
    assert page.cells == 4 * 12  # grid + timeline, both panels
    assert "layer 1, segment 2, step 3, 4.000 ms" in page.titles  # hover detail with the step's measured time
    assert "script" not in page.tags and "http" not in text and "<link" not in text
    assert "speedup bound (steps)</dt><dd>2.00x" in text and "sequential steps</dt><dd>12" in text


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Chromium not installed (apt install chromium)")
def test_html_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    s = diagonal(4, 6)
    page = s.to_html(str(tmp_path / "r.html"), compare=sequential(4, 6))
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,900", f"--screenshot={shot}", f"file://{page}"],
                   check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    img = matplotlib.image.imread(str(shot))[..., :3]
    assert img.shape[:2] == (900, 1200)
    coloured = (img.max(-1) - img.min(-1)) > 0.3  # saturated pixels: the step colours of grid and timeline
    assert coloured.mean() > 0.02, f"only {coloured.mean():.3%} of the screenshot is coloured: blank page?"


def test_plot_is_a_heat_map_of_steps_or_times():
    pytest.importorskip("matplotlib")
    s = diagonal(2, 3)
    fig = s.plot()
    data = fig.axes[0].images[0].get_array()
    assert data.tolist() == [[0, 1, 2], [1, 2, 3]]
    timed = s.plot(fake_timings(s)).axes[0].images[0].get_array()
    assert timed[1, 2] == pytest.approx(4.0) and "measured" in s.plot(fake_timings(s)).axes[0].get_title()
