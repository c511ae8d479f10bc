"""export_onnx: an optimized model as an ONNX graph whose sequence length stays dynamic.

Scan-parallelized models (Python time loops lifted into scans, Hugging Face Mamba) export with
every scan in its chunked form: the prefix composition inside chunks as whole-tensor ops and the
carry across chunks in one ONNX Scan over T / chunk steps. Nothing is unrolled: a loop that cannot
run as a scan stops the export with the reason (LoopExportError) instead of being frozen at the
example's length. The export is checked in onnxruntime against the eager model on the example
inputs, and the graph carries wavefront's version and what was rewritten in metadata_props.
"""
from __future__ import annotations

import json

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from wavefront.backends.onnx.graphs import (
    ExportError,
    check_in_onnxruntime,
    run_onnx,
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


def _prepare(model: nn.Module):
    """(the module to export, what kind it is, a function describing what was rewritten)."""
    import wavefront  # what optimize() returns, through the public package (the API imports this module)
    OptimizedModel, optimize = wavefront.OptimizedModel, wavefront.optimize
    from wavefront.routes.kernels import ScanAcceleratedModel
    from wavefront.time_loops.model import LoopLiftedModel
    if isinstance(model, OptimizedModel):
        return model, "segments", None
    if not isinstance(model, (LoopLiftedModel, ScanAcceleratedModel)):
        model = optimize(model)
        if isinstance(model, OptimizedModel):
            return _prepare(model)
    if isinstance(model, LoopLiftedModel):
        return model, "time-loops", model.report
    return model, model.adapter.name, lambda: [model.adapter.describe(model.model)]


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
    from torch.export import Dim
    specs = []
    for x, td in zip(example_inputs, _time_dims(example_inputs, time_dims)):
        specs.append({td % x.dim(): Dim.DYNAMIC} if isinstance(x, torch.Tensor) and td is not None else None)
    return (tuple(specs),)


def export_onnx(model: nn.Module, example_inputs, path: str, *, dynamic: bool = True, time_dims=None,
                dynamic_shapes=None, kwargs: dict | None = None, check: bool = True):
    """Export `model` (optimized or not) to the ONNX file `path`; returns the onnx.ModelProto.

    dynamic=True keeps each input's time dim (`time_dims`, default dim 1 of inputs with 2+ dims)
    dynamic, the other dims as in the example; `dynamic_shapes` (torch.export's format, one entry
    per input inside a 1-tuple) overrides that. `kwargs` are fixed keyword arguments (e.g.
    {"use_cache": False} for HF models).
    check=True runs the exported graph in onnxruntime (CPU) on the example inputs and raises
    ExportError if it differs from the eager model by more than the dtype's tolerance.

    >>> import tempfile, os
    >>> from wavefront.models.loop_models import LinearRecurrence
    >>> path = os.path.join(tempfile.mkdtemp(), "lru.onnx")
    >>> proto = export_onnx(LinearRecurrence(4), (torch.randn(1, 10, 4),), path)
    >>> "Scan" in {n.op_type for n in proto.graph.node}
    True
    """
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    from wavefront.scheduler.train_mode import eval_mode
    with eval_mode(model.modules()):  # exported in eval mode; the model's own modes come back after
        return _export(model, example_inputs, path, dynamic, time_dims, dynamic_shapes, dict(kwargs or {}), check)


def _export(model, example_inputs, path, dynamic, time_dims, dynamic_shapes, kwargs, check):
    module, kind, report = _prepare(model)
    if kind == "segments":
        from wavefront.backends.onnx.segments import export_segments
        return export_segments(module, example_inputs, path, dynamic=dynamic, check=check)
    if dynamic and dynamic_shapes is None:  # a length-1 example would fix the length at 1 (0/1 specialisation)
        example_inputs = _at_least_two_steps(example_inputs, time_dims)
    wrapper = _Outputs(module, kwargs).eval()  # (inside export_onnx's eval_mode: the user's flags are restored)
    with torch.no_grad():
        expected = wrapper(*example_inputs)  # also warms the loop plans up, outside the export trace
    shapes = dynamic_shapes if dynamic_shapes is not None else (
        _dynamic_shapes(example_inputs, time_dims) if dynamic else None)
    program = to_onnx(wrapper, example_inputs, shapes)
    proto = program.model_proto
    meta = {"wavefront.kind": kind, "wavefront.rewrites": json.dumps(report()),
            "wavefront.dynamic": json.dumps(bool(dynamic)),
            "wavefront.inputs": json.dumps([list(x.shape) if isinstance(x, torch.Tensor) else repr(x)
                                            for x in example_inputs])}
    save_with_metadata(proto, path, meta)
    if check:
        check_in_onnxruntime(path, example_inputs, expected)
    return proto


__all__ = ["ExportError", "export_onnx", "run_onnx"]
