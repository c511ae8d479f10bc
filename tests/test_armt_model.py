"""The standalone ARMT is the reference: check it against the rules in ARCHITECTURE.md ("ARMT, exactly") written naively."""
import pytest
import torch

from conftest import SEG, VOCAB, ids_for, tiny_armt
from wavefront.models import AssociativeMemory, MemoryState, dpfp
from wavefront.testing import assert_close


def naive_dpfp(u, nu):
    r = torch.cat([torch.relu(u), torch.relu(-u)], -1)
    n = r.shape[-1]
    out = torch.empty(*u.shape[:-1], nu * n, dtype=u.dtype)
    for j in range(1, nu + 1):
        for i in range(n):
            out[..., (j - 1) * n + i] = r[..., i] * r[..., (i - j) % n]
    return out


def naive_read(mem, x, A, z, first):
    if first:
        return x.clone()
    out = x.clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            q = naive_dpfp(x[b, t] @ mem.W_mq.weight.T, mem.nu)
            out[b, t] = x[b, t] + (q @ A[b]) / (q @ z[b] + 1e-5)
    return out


def naive_write(mem, m, A, z, first):
    A, z = A.clone(), z.clone()
    for b in range(m.shape[0]):
        dA, dz = torch.zeros_like(A[b]), torch.zeros_like(z[b])
        for j in range(m.shape[1]):
            k = naive_dpfp(m[b, j] @ mem.W_mk.weight.T, mem.nu)
            v = m[b, j] @ mem.W_mv.weight.T
            beta = torch.sigmoid(m[b, j] @ mem.W_mb.weight[0] + mem.W_mb.bias[0])
            if first:
                v_prev, gamma = torch.zeros_like(v), 1.0
            else:
                kz = k @ z[b] + 1e-5
                v_prev = (k @ A[b]) / kz
                gamma = torch.clamp(1 - kz / (k @ k + 1e-5), 0, 1)
            dA += beta * torch.outer(k, v - v_prev)
            dz += gamma * k
        A[b] += dA
        z[b] += dz
    return A, z


def test_dpfp_matches_definition():
    u = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(dpfp(u, 3), naive_dpfp(u, 3))


def test_memory_read_write_match_design_rules():
    torch.manual_seed(0)
    mem = AssociativeMemory(d_model=8, d_mem=3).double()
    A, z = mem.initial_state(2, torch.float64, "cpu")
    for seg in range(3):  # the first segment, then two with live memory
        first = torch.tensor(seg == 0)
        x = torch.randn(2, 5, 8, dtype=torch.float64)
        assert_close(mem.read(x, A, z, first), naive_read(mem, x, A, z, seg == 0), 1e-12, f"read seg {seg}")
        m = torch.randn(2, 3, 8, dtype=torch.float64)
        A_ref, z_ref = naive_write(mem, m, A, z, seg == 0)
        A, z = mem.write(m, A, z, first)
        assert_close(A, A_ref, 1e-12, f"A seg {seg}")
        assert_close(z, z_ref, 1e-12, f"z seg {seg}")
    assert z.abs().sum() > 0 and A.abs().sum() > 0


def test_memory_weights_are_live_by_default():
    model = tiny_armt()
    for layer in model.cell.layers:
        assert layer.memory.W_mv.weight.abs().sum() > 0


def test_streaming_in_pieces_equals_one_call():
    model = tiny_armt()
    ids = ids_for(5, batch=2, short_last=2)
    whole = model(ids)
    a = model(ids[:, :2 * SEG])
    b = model(ids[:, 2 * SEG:3 * SEG], memory=a.memory)
    c = model(ids[:, 3 * SEG:], memory=b.memory)
    assert torch.equal(torch.cat([a.logits, b.logits, c.logits], 1), whole.logits)
    assert c.memory.segments_seen == whole.memory.segments_seen == 5
    for x, y in zip(c.memory.tensors, whole.memory.tensors):
        assert torch.equal(x, y)


@pytest.mark.parametrize("n_tokens", [1, SEG - 1, SEG, SEG + 1, 3 * SEG + 4])
def test_any_length_and_short_last_segment(n_tokens):
    model = tiny_armt()
    ids = torch.randint(0, VOCAB, (2, n_tokens))
    out = model(ids)
    assert out.logits.shape == (2, n_tokens, VOCAB)
    assert out.memory.segments_seen == -(-n_tokens // SEG)
    assert torch.isfinite(out.logits).all()


def test_batch_rows_are_independent():
    model = tiny_armt()
    ids = ids_for(4, batch=2, short_last=1)
    both = model(ids).logits
    for b in range(2):
        assert_close(both[b:b + 1], model(ids[b:b + 1]).logits, 1e-12, f"row {b}")


def test_memory_is_live_and_causal():
    """Changing segment 0 changes later segments (memory carries it); changing segment 2 leaves
    segments 0-1 untouched (nothing flows backwards)."""
    model = tiny_armt()
    ids = ids_for(4)
    base = model(ids).logits
    early = ids.clone()
    early[0, 0] = (early[0, 0] + 1) % VOCAB
    changed = model(early).logits
    for s in (1, 2, 3):
        seg = slice(s * SEG, (s + 1) * SEG)
        assert (changed[:, seg] - base[:, seg]).abs().max() > 1e-6, f"segment {s} did not see segment 0"
    late = ids.clone()
    late[0, 2 * SEG] = (late[0, 2 * SEG] + 1) % VOCAB
    assert torch.equal(model(late).logits[:, :2 * SEG], base[:, :2 * SEG])


def test_first_segment_ignores_memory_read_weights():
    """Read is skipped on segment 0: W_mq cannot affect the first segment's logits."""
    model = tiny_armt()
    ids = ids_for(2)
    before = model(ids).logits
    with torch.no_grad():
        for layer in model.cell.layers:
            layer.memory.W_mq.weight.mul_(3.0)
    after = model(ids).logits
    assert torch.equal(after[:, :SEG], before[:, :SEG])
    assert not torch.equal(after[:, SEG:], before[:, SEG:])


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(0, 4, dtype=torch.long), "empty"),
    (torch.zeros(1, 4), "integer token ids"),
    (torch.zeros(4, dtype=torch.long), "shape \\[batch, tokens\\]"),
    ([1, 2, 3], "torch.Tensor"),
])
def test_bad_input_is_rejected_clearly(bad, message):
    model = tiny_armt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        model(bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_foreign_memory_is_rejected_and_left_intact():
    model = tiny_armt()
    out = model(ids_for(1, batch=2))
    kept = [t.clone() for t in out.memory.tensors]
    with pytest.raises(ValueError, match="batch size"):
        model(ids_for(1, batch=1), memory=out.memory)
    with pytest.raises(ValueError, match="float32"):
        model(ids_for(1, batch=2), memory=MemoryState(tuple(t.float() for t in out.memory.tensors), 1))
    with pytest.raises(TypeError, match="MemoryState"):
        model(ids_for(1, batch=2), memory=out.memory.tensors)
    assert all(torch.equal(a, b) for a, b in zip(kept, out.memory.tensors))


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="segment_len"):
        tiny_armt(segment_len=0)
    with pytest.raises(ValueError, match="divisible"):
        tiny_armt(d_model=15)
