"""Lane folding for opaque blocks (e.g. Hugging Face decoder layers): swap modules, not ops.

An opaque block cannot be rewritten op by op, but its code treats batch rows independently
and touches parameters only inside a few leaf modules. So the block's own code runs once over
the folded rows [lane 0 batch; lane 1 batch; ...] in a structural clone whose parameter-holding
leaves are replaced by lane-aware ones reading the stacked parameters of the call:
  - nn.Linear / GPT-2's Conv1D   -> one baddbmm over the lane-stacked weights;
  - weight (and bias) scaled norms (RMSNorm, LayerNorm) -> the module with unit weight and
    zero bias, then the lane slices applied per lane.
The clone shares every other module and buffer with the original; no parameter is copied. A
leaf of another kind makes the block not foldable (vmap batches it), and FoldLaneCell's first
batched call checks the result against vmap.
"""
from __future__ import annotations

import contextlib

import copy

import torch
from torch import nn

from .lane_fold import FoldNotApplicable, lane_elementwise, lane_linear


class LaneContext:
    """The stacked parameter slices and lane count of the call in progress."""

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}
        self.lanes = 0
        self.pinned = False


class LaneLinear(nn.Module):
    """nn.Linear (weight [out, in]) or GPT-2 Conv1D (weight [in, out]) over lanes."""

    def __init__(self, ctx: LaneContext, weight: str, bias: str | None, transposed: bool):
        super().__init__()
        self.ctx, self.weight_name, self.bias_name, self.transposed = ctx, weight, bias, transposed

    def forward(self, x):
        w = self.ctx.params[self.weight_name]
        if self.transposed:  # Conv1D stores [in, out]
            w = w.transpose(1, 2)
        b = self.ctx.params[self.bias_name] if self.bias_name else None
        return lane_linear(x, w, b, self.ctx.lanes)


class LaneScaledNorm(nn.Module):
    """A norm whose parameters scale and shift its output: base(x) * w + b per lane."""

    def __init__(self, ctx: LaneContext, module: nn.Module, weight: str, bias: str | None):
        super().__init__()
        self.ctx, self.weight_name, self.bias_name = ctx, weight, bias
        self.base = copy.copy(module)  # same class and settings, unit weight and zero bias
        self.base._parameters = dict(module._parameters)
        self._unit_key = None

    def forward(self, x):
        w = self.ctx.params[self.weight_name]
        key = (w.shape[1:], w.dtype, w.device)
        if key != self._unit_key:  # made once per dtype/device, not on every call
            one = torch.ones(w.shape[1:], dtype=w.dtype, device=w.device)
            # Parameters (frozen), not plain tensors: torch.export requires what sits in _parameters to be one
            self.base._parameters["weight"] = nn.Parameter(one, requires_grad=False)
            if self.bias_name:
                self.base._parameters["bias"] = nn.Parameter(torch.zeros_like(one), requires_grad=False)
            self._unit_key = key
        y = lane_elementwise("mul", self.base(x), w, self.ctx.lanes, False)
        if self.bias_name:
            y = lane_elementwise("add", y, self.ctx.params[self.bias_name], self.ctx.lanes, False)
        return y


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


def _is_scaled_norm(m: nn.Module) -> bool:
    names = set(n for n, p in m.named_parameters(recurse=False))
    norm_like = isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
    return norm_like and names in ({"weight"}, {"weight", "bias"}) and m.weight.dim() == 1 \
        and not list(m.children())


def lane_clone(module: nn.Module, prefix: str, ctx: LaneContext, invariant: set[str]) -> nn.Module:
    """A clone of `module` (at `prefix` in the layer graph) whose parameter leaves read `ctx`."""
    own = dict(module.named_parameters(recurse=False))
    own_buffers = {n for n, _ in module.named_buffers(recurse=False)}
    for b in own_buffers:
        if f"{prefix}{b}" not in invariant:
            raise FoldNotApplicable(f"buffer {prefix}{b} differs between layers")
    if own:
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
            return LaneLinear(ctx, f"{prefix}weight", bias, transposed=_is_conv1d(module))
        if _is_scaled_norm(module):
            bias = f"{prefix}bias" if "bias" in own and module.bias is not None else None
            return LaneScaledNorm(ctx, module, f"{prefix}weight", bias)
        raise FoldNotApplicable(f"module {prefix.rstrip('.') or '<block>'} ({type(module).__name__}) holds "
                                f"parameters {sorted(own)} that lane folding cannot batch")
    clone = copy.copy(module)
    clone._modules = {name: (lane_clone(child, f"{prefix}{name}.", ctx, invariant) if child is not None else None)
                      for name, child in module._modules.items()}
    return clone


class LaneBlock(nn.Module):
    """Runs a lane clone of an opaque block: forward(*args, lane_params=..., lanes=...)."""

    def __init__(self, block: nn.Module, prefix: str, invariant: set[str]):
        super().__init__()
        self.ctx = LaneContext()
        self.clone = lane_clone(block, prefix, self.ctx, invariant)

    def forward(self, *args, lane_params, lanes, **kwargs):
        if self.ctx.pinned:  # set by the caller for a whole traced scan, whose body may not mutate it
            return self.clone(*args, **kwargs)
        self.ctx.params, self.ctx.lanes = lane_params, lanes
        try:
            return self.clone(*args, **kwargs)
        finally:
            self.ctx.params = {}

    @contextlib.contextmanager
    def pinned(self, lane_params: dict, lanes: int):
        """Hold these parameters for every call inside the block (export: the calls sit in a
        scan body, where mutating this context is a side effect torch.export refuses)."""
        self.ctx.params, self.ctx.lanes, self.ctx.pinned = lane_params, lanes, True
        try:
            yield
        finally:
            self.ctx.params, self.ctx.pinned = {}, False
