"""optimize(model, backend="onnxruntime"): run the exported graph in an onnxruntime session.

The model is exported (wavefront.export_onnx) on its first call: a segment model once per dtype
(its graph takes every batch and length), another model for that call's fixed shapes (batch,
and the sizes other than the length, which stays dynamic) and non-tensor arguments,
and cached on disk under $WAVEFRONT_CACHE_DIR/onnx (default ~/.cache/wavefront/onnx, checked
before use by backends.disk_cache) by model_key: a hash of everything that enters the graph
(weights, buffers, every module's class and plain attributes, a Hugging Face config), the
shapes, the options and the versions, so a later process opens the session without exporting.
Every call checks, cheaply, that the model's parameters and buffers are the ones the sessions
were built for (object, storage, version counter): after an optimizer step, an in-place change
or load_state_dict the graph is exported again (or found on disk) for the new weights. Writes
through `p.data` bypass the version counter: call refresh() after them.
Sessions ask for ["CUDAExecutionProvider", "CPUExecutionProvider"] and record what they got
(onnxruntime falls back to the CPU silently; explain() shows the truth). Inputs and outputs go
through IOBinding: CUDA tensors are bound by pointer and stay on the device. Inputs are
checked as the torch backend checks them (token ids in the vocabulary, memory of the right
shape and dtype) before onnxruntime sees them.

Segment models run in one graph for every batch and length (backends/onnx/segments.py): the
whole segments under the diagonal schedule, a shorter last segment too, all in onnxruntime;
generate() decodes in a second graph, the decode step (backends/onnx/decode_graph.py: a token
with the current segment's key/value cache), each exported once per dtype.
"""
from __future__ import annotations

import itertools
import os
import threading
import time

import torch

from wavefront.backends.disk_cache import cache_dir, cached_entry
from wavefront.backends.onnx.decode_session import OnnxDecodeSession
from wavefront.backends.onnx.graphs import ExportError
from wavefront.backends.onnx.model_key import (
    content_digest,
    content_key,
    parameter_fingerprint,
    plain_text,
)
from wavefront.backends.onnx.segments import OnnxSegmentSession
from wavefront.backends.onnx.session import (
    PROVIDERS,
    Session,
    check_token_ids,
    input_embedding,
)
from wavefront.contract.segment import (
    check_input_ids,
    check_memory,
    with_hf_conventions,
)
from wavefront.generation import segment_generate
from wavefront.reoptimize import reoptimize
from wavefront.routes.base import Optimized
from wavefront.routes.explanation import Explanation
from wavefront.scheduler.capture_guard import CaptureGuard
from wavefront.stages import Stage

# torch.export and torch._dynamo.reset() are process-wide: two models exporting in two threads
# take turns (one model's threads already do, on its own lock)
_EXPORT_LOCK = threading.Lock()


def available() -> tuple[bool, str]:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        return False, f"{e.name} is not installed (pip install 'wavefront[onnx]', or [gpu] on a CUDA machine)"
    return True, ""


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_plain(v) for v in value)


class OnnxRuntimeModel(Optimized):
    """A model optimized by wavefront, run by onnxruntime; the same forward and outputs as
    `optimized` (logits for language models, tensors otherwise).

    Each call compares the model's parameters and buffers with those its sessions were built for
    (parameter_fingerprint): an optimizer step, an in-place change, load_state_dict (copying or
    assign=True) or model.to(...) makes the next call export again, or open the graph the disk
    cache holds for the new weights. Writes through `p.data` (`p.data.copy_(...)`) bypass the
    version counter and are not seen: call refresh() after them. Threads may share the model:
    its first export happens once, the others wait for it.
    """

    route = "onnxruntime"
    precision = torch.float32  # onnxruntime fuses and reorders float ops: float32 rounding at best

    def __init__(self, optimized: Optimized, options: dict, providers=PROVIDERS, kwargs: dict | None = None,
                 verify: bool = False):
        """`optimized`: what the torch route made of the model (its exports are this model's graphs)."""
        super().__init__(optimized.model, options, verify)
        # the user's model is registered once, inside `optimized` (no second set of state_dict keys)
        object.__setattr__(self, "model", self._modules.pop("model"))
        ok, why = available()
        if not ok:
            raise RuntimeError(f"backend='onnxruntime' needs onnxruntime: {why}")
        self.optimized, self.providers, self.kwargs = optimized, tuple(providers), dict(kwargs or {})
        self.sessions: dict = {}
        self.last_session: Session | None = None
        self.export_time_s: float | None = None
        self.exports = 0  # graphs exported by this model (not found in the disk cache)
        self._lock = threading.Lock()
        self._seen: tuple | None = None  # parameter_fingerprint the sessions were built for
        self._pinned: list = []  # its tensors, held so that their ids cannot be reused by new ones
        self._content: str | None = None  # content_digest of those weights, computed when first needed
        self._vocab: int | None = None
        self._guard = None  # a CaptureGuard of the user's model, made on the first call
        self._decode_refused: dict = {}  # dtype -> why the decode step does not export (generate then reruns)

    @property
    def decode_reason(self) -> str:
        """Why generate() runs each token's current segment in the segment graph instead of the
        decode-step graph ("" when the decode graph is used, or not tried yet)."""
        return "; ".join(f"{dtype}: {why}" for dtype, why in self._decode_refused.items())

    @property
    def is_segments(self) -> bool:
        return self.optimized.export_kind() == "segments"

    def refresh(self) -> None:
        """Forget the sessions: the next call keys the graph by the weights' content again. Needed
        only after writes that bypass version counters (`p.data.copy_(...)`)."""
        with self._lock:
            self._seen, self._pinned, self.sessions, self._content, self._decode_refused = None, [], {}, None, {}

    def _follow_the_model(self) -> None:
        """Drop the sessions when the model changed: its tensors' values (fingerprint, then content),
        or anything a CaptureGuard watches (tensors or modules replaced, settings such as an eps,
        layers added). A replaced or reconfigured model is optimized again first, so that nothing
        captured from the old one is exported."""
        with self._lock:
            seen = parameter_fingerprint(self.optimized)
            why = self._guard.changed() if self._guard is not None else "first call"
            if seen == self._seen and not why:
                return
            if self._guard is not None and not why and self._content is not None:
                content = content_digest(self.model)  # storage moved (p.data = ..., restacked), values maybe not
                if content == self._content:
                    self._seen = seen
                    self._pinned = list(itertools.chain(self.optimized.parameters(), self.optimized.buffers()))
                    return
            if self._guard is not None and why:
                self.optimized = reoptimize(self.model, {**self.optimized.options, "backend": "torch"})
            self.sessions, self._content, self._decode_refused = {}, None, {}
            emb = input_embedding(self.model)
            self._vocab = emb.num_embeddings if emb is not None else None
            self._seen = parameter_fingerprint(self.optimized)
            self._pinned = list(itertools.chain(self.optimized.parameters(), self.optimized.buffers()))
            bound = getattr(self.optimized, "bound", None)
            self._guard = CaptureGuard(self.model, volatile=getattr(bound, "volatile", frozenset()))

    def _session(self, example: tuple, shape_key) -> Session:
        with self._lock:
            session = self.sessions.get(shape_key)
            if session is None:
                if self._content is None:
                    self._content = content_digest(self.model)
                key = content_key(self._content, type(self.optimized).__qualname__,
                           getattr(self.optimized, "schedule_kind", None), shape_key, sorted(self.kwargs.items()))

                decode = shape_key[0] == "decode step"

                def export_to(tmp):
                    with _EXPORT_LOCK:
                        self.optimized.export_onnx(example, tmp, kwargs=self.kwargs, decode=decode)
                t0 = time.perf_counter()
                entry = cached_entry(os.path.join(cache_dir("onnx"), key + ".onnx"), key, export_to)
                if entry.built:
                    self.export_time_s, self.exports = time.perf_counter() - t0, self.exports + 1
                make = {"segment graph": OnnxSegmentSession, "decode step": OnnxDecodeSession}.get(shape_key[0], Session)
                session = self.sessions[shape_key] = make(entry.path, self.providers, strict=False)
            self.last_session = session
            return session

    def before_call(self) -> None:
        self._follow_the_model()

    def run(self, *args, **kwargs):
        if self.is_segments:  # the segment call with Hugging Face's conventions (labels, attention_mask)
            return with_hf_conventions(self._segments, *args, **kwargs)
        return self._tensors(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.LongTensor:
        """A segment model: wavefront/generation.py with every call in onnxruntime: the prefill in
        the segment graph, then each token in the decode-step graph (one token with the current
        segment's key/value cache), or, for a model whose decode step does not export (the reason
        is in `decode_reason`), each token's current segment whole in the segment graph. Another
        model: the torch route's generate (the exported graphs hold no cache)."""
        if not self.is_segments:
            return self.optimized.generate(input_ids, **kwargs)
        kwargs.setdefault("generation_config", self.generation_config)
        self.before_call()
        check_input_ids(input_ids)
        dtype = next(self.optimized.rg.cell.parameters()).dtype
        decoder = self._decode_session(input_ids, dtype)
        return segment_generate(self, self.optimized.rg.segment_len, input_ids, cached=decoder, dtype=dtype, **kwargs)

    def _decode_session(self, input_ids, dtype):
        """The decode-step graph's session for `dtype` (exported once per dtype), or None with
        `decode_reason` saying why it does not export."""
        if self._decode_refused.get(dtype):
            return None
        try:
            return self._session((input_ids.long(),), ("decode step", dtype))
        except ExportError as e:
            self._decode_refused[dtype] = str(e)
            return None

    def reference(self, *args, **kwargs):
        if self.is_segments:
            return self.optimized.reference(*args, **kwargs)
        return self.model(*args, **{**self.kwargs, **kwargs})

    def compared(self, out, ref):
        if self.is_segments:
            return self.optimized.compared(out, ref)
        return out, ref.logits if hasattr(ref, "logits") else ref

    def describe_route(self) -> str:
        return "onnxruntime"

    def rewrites(self) -> list[str]:
        return self.optimized.rewrites()

    def export_kind(self) -> str:
        return self.optimized.export_kind()

    def _export(self, example_inputs: tuple, path: str, **how):
        return self.optimized._export(example_inputs, path, **how)

    def explain(self, n_segments: int | None = None) -> Explanation:
        e = self.optimized.explain(n_segments)
        e.backend = "onnxruntime; " + self.describe()
        return e

    def stages(self) -> list[Stage]:
        log = self.optimized.stages()
        if self.last_session is not None:
            log.append(Stage("onnx export", self.last_session, self.export_time_s or 0.0, self.describe()))
        return log

    def _tensors(self, *args, **kwargs):
        if kwargs:
            raise TypeError(f"pass keyword arguments when optimizing (optimize(..., kwargs=...)), got {sorted(kwargs)}")
        signature = []  # the graph holds each non-tensor argument as a constant: part of its key
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                signature.append(("tensor", tuple(a.shape[:1]) + tuple(a.shape[2:]), a.dtype))
            elif _is_plain(a):
                signature.append(("value", plain_text(a)))
            else:
                raise TypeError(f"argument {i} is a {type(a).__name__}: backend='onnxruntime' takes tensors and plain "
                                "values (numbers, strings, None, tuples of them); run this call with backend='torch'")
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point() \
                and callable(getattr(self.model, "get_input_embeddings", None)):
            check_token_ids(args[0], self._vocab)  # a language model's input_ids
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        outs = self._session(args, ("loops", tuple(signature))).run(*tensors)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _segments(self, input_ids: torch.Tensor, memory=None):
        check_input_ids(input_ids)  # the torch backend's checks and messages, before onnxruntime sees anything
        rg = self.optimized.rg
        weight = next(rg.cell.parameters())
        dtype, device = weight.dtype, weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}: move one of them")
        check_token_ids(input_ids, self._vocab)
        if memory is not None:
            check_memory(memory, rg.initial_state(input_ids.shape[0], dtype, device))
        # one graph for every batch and length (a short last segment included), exported once per dtype
        # and checked on (a piece of) this call's input
        session = self._session((input_ids[:, :3 * rg.segment_len].long(),), ("segment graph", dtype))
        return session(input_ids.long(), memory)

    def describe(self) -> str:
        if self.last_session is None:
            return "onnxruntime: no session yet (the graph is exported on the first call)"
        return self.last_session.describe()


def build(torch_model: Optimized, options: dict, verify: bool, kwargs: dict | None = None) -> OnnxRuntimeModel:
    """backend="onnxruntime": the torch route's result, exported and run by onnxruntime sessions."""
    return OnnxRuntimeModel(torch_model, options, kwargs=kwargs, verify=verify)


__all__ = ["OnnxRuntimeModel", "available", "build"]
