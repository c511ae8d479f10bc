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
    text = str(wavefront.explain(fast))
    if hasattr(mm, "mamba_selective_scan"):  # transformers 5.x: the module-level scan is swapped per call
        assert "native" not in getattr(mm.mamba_selective_scan, "__name__", "")
        assert "mamba_selective_scan [selective_scan_fn]: runs as wavefront.kernels.selective_scan_fn" in text
    else:  # transformers 4.x: the loop inlined in MambaMixer.slow_forward is lifted into a scan
        assert "MambaMixer.slow_forward" in text and "carry `ssm_state`: ran as a scan" in text


def test_the_swap_is_undone_even_on_error():
    model = tiny_mamba()
    before = getattr(mm, "mamba_selective_scan", None)
    fast = wavefront.optimize(model)
    with pytest.raises(Exception):
        fast(torch.full((1, 5), 10_000))  # token id out of range: fails inside the patched call
    assert getattr(mm, "mamba_selective_scan", None) is before
    assert not any("slow_forward" in vars(m) for m in model.modules())  # 4.x: lifted methods removed


def test_a_native_kernel_that_cannot_be_built_gives_way_to_its_torch_form(monkeypatch):
    """Still exact, with the reason in explain(); never a TypeError for a model that runs."""
    import wavefront.backends.scans.selective.native as sel
    model = tiny_mamba()
    broken = sel.native_scan.KernelLibrary("selective", "", [])
    broken._tried, broken.error = True, "RuntimeError: no C compiler found (set CC)"
    monkeypatch.setattr(sel, "KERNEL", broken)
    if hasattr(mm, "mamba_selective_scan"):  # 5.x: the seam is filled with the kernel's torch form, and says so
        fast = wavefront.optimize(model, verify=True)
        assert fast.route == "kernel substitution"
        assert "could not be built (RuntimeError: no C compiler" in str(wavefront.explain(fast))
        ids = torch.randint(0, model.config.vocab_size, (1, 7))
        with torch.no_grad():
            assert_close(fast(ids).logits, model(ids).logits, 1e-5, "logits")
    else:  # 4.x: the inlined loop is lifted into a first-order scan, which needs no selective kernel
        from wavefront.time_loops.model import LoopLiftedModel
        assert isinstance(wavefront.optimize(model), LoopLiftedModel)


def test_a_users_wrapper_around_the_seam_function_is_kept():
    """functools.wraps gives the wrapper __wrapped__, but it is not transformers' seam: not replaced."""
    import functools
    if not hasattr(mm, "mamba_selective_scan"):
        pytest.skip("transformers 4.x has no kernel seam")
    model = tiny_mamba()
    original = mm.mamba_selective_scan

    @functools.wraps(original)
    def halved(*args, **kwargs):
        out = original(*args, **kwargs)
        return (out[0] * 0.5, out[1]) if isinstance(out, tuple) else out * 0.5
    ids = torch.randint(0, 100, (1, 20))
    mm.mamba_selective_scan = halved
    try:
        fast = wavefront.optimize(model)
        with torch.no_grad():
            assert_close(fast(ids).logits, model(ids).logits, 1e-5, "logits with the user's wrapper")
        assert "mamba_selective_scan [selective_scan_fn]: runs as" not in str(wavefront.explain(fast))
    finally:
        mm.mamba_selective_scan = original


def test_an_activation_the_kernel_does_not_run_keeps_the_models_own_convolution():
    from wavefront import hf_families
    if not hasattr(mm, "mamba_selective_scan"):
        pytest.skip("transformers 4.x has no kernel seam")
    model = hf_families.build("mamba", hidden_act="gelu")
    ids = hf_families.example_ids("mamba", 1, 30)
    fast = wavefront.optimize(model, verify=True)
    with torch.no_grad():
        assert_close(fast(ids).logits, model(ids).logits, 1e-5, "logits")
