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
batched call checks the result against the layers themselves. The clone's modules are copies, so
their train/eval flags are set from the originals before every model call (sync_modes), and the
parameters of the call in progress live in a per-thread context: one model serves many threads.
"""
from __future__ import annotations

import contextlib
import copy
import threading

import torch
from torch import nn
from wavefront.passes.lanes.ops import FoldNotApplicable, lane_elementwise, lane_linear


class LaneContext(threading.local):
    """The stacked parameter slices and lane count of the call in progress, per thread (two
    threads calling one model each see their own call's parameters; torch.compile traces a
    threading.local like any object)."""

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
        self._unit_lock = threading.Lock()

    def _unit_base(self, w: torch.Tensor) -> nn.Module:
        key = (w.shape[1:], w.dtype, w.device)
        if key != self._unit_key:  # made once per dtype/device, not on every call
            with self._unit_lock:  # two threads' first calls must not see half-replaced parameters
                if key != self._unit_key:
                    one = torch.ones(w.shape[1:], dtype=w.dtype, device=w.device)
                    # Parameters (frozen), not plain tensors: torch.export requires what sits in _parameters to be one
                    params = {"weight": nn.Parameter(one, requires_grad=False)}
                    if self.bias_name:
                        params["bias"] = nn.Parameter(torch.zeros_like(one), requires_grad=False)
                    self.base._parameters = {**self.base._parameters, **params}
                    self._unit_key = key
        return self.base

    def forward(self, x):
        w = self.ctx.params[self.weight_name]
        y = lane_elementwise("mul", self._unit_base(w)(x), w, self.ctx.lanes, False)
        if self.bias_name:
            y = lane_elementwise("add", y, self.ctx.params[self.bias_name], self.ctx.lanes, False)
        return y


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


def _mixes_rows(m: nn.Module) -> bool:
    """Modules whose output for one batch row depends on the others (batch statistics): folding
    lanes into the batch would mix layers, and in training they would update the wrong layer's
    running statistics."""
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm))


def _is_scaled_norm(m: nn.Module) -> bool:
    names = set(n for n, p in m.named_parameters(recurse=False))
    norm_like = isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
    return norm_like and names in ({"weight"}, {"weight", "bias"}) and m.weight.dim() == 1 \
        and not list(m.children())


def lane_clone(module: nn.Module, prefix: str, ctx: LaneContext, invariant: set[str]) -> nn.Module:
    """A clone of `module` (at `prefix` in the layer graph) whose parameter leaves read `ctx`."""
    if _mixes_rows(module):
        raise FoldNotApplicable(f"module {prefix.rstrip('.') or '<block>'} ({type(module).__name__}) mixes batch rows")
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


def _mode_pairs(original: nn.Module, clone: nn.Module, out: list) -> list:
    """(clone module, original module) for every module of a lane clone, matched by position."""
    out.append((clone, original))
    if isinstance(clone, LaneScaledNorm):
        out.append((clone.base, original))
    elif not isinstance(clone, LaneLinear):
        for name, child in original._modules.items():
            if child is not None:
                _mode_pairs(child, clone._modules[name], out)
    return out


class LaneBlock(nn.Module):
    """Runs a lane clone of an opaque block: forward(*args, lane_params=..., lanes=...)."""

    def __init__(self, block: nn.Module, prefix: str, invariant: set[str]):
        super().__init__()
        self.ctx = LaneContext()
        self.clone = lane_clone(block, prefix, self.ctx, invariant)
        object.__setattr__(self, "_pairs", _mode_pairs(block, self.clone, []))  # not submodules: plain references

    def sync_modes(self) -> None:
        """Give every module of the clone its original's train/eval flag (the clone's modules are
        copies: model.train() / .eval() do not reach them). Called before each model call, outside
        any compiled region."""
        for clone, original in self._pairs:
            clone.training = original.training

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
