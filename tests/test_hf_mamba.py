"""optimize() on Hugging Face Mamba: its scan loop runs as the native selective scan."""
import pytest
import torch

import wavefront
from wavefront.testing import assert_close

pytestmark = pytest.mark.hf
mm = pytest.importorskip("transformers.models.mamba.modeling_mamba")


def tiny_mamba(dtype=torch.float32):
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=16, state_size=8, num_hidden_layers=2,
                                        expand=2, conv_kernel=4)).to(dtype).eval()


def test_mamba_logits_and_gradients_match_the_models_own_loop():
    model = tiny_mamba()
    ids = torch.randint(0, 100, (2, 300))
    if not hasattr(mm, "mamba_selective_scan"):  # transformers 4.x: the loop is inlined
        with pytest.raises(TypeError, match="inlines Mamba's scan loop"):
            wavefront.optimize(model)
        return
    ref = model(ids, use_cache=False)
    ref.logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = wavefront.optimize(model, verify=True)
    out = fast(ids, use_cache=False)
    assert_close(out.logits, ref.logits, 1e-5, "logits")
    out.logits.pow(2).mean().backward()
    assert len(grads) > 5
    for n, p in model.named_parameters():
        if n in grads:
            assert_close(p.grad, grads[n], 1e-3, f"grad {n}")
    assert mm.mamba_selective_scan is not None and "native" not in getattr(mm.mamba_selective_scan, "__name__", "")
    text = str(wavefront.explain(fast))
    assert "selective scan" in text and "native scan" in text


def test_the_swap_is_undone_even_on_error():
    model = tiny_mamba()
    if not hasattr(mm, "mamba_selective_scan"):  # transformers 4.x: refused, nothing swapped
        with pytest.raises(TypeError, match="inlines Mamba's scan loop"):
            wavefront.optimize(model)
        return
    before = mm.mamba_selective_scan
    fast = wavefront.optimize(model)
    with pytest.raises(Exception):
        fast(torch.full((1, 5), 10_000))  # token id out of range: fails inside the patched call
    assert mm.mamba_selective_scan is before


def test_refused_at_optimize_time_when_the_kernel_cannot_be_built(monkeypatch):
    import wavefront.backends.selective_scan as sel
    model = tiny_mamba()
    broken = sel.native_scan.KernelLibrary("selective", "", [])
    broken._tried, broken.error = True, "RuntimeError: no C compiler found (set CC)"
    monkeypatch.setattr(sel, "KERNEL", broken)
    expected = "could not be built: RuntimeError: no C compiler" if hasattr(mm, "mamba_selective_scan") \
        else "inlines Mamba's scan loop"
    with pytest.raises(TypeError, match=expected):
        wavefront.optimize(model)
