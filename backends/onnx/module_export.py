"""Export a module as it is (time loops lifted into scans, substituted kernels) to ONNX with its
time dims dynamic: torch.export, then torch.onnx, metadata, the check in onnxruntime.

Scans export in their chunked form: the prefix composition inside chunks as whole-tensor ops and
the carry across chunks in one ONNX Scan over T / chunk steps. Nothing is unrolled: a loop that
cannot run as a scan stops the export with the reason (LoopExportError) instead of being frozen
at the example's length.
"""
from __future__ import annotations

import json

import torch
from torch import nn
from torch.export import Dim
from torch.utils._pytree import tree_leaves
from wavefront.backends.onnx.graphs import (
    check_in_onnxruntime,
    save_with_metadata,
    to_onnx,
)


class _Outputs(nn.Module):
    """The tensors of a model's output: `logits` for language-model outputs, else every tensor
    in the (nested) output, in order. Keyword arguments are fixed (e.g. use_cache=False)."""

    def __init__(self, model: nn.Module, kwargs: dict):
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, *args):
        out = self.model(*args, **self.kwargs)
        if hasattr(out, "logits"):
            return out.logits
        return tuple(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def _time_dims(example_inputs: tuple, time_dims) -> list:
    if time_dims is not None:
        return list(time_dims)
    return [1 if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0 for x in example_inputs]


def _at_least_two_steps(example_inputs: tuple, time_dims) -> tuple:
    """The example with every time dim of length 1 doubled (its values only feed the trace)."""
    out = []
    for x, td in zip(example_inputs, _time_dims(example_inputs, time_dims)):
        if isinstance(x, torch.Tensor) and td is not None and x.shape[td % x.dim()] == 1:
            x = torch.cat([x, x], dim=td % x.dim())
        out.append(x)
    return tuple(out)


def _dynamic_shapes(example_inputs: tuple, time_dims):
    """One spec per input: its time dim dynamic, the others as in the example (AUTO dims trip
    torch.export's shape solver on small examples; pass dynamic_shapes to choose otherwise)."""
    specs = []
    for x, td in zip(example_inputs, _time_dims(example_inputs, time_dims)):
        specs.append({td % x.dim(): Dim.DYNAMIC} if isinstance(x, torch.Tensor) and td is not None else None)
    return (tuple(specs),)


def export_module(module: nn.Module, example_inputs: tuple, path: str, *, kind: str, rewrites: list[str],
                  dynamic: bool = True, time_dims=None, dynamic_shapes=None, kwargs: dict | None = None,
                  check: bool = True):
    """Export `module` (called with `example_inputs` and the fixed `kwargs`) to the ONNX file
    `path`, each input's time dim dynamic (`time_dims`, default dim 1 of inputs with 2+ dims) or
    as `dynamic_shapes` says; metadata records `kind` and `rewrites`. Returns the ModelProto.
    check=True runs the graph in onnxruntime on the example and raises ExportError if it differs.

    >>> import os, tempfile
    >>> proto = export_module(nn.Linear(3, 2), (torch.randn(1, 4, 3),), os.path.join(tempfile.mkdtemp(), "l.onnx"),
    ...                       kind="plain", rewrites=[])
    >>> [p.key for p in proto.metadata_props if p.key == "wavefront.kind"]
    ['wavefront.kind']
    """
    if dynamic and dynamic_shapes is None:  # a length-1 example would fix the length at 1 (0/1 specialisation)
        example_inputs = _at_least_two_steps(example_inputs, time_dims)
    wrapper = _Outputs(module, dict(kwargs or {})).eval()  # (the caller restores the user's train/eval flags)
    with torch.no_grad():
        expected = wrapper(*example_inputs)  # also warms the loop plans up, outside the export trace
    shapes = dynamic_shapes if dynamic_shapes is not None else (
        _dynamic_shapes(example_inputs, time_dims) if dynamic else None)
    proto = to_onnx(wrapper, example_inputs, shapes)
    meta = {"wavefront.kind": kind, "wavefront.rewrites": json.dumps(rewrites),
            "wavefront.dynamic": json.dumps(bool(dynamic)),
            "wavefront.inputs": json.dumps([list(x.shape) if isinstance(x, torch.Tensor) else repr(x)
                                            for x in example_inputs])}
    save_with_metadata(proto, path, meta)
    if check:
        check_in_onnxruntime(path, example_inputs, expected)
    return proto


__all__ = ["export_module"]
