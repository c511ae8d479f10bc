"""ARMT's associative memory: the read and write rules, written once.

Every wavefront ARMT build (standalone, Hugging Face wrapped) calls these functions, so the
reference forward and the captured graphs run exactly the same operations (models built with
the public ARMT code run that code's own memory rules: scheduler/published_armt.py). The
first-segment flag is a bool tensor (never a Python branch) so the rule stays traceable by
torch.fx and per cell: a batched call can mix first and later cells.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def dpfp(u: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """DPFP feature map: r = [relu(u), relu(-u)], phi = concat_j r * roll(r, j), j = 1..nu.

    >>> dpfp(torch.ones(1, 2), nu=3).shape
    torch.Size([1, 12])
    """
    r = torch.cat([F.relu(u), F.relu(-u)], dim=-1)
    return torch.cat([r * torch.roll(r, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


class AssociativeMemory(nn.Module):
    """The per-layer memory parameters of ARMT and its read / write rules.

    State per layer: A [batch, d_key, d_model] and z [batch, d_key], zero at the start,
    d_key = 2 * nu * d_mem.

    >>> mem = AssociativeMemory(d_model=8, d_mem=2)
    >>> A, z = mem.initial_state(batch=1, dtype=torch.float32, device="cpu")
    >>> x = torch.randn(1, 5, 8)
    >>> torch.equal(mem.read(x, A, z, torch.tensor(True)), x)
    True
    """

    def __init__(self, d_model: int, d_mem: int, nu: int = 3):
        super().__init__()
        self.d_model, self.d_mem, self.nu = d_model, d_mem, nu
        self.d_key = 2 * nu * d_mem
        self.W_mq = nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False)
        # The published code zero-initialises W_mv, which makes memory a no-op until trained;
        # here it keeps nn.Linear's default so a fresh model's memory is live.
        self.W_mv = nn.Linear(d_model, d_model, bias=False)
        self.W_mb = nn.Linear(d_model, 1, bias=True)

    def initial_state(self, batch: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.zeros(batch, self.d_key, self.d_model, dtype=dtype, device=device)
        z = torch.zeros(batch, self.d_key, dtype=dtype, device=device)
        return A, z

    def read(self, x: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """x + (q A) / (q z + eps) for every token; x unchanged on a cell's first segment."""
        return memory_read(self, x, A, z, first)

    def write(self, m: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first: torch.Tensor):
        """New (A, z) from the memory-token rows m of the block output."""
        return memory_write(self, m, A, z, first)


def memory_read(mem, x, A, z, first):
    """Read rule over any object with W_mq and nu."""
    q = dpfp(mem.W_mq(x), mem.nu)
    num = torch.matmul(q, A)
    den = torch.matmul(q, z.unsqueeze(-1)) + EPS
    return torch.where(first, x, num / den + x)


def memory_write(mem, m, A, z, first):
    """Write rule (ARCHITECTURE.md, "ARMT, exactly"): A += sum_j beta_j k_j^T (v - v_prev)_j, z += sum_j gamma_j k_j.

    gamma is detached, as in the published implementation (it is a correction coefficient,
    not trained through).
    """
    k = dpfp(mem.W_mk(m), mem.nu)
    v = mem.W_mv(m)
    beta = torch.sigmoid(mem.W_mb(m))
    kz = torch.matmul(k, z.unsqueeze(-1)) + EPS
    v_prev = torch.where(first, torch.zeros_like(v), torch.matmul(k, A) / kz)
    k_sq = torch.linalg.vector_norm(k, dim=-1, keepdim=True) ** 2
    gamma = torch.clamp(1 - kz / (k_sq + EPS), 0, 1).detach()
    gamma = torch.where(first, torch.ones_like(gamma), gamma)
    A_new = A + torch.matmul((k * beta).transpose(-1, -2), v - v_prev)
    z_new = z + (gamma * k).sum(dim=1)
    return A_new, z_new
