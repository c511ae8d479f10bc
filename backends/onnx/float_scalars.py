"""Python-float constants of a float64 graph, kept at float64.

torch.onnx (2.13, through onnxscript) writes a Python float operand such as an epsilon
(`x + 1e-5`, GELU's 0.044715) as a float32 constant cast to the graph's dtype, so a float64 graph
computes with 9.99999975e-06 where the model uses 1e-05: relative errors of 1e-10..1e-9 once
such a value enters a division. The exported program still holds every such operand as the
Python float the model wrote; this puts those values back into the ONNX graph's float64
scalar constants (no library does: the rounding happens inside the exporter). The model's own
parameters and buffers are never rewritten; where the exporter merged a rounded constant into
an equal one-element weight, the constant stays rounded (the export's check still applies).

>>> import onnx, numpy as np
>>> from onnx import helper, numpy_helper
>>> rounded = np.array(np.float32(1e-5), np.float64)
>>> node = helper.make_node("Constant", [], ["eps"], value=numpy_helper.from_array(rounded))
>>> g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("eps", onnx.TensorProto.DOUBLE, [])])
>>> proto = helper.make_model(g)
>>> restore_float64_scalars(proto, [1e-5])
1
>>> float(numpy_helper.to_array(proto.graph.node[0].attribute[0].t))
1e-05
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper


def python_floats(exported_program) -> list[float]:
    """Every Python float operand in an ExportedProgram's graphs (higher-order op bodies included)."""
    found = set()

    def visit(value):
        if isinstance(value, float):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for module in exported_program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in (graph.nodes if graph is not None else ()):
            visit(node.args)
            visit(node.kwargs)
    return sorted(found)


def model_tensor_names(exported_program) -> set[str]:
    """The names the model's own parameters, buffers and tensor constants keep in the ONNX graph:
    those are the user's values, never rewritten."""
    sig = exported_program.graph_signature
    return {*sig.inputs_to_parameters.values(), *sig.inputs_to_buffers.values(),
            *sig.inputs_to_lifted_tensor_constants.values(), *exported_program.state_dict,
            *exported_program.constants}


def restore_float64_scalars(proto, floats, keep=()) -> int:
    """Replace each float64 scalar constant of `proto` (every subgraph; initializers named in `keep`,
    the model's own tensors, excepted) whose value is a float32 rounding of exactly one of
    `floats` by that float; returns how many were replaced."""
    by_rounded: dict = {}
    for f in floats:
        r = float(np.float32(f)) if np.isfinite(np.float32(f)) else None
        if r is not None and r != f:
            by_rounded.setdefault(r, set()).add(f)
    wanted = {r: next(iter(fs)) for r, fs in by_rounded.items() if len(fs) == 1}  # an ambiguous rounding stays
    count = 0

    def fix(tensor) -> bool:
        if tensor.data_type != TensorProto.DOUBLE:
            return False
        arr = numpy_helper.to_array(tensor)
        if arr.size != 1 or float(arr.reshape(-1)[0]) not in wanted:
            return False
        tensor.CopyFrom(numpy_helper.from_array(np.full(arr.shape, wanted[float(arr.reshape(-1)[0])], np.float64),
                                                tensor.name))
        return True

    def walk(graph):
        nonlocal count
        for init in graph.initializer:
            if init.name not in keep:
                count += fix(init)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.HasField("t"):
                    count += fix(attr.t)
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.HasField("t"):
                    count += fix(attr.t)
    return count


__all__ = ["model_tensor_names", "python_floats", "restore_float64_scalars"]
