"""The ops lane-folded graphs call (lane_fold.py writes them in, module_fold.py's clones use them):
per-lane linear maps and elementwise ops over lanes folded into the batch dimension."""
from __future__ import annotations

import operator

import torch


class FoldNotApplicable(Exception):
    """Why a layer graph cannot be lane-folded (then vmap batches it)."""


def lane_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lanes: int) -> torch.Tensor:
    """Per-lane F.linear: x [lanes * B, ..., in], weight [lanes, out, in], bias [lanes, out]."""
    x3 = x.reshape(lanes, -1, x.shape[-1])
    wt = weight.transpose(1, 2)
    y = torch.bmm(x3, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x3, wt)
    return y.reshape(*x.shape[:-1], weight.shape[1])


_OPS = {"mul": operator.mul, "add": operator.add, "sub": operator.sub, "truediv": operator.truediv,
        "maximum": torch.maximum, "minimum": torch.minimum}


def lane_row_flag(flag_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row bool [lanes * B] shaped to broadcast against a folded tensor as torch.where's condition."""
    return flag_rows.view(-1, *([1] * (like.dim() - 1)))


def lane_elementwise(op_name: str, x: torch.Tensor, p: torch.Tensor, lanes: int, param_first: bool) -> torch.Tensor:
    """op(x, p) per lane, where x is folded [lanes * B, ...] and p is stacked [lanes, *shape]."""
    op = _OPS[op_name]
    extra = x.dim() - (p.dim() - 1)
    if extra < 0:
        raise RuntimeError(f"lane_elementwise: activation of rank {x.dim()} against a parameter of rank {p.dim() - 1}")
    xs = x.reshape(lanes, x.shape[0] // lanes, *x.shape[1:])
    pv = p.reshape(p.shape[0], *([1] * extra), *p.shape[1:])
    out = op(pv, xs) if param_first else op(xs, pv)
    return out.reshape(-1, *out.shape[2:])
