"""wavefront.distributed's sequence-parallel scans on 2 gloo processes equal the single-process
references on the whole sequence, values and gradients (float64). One spawn runs every case: each
rank saves its chunk's results and the parent concatenates and compares them."""

import pytest
from distributed_harness import spawn_ranks
import torch
from wavefront.backends.scans.linear.naive import linear_scan_reference
from wavefront.backends.scans.matrix.naive import matrix_scan_reference

WORLD = 2
F64 = torch.float64
# (full shape, time dim, steps on rank 0, with h0)
LINEAR_CASES = {"dim1_unequal_h0": ((2, 11, 3), 1, 4, True),
                "dim2_no_h0": ((3, 2, 9), 2, 6, False),
                "dim0_empty_rank0_h0": ((7, 4), 0, 0, True)}
# (decay form, steps on rank 0, with S0); q, k [2, T=10, 3], v [2, 10, 4]
MATRIX_CASES = {"no_decay": (None, 3, False), "scalar_decay_S0": ("scalar", 6, True),
                "per_dim_decay": ("per_dim", 4, False), "per_dim_empty_rank1_S0": ("per_dim", 10, True)}


def linear_inputs(shape, dim, with_h0):
    g = torch.Generator().manual_seed(0)
    a = 0.5 + 0.5 * torch.rand(shape, generator=g, dtype=F64)
    b, w = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    h0 = torch.randn(a.select(dim, 0).shape, generator=g, dtype=F64) if with_h0 else None
    return a, b, h0, w


def matrix_inputs(form, with_S0, T=10):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, T, 3, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, T, 4, generator=g, dtype=F64)
    decay = {None: None, "scalar": 0.5 + 0.5 * torch.rand(2, T, generator=g, dtype=F64),
             "per_dim": 0.5 + 0.5 * torch.rand(2, T, 3, generator=g, dtype=F64)}[form]
    S0 = torch.randn(2, 3, 4, generator=g, dtype=F64) if with_S0 else None
    w_o, w_S = torch.randn(2, T, 4, generator=g, dtype=F64), torch.randn(WORLD, 2, 3, 4, generator=g, dtype=F64)
    return q, k, v, decay, S0, w_o, w_S


def chunk(x, dim, first, rank):
    """Rank `rank`'s slice of x along dim: rank 0 the first `first` steps, rank 1 the rest."""
    n = x.shape[dim]
    return x.narrow(dim, 0, first) if rank == 0 else x.narrow(dim, first, n - first)


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def grads(*xs):
    return [None if x is None else x.grad for x in xs]


def run_cases(rank):
    from wavefront.distributed import linear_scan, matrix_scan
    out = {}
    for name, (shape, dim, first, with_h0) in LINEAR_CASES.items():
        a, b, h0, w = linear_inputs(shape, dim, with_h0)
        a, b, h0 = leaf(chunk(a, dim, first, rank)), leaf(chunk(b, dim, first, rank)), leaf(h0)
        h = linear_scan(a, b, h0, dim=dim)
        (h * chunk(w, dim, first, rank)).sum().backward()
        out[name] = [h.detach(), *grads(a, b, h0)]
    for name, (form, first, with_S0) in MATRIX_CASES.items():
        q, k, v, decay, S0, w_o, w_S = matrix_inputs(form, with_S0)
        q, k, v = (leaf(chunk(x, -2, first, rank)) for x in (q, k, v))
        decay = leaf(None if decay is None else chunk(decay, decay.dim() - 1 if form == "scalar" else -2, first, rank))
        S0 = leaf(S0)
        o, S = matrix_scan(q, k, v, decay, S0)
        ((o * chunk(w_o, -2, first, rank)).sum() + (S * w_S[rank]).sum()).backward()
        out[name] = [o.detach(), S.detach(), *grads(q, k, v, decay, S0)]
    # mismatches every rank must refuse alike (each costs the one all_gather, so the ranks stay in step)
    errors = {}
    mismatches = {"state shape": lambda: linear_scan(torch.rand((2, 5, 3) if rank == 0 else (3, 5, 2)),
                                                     torch.rand((2, 5, 3) if rank == 0 else (3, 5, 2))),
                  "needs grad": lambda: linear_scan(torch.rand(2, 5, requires_grad=rank == 0), torch.rand(2, 5)),
                  "initial state given": lambda: linear_scan(torch.rand(2, 5), torch.rand(2, 5),
                                                             torch.zeros(2) if rank == 0 else None)}
    for field, call in mismatches.items():
        try:
            call()
            errors[field] = "no error"
        except ValueError as e:
            errors[field] = str(e)
    out["errors"] = errors
    return out


def close(got, want, tol, what):
    """'' when got matches want to relative tolerance tol, else what is wrong."""
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-300)
    return f"{what}: relative error {err:.3g} > {tol}" if not err <= tol else ""


def check_linear(results, name):
    shape, dim, first, with_h0 = LINEAR_CASES[name]
    a, b, h0, w = linear_inputs(shape, dim, with_h0)
    a, b, h0 = leaf(a), leaf(b), leaf(h0)
    h = linear_scan_reference(a, b, h0, dim=dim)
    (h * w).sum().backward()
    ranks = [r[name] for r in results]
    out = []
    for i, (what, want) in enumerate([("h", h.detach()), ("a.grad", a.grad), ("b.grad", b.grad)]):
        got = torch.cat([r[i] if r[i] is not None else torch.zeros_like(chunk(want, dim, first, j))
                         for j, r in enumerate(ranks)], dim)  # an empty chunk's grad may be None
        out.append(close(got, want, 1e-12 if i == 0 else 1e-10, what))
    if with_h0:  # replicated: the full gradient on every rank
        out += [close(got[3], h0.grad, 1e-10, f"rank {r} h0.grad") for r, got in enumerate(ranks)]
    return out


def check_matrix(results, name):
    form, first, with_S0 = MATRIX_CASES[name]
    q, k, v, decay, S0, w_o, w_S = matrix_inputs(form, with_S0)
    q, k, v, decay, S0 = (leaf(x) for x in (q, k, v, decay, S0))
    tdim = -2 if form != "scalar" else 1
    # the state after rank 0's chunk, then the whole sequence's final state after rank 1's
    _, S_mid = matrix_scan_reference(*(chunk(x, -2, first, 0) for x in (q, k, v)),
                                     None if decay is None else chunk(decay, tdim, first, 0), S0)
    o, S_end = matrix_scan_reference(q, k, v, decay, S0)
    ((o * w_o).sum() + (S_mid * w_S[0]).sum() + (S_end * w_S[1]).sum()).backward()
    ranks = [r[name] for r in results]
    out = [close(torch.cat([r[0] for r in ranks], -2), o.detach(), 1e-12, "o"),
           close(ranks[0][1], S_mid.detach(), 1e-12, "rank 0 S_last"),
           close(ranks[1][1], S_end.detach(), 1e-12, "rank 1 S_last")]
    for i, (what, want) in enumerate([("q", q), ("k", k), ("v", v), ("decay", decay)], start=2):
        if want is not None:
            d = tdim if what == "decay" else -2
            got = torch.cat([r[i] if r[i] is not None else torch.zeros_like(chunk(want.grad, d, first, j))
                             for j, r in enumerate(ranks)], d)
            out.append(close(got, want.grad, 1e-10, f"{what}.grad"))
    if with_S0:
        out += [close(got[6], S0.grad, 1e-10, f"rank {r} S0.grad") for r, got in enumerate(ranks)]
    return out


def test_two_ranks_match_the_single_process_scans(tmp_path):
    # one test, so one spawn however pytest-xdist spreads the tests
    results = spawn_ranks(str(tmp_path), run_cases, WORLD)
    failures = [f"{name}: {msg}" for name in LINEAR_CASES for msg in check_linear(results, name) if msg]
    failures += [f"{name}: {msg}" for name in MATRIX_CASES for msg in check_matrix(results, name) if msg]
    for field in ["state shape", "needs grad", "initial state given"]:  # every rank refuses alike
        msgs = [r["errors"][field] for r in results]
        if not msgs[0].startswith("the ranks' chunks disagree") or msgs[0] != msgs[1]:
            failures.append(f"mismatched {field}: {msgs}")
    assert not failures, "\n".join(failures)


def test_without_a_process_group_says_how_to_start_one():
    import torch.distributed as dist

    from wavefront.distributed import linear_scan, matrix_scan
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"torch\.distributed\.init_process_group"):
        linear_scan(torch.rand(1, 3), torch.rand(1, 3))
    with pytest.raises(ValueError, match=r"torch\.distributed\.init_process_group"):
        matrix_scan(torch.rand(1, 3, 2), torch.rand(1, 3, 2), torch.rand(1, 3, 2))
