"""ARMT around a (small, random) Hugging Face LLaMA, diagonally batched, memory streamed across calls.

    python examples/hf_llama_armt.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import wavefront
from wavefront.models import wrap_armt
from wavefront.testing import rel_err

torch.manual_seed(0)
lm = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2)).eval()
armt = wrap_armt(lm, segment_len=64, n_mem_tokens=8, d_mem=16).eval()
fast = wavefront.optimize(armt, verify=True)

ids = torch.randint(0, 1000, (2, 10 * 64 + 17))  # two rows, ten full segments and a short one
with torch.no_grad():
    whole = armt(ids)
    first = fast(ids[:, :6 * 64])  # stream: six segments now...
    rest = fast(ids[:, 6 * 64:], memory=first.memory)  # ...the rest later, memory carried over
streamed = torch.cat([first.logits, rest.logits], dim=1)
print(wavefront.last_schedule(fast))
print(f"streamed diagonal vs one sequential call: rel err {rel_err(streamed, whole.logits):.1e}")
