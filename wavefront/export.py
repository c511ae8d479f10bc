"""export_onnx: a model, optimized or not, as an ONNX graph whose sequence length stays dynamic.

A model not optimized yet is optimized first; then the result exports itself the way its route
runs (Optimized.export_onnx): a segment model as its one program under the diagonal schedule (one
ONNX Scan over the steps, any segment count), time loops and substituted kernels as their
chunked scans (backends/onnx/module_export.py). The export is checked in onnxruntime against
the eager model on the example inputs, and the graph carries wavefront's version and what was
rewritten in metadata_props.
"""
from __future__ import annotations

from torch import nn

from wavefront.api import optimize
from wavefront.backends.onnx.graphs import ExportError, run_onnx
from wavefront.routes.base import Optimized


def export_onnx(model: nn.Module, example_inputs, path: str, *, dynamic: bool = True, time_dims=None,
                dynamic_shapes=None, kwargs: dict | None = None, check: bool = True, decode: bool = False):
    """Export `model` (optimized or not) to the ONNX file `path`; returns the onnx.ModelProto.

    dynamic=True keeps each input's time dim (`time_dims`, default dim 1 of inputs with 2+ dims)
    dynamic, the other dims as in the example; `dynamic_shapes` (torch.export's format, one entry
    per input inside a 1-tuple) overrides that. `kwargs` are fixed keyword arguments (e.g.
    {"use_cache": False} for HF models).
    check=True runs the exported graph in onnxruntime (CPU) on the example inputs and raises
    ExportError if it differs from the eager model by more than the dtype's tolerance.
    decode=True (segment models) writes the decode step instead: a few tokens of the current
    segment with its key/value cache and memory in and out (backends/onnx/decode_graph.py).

    >>> import os, tempfile, torch
    >>> from wavefront.models.loop_models import LinearRecurrence
    >>> path = os.path.join(tempfile.mkdtemp(), "lru.onnx")
    >>> proto = export_onnx(LinearRecurrence(4), (torch.randn(1, 10, 4),), path)
    >>> "Scan" in {n.op_type for n in proto.graph.node}
    True
    """
    if not isinstance(model, Optimized):
        model = optimize(model)
    return model.export_onnx(example_inputs, path, dynamic=dynamic, time_dims=time_dims,
                             dynamic_shapes=dynamic_shapes, kwargs=kwargs, check=check, decode=decode)


__all__ = ["ExportError", "export_onnx", "run_onnx"]
