"""Sequence-parallel scans (LASP-2 style): each rank of a process group holds a contiguous chunk of
time, in rank order, and gets exactly the single-process scan's values on its chunk.

Why it works: running h_t = a_t * h_{t-1} + b_t over rank r's chunk from a state h gives the affine
map h -> A_r * h + B_r, with A_r the product of a over the chunk and B_r the chunk's final state
from zero (for the matrix state S -> diag(P_r) S + S_r: P_r the chunk's decay product, S_r its
final state from zero). So the state entering rank r obeys the same recurrence over ranks,
H_{r+1} = A_r * H_r + B_r with H_0 = h0. Each rank (1) scans its chunk from zero for (A_r, B_r),
(2) gathers every rank's summary in one all_gather, (3) runs that W-step recurrence for H_r and
(4) rescans its chunk from H_r: the same arithmetic the single-process scan does on those steps
(no cumulative products of a, which underflow). Backward: the gather's backward is one all_reduce
of the gradients w.r.t. every summary, so each rank receives what the later ranks' losses send it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from wavefront.backends.scans.linear.dispatch import linear_scan as local_linear_scan
from wavefront.backends.scans.linear.dispatch import needs_grad
from wavefront.backends.scans.matrix.dispatch import matrix_scan as local_matrix_scan
from wavefront.backends.scans.shapes import check_h0, time_dim
from wavefront.distributed.process_group import position

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
# The header every rank sends with its summary: these fields, then the state's shape. Ranks compare
# them after the gather, so all raise the same error (a mismatch would otherwise garble the
# combine, or hang the backward on the ranks that wait for a collective the others never run).
FIELDS = ("scan", "dtype", "time dim", "initial state given", "initial state needs grad", "needs grad", "decay")
SCANS = ("linear_scan", "matrix_scan")
DECAYS = ("none", "scalar per step", "per key dim")
# torch 2.13 renamed all_gather_into_tensor (the old name warns); the project supports torch >= 2.4
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _header(scan, dtype, dim, init, grad, decay, state, device) -> torch.Tensor:
    code = DTYPES.index(dtype) if dtype in DTYPES else -1
    init_grad = init is not None and init.requires_grad and torch.is_grad_enabled()
    values = [scan, code, dim, init is not None, init_grad, grad, decay, *state]
    return torch.tensor([int(x) for x in values], dtype=torch.int64, device=device)


def _fields(row: list[int]) -> dict:
    out = dict(zip(FIELDS, row))
    out["scan"] = SCANS[out["scan"]] if 0 <= out["scan"] < len(SCANS) else out["scan"]
    out["dtype"] = str(DTYPES[out["dtype"]]) if 0 <= out["dtype"] < len(DTYPES) else "other"
    out["decay"] = DECAYS[out["decay"]] if 0 <= out["decay"] < len(DECAYS) else out["decay"]
    for flag in FIELDS[3:6]:
        out[flag] = bool(out[flag])
    out["state shape"] = tuple(row[len(FIELDS):])
    return out


def _check_headers(headers: torch.Tensor) -> None:
    rows = headers.tolist()
    bad = next((r for r, row in enumerate(rows) if row != rows[0]), None)
    if bad is not None:  # every rank compares against rank 0: all raise the same message
        first, other = _fields(rows[0]), _fields(rows[bad])
        diff = "; ".join(f"{k}: {first[k]} on rank 0, {other.get(k)} on rank {bad}" for k in first
                         if first[k] != other.get(k))
        raise ValueError(f"the ranks' chunks disagree ({diff}): every rank must pass chunks of the same shape "
                         "except along time, of one dtype, with the same time dim and decay form, the initial "
                         "state on every rank or on none, and gradients needed on every rank or on none")


class _GatherSummaries(torch.autograd.Function):
    """One all_gather of every rank's header and summary (as bytes, so the header's integers stay
    exact whatever the dtype); backward: one all_reduce of the gradients w.r.t. every rank's
    summary and the replicated initial state, from which each rank keeps its own row."""

    @staticmethod
    def forward(ctx, group, rank, header, summary, init):
        world = dist.get_world_size(group)
        buf = torch.cat([header.view(torch.uint8), summary.contiguous().view(torch.uint8)])
        out = buf.new_empty(world * buf.numel())
        ALL_GATHER(out, buf, group=group)
        out = out.view(world, -1)
        split = header.numel() * header.element_size()
        headers = out[:, :split].contiguous().view(torch.int64)
        summaries = out[:, split:].contiguous().view(summary.dtype)
        ctx.group, ctx.rank, ctx.init_shape = group, rank, init.shape
        ctx.mark_non_differentiable(headers)
        return headers, summaries, init.clone()

    @staticmethod
    def backward(ctx, _, grad_summaries, grad_init):
        n = grad_summaries.shape[1]
        buf = torch.cat([grad_summaries.reshape(-1), grad_init.reshape(-1)])  # a fresh tensor: reduced in place
        dist.all_reduce(buf, group=ctx.group)
        mine = buf[ctx.rank * n:(ctx.rank + 1) * n]
        init = buf[grad_summaries.numel():].view(ctx.init_shape) if ctx.needs_input_grad[4] else None
        return None, None, None, mine, init


def _incoming_state(group, rank, header, A, B, init, grad):
    """The state entering this rank's chunk from every rank's map h -> A * h + B (A broadcast over
    B's trailing dims) and the initial state `init` (zero if None)."""
    summary = torch.cat([A.reshape(-1), B.reshape(-1)])
    if grad and not summary.requires_grad:  # an empty chunk still takes part in the backward's all_reduce
        summary.requires_grad_()
    init = torch.zeros_like(B) if init is None else init
    headers, summaries, init = _GatherSummaries.apply(group, rank, header, summary, init)
    _check_headers(headers)
    A_shape = A.shape + (1,) * (B.dim() - A.dim())
    states = [init]
    for row in summaries[:-1]:  # H_{r+1} = A_r * H_r + B_r
        states.append(row[:A.numel()].view(A_shape) * states[-1] + row[A.numel():].view(B.shape))
    # every rank's result depends on every summary, so every rank runs the backward's collective
    return torch.stack(states)[rank]


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                group=None) -> torch.Tensor:
    """This rank's chunk of all states of h_t = a_t * h_{t-1} + b_t along `dim`, where each rank of
    `group` (default: the world) holds a contiguous chunk of time in rank order (rank 0 the
    earliest). Equal to wavefront's single-process ``linear_scan`` over the concatenated sequence.

    Chunks may have different lengths along `dim` (zero steps included) but must agree in every
    other dim and in dtype. h0 (zero if None) is the state before the whole sequence, of a's shape
    without `dim`: a replicated input. Pass the same h0 on every rank, or None on every rank (each
    rank combines from its own copy; the values are not compared, so copies that differ give wrong
    results); with gradients, every rank's h0.grad is the full single-process gradient (the ranks'
    contributions summed).

    Cost: two local scans of the chunk and one all_gather of O(state) per rank (A and B, a's size
    without `dim`, plus a small header), independent of T; backward, one all_reduce of O(W * state).
    Gradients: every rank must run backward through its result (as with DistributedDataParallel),
    or the others wait on its all_reduce (until the group's timeout).

    Errors: ValueError when no process group is initialised, when the ranks' chunks disagree in
    shape except along time (or dtype, `dim`, h0 given, gradients needed) and the summaries have
    the same size; when their sizes differ, the all_gather itself fails (gloo aborts the process:
    "Received data size doesn't match expected size"). IndexError for `dim` out of range.

    Example (on each of 2 ranks after ``torch.distributed.init_process_group("gloo", ...)``)::

        a, b = torch.full((1, 4), 0.5), torch.ones(1, 4)        # rank r's 4 steps
        h = wavefront.distributed.linear_scan(a, b)
        # rank 0: [[1.0, 1.5, 1.75, 1.875]]; rank 1: the same sequence continued,
        # [[1.9375, 1.96875, 1.984375, 1.9921875]]
    """
    rank, _ = position(group, "wavefront.distributed scans need", "call the scan")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dim = time_dim(dim, a.dim())
    dtype = torch.promote_types(a.dtype, b.dtype)
    if h0 is not None:
        check_h0(h0, a, dim, dtype)
    grad = needs_grad(a, b, h0)
    state = a.shape[:dim] + a.shape[dim + 1:]
    header = _header(0, dtype, dim, h0, grad, 0, state, a.device)
    steps = a.shape[dim]
    if steps:
        A = a.to(dtype).prod(dim)
        B = local_linear_scan(a, b, dim=dim).select(dim, -1)
    else:
        A = torch.ones(state, dtype=dtype, device=a.device)
        B = torch.zeros_like(A)
    h_in = _incoming_state(group, rank, header, A, B, h0, grad)
    if not steps:
        return h_in.unsqueeze(dim).narrow(dim, 0, 0)
    return local_linear_scan(a, b, h_in, dim=dim)  # exact: the single-process arithmetic from h_in


def matrix_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
                S0: torch.Tensor | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, S_last) on this rank's chunk of S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t,
    where each rank of `group` (default: the world) holds a contiguous chunk of time (dim -2 of q,
    k, v) in rank order. Equal to wavefront's single-process ``matrix_scan`` on the whole sequence.

    Shapes as the single-process form: q, k [..., T, dk]; v [..., T, dv]; decay None, [..., T] (a
    scalar per step) or [..., T, dk] (per key dim), the same form on every rank. o is this rank's
    chunk of outputs [..., T_rank, dv]; S_last [..., dk, dv] is the state after this rank's chunk
    (the last rank's is the whole sequence's final state). Chunks may differ in length (zero steps
    included: o is empty, S_last the incoming state). S0 (zero if None) is the state before the
    sequence: replicated like linear_scan's h0 (the same on every rank or None everywhere; every
    rank's S0.grad is the full gradient).

    Cost: two local scans of the chunk and one all_gather of O(state) per rank (the decay product
    [..., dk] and the chunk's state [..., dk, dv], plus a small header), independent of T; backward,
    one all_reduce of O(W * state). Every rank must run backward through its results; errors as
    linear_scan's.

    Example (on each rank after ``torch.distributed.init_process_group(...)``)::

        q = k = torch.ones(1, 3, 2); v = torch.ones(1, 3, 4)     # rank r's 3 steps
        o, S = wavefront.distributed.matrix_scan(q, k, v)
        # rank 0: o[0, :, 0] == [2., 4., 6.]; rank 1: [8., 10., 12.]
    """
    rank, _ = position(group, "wavefront.distributed scans need", "call the scan")
    if q.dim() < 2 or k.shape != q.shape or v.dim() != q.dim() or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q and k must be [..., T, dk] and v [..., T, dv] with the same leading dims, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    lead, steps, dk, dv = q.shape[:-2], q.shape[-2], q.shape[-1], v.shape[-1]
    if decay is None:
        form = 0
    elif decay.shape in (q.shape[:-1], q.shape):
        form = 1 if decay.shape == q.shape[:-1] else 2
    else:
        raise ValueError(f"decay must be None, [..., T] {tuple(q.shape[:-1])} or [..., T, dk] {tuple(q.shape)}, "
                         f"got {tuple(decay.shape)}")
    state = (*lead, dk, dv)
    if S0 is not None and (S0.shape != state or S0.dtype != q.dtype or S0.device != q.device):
        raise ValueError(f"S0 must be {state} of q's dtype and device ({q.dtype} on {q.device}), got "
                         f"{tuple(S0.shape)} {S0.dtype} on {S0.device}")
    grad = needs_grad(q, k, v, decay, S0)
    header = _header(1, q.dtype, q.dim() - 2, S0, grad, form, state, q.device)
    P = torch.ones((*lead, dk), dtype=q.dtype, device=q.device)  # sent for every form: one summary size
    if steps and form == 1:
        P = decay.to(q.dtype).prod(-1)[..., None].expand(*lead, dk)
    elif steps and form == 2:
        P = decay.to(q.dtype).prod(-2)
    S_loc = local_matrix_scan(q, k, v, decay)[1].to(q.dtype) if steps else torch.zeros(state, dtype=q.dtype,
                                                                                        device=q.device)
    S_in = _incoming_state(group, rank, header, P, S_loc, S0, grad)
    if not steps:
        return S_in[..., :0, :], S_in
    return local_matrix_scan(q, k, v, decay, S_in)  # exact: the single-process arithmetic from S_in


__all__ = ["linear_scan", "matrix_scan"]
