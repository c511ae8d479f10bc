"""schedule.plot(): a matplotlib Figure (needs the viz extra: pip install wavefront[viz])."""
from __future__ import annotations


def plot_schedule(schedule, timings=None):
    """Heat map of the step of each cell (rows: layers, columns: segments), or, with Timings, of
    the measured duration of each cell's step in ms. Returns a matplotlib Figure (not shown).

    >>> from wavefront.scheduler.schedule import diagonal
    >>> fig = plot_schedule(diagonal(2, 3))
    >>> fig.axes[0].get_title()
    'diagonal schedule: step of each cell'
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("schedule.plot() needs matplotlib: pip install 'wavefront[viz]'") from e
    import numpy as np

    L, S = schedule.n_layers, schedule.n_segments
    where = schedule.step_of()
    if timings is not None:
        timings.check_matches(schedule)
    grid = np.full((L, S), np.nan)
    for (l, s), t in where.items():
        grid[l, s] = t if timings is None else 1e3 * timings.step_s[t]
    fig = Figure(figsize=(min(max(5.0, 2 + 0.45 * S), 16), min(max(2.5, 1.5 + 0.45 * L), 10)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
    what = "step of each cell" if timings is None else "measured ms of each cell's step"
    ax.set_title(f"{schedule.kind} schedule: {what}", fontsize=10)
    ax.set_xlabel("segment")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, S, max(1, S // 16)))
    ax.set_yticks(range(0, L, max(1, L // 16)))
    if S * L <= 400:  # write the values where they stay readable
        for (l, s), t in where.items():
            ax.text(s, l, str(t) if timings is None else f"{grid[l, s]:.2g}", ha="center", va="center",
                    color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="step" if timings is None else "ms")
    fig.tight_layout()
    return fig
