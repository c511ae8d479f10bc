"""optimize() on Hugging Face RecurrentGemma: the RG-LRU's Python loop over time runs as a scan."""
import pytest
import torch

import wavefront
from wavefront.time_loops.model import LoopLiftedModel
from wavefront.testing import assert_close

pytestmark = pytest.mark.hf
pytest.importorskip("transformers.models.recurrent_gemma.modeling_recurrent_gemma")


def tiny_recurrent_gemma():
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM
    torch.manual_seed(0)
    cfg = RecurrentGemmaConfig(num_hidden_layers=3, vocab_size=100, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=1, lru_width=32, attention_window_size=16,
                               conv1d_width=4, block_types=["recurrent", "recurrent", "attention"])
    return RecurrentGemmaForCausalLM(cfg).eval()


@pytest.mark.parametrize("T", [1, 37, 300])
def test_logits_and_gradients_match_the_models_own_loop(T):
    # two identical models: transformers 4.x keeps the RG-LRU state on the module between calls
    reference, model = tiny_recurrent_gemma(), tiny_recurrent_gemma()
    ids = torch.randint(0, 100, (2, T))
    ref = reference(ids, use_cache=False)
    ref.logits.pow(2).mean().backward()
    fast = wavefront.optimize(model)
    assert isinstance(fast, LoopLiftedModel)
    out = fast(ids, use_cache=False)
    assert_close(out.logits, ref.logits, 1e-5, "logits")
    out.logits.pow(2).mean().backward()
    grads = dict(reference.named_parameters())
    assert any("rg_lru" in n and p.grad is not None for n, p in grads.items())
    for n, p in model.named_parameters():
        if grads[n].grad is not None:
            assert_close(p.grad, grads[n].grad, 1e-4, f"grad {n}")
    text = str(wavefront.explain(fast))
    assert "RecurrentGemmaRglru._rnn_scan" in text and "carry `recurrent_states`" in text
    if T > 1:  # (T == 1 takes the model's single-step branch: no loop runs)
        assert "ran as a scan" in text


def test_verify_checks_the_first_call():
    fast = wavefront.optimize(tiny_recurrent_gemma(), verify=True)
    with torch.no_grad():
        fast(torch.randint(0, 100, (1, 50)), use_cache=False)
    assert not fast.verify
