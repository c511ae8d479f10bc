"""`make demo`: capture an ARMT, show its cell grid and schedules, run them exactly; refuse RMT.

Embedded defaults only: small random models, no download of weights or data.
"""
from __future__ import annotations

import time

import torch

from wavefront.backends import TorchExecutor
from wavefront.models import ARMT, RMT, ARMTConfig, RMTConfig
from wavefront.passes import analyse, build_grid
from wavefront.scheduler import ScheduleError, capture, diagonal, sequential, validate
from wavefront.testing import rel_err


def main() -> None:
    torch.manual_seed(0)
    L, S, seg = 4, 6, 32
    model = ARMT(ARMTConfig(n_layers=L, d_model=64, n_heads=4, d_ff=128, segment_len=seg, n_mem_tokens=8,
                            d_mem=16)).double().eval()
    ids = torch.randint(0, 256, (2, S * seg - 5))  # a short last segment
    print("== ARMT: captured structure")
    rg = capture(model)
    print(rg.describe())
    grid = build_grid(rg, S)
    print(f"\ncell grid: {L} layers x {S} segments, {grid.graph.number_of_edges()} dependence edges, "
          f"critical path {grid.critical_path_length} cells")
    print(analyse(rg))
    for sched in (sequential(L, S), diagonal(L, S)):
        validate(sched, grid)
        print()
        print(sched)
    ex = TorchExecutor(rg)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(ids)
        t1 = time.perf_counter()
        outs = {kind: ex.run(ids, kind) for kind in ("sequential", "diagonal")}
        t2 = time.perf_counter()
    print(f"\nmodel forward (float64): {1e3 * (t1 - t0):.1f} ms; executor, both schedules: {1e3 * (t2 - t1):.1f} ms")
    for kind, out in outs.items():
        exact = torch.equal(out.logits, ref.logits)
        print(f"executor, {kind} order vs model forward: rel err {rel_err(out.logits, ref.logits):.1e}"
              f" ({'bitwise identical' if exact else 'differs'})")

    print("\n== RMT: memory from the top layer feeds the next segment's first layer")
    rmt = RMT(RMTConfig(n_layers=L, d_model=64, n_heads=4, d_ff=128, segment_len=seg, n_mem_tokens=8))
    rrg = capture(rmt)
    print(rrg.describe())
    print(analyse(rrg))
    try:
        validate(diagonal(L, S), build_grid(rrg, S))
    except ScheduleError as e:
        print(f"diagonal schedule refused at step {e.step}:\n{e}")


if __name__ == "__main__":
    main()
