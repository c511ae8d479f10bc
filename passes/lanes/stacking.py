"""Per-kind parameter stacks that *are* the layers' storage, so batching never copies weights.

Each parameter (and buffer) name of a layer kind gets one tensor [n_layers_of_kind, *shape];
every layer's tensor is re-pointed (`p.data = stack[i]`) to a view into it. The Parameter
objects, their names and values are unchanged (state_dict and optimizers see the same
things), peak memory after stacking equals before (one name is stacked at a time), and a
diagonal step's active layers - a contiguous range - are a slice of the stack. If anything
re-points a parameter afterwards (model.to(...), load_state_dict with assign), `check()`
notices and stacks again, so a stale stack is never used.
"""
from __future__ import annotations

import torch
from torch import nn


class LayersNotStackable(ValueError):
    """The layers of a kind cannot share a stack (shared or mismatched tensors)."""


class _LaneSlice(torch.autograd.Function):
    """storage[a:b] as a function of the per-layer parameters: forward is a view (no copy),
    backward hands each layer's parameter its slice of the gradient. `spans` (offset, size) on
    dim 1 name the tensors of a joint storage (name-major, then lane); None: one tensor."""

    @staticmethod
    def forward(ctx, storage, a, b, spans, *params):
        ctx.spans = spans
        return storage[a:b]

    @staticmethod
    def backward(ctx, grad):
        if ctx.spans is None:
            grads = list(grad.unbind(0))
        else:
            grads = [g for off, size in ctx.spans for g in grad.narrow(1, off, size).unbind(0)]
        return (None, None, None, None, *grads)


class ParameterStack:
    """Stacks of the named tensors of several structurally identical modules.

    >>> layers = [nn.Linear(3, 2) for _ in range(4)]
    >>> st = ParameterStack(layers)
    >>> st.slice("weight", 1, 3).shape, layers[2].weight.data_ptr() == st.stacks["weight"][2].data_ptr()
    (torch.Size([2, 2, 3]), True)
    """

    def __init__(self, modules: list[nn.Module], joint: list[list[str]] = ()):
        """`joint`: groups of tensor names (same trailing shape, e.g. the weights of linears
        reading one input) laid side by side in one storage along dim 1, so one batched matmul
        can serve the whole group; each name's stack (and each layer's tensor) is a view of it."""
        self.modules = list(modules)
        self.names = tuple(n for n, _ in self._named(self.modules[0]))
        self.joint = [tuple(g) for g in joint]
        self.joint_storage: list[torch.Tensor] = []
        self.joint_spans: list[tuple[tuple[int, int], ...]] = []  # (offset, size) on dim 1 per name
        self.stacks: dict[str, torch.Tensor] = {}
        self._restack()

    @staticmethod
    def _named(m):
        yield from m.named_parameters(remove_duplicate=False)
        yield from m.named_buffers(remove_duplicate=False)

    def _restack(self):
        tables = [dict(self._named(m)) for m in self.modules]  # one walk per module, not per name
        seen: dict[int, str] = {}
        tensors = {}
        for name in self.names:
            missing = [i for i, table in enumerate(tables) if name not in table]
            if missing:
                raise LayersNotStackable(f"layer {missing[0]} of this kind has no tensor '{name}'")
            ts = tensors[name] = [table[name] for table in tables]
            for i, t in enumerate(ts):
                if id(t) in seen:
                    raise LayersNotStackable(
                        f"tensor '{name}' of layer {i} is shared with '{seen[id(t)]}': tied weights across "
                        "layers cannot be stacked; use the sequential schedule")
                seen[id(t)] = name
                if (t.shape, t.dtype, t.device) != (ts[0].shape, ts[0].dtype, ts[0].device):
                    raise LayersNotStackable(f"tensor '{name}' differs in shape/dtype/device between layers 0 and {i}")
        in_joint = {n for g in self.joint for n in g}
        self.joint_storage, self.joint_spans = [], []
        for group in self.joint:
            first = tensors[group[0]][0]
            sizes = [tensors[n][0].shape[0] for n in group]
            self.joint_spans.append(tuple((sum(sizes[:i]), size) for i, size in enumerate(sizes)))
            storage = torch.empty((len(self.modules), sum(sizes), *first.shape[1:]), dtype=first.dtype,
                                  device=first.device)
            off = 0
            for n, size in zip(group, sizes):
                self._adopt(n, tensors[n], storage[:, off:off + size])
                off += size
            self.joint_storage.append(storage)
        self._refs = tensors  # the layers' tensor objects per name, for autograd slices
        for name in self.names:
            if name not in in_joint:
                ts = tensors[name]
                self._adopt(name, ts, torch.empty((len(ts), *ts[0].shape), dtype=ts[0].dtype, device=ts[0].device))

    def _adopt(self, name, ts, stack):
        """Copy the layers' tensors into `stack` and make each layer's tensor a view of it."""
        with torch.no_grad():
            for i, t in enumerate(ts):
                stack[i].copy_(t.data)
                t.data = stack[i]  # the old storage is freed here: one name at a time
        self.stacks[name] = stack

    def is_current(self) -> bool:
        """Do all layers still view this stack (nothing re-pointed them since)?"""
        tables = [dict(self._named(m)) for m in self.modules]  # one walk per module, not per name
        self._refs = {name: [table.get(name) for table in tables] for name in self.names}
        for name in self.names:
            stack = self.stacks[name]
            for i, table in enumerate(tables):
                t = table.get(name)
                if t is None:
                    return False
                if t.data_ptr() != stack[i].data_ptr() or t.dtype != stack.dtype or t.device != stack.device \
                        or t.shape != stack.shape[1:]:
                    return False
        return True

    def check(self) -> None:
        """Re-stack if any layer's tensors were re-pointed (e.g. by model.to(dtype))."""
        if not self.is_current():
            self._restack()

    def slice(self, name: str, a: int, b: int) -> torch.Tensor:
        """Layers a..b-1 of tensor `name` as [b - a, *shape]: a view, differentiable w.r.t. the
        layers' own parameters when autograd is recording."""
        stack = self.stacks[name]
        return self._differentiable(stack, a, b, [name], None)

    def slices(self, a: int, b: int, names=None) -> dict[str, torch.Tensor]:
        """Slices for layers a..b-1 of `names` (default: every name, and `joint{k}` for each
        joint storage)."""
        if names is None:
            names = list(self.names) + [f"joint{k}" for k in range(len(self.joint))]
        return {n: self.joint_slice(int(n[5:]), a, b) if n.startswith("joint") and n not in self.stacks
                else self.slice(n, a, b) for n in names}

    def joint_slice(self, k: int, a: int, b: int) -> torch.Tensor:
        """Layers a..b-1 of joint storage k: [b - a, sum of the group's sizes, *rest]."""
        return self._differentiable(self.joint_storage[k], a, b, self.joint[k], self.joint_spans[k])

    def _differentiable(self, storage, a, b, names, spans):
        """storage[a:b], through _LaneSlice when autograd must reach the layers' parameters."""
        if torch.is_grad_enabled():
            params = [t for n in names for t in self._refs[n][a:b]]
            if any(p.requires_grad for p in params):
                return _LaneSlice.apply(storage, a, b, spans, *params)
        return storage[a:b]
