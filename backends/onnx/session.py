"""The one onnxruntime session class every wavefront graph runs in (IOBinding, the providers it
really got), and the checks that make a session refuse what torch refuses."""
from __future__ import annotations

import torch
from torch import nn

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def open_session(path: str, providers, strict: bool = True):
    """An onnxruntime InferenceSession asking for `providers`. onnxruntime drops a provider it
    lacks without a word: strict=True raises then, with what it got; strict=False asks only for
    the available ones (the caller reports what it got)."""
    import onnxruntime as ort
    providers = list(providers)
    wanted = providers if strict else ([p for p in providers if p in ort.get_available_providers()]
                                        or ["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the note that inputs with defaults are initializers is by design
    session = ort.InferenceSession(path, options, providers=wanted)
    missing = [p for p in providers if p not in session.get_providers()]
    if strict and missing:
        raise RuntimeError(f"onnxruntime did not give the providers {missing} (it gave {session.get_providers()})")
    return session


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding: get_input_embeddings() (Hugging Face), else its first
    nn.Embedding.

    >>> input_embedding(nn.Sequential(nn.Embedding(7, 2), nn.Linear(2, 2))).num_embeddings
    7
    """
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int | None) -> None:
    """Refuse ids outside [0, vocab_size) as torch's embedding does (an ONNX Gather would wrap a
    negative id around instead).

    >>> check_token_ids(torch.tensor([[0, 49]]), 50)
    >>> check_token_ids(torch.tensor([[-3]]), 50)
    Traceback (most recent call last):
    ...
    IndexError: index out of range in self: token ids must lie in [0, 50) (the model's vocabulary), got ids from -3 to -3
    """
    if vocab_size is None or input_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        raise IndexError(f"index out of range in self: token ids must lie in [0, {vocab_size}) (the model's "
                         f"vocabulary), got ids from {lo} to {hi}")


class Session:
    """One onnxruntime session over IOBinding, with the providers it really got."""

    def __init__(self, path: str, providers=PROVIDERS, strict: bool = False):
        self.session = open_session(path, providers, strict=strict)
        self.providers = self.session.get_providers()
        self.requested = list(providers)
        # inputs with a default (an initializer of the same name) come after the required ones
        self.defaults = {i.name for i in self.session.get_overridable_initializers()}
        self.inputs = [i.name for i in self.session.get_inputs()] + sorted(self.defaults)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"

    def run(self, *tensors: torch.Tensor, names=None) -> list[torch.Tensor]:
        """The outputs for `tensors`, bound to `names` (default: the inputs in order)."""
        names = self.inputs if names is None else names
        if self.defaults.intersection(names):  # IOBinding cannot bind inputs that have defaults: run() can
            feed = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}
            outs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
            return outs if self.device == "cpu" else [o.cuda() for o in outs]
        binding = self.session.io_binding()
        keep = []
        for name, t in zip(names, tensors):
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


__all__ = ["PROVIDERS", "Session", "check_token_ids", "input_embedding", "open_session"]
