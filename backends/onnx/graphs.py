"""The ONNX side of every export: torch.export -> torch.onnx, metadata, the check in onnxruntime."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from wavefront.backends.onnx.float_scalars import (
    model_tensor_names,
    python_floats,
    restore_float64_scalars,
)
from wavefront.backends.onnx.session import open_session

from wavefront.contract.checks import VERIFY_RTOL, rel_err
from wavefront.contract.version import __version__


class ExportError(RuntimeError):
    """The model (or a part of it) cannot be exported as asked; the message names the part."""


class LoopExportError(RuntimeError):
    """A time loop that cannot run as a scan was met while exporting: it would be unrolled."""


def to_onnx(module: nn.Module, args: tuple, dynamic_shapes):
    """torch.export (non-strict: our Python runs, with symbolic sizes) then torch.onnx -> the
    onnx.ModelProto (float_scalars.py mends its float64 constants); a LoopExportError inside is
    reported as itself, not as the exporter's generic failure."""
    torch._dynamo.reset()  # repeated exports in one process otherwise interfere
    try:
        with torch.no_grad():
            exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            proto = torch.onnx.export(exported, dynamo=True, verbose=False).model_proto
        # a float64 graph's epsilons kept float64; the model's own tensors as they are
        restore_float64_scalars(proto, python_floats(exported), keep=model_tensor_names(exported))
        return proto
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, LoopExportError):
            cause = cause.__cause__ or cause.__context__
        raise ExportError(str(cause) if cause is not None else f"export failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def save_with_metadata(proto, path: str, meta: dict) -> None:
    """Add wavefront's version and `meta` to the graph's metadata_props, check it, save it."""
    import onnx
    for k, v in {"wavefront.version": __version__, **meta}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def save_model_graph(proto, path: str, meta: dict, model, dtype: torch.dtype) -> torch.dtype:
    """save_with_metadata for a language model's graph: the vocabulary size (lets a session refuse
    ids outside it, as torch does) and the precision the graph is checked at join `meta`;
    returns that precision (working_precision)."""
    from wavefront.backends.onnx.session import input_embedding
    embedding = input_embedding(model)
    if embedding is not None:
        meta["wavefront.vocab_size"] = str(embedding.num_embeddings)
    precision, why = working_precision(proto, dtype)
    if why:
        meta["wavefront.checked_at"] = f"{precision}: {why}"
    save_with_metadata(proto, path, meta)
    return precision


def example_ids(example: torch.Tensor, batch: int, tokens: int, device) -> torch.Tensor:
    """[batch, tokens] int64 ids drawn cyclically from an example's (valid ids: the trace and the
    checks need sizes it did not see, and ids the model takes).

    >>> example_ids(torch.tensor([[3, 4]]), 2, 3, "cpu").tolist()
    [[3, 4, 3], [4, 3, 4]]
    """
    flat = example.reshape(-1)
    return flat[torch.arange(batch * tokens, device=flat.device) % flat.numel()].reshape(batch, tokens).long().to(device)


def check_in_onnxruntime(path: str, example_inputs: tuple, expected, got=None, precision=None) -> None:
    """Compare the graph's outputs with `expected` at the tolerance of their dtype, or of
    `precision` (working_precision: the coarsest dtype the model itself computes in)."""
    got = run_onnx(path, example_inputs) if got is None else got
    want = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    for k, (g, w) in enumerate(zip(got, want)):
        err, tol = rel_err(g, w), max(VERIFY_RTOL.get(w.dtype, 1e-4), VERIFY_RTOL.get(precision, 0.0))
        if err > tol:
            raise ExportError(f"the exported graph differs from the eager model on the example inputs: output {k} "
                              f"relative error {err:.3e} > {tol:.0e}")


_COARSER = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}  # ONNX element types below float64


def working_precision(proto, dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """(the coarsest float dtype the graph computes in, why) for a graph of a `dtype` model: a
    float64 model whose own code casts float64 values to float32 (transformers' rotary embeddings
    compute cos/sin in float32) is exact only to float32 rounding there, and onnxruntime's float32
    cos differs from torch's by an ulp, so such a graph is checked at float32's tolerance. Only
    casts of float64 values count (a bool mask made float32 rounds nothing); a cast whose input
    type shape inference cannot tell is not counted, so the check stays strict."""
    import onnx
    casts = []

    def walk(graph, types):
        types = dict(types)
        for v in [*graph.input, *graph.value_info, *graph.output]:
            types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type
        for node in graph.node:
            if node.op_type == "Cast":
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if to in _COARSER and types.get(node.input[0]) == onnx.TensorProto.DOUBLE:
                    casts.append(_COARSER[to])
            for a in node.attribute:
                if a.g.node:
                    walk(a.g, types)
    if dtype == torch.float64:
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # no types to tell casts of float64 apart: count none, the check stays strict
            inferred = proto
        walk(inferred.graph, {})
    if not casts:
        return dtype, ""
    coarsest = max(casts, key=lambda d: VERIFY_RTOL.get(d, 0.0))
    return coarsest, (f"the model computes part of its math in {str(coarsest).split('.')[-1]} ({len(casts)} casts of "
                      "float64 values to it in the graph): checked at that precision's tolerance")


def run_onnx(path: str, inputs, providers=("CPUExecutionProvider",)) -> list[torch.Tensor]:
    """Run an exported graph in onnxruntime; returns its outputs as tensors.

    The session's providers are checked: asking for CUDAExecutionProvider on a machine without
    it raises instead of silently running on the CPU.
    """
    session = open_session(path, providers)
    names = [i.name for i in session.get_inputs()]
    tensors = [x for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,)) if isinstance(x, torch.Tensor)]
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, tensors)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


__all__ = ["ExportError", "check_in_onnxruntime", "example_ids", "run_onnx", "save_with_metadata", "to_onnx", "working_precision"]
