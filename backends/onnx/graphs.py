"""The ONNX side of every export: torch.export -> torch.onnx, metadata, the check in onnxruntime."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from wavefront.backends.onnx.session import open_session

from wavefront.contract.checks import VERIFY_RTOL, rel_err
from wavefront.contract.version import __version__


class ExportError(RuntimeError):
    """The model (or a part of it) cannot be exported as asked; the message names the part."""


class LoopExportError(RuntimeError):
    """A time loop that cannot run as a scan was met while exporting: it would be unrolled."""


def to_onnx(module: nn.Module, args: tuple, dynamic_shapes):
    """torch.export (non-strict: our Python runs, with symbolic sizes) then torch.onnx; a
    LoopExportError inside is reported as itself, not as the exporter's generic failure."""
    torch._dynamo.reset()  # repeated exports in one process otherwise interfere
    try:
        with torch.no_grad():
            exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            return torch.onnx.export(exported, dynamo=True, verbose=False)
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


def check_in_onnxruntime(path: str, example_inputs: tuple, expected, got=None) -> None:
    got = run_onnx(path, example_inputs) if got is None else got
    want = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    for k, (g, w) in enumerate(zip(got, want)):
        err, tol = rel_err(g, w), VERIFY_RTOL.get(w.dtype, 1e-4)
        if err > tol:
            raise ExportError(f"the exported graph differs from the eager model on the example inputs: output {k} "
                              f"relative error {err:.3e} > {tol:.0e}")


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


__all__ = ["ExportError", "check_in_onnxruntime", "run_onnx", "save_with_metadata", "to_onnx"]
