"""Small random-weight Hugging Face models of every recurrent and hybrid family in transformers.

One entry per family (Mamba, FalconMamba, Jamba, Mamba-2, Bamba, Zamba2, GraniteMoeHybrid,
Falcon-H1, RWKV, xLSTM, Qwen3-Next, Kimi-Linear, MiniMax, RecurrentGemma, LFM2): a config small
enough for CPU tests (hidden size 64, 2-3 layers, vocabulary 128) in which the recurrent part
(SSM scan, WKV, mLSTM, gated delta rule, lightning attention, RG-LRU, short convolution) is a
meaningful share of the compute, and, for the hybrids, at least one recurrent layer and one
attention layer. Used by the tests, benchmarks/hf_families.py and the README table. Nothing here
downloads weights or data: every model is built from its config with random weights.

transformers is imported only when a model is built, so importing this module never needs it;
`available()` says which families the installed transformers has.

Chunked kernels are given chunk size 64 wherever the config has one (Mamba-2 family
`chunk_size`, xLSTM `chunk_size`, MiniMax `block_size`; the gated delta rule and KDA use their
built-in 64), so a length such as 300 is not a multiple of any chunk size.

>>> "mamba" in FAMILIES and list(FAMILIES)[0]
'mamba'
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FAMILIES", "Family", "available", "build", "config", "example_ids"]

VOCAB = 128


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "wavefront.hf_families needs Hugging Face transformers (pip install 'wavefront[hf]')"
        raise ImportError(msg) from exc
    return transformers


@dataclass(frozen=True, eq=False)
class Family:
    """One recurrent or hybrid family: its transformers classes and a small config.

    `config_kwargs` are the keyword arguments of `config_class_name`; `build` makes the eval-mode
    `model_class_name` (a *ForCausalLM) with random weights from them.

    >>> FAMILIES["rwkv"].model_class_name
    'RwkvForCausalLM'
    """

    name: str
    config_class_name: str
    model_class_name: str
    config_kwargs: Mapping[str, Any] = field(default_factory=dict)
    recurrent: str = ""  # what the recurrent part is, in words

    def is_available(self) -> bool:
        """Whether the installed transformers has both classes (False without transformers).

        >>> FAMILIES["mamba"].is_available()
        True
        """
        try:
            transformers = _transformers()
        except ImportError:
            return False
        for cls_name in (self.config_class_name, self.model_class_name):
            try:
                getattr(transformers, cls_name)
            except (AttributeError, ImportError, RuntimeError):
                return False
        return True

    def _classes(self):
        transformers = _transformers()
        try:
            return getattr(transformers, self.config_class_name), getattr(transformers, self.model_class_name)
        except (AttributeError, ImportError, RuntimeError) as exc:
            raise ImportError(
                f"family {self.name!r} needs transformers.{self.config_class_name} and "
                f"transformers.{self.model_class_name}, which transformers {transformers.__version__} does not have"
            ) from exc

    def config(self, **overrides):
        """The family's small config (a transformers config object); `overrides` replace its values.

        >>> FAMILIES["mamba"].config(state_size=8).state_size
        8
        """
        config_cls, _ = self._classes()
        return config_cls(**copy.deepcopy({**self.config_kwargs, **overrides}))

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
        """The eval-mode *ForCausalLM with random weights drawn from `seed`, in `dtype`.

        The global RNG is left as it was. `overrides` replace config values (e.g. `chunk_size=32`).

        >>> model = FAMILIES["mamba"].build()
        >>> model(example_ids("mamba", 2, 8), use_cache=False).logits.shape
        torch.Size([2, 8, 128])
        """
        _, model_cls = self._classes()
        cfg = self.config(**overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(cfg)
        return model.to(dtype).eval()


def _hybrid_attention(**kw):
    """Attention sizes shared by the hybrids: 4 query heads of 16, 2 key/value heads."""
    return {"num_attention_heads": 4, "num_key_value_heads": 2, **kw}


# transformers 5 runs MoE experts with torch grouped_mm by default, which has no float64 kernel; the
# "eager" loop over experts runs in every dtype (transformers 4 ignores the key).
_EAGER_EXPERTS = {"experts_implementation": "eager"}

_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "tie_word_embeddings": False}

FAMILIES: OrderedDict[str, Family] = OrderedDict(
    (f.name, f)
    for f in [
        Family(
            "mamba", "MambaConfig", "MambaForCausalLM",
            {**_COMMON, "num_hidden_layers": 2, "state_size": 16, "expand": 2, "conv_kernel": 4,
             "use_mambapy": False, "use_associative_scan": False},
            recurrent="selective scan, a Python loop over time (2 Mamba layers, d_inner 128, state 16)",
        ),
        Family(
            "falcon_mamba", "FalconMambaConfig", "FalconMambaForCausalLM",
            {**_COMMON, "num_hidden_layers": 2, "state_size": 16, "expand": 2, "conv_kernel": 4,
             "use_mambapy": False, "use_associative_scan": False},
            recurrent="selective scan (Mamba's, with RMS norms on dt, B, C), a Python loop over time",
        ),
        Family(
            "jamba", "JambaConfig", "JambaForCausalLM",
            {**_COMMON, **_hybrid_attention(), "num_hidden_layers": 3, "intermediate_size": 128,
             "attn_layer_period": 3, "attn_layer_offset": 1,  # layers: mamba, attention, mamba
             "expert_layer_period": 2, "expert_layer_offset": 1,  # MoE MLP in layer 1
             "num_experts": 4, "num_experts_per_tok": 2, **_EAGER_EXPERTS,
             "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
             "use_mambapy": False, "use_associative_scan": False,
             "use_mamba_kernels": False},  # transformers 4.x refuses to build without mamba_ssm otherwise
            recurrent="selective scan (Mamba-1), a Python loop over time, in layers 0 and 2; attention in layer 1",
        ),
        Family(
            "mamba2", "Mamba2Config", "Mamba2ForCausalLM",
            {**_COMMON, "num_hidden_layers": 2, "num_heads": 4, "head_dim": 32, "expand": 2, "state_size": 32,
             "n_groups": 2, "conv_kernel": 4, "chunk_size": 64},
            recurrent="SSD chunked scan (einsums, no Python loop), 4 heads of 32, state 32, 2 groups",
        ),
        Family(
            "bamba", "BambaConfig", "BambaForCausalLM",
            {**_COMMON, **_hybrid_attention(), "num_hidden_layers": 3, "intermediate_size": 128,
             "attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_state": 32, "mamba_n_groups": 1,
             "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 64},
            recurrent="Mamba-2 SSD chunked scan in layers 0 and 2; attention in layer 1",
        ),
        Family(
            "zamba2", "Zamba2Config", "Zamba2ForCausalLM",
            {**_COMMON, "num_hidden_layers": 3, "layers_block_type": ["mamba", "hybrid", "mamba"],
             "num_attention_heads": 4, "intermediate_size": 128, "n_mamba_heads": 4, "mamba_d_state": 32,
             "mamba_ngroups": 1, "mamba_d_conv": 4, "mamba_expand": 2, "chunk_size": 64, "num_mem_blocks": 1,
             "use_shared_attention_adapter": False, "use_mem_rope": False},
            recurrent="Mamba-2 SSD chunked scan in all 3 layers; layer 1 also runs the shared attention block",
        ),
        Family(
            "granitemoehybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
            {**_COMMON, **_hybrid_attention(), "num_hidden_layers": 3,
             "layer_types": ["mamba", "attention", "mamba"],
             "intermediate_size": 64, "shared_intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
             **_EAGER_EXPERTS, "mamba_n_heads": 4, "mamba_d_state": 32, "mamba_n_groups": 1, "mamba_d_conv": 4,
             "mamba_expand": 2, "mamba_chunk_size": 64},
            recurrent="Mamba-2 SSD chunked scan in layers 0 and 2; attention in layer 1; MoE MLPs",
        ),
        Family(
            "falcon_h1", "FalconH1Config", "FalconH1ForCausalLM",
            {**_COMMON, **_hybrid_attention(), "num_hidden_layers": 2, "intermediate_size": 128,
             "mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_state": 32, "mamba_n_groups": 1,
             "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 64},
            recurrent="Mamba-2 SSD chunked scan (8 heads of 16, state 32) beside attention in every layer",
        ),
        Family(
            "rwkv", "RwkvConfig", "RwkvForCausalLM",
            {**_COMMON, "num_hidden_layers": 2, "attention_hidden_size": 64, "intermediate_size": 128,
             "context_length": 2048, "rescale_every": 0},
            recurrent="RWKV-4 WKV, a Python loop over time (2 layers, 64 channels)",
        ),
        Family(
            "xlstm", "xLSTMConfig", "xLSTMForCausalLM",
            {**_COMMON, "num_hidden_layers": 2, "num_heads": 4, "qk_dim_factor": 0.5, "v_dim_factor": 1.0,
             "mode": "inference", "chunk_size": 64, "inference_state_dtype": "float32",
             "weight_mode": "single", "max_inference_chunksize": 16384},
            recurrent="mLSTM chunkwise (Python loop over chunks) + a step loop over the T % 64 tail",
        ),
        Family(
            "qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM",
            {**_COMMON, **_hybrid_attention(head_dim=16), "num_hidden_layers": 3,
             "layer_types": ["linear_attention", "full_attention", "linear_attention"],
             "intermediate_size": 128, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
             "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
             "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
             "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1, **_EAGER_EXPERTS},
            recurrent="gated delta rule, chunked (Python loop over 64-token chunks), in layers 0 and 2",
        ),
        Family(
            "kimi_linear", "KimiLinearConfig", "KimiLinearForCausalLM",
            {**_COMMON, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 128, "moe_intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
             "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, **_EAGER_EXPERTS,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
             "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
             "linear_attn_config": {"kda_layers": [1, 3], "full_attn_layers": [2], "num_heads": 4, "head_dim": 16,
                                    "short_conv_kernel_size": 4}},
            recurrent="Kimi delta attention, chunked (Python loops over chunks and within a chunk), layers 0 and 2",
        ),
        Family(
            "minimax", "MiniMaxConfig", "MiniMaxForCausalLM",
            {**_COMMON, **_hybrid_attention(head_dim=16), "num_hidden_layers": 3,
             "layer_types": ["linear_attention", "full_attention", "linear_attention"],
             "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 64,
             **_EAGER_EXPERTS},
            recurrent="lightning attention, a Python loop over 64-token blocks, in layers 0 and 2",
        ),
        Family(
            "recurrent_gemma", "RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
            {**_COMMON, "tie_word_embeddings": True, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 1, "intermediate_size": 128, "lru_width": 64, "conv1d_width": 4,
             "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"]},
            recurrent="RG-LRU, a Python loop over time, in layers 0 and 1; local attention in layer 2",
        ),
        Family(
            "lfm2", "Lfm2Config", "Lfm2ForCausalLM",
            {**_COMMON, **_hybrid_attention(), "num_hidden_layers": 3,
             "layer_types": ["conv", "full_attention", "conv"], "intermediate_size": 128,
             "block_auto_adjust_ff_dim": False, "conv_L_cache": 3, "conv_bias": False},
            recurrent="gated short causal convolution (width 3, no state recurrence) in layers 0 and 2",
        ),
    ]
)


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; the families are {', '.join(FAMILIES)}") from None


def available() -> list[str]:
    """The family names whose classes the installed transformers has ([] without transformers), in order.

    >>> "mamba" in available()
    True
    """
    return [name for name, fam in FAMILIES.items() if fam.is_available()]


def config(name: str, **overrides):
    """The small config of family `name`, with `overrides` applied.

    >>> config("rwkv").hidden_size
    64
    """
    return _family(name).config(**overrides)


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """`FAMILIES[name].build(dtype, seed, **overrides)`: the eval-mode *ForCausalLM with random weights.

    >>> build("mamba", dtype=torch.float64).dtype
    torch.float64
    """
    return _family(name).build(dtype=dtype, seed=seed, **overrides)


def example_ids(family_name: str, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """A [batch, length] LongTensor of token ids drawn uniformly from the family's vocabulary.

    The ids come from a generator seeded with `seed`; the global RNG is untouched.

    >>> ids = example_ids("xlstm", 2, 5)
    >>> ids.shape, ids.dtype, bool(ids.max() < 128)
    (torch.Size([2, 5]), torch.int64, True)
    """
    vocab = int(_family(family_name).config_kwargs.get("vocab_size", VOCAB))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen, dtype=torch.long)
