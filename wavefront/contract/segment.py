"""The segment-recurrent language model contract shared by every model family.

A model owns a *segment cell*: forward(input_ids, first, state) -> (logits, new_state), one
segment through all layers, with the recurrent memory as explicit tensors. The model's own
forward runs that cell segment by segment: the sequential reference every schedule must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map


@dataclass(frozen=True)
class MemoryState:
    """Recurrent memory carried between calls: the cell's state and how many segments have been
    processed (0 means fresh: the next segment is each layer's first). `tensors` is the tuple the
    cell returned (as_memory_tensors: a tuple, or a dict); its items are tensors or nested tuples /
    lists / dicts of them (one entry per layer, say); `leaves()` flattens it.

    >>> MemoryState(((torch.zeros(2), torch.ones(1)),), 1).leaves()
    (tensor([0., 0.]), tensor([1.]))
    """

    tensors: tuple
    segments_seen: int = 0

    def leaves(self) -> tuple[torch.Tensor, ...]:
        return tuple(tree_flatten(self.tensors)[0])

    def detach(self) -> "MemoryState":
        return MemoryState(tree_map(lambda t: t.detach(), self.tensors), self.segments_seen)


def as_memory_tensors(state):
    """A cell's state as MemoryState.tensors holds it: a tuple for a tuple or list, any other
    structure (a dict of per-layer states) as it is."""
    return tuple(state) if isinstance(state, (tuple, list)) else state


@dataclass
class SegmentLMOutput:
    """logits [batch, tokens, vocab] (memory rows dropped), the memory after the last segment and,
    when labels were given, the loss (causal_lm_loss)."""

    logits: torch.Tensor
    memory: MemoryState
    loss: torch.Tensor | None = None


IGNORE_INDEX = -100  # labels not counted in the loss, as transformers and torch's cross_entropy take them


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: the cross-entropy of each position's logits against the next
    token's label, in float32 at least, averaged over the labels that are not IGNORE_INDEX.

    >>> logits = torch.zeros(1, 3, 4); labels = torch.tensor([[0, 1, -100]])
    >>> round(causal_lm_loss(logits, labels).item(), 4)  # one counted label, uniform logits: log 4
    1.3863
    """
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]) \
            or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of the input's shape {tuple(logits.shape[:2])} (token "
                         f"ids, {IGNORE_INDEX} where not counted), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.nn.functional.cross_entropy(wide.reshape(-1, wide.shape[-1]), shifted.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def with_hf_conventions(run, input_ids, memory=None, labels=None, attention_mask=None) -> SegmentLMOutput:
    """`run(input_ids, memory)` (a segment model's call) with Hugging Face's conventions: an
    attention mask of ones accepted and padding refused (check_attention_mask), and with `labels`
    the causal-LM loss (causal_lm_loss) in the output's `loss`."""
    if isinstance(input_ids, torch.Tensor):
        check_attention_mask(attention_mask, input_ids)
    out = run(input_ids, memory)
    if labels is not None:
        out = SegmentLMOutput(out.logits, out.memory, causal_lm_loss(out.logits, labels))
    return out


def check_attention_mask(attention_mask, input_ids) -> None:
    """An attention mask of ones is accepted (it changes nothing); padding is refused with the reason."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    if not bool((attention_mask == 1).all()):
        raise ValueError("attention_mask has zeros (padding): a segment model cuts every row into the same "
                         "segments at the same offsets, so a padded row would not be computed as it is alone. "
                         "Pass rows of equal length (or one row per call) with no attention_mask")


class SegmentCell(nn.Module):
    """Base of a recurrent cell: subclasses define `layers` (nn.ModuleList), `initial_state` and
    forward(input_ids, first, state) -> (logits, tuple(new_state))."""

    layers: nn.ModuleList

    def initial_state(self, batch: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def check_input_ids(input_ids) -> None:
    """Reject input a segment-recurrent LM cannot process, saying what to do instead."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids (e.g. torch.long), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, tokens], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): pass at least one token per row")


def segment_bounds(n_tokens: int, segment_len: int) -> list[tuple[int, int]]:
    """[start, end) of each segment; the last one may be shorter.

    >>> segment_bounds(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(s, min(s + segment_len, n_tokens)) for s in range(0, n_tokens, segment_len)]


def check_memory(memory: MemoryState, expected) -> None:
    """The memory passed in must look like the model's own fresh memory for this input
    (`expected`: that memory's state, any nesting; compared leaf by leaf)."""
    if not isinstance(memory, MemoryState):
        raise TypeError(f"memory must be the MemoryState a previous call returned, got {type(memory).__name__}")
    got_leaves, expected = memory.leaves(), tuple(tree_flatten(expected)[0])
    if not all(isinstance(t, torch.Tensor) for t in got_leaves):
        raise TypeError("memory holds something that is not a tensor: pass the memory returned by this same model")
    if len(got_leaves) != len(expected):
        raise ValueError(f"memory holds {len(got_leaves)} tensors but this model carries {len(expected)}: "
                         "pass the memory returned by this same model")
    for i, (got, want) in enumerate(zip(got_leaves, expected)):
        if got.shape != want.shape:
            raise ValueError(f"memory tensor {i} has shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                             "(a different batch size than the call that produced it?)")
        if got.dtype != want.dtype or got.device != want.device:
            raise ValueError(f"memory tensor {i} is {got.dtype} on {got.device}, the model runs "
                             f"{want.dtype} on {want.device}: move it with the model")


class SegmentRecurrentLM(nn.Module):
    """A language model that cuts its input into segments and runs its cell over them in order.

    forward(input_ids, memory=None) -> SegmentLMOutput. Pass `memory=out.memory` to continue a
    stream: feeding pieces whose lengths are multiples of `segment_len` (any length for the
    last piece) gives the same result as one call on the whole input.
    """

    def __init__(self, cell: SegmentCell, segment_len: int):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        self.cell = cell
        self.segment_len = segment_len

    @property
    def n_layers(self) -> int:
        return len(self.cell.layers)

    def _param_dtype_device(self):
        p = next(self.parameters())
        return p.dtype, p.device

    def initial_memory(self, batch: int) -> MemoryState:
        dtype, device = self._param_dtype_device()
        return MemoryState(as_memory_tensors(self.cell.initial_state(batch, dtype, device)), 0)

    def prepare(self, input_ids, memory: MemoryState | None) -> MemoryState:
        """Validate a call's inputs; return the memory to start from."""
        check_input_ids(input_ids)
        dtype, device = self._param_dtype_device()
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}: move one of them")
        fresh = self.initial_memory(input_ids.shape[0])
        if memory is None:
            return fresh
        check_memory(memory, fresh.tensors)
        return memory

    def forward(self, input_ids: torch.Tensor, memory: MemoryState | None = None, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> SegmentLMOutput:
        """Logits and memory, and the loss (causal_lm_loss) when `labels` are given; an
        `attention_mask` of ones is accepted, padding refused."""
        check_input_ids(input_ids)
        return with_hf_conventions(self._segments, input_ids, memory, labels, attention_mask)

    def _segments(self, input_ids: torch.Tensor, memory: MemoryState | None) -> SegmentLMOutput:
        memory = self.prepare(input_ids, memory)
        state, seen = memory.tensors, memory.segments_seen
        logits = []
        for start, end in segment_bounds(input_ids.shape[1], self.segment_len):
            first = torch.tensor(seen == 0, device=input_ids.device)
            seg_logits, state = self.cell(input_ids[:, start:end], first, state)
            logits.append(seg_logits)
            seen += 1
        return SegmentLMOutput(torch.cat(logits, dim=1), MemoryState(as_memory_tensors(state), seen))
