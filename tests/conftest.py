"""Shared tiny models for the suite (a few layers, d_model 16-32: the suite must stay fast)."""
import os
import warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each, or
    os.environ["OMP_NUM_THREADS"] = "1"      # OpenMP's spinning threads slow both 10x (subprocesses inherit it)
    torch.set_num_threads(1)

if not torch.cuda.is_available():  # Triton kernels run on CPU only in the interpreter, set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from wavefront.models import ARMT, RMT, ARMTConfig, RMTConfig, wrap_armt

N_LAYERS = 3
SEG = 6
VOCAB = 50
# S in {1, 2, L-1, L, L+2, 2L+1}
SEGMENT_COUNTS = sorted({1, 2, N_LAYERS - 1, N_LAYERS, N_LAYERS + 2, 2 * N_LAYERS + 1})


def tiny_armt(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=16, n_layers=N_LAYERS, n_heads=2, d_ff=32, segment_len=SEG,
               n_mem_tokens=3, d_mem=4)
    cfg.update(kw)
    return ARMT(ARMTConfig(**cfg)).to(dtype).eval()


def tiny_rmt(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return RMT(RMTConfig(vocab_size=VOCAB, d_model=16, n_layers=N_LAYERS, n_heads=2, d_ff=32, segment_len=SEG,
                         n_mem_tokens=3)).to(dtype).eval()


def tiny_llama(dtype=torch.float64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=N_LAYERS,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float64, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=N_LAYERS, n_head=2, n_positions=32,
                         bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def build(kind, dtype=torch.float64, seed=0):
    """A tiny model of each family the suite covers."""
    if kind == "armt":
        return tiny_armt(dtype, seed)
    if kind == "rmt":
        return tiny_rmt(dtype, seed)
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind](dtype, seed)
    torch.manual_seed(seed + 1)
    return wrap_armt(base, segment_len=SEG, n_mem_tokens=3, d_mem=4).to(dtype).eval()


ARMT_KINDS = ["armt", pytest.param("llama", marks=pytest.mark.hf), pytest.param("gpt2", marks=pytest.mark.hf)]


def ids_for(n_segments, batch=1, short_last=0, seed=0):
    """Token ids covering `n_segments` segments, the last one `short_last` tokens short."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n_segments * SEG - short_last), generator=g)
