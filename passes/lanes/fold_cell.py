"""FoldLaneCell: runs a lane-folded layer graph (lane_fold.py) as a kind's batched cell."""
from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from wavefront.passes.lanes.block_clones import LaneBlock
from wavefront.passes.lanes.fold_graph import (
    FoldNotApplicable,
    fold_graph,
    lane_invariant_buffers,
)
from wavefront.passes.lanes.signature import LaneSignature
from wavefront.passes.lanes.vmap_cell import VmapLaneCell
from wavefront.scheduler.train_mode import eval_mode

from wavefront.contract.checks import rel_err
from wavefront.models.opaque import OpaqueModule

CHECK_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}  # a structural check: mixed rows differ by O(1)


def structural_mismatch(got: torch.Tensor, ref: torch.Tensor) -> str:
    """Why `got` is not `ref` for a self-check ("" when it is): a shape, or a relative error above
    CHECK_RTOL (rounding passes, a result that mixes rows or segments differs by O(1)); tensors
    that are not floating point must be equal.

    >>> structural_mismatch(torch.ones(2), torch.ones(2) + 1e-12), structural_mismatch(torch.ones(2), torch.zeros(2))
    ('', 'relative error 1.00e+00')
    """
    if got.shape != ref.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if not (ref.is_floating_point() or ref.is_complex()):
        return "" if torch.equal(got, ref) else "values differ"
    err = rel_err(got, ref)
    return "" if err <= CHECK_RTOL.get(ref.dtype, 5e-2) else f"relative error {err:.2e}"


def _plain_layout(x):
    """A tensor input of the compiled graph as its own contiguous tensor: dynamo guards on
    strides and on a view's base, so a flag expanded over one lane (stride 0) or a slice of the
    program's stack would each recompile the graph once more (a cold compile each, ~10 s)."""
    if isinstance(x, torch.Tensor) and (x._base is not None or not x.is_contiguous()):
        return x.clone(memory_format=torch.contiguous_format)
    return x


class FoldLaneCell(OpaqueModule):
    """Same interface as VmapLaneCell, running the lane-folded graph.

    The first call with two or more lanes is checked against the user's own layers, each lane
    run through its layer module (in eval mode, so that dropout cannot make two runs differ): a
    layer that mixes batch rows (which folding would get wrong) is caught there and the kind
    switches to vmap for good, with the reason kept in `fallback_reason`. `checked` turns True
    only once that comparison has passed; if the check itself fails (the layer raised), the
    error propagates and the next multi-lane call checks again.
    """

    def __init__(self, folded: fx.GraphModule, names: list[str], out_tags: list[str], signature: LaneSignature,
                 vmap_cell: VmapLaneCell, invariant: set[str], stack):
        super().__init__()
        self.folded, self.names, self.out_tags, self.signature = folded, names, out_tags, signature
        self.vmap_cell, self.invariant, self.stack = vmap_cell, invariant, stack
        self.checked = False
        self.fallback_reason = ""
        self.compiled = None  # set by backends.inductor: torch.compile(self.folded)
        self.compile_error = ""  # why compiling failed, if it did (the eager graph runs instead)
        self.layers_training = False  # set before each model call (sync_modes): compiled graphs serve eval only

    @property
    def mode(self):
        return "vmap" if self.fallback_reason else "fold"

    @property
    def param_names(self):
        """The stacked tensors the folded graph reads (None once fallen back: vmap reads all)."""
        return None if self.fallback_reason or not self.checked else self.names

    def sync_modes(self, training: bool = False) -> None:
        """The lane clones of opaque blocks take their originals' train/eval flags (module_fold);
        `training`: is any module of the kind's layers in training mode (then the compiled graph,
        traced in one mode, does not run)."""
        self.layers_training = training
        for m in self.folded.modules():
            if isinstance(m, LaneBlock):
                m.sync_modes()

    def check_invariants(self) -> None:
        """Once per model call: buffers folded as shared must still be equal in every layer."""
        if self.invariant and not self.fallback_reason and not all(
                torch.equal(self.stack.stacks[n][i], self.stack.stacks[n][0])
                for n in self.invariant for i in range(1, self.stack.stacks[n].shape[0])):
            self.fallback_reason = "a buffer that was equal in every layer changed"

    def _folded_inputs(self, params, lane_values, rows):
        """The folded graph's (args, kwargs, stacked parameters): lanes folded into the batch;
        per-lane values broadcast over the batch (masks, rotary tables: batch 1) given per row."""
        flag = self.signature.flag_lane
        # the flag per row by expand, not repeat_interleave: torch.onnx (torch 2.13) translates the
        # latter inside a scan body with a symbolic batch into an Expand that onnxruntime rejects
        folded = [v[:, None].expand(v.shape[0], rows).flatten() if k == flag else
                  (v.expand(v.shape[0], rows, *v.shape[2:]) if v.shape[1] != rows else v).flatten(0, 1)
                  for k, v in enumerate(lane_values)]
        args, kwargs = self.signature.rebuild(folded)
        return args, kwargs, {"lane_" + n.replace(".", "_"): params[n] for n in self.names}

    def _unfolded(self, out, lanes):
        leaves, spec = tree_flatten(out)
        return [x.reshape(lanes, -1, *x.shape[1:]) if t == "B" else x for x, t in zip(leaves, self.out_tags)], spec

    def run_folded(self, params, lane_values, compiled: bool = False):
        """The folded graph alone, for a cell that has checked itself (no check, no fallback):
        what a program calls step by step. compiled=True takes the compiled graph when the
        inductor backend set one (inference only); a program traced as a whole (torch.export)
        passes False."""
        lanes, rows = lane_values[0].shape[0], lane_values[0].shape[1]
        args, kwargs, extra = self._folded_inputs(params, lane_values, rows)
        call = self._call_compiled if compiled else self.folded
        return self._unfolded(call(*args, **kwargs, **extra, lanes=lanes), lanes)

    def _call_compiled(self, *args, **kwargs):
        """The compiled folded graph when there is one and it may run (checked, no autograd);
        a graph torch.compile cannot handle runs eager from then on, the reason kept."""
        if self.compiled is None or not self.checked or torch.is_grad_enabled() or self.layers_training:
            return self.folded(*args, **kwargs)
        if not getattr(self.compiled, "traced_by_dynamo", True):  # an AOTInductor package: no shape guessing to set
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                self.compiled, self.compile_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                return self.folded(*args, **kwargs)
        if kwargs.get("lanes") == 1:  # a diagonal's corner step: compiled, its size-1 lanes would recompile the graph
            return self.folded(*args, **kwargs)
        # Duck sizing would tie unrelated sizes that happen to be equal on the first call
        # (lanes == batch == layers) and recompile when they part; keep them independent. (Set and
        # restored by hand: config.patch costs ~0.1 ms, as much as a small step.)
        shape_config = torch.fx.experimental._config
        duck = shape_config.use_duck_shape
        shape_config.use_duck_shape = False
        args = tree_map(_plain_layout, args)  # the lane values; the stacked weights (lane_*) keep one layout
        kwargs = {k: v if k.startswith("lane_") else tree_map(_plain_layout, v) for k, v in kwargs.items()}
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:
            self.compiled, self.compile_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return self.folded(*args, **kwargs)
        finally:
            shape_config.use_duck_shape = duck

    def forward(self, params, lane_values, layers=None):
        """Run the folded graph on lanes of stacked parameters; `layers` (the user's layer
        modules of these lanes, in order) serve the first multi-lane call's self-check."""
        if self.fallback_reason:
            return self.vmap_cell(params, lane_values)
        lanes = lane_values[0].shape[0]
        rows = lane_values[0].shape[1] if lane_values[0].dim() > 1 else None
        flag = self.signature.flag_lane
        if rows is None or any((v.dim() < 2 or v.shape[1] not in (rows, 1)) for k, v in enumerate(lane_values)
                               if k != flag):
            return self.vmap_cell(params, lane_values)  # inputs without a common batch dim
        if not self.checked and lanes >= 2 and layers is None:
            raise ValueError("the lane-folded cell checks its first multi-lane call against the layers themselves: "
                             "pass layers=[the layer modules of these lanes]")
        args, kwargs, extra = self._folded_inputs(params, lane_values, rows)
        out = self._call_compiled(*args, **kwargs, **extra, lanes=lanes)
        leaves, spec = self._unfolded(out, lanes)
        if not self.checked and lanes >= 2:
            why = self._self_check(params, lane_values, layers, leaves)
            if why:
                self.fallback_reason = why
                return self.vmap_cell(params, lane_values)
            self.checked = True  # only now: a check that raised or failed never leaves this path unchecked
        return leaves, spec

    def _self_check(self, params, lane_values, layers, leaves) -> str:
        """Compare the folded graph with each lane run through its own layer module, in eval mode;
        returns why they differ ("" when they agree)."""
        if len(layers) != lane_values[0].shape[0]:
            raise ValueError(f"{len(layers)} layer modules for {lane_values[0].shape[0]} lanes")
        modules = [m for layer in layers for m in layer.modules()] + list(self.folded.modules())
        training, layers_training = any(m.training for m in modules), self.layers_training
        try:
            return self._compare_lanes(params, lane_values, layers, leaves, modules, training)
        finally:
            self.layers_training = layers_training  # sync_modes inside the check set it for eval

    def _compare_lanes(self, params, lane_values, layers, leaves, modules, training) -> str:
        with torch.no_grad(), eval_mode(modules):
            if training:  # the result in hand drew dropout masks: fold again, deterministically
                self.sync_modes()
                rows = lane_values[0].shape[1]
                args, kwargs, extra = self._folded_inputs(params, lane_values, rows)
                leaves, _ = self._unfolded(self.folded(*args, **kwargs, **extra, lanes=len(layers)), len(layers))
            for k, layer in enumerate(layers):
                args, kwargs = self.signature.rebuild([v[k] for v in lane_values])
                ref = [r for r in tree_flatten(layer(*args, **kwargs))[0] if isinstance(r, torch.Tensor)]
                mine = [x[k] if t == "B" else x for x, t in zip(leaves, self.out_tags)]
                if len(ref) != len(mine):
                    return f"lane-folded cell returned {len(mine)} tensors, layer {k} of the call {len(ref)}"
                for x, r in zip(mine, ref):
                    if structural_mismatch(x, r):
                        return "lane-folded result differed from the layers' own forward on the first batched call"
        return ""


def compiled_label(cell) -> str:
    """How a batched cell's compiled graph runs ("" when it has none), for explain()."""
    compiled = getattr(cell, "compiled", None)
    if compiled is None:
        return ""
    return getattr(compiled, "label", "compiled (inductor)")


def fold_lanes(template: fx.GraphModule, signature: LaneSignature, stack, fused: list[list[str]] = ()) -> FoldLaneCell:
    """Build the folded cell for one layer kind, or raise FoldNotApplicable saying why."""
    invariant = lane_invariant_buffers(template, stack)
    flag_placeholder = None
    if signature.flag_lane is not None:
        leaf = signature.lane_pos[signature.flag_lane]
        args, kwargs = tree_unflatten(list(range(len(signature.leaves))), signature.spec)
        if leaf not in args:
            raise FoldNotApplicable("the first-segment flag is passed by keyword")
        flag_placeholder = list(args).index(leaf)
    folded, names, out_tags = fold_graph(template, stack.names, invariant, flag_placeholder, fused)
    return FoldLaneCell(folded, names, out_tags, signature, VmapLaneCell(template, signature), invariant, stack)
