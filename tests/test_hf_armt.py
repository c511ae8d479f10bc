"""wrap_armt over Hugging Face LLaMA and GPT-2 (small random configs, no hub access)."""
import pytest
import torch

from conftest import SEG, VOCAB, build, ids_for, tiny_gpt2, tiny_llama
from wavefront.models import wrap_armt
from wavefront.testing import assert_close

pytestmark = pytest.mark.hf


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_first_segment_equals_the_base_model_on_tokens_plus_memory(kind):
    """Segment 0 skips the read, so its logits must be the unmodified HF model's on
    [segment tokens; memory tokens] with positions from 0: proves mask, positions, rotary."""
    model = build(kind)
    ids = ids_for(1, batch=2)
    hf = model.hf_model
    embeds = torch.cat([hf.get_input_embeddings()(ids), model.cell.memory.expand(2, -1, -1)], dim=1)
    ref = hf(inputs_embeds=embeds, use_cache=False).logits[:, :SEG]
    assert_close(model(ids).logits, ref, 1e-10, f"{kind} segment 0")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streaming_batch_and_live_memory(kind):
    model = build(kind)
    ids = ids_for(3, batch=2, short_last=2)
    whole = model(ids)
    a = model(ids[:, :SEG])
    b = model(ids[:, SEG:], memory=a.memory)
    assert torch.equal(torch.cat([a.logits, b.logits], 1), whole.logits)
    assert_close(model(ids[1:]).logits, whole.logits[1:], 1e-12, "batch row 1 alone")
    early = ids.clone()
    early[:, 0] = (early[:, 0] + 1) % VOCAB
    assert (model(early).logits[:, 2 * SEG:] - whole.logits[:, 2 * SEG:]).abs().max() > 1e-6


def test_parameters_are_shared_with_the_hf_model():
    lm = tiny_llama()
    model = wrap_armt(lm, segment_len=SEG, n_mem_tokens=2, d_mem=4)
    ours = {id(p) for p in model.parameters()}
    assert all(id(p) in ours for p in lm.parameters())
    n_memory = sum(p.numel() for layer in model.cell.layers for p in layer.memory.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in lm.parameters()) + n_memory + 2 * 16


def test_wrap_armt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="learned positions"):
        wrap_armt(tiny_gpt2(), segment_len=31, n_mem_tokens=2, d_mem=4)
    with pytest.raises(ValueError, match="n_mem_tokens"):
        wrap_armt(tiny_llama(), segment_len=8, n_mem_tokens=0, d_mem=4)
    with pytest.raises(TypeError, match="not a Hugging Face causal LM"):
        wrap_armt(torch.nn.Linear(2, 2), segment_len=8, n_mem_tokens=2, d_mem=4)
