"""Lane folding: run the layers of one kind, on a diagonal step, as one batched call.

signature.py (a layer call's per-lane and shared arguments), stacking.py (per-kind parameter
stacks that are the layers' storage), ops.py (the ops folded graphs call), fold_graph.py (the
graph rewrite and the grouping of linear maps), block_clones.py (opaque blocks: lane clones of
their modules), fold_cell.py (FoldLaneCell, the folded kind's cell, checked on its first
multi-lane call), vmap_cell.py (the torch.func.vmap fallback).
"""
