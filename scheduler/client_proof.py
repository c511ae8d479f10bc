"""Prove, at optimize() time, that a cell an adapter built runs exactly what the client's code runs.

Adapters for foreign implementations (the public ARMT and RMT code) run the client's own modules
and, where they can, the client's own memory code, but the segment loop around them is the
adapter's. Before such a cell is used, prove_same_as_client runs the client's forward and the
cell's sequential loop on one small synthetic input (two batch rows, three segments, the last one
short) and compares every segment's logits; anything else raises AdapterRefused naming the first
segment that differs, so a variant of the client code the adapter does not follow is never run
silently. Memory parameters that may be all zero in a fresh model (the public ARMT zero-initialises
W_mv, making its memory a no-op that any memory rule would match) get random values for a second
run: each parameter's storage is swapped for the run and put back after (even on an error), its
values never written. (torch.func.functional_call was tried first: with the parameters reachable
under two names, as in the public code's wrapped layer list, it left the random values in place.)
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from wavefront.scheduler.bound_model import AdapterRefused
from wavefront.scheduler.train_mode import eval_mode

from wavefront.contract.checks import rel_err
from wavefront.contract.segment import SegmentRecurrentLM, segment_bounds

PROOF_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


_STRUCTURE = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def _client_state_kept(client: nn.Module):
    """The client's forward rewrites its modules' attributes (the public ARMT code's memory, flags
    and counters): everything but their structure is put back as it was after the proof, so a
    memory the user was carrying survives optimize()."""
    saved = [(m, {k: v for k, v in m.__dict__.items() if k not in _STRUCTURE}) for m in client.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in [k for k in m.__dict__ if k not in _STRUCTURE and k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)


@contextlib.contextmanager
def _swapped(params: list[torch.Tensor], values: list[torch.Tensor]):
    """Each parameter viewing `values` for the block; its own storage back after, even on error."""
    kept = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, k in zip(params, kept):
            p.data = k


def client_segment_len(model: nn.Module, what: str) -> int:
    """The segment length of a public-code wrapper (rmt_config['segment_size']), or AdapterRefused
    for what the adapters do not follow (no size, segments aligned other than from the left)."""
    seg = model.rmt_config.get("segment_size")
    if not isinstance(seg, int) or seg < 1:
        raise AdapterRefused(f"the {what} wrapper has no rmt_config['segment_size']: cannot tell the segment length")
    align = model.rmt_config.get("segment_alignment")
    if align not in (None, "left"):
        raise AdapterRefused(f"segment_alignment={align!r} is not supported (only left-aligned segments, the default)")
    return seg


def client_logits(client: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a public-code wrapper's own forward (an output with .logits, or the tensor)."""
    out = client(ids)
    return out.logits if hasattr(out, "logits") else out


def _random_like(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    scale = 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1
    return (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(dtype=p.dtype, device=p.device)


def prove_same_as_client(what: str, client: nn.Module, cell: nn.Module, segment_len: int, vocab: int,
                         randomize: dict[str, torch.Tensor] | None = None) -> None:
    """Raise AdapterRefused unless `cell` run segment by segment gives the logits of the client's
    own forward (client_logits); `randomize`: parameters ({name: tensor}) drawn at random for a
    second comparison."""
    p = next(client.parameters())
    g = torch.Generator().manual_seed(0)
    n = 2 * segment_len + (max(1, segment_len // 2) if segment_len > 1 else 1)
    ids = torch.randint(0, vocab, (2, n), generator=g).to(p.device)
    ours_lm = SegmentRecurrentLM(cell, segment_len)
    runs = [("its weights", [], [])]
    if randomize:
        params = list({id(t): t for t in randomize.values()}.values())
        runs.append(("random memory weights", params, [_random_like(t, g) for t in params]))
    with _client_state_kept(client), torch.no_grad(), eval_mode(list(client.modules()) + list(cell.modules())):
        for label, params, values in runs:
            with _swapped(params, values):
                try:
                    ref = client_logits(client, ids)
                except Exception as e:
                    raise AdapterRefused(f"{what}: the model's own forward failed on a synthetic input "
                                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}), so "
                                         "wavefront cannot compare with it") from e
                try:
                    ours = ours_lm(ids).logits
                except Exception as e:
                    raise AdapterRefused(f"{what}: wavefront's cell for it failed on a synthetic input "
                                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
            _compare(what, label, ref, ours, segment_len)


def _compare(what, label, ref, ours, segment_len):
    if not isinstance(ref, torch.Tensor) or ref.shape != ours.shape:
        raise AdapterRefused(f"{what}: the model's own forward returned logits of shape "
                             f"{tuple(getattr(ref, 'shape', ()))}, wavefront's cell {tuple(ours.shape)}")
    tol = PROOF_RTOL.get(ours.dtype, 1e-4)
    for s, (a, b) in enumerate(segment_bounds(ref.shape[1], segment_len)):
        err = rel_err(ours[:, a:b], ref[:, a:b])
        if err > tol:
            which = "the first segment" if s == 0 else f"segment {s} (after the memory was written)"
            raise AdapterRefused(f"{what}: with {label}, wavefront's reading of this code differs from the model's own "
                                 f"forward in {which}: relative error {err:.2e} > {tol:.0e}. The client code does "
                                 "something the adapter does not follow, so it runs as it is")
