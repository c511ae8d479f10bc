"""One self-contained HTML file for a Schedule: inline SVG and CSS, no scripts, no network.

Per schedule: the layer x segment grid coloured by step, the timeline (one row per layer; real
durations when Timings are given, else unit steps), hover details per cell (SVG <title>: the
browser's own tooltip, so no script is needed), the step counts and the speedup bound over the
sequential order. `compare` puts a second schedule beside the first.
"""
from __future__ import annotations

from html import escape

CELL = 26  # grid cell size, px
ROW = 18  # timeline row height, px
TIMELINE_W = 520
LABEL_W = 64

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2733; background: #fff; }
h1 { font-size: 20px; margin: 0 0 16px; }
h2 { font-size: 16px; margin: 0 0 8px; }
.panels { display: flex; flex-wrap: wrap; gap: 32px; align-items: flex-start; }
.panel { border: 1px solid #d5dbe3; border-radius: 6px; padding: 16px; background: #fafbfc; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 0 0 12px; }
dt { color: #5a6675; } dd { margin: 0; font-weight: 600; }
svg text { font: 11px system-ui, sans-serif; fill: #1d2733; }
svg text.on-cell { fill: #fff; text-anchor: middle; dominant-baseline: central; pointer-events: none; }
rect.cell { stroke: #fff; stroke-width: 1; }
rect.cell:hover { stroke: #000; stroke-width: 2; }
.caption { color: #5a6675; font-size: 12px; margin: 4px 0 14px; }
"""


def step_color(t: int, n_steps: int) -> str:
    """Colour of step t: hue from red (first step) to violet (last)."""
    hue = 270.0 * t / max(n_steps - 1, 1)
    return f"hsl({hue:.0f}, 62%, 48%)"


def _cell_title(l, s, t, timings) -> str:
    text = f"layer {l}, segment {s}, step {t}"
    if timings is not None:
        text += f", {1e3 * timings.step_s[t]:.3f} ms"
    return escape(text)


def grid_svg(schedule, timings=None) -> str:
    """The grid: rows are layers, columns segments, each cell filled with its step's colour."""
    L, S, T = schedule.n_layers, schedule.n_segments, schedule.num_steps
    where = schedule.step_of()
    w, h = LABEL_W + S * CELL + 4, 18 + L * CELL + 4
    out = [f'<svg class="grid" width="{w}" height="{h}" viewBox="0 0 {w} {h}">']
    for s in range(S):
        out.append(f'<text x="{LABEL_W + s * CELL + CELL / 2}" y="12" text-anchor="middle">s{s}</text>')
    for l in range(L):
        y = 18 + l * CELL
        out.append(f'<text x="0" y="{y + CELL / 2 + 4}">layer {l}</text>')
        for s in range(S):
            x = LABEL_W + s * CELL
            if (l, s) not in where:
                out.append(f'<rect class="cell" x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="#ccc">'
                           f'<title>layer {l}, segment {s}: not scheduled</title></rect>')
                continue
            t = where[(l, s)]
            out.append(f'<rect class="cell" x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{step_color(t, T)}">'
                       f'<title>{_cell_title(l, s, t, timings)}</title></rect>')
            if S <= 64:  # numbers stop being readable on wider grids; the tooltip still has them
                out.append(f'<text class="on-cell" x="{x + CELL / 2}" y="{y + CELL / 2}">{t}</text>')
    out.append("</svg>")
    return "".join(out)


def timeline_svg(schedule, timings=None) -> str:
    """The timeline: one row per layer, each cell a bar over its step's time span."""
    L, T = schedule.n_layers, schedule.num_steps
    if timings is not None:
        starts, durs, total = timings.step_start_s(), timings.step_s, max(timings.steps_total_s, 1e-12)
        unit = "ms"
    else:
        starts, durs, total, unit = tuple(range(T)), (1,) * T, T, "steps"
    scale = TIMELINE_W / total
    w, h = LABEL_W + TIMELINE_W + 8, L * ROW + 34
    out = [f'<svg class="timeline" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}">']
    for l in range(L):
        out.append(f'<text x="0" y="{l * ROW + ROW / 2 + 4}">layer {l}</text>')
    for t, step in enumerate(schedule.steps):
        x, bw = LABEL_W + starts[t] * scale, max(durs[t] * scale, 0.5)
        for l, s in step:
            out.append(f'<rect class="cell" x="{x:.2f}" y="{l * ROW + 1}" width="{bw:.2f}" height="{ROW - 2}" '
                       f'fill="{step_color(t, T)}"><title>{_cell_title(l, s, t, timings)}</title></rect>')
    axis_y = L * ROW + 14
    out.append(f'<line x1="{LABEL_W}" y1="{axis_y - 10}" x2="{LABEL_W + TIMELINE_W}" y2="{axis_y - 10}" '
               'stroke="#5a6675"/>')
    end = f"{1e3 * total:.2f} ms" if timings is not None else f"{T} steps"
    out.append(f'<text x="{LABEL_W}" y="{axis_y + 4}">0</text>')
    out.append(f'<text x="{LABEL_W + TIMELINE_W}" y="{axis_y + 4}" text-anchor="end">{end}</text>')
    out.append(f'<text x="{LABEL_W + TIMELINE_W / 2}" y="{axis_y + 16}" text-anchor="middle">time ({unit})</text>')
    out.append("</svg>")
    return "".join(out)


def summary(schedule, timings=None) -> list[tuple[str, str]]:
    """(label, value) rows: sizes, step counts, the bound over the sequential order, timings."""
    L, S, T = schedule.n_layers, schedule.n_segments, schedule.num_steps
    rows = [("layers x segments", f"{L} x {S} = {L * S} cells"), ("steps", str(T)),
            ("sequential steps", str(L * S)), ("speedup bound (steps)", f"{L * S / T:.2f}x"),
            ("widest step", f"{max(len(st) for st in schedule.steps)} cells")]
    if timings is not None:
        rows += [("measured total", f"{1e3 * timings.total_s:.3f} ms on {timings.device}"),
                 ("inside steps", f"{1e3 * timings.steps_total_s:.3f} ms ({timings.clock}"
                                  f"{', ' + timings.path if timings.path else ''})")]
    return rows


def panel(schedule, timings=None) -> str:
    if timings is not None:
        timings.check_matches(schedule)
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in summary(schedule, timings))
    return (f'<section class="panel" data-kind="{escape(schedule.kind)}"><h2>{escape(schedule.kind)} schedule</h2>'
            f"<dl>{dl}</dl>"
            f'<div class="caption">Step of each cell (hover a cell for its details)</div>{grid_svg(schedule, timings)}'
            f'<div class="caption">Timeline: one row per layer</div>{timeline_svg(schedule, timings)}</section>')


def report_html(schedule, timings=None, compare=None) -> str:
    """The whole page as a string. `compare` is another Schedule, or (Schedule, Timings or None).

    >>> from wavefront.scheduler.schedule import diagonal, sequential
    >>> page = report_html(diagonal(2, 3), compare=sequential(2, 3))
    >>> page.count('<section class="panel"'), "<script" in page
    (2, False)
    """
    panels = [panel(schedule, timings)]
    if compare is not None:
        other, other_t = compare if isinstance(compare, tuple) else (compare, None)
        panels.append(panel(other, other_t))
    title = f"wavefront: {schedule.kind} schedule, {schedule.n_layers} layers x {schedule.n_segments} segments"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f'<div class="panels">{"".join(panels)}</div></body></html>\n')


def write_html(schedule, path: str, timings=None, compare=None) -> str:
    """Write report_html(...) to `path`; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(report_html(schedule, timings, compare))
    return path
