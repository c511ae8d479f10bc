"""optimize(model, backend="onnxruntime"): run the exported graph in an onnxruntime session.

The model is exported (wavefront.export_onnx) on its first call for that call's fixed shapes
(batch, and the sizes other than the length, which stays dynamic), cached on disk under
$WAVEFRONT_CACHE_DIR/onnx (default ~/.cache/wavefront/onnx) by a hash of the weights, the
shapes, the options and the versions, so a later process opens the session without exporting.
Sessions ask for ["CUDAExecutionProvider", "CPUExecutionProvider"] and record what they got
(onnxruntime falls back to the CPU silently; explain() shows the truth). Inputs and outputs go
through IOBinding: CUDA tensors are bound by pointer and stay on the device.

Segment models run their whole segments in the graph; a shorter last segment runs in the torch
executor, continuing from the memory the graph returned.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def available() -> tuple[bool, str]:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        return False, f"{e.name} is not installed (pip install 'wavefront[onnx]', or [gpu] on a CUDA machine)"
    return True, ""


def _cache_dir() -> str:
    from .disk_cache import cache_root
    path = os.path.join(cache_root(), "onnx")
    os.makedirs(path, exist_ok=True)
    return path


def open_session(path: str, providers, strict: bool = True):
    """An onnxruntime InferenceSession asking for `providers`. onnxruntime drops a provider it
    lacks without a word: strict=True raises then, with what it got; strict=False asks only for
    the available ones (the caller reports what it got)."""
    import onnxruntime as ort
    providers = list(providers)
    wanted = providers if strict else ([p for p in providers if p in ort.get_available_providers()]
                                        or ["CPUExecutionProvider"])
    session = ort.InferenceSession(path, providers=wanted)
    missing = [p for p in providers if p not in session.get_providers()]
    if strict and missing:
        raise RuntimeError(f"onnxruntime did not give the providers {missing} (it gave {session.get_providers()})")
    return session


def model_key(model: nn.Module, *parts) -> str:
    """A hash of the model's class, weights and buffers and of `parts` (shapes, options, versions)."""
    import onnxruntime

    import wavefront
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr((parts, wavefront.__version__, torch.__version__, onnxruntime.__version__)).encode())
    return h.hexdigest()[:24]


class Session:
    """One onnxruntime session over IOBinding, with the providers it really got."""

    def __init__(self, path: str, providers=PROVIDERS):
        self.session = open_session(path, providers, strict=False)
        self.providers = self.session.get_providers()
        self.requested = list(providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        keep = []
        for name, t in zip(self.inputs, tensors):
            t = t.contiguous()
            if t.is_cuda and self.device == "cuda":  # by pointer: no copy off the device
                keep.append(t)
                binding.bind_input(name, "cuda", t.device.index or 0, _np_dtype(t.dtype), list(t.shape), t.data_ptr())
            else:
                binding.bind_cpu_input(name, t.detach().cpu().numpy())
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outs = [torch.from_numpy(o.numpy()) for o in binding.get_outputs()]
        # (on CUDA the outputs are copied to the host here: the from-device hand-over is untested without a GPU)
        return outs if self.device == "cpu" else [o.cuda() for o in outs]

    def describe(self) -> str:
        fallback = "CUDAExecutionProvider" in self.requested and "CUDAExecutionProvider" not in self.providers
        return f"onnxruntime providers: {', '.join(self.providers)}" + (
            " (CUDA was asked for and is not available: running on the CPU)" if fallback else "")


def _np_dtype(dtype: torch.dtype):
    import numpy as np
    return {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.bool: np.bool_,
            torch.float16: np.float16, torch.int32: np.int32}[dtype]


class OnnxRuntimeModel(nn.Module):
    """A model optimized by wavefront, run by onnxruntime; the same forward and outputs as
    `optimized` (logits for language models, tensors otherwise)."""

    def __init__(self, optimized: nn.Module, providers=PROVIDERS, kwargs: dict | None = None, verify: bool = False):
        super().__init__()
        self.verify = verify
        ok, why = available()
        if not ok:
            raise RuntimeError(f"backend='onnxruntime' needs onnxruntime: {why}")
        self.optimized, self.providers, self.kwargs = optimized, tuple(providers), dict(kwargs or {})
        self.sessions: dict = {}
        self.last_session: Session | None = None
        self.export_time_s: float | None = None

    @property
    def is_segments(self) -> bool:
        from wavefront.api import OptimizedModel
        return isinstance(self.optimized, OptimizedModel)

    def _session(self, example: tuple, shape_key) -> Session:
        if shape_key not in self.sessions:
            import time

            from wavefront.export import export_onnx
            path = os.path.join(_cache_dir(), model_key(self.optimized, shape_key, sorted(self.kwargs.items())) + ".onnx")
            if not os.path.exists(path):
                t0 = time.perf_counter()
                export_onnx(self.optimized, example, path + ".tmp", kwargs=self.kwargs)
                os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a graph in the cache
                self.export_time_s = time.perf_counter() - t0
            self.sessions[shape_key] = Session(path, self.providers)
        self.last_session = self.sessions[shape_key]
        return self.last_session

    def forward(self, *args, **kwargs):
        out = self._segments(*args, **kwargs) if self.is_segments else self._tensors(*args, **kwargs)
        if self.verify:  # the first call against the torch backend (itself exact against the model)
            from wavefront.verification import check_outputs
            with torch.no_grad():
                ref = self.optimized(*args, **{**self.kwargs, **kwargs})
            if self.is_segments:
                out_t, ref_t = [out.logits, *out.memory.tensors], [ref.logits, *ref.memory.tensors]
            else:
                out_t, ref_t = out, ref.logits if hasattr(ref, "logits") else ref
            check_outputs(out_t, ref_t, "onnxruntime (vs the torch backend)", rtol=1e-4)
            self.verify = False
        return out

    def _tensors(self, *args, **kwargs):
        if kwargs:
            raise TypeError(f"pass keyword arguments when optimizing (optimize(..., kwargs=...)), got {sorted(kwargs)}")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        key = ("loops", tuple((tuple(t.shape[:1]) + tuple(t.shape[2:]), t.dtype) for t in tensors))
        outs = self._session(args, key).run(*tensors)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _segments(self, input_ids: torch.Tensor, memory=None):
        from wavefront.backends.diagonal_program import stacked_memory, unstacked_memory
        from wavefront.models.segment import MemoryState, SegmentLMOutput, check_input_ids
        check_input_ids(input_ids)
        rg, opt = self.optimized.rg, self.optimized
        seg, L = rg.segment_len, rg.n_layers
        B, T = input_ids.shape
        whole = (T // seg) * seg
        dtype = next(rg.cell.parameters()).dtype
        if memory is None:
            memory = MemoryState(rg.initial_state(B, dtype, input_ids.device), 0)
        pieces = []
        if whole:
            session = self._session((input_ids[:, :seg],), ("segments", B, dtype))
            A, z = stacked_memory(memory.tensors, L)
            logits, A2, z2 = session.run(input_ids[:, :whole].reshape(B, -1, seg), A, z,
                                         torch.tensor(memory.segments_seen == 0))
            pieces.append(logits)
            memory = MemoryState(unstacked_memory(A2, z2), memory.segments_seen + whole // seg)
        if whole < T:  # the shorter last segment: torch, from the graph's memory
            tail = opt(input_ids[:, whole:], memory)
            pieces.append(tail.logits)
            memory = tail.memory
        return SegmentLMOutput(torch.cat(pieces, dim=1), memory)

    def describe(self) -> str:
        if self.last_session is None:
            return "onnxruntime: no session yet (the graph is exported on the first call)"
        return self.last_session.describe()


__all__ = ["OnnxRuntimeModel", "Session", "available", "model_key", "open_session"]
