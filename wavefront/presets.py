"""Model sizes the benchmarks and the CLI share (the configs the issues name), and the named
example models `wavefront inspect` / `export` build."""

import torch

from wavefront.models import ARMT, RMT, ARMTConfig, RMTConfig

ARMT_PRESETS = {
    # dispatch-bound: tiny layers, so per-call overhead dominates the sequential model
    "dispatch": dict(n_layers=8, d_model=64, n_heads=4, d_ff=128, segment_len=32, n_mem_tokens=8, d_mem=16,
                     vocab_size=256, n_segments=64),
    # small: L=8, d=256, d_ff=688, segment 128, M=16, S=64
    "small": dict(n_layers=8, d_model=256, n_heads=4, d_ff=688, segment_len=128, n_mem_tokens=16, d_mem=32,
                  vocab_size=1024, n_segments=64),
    # tiny: a seconds-long smoke run
    "tiny": dict(n_layers=4, d_model=32, n_heads=2, d_ff=64, segment_len=16, n_mem_tokens=4, d_mem=8,
                 vocab_size=128, n_segments=8),
}


def split_preset(name: str) -> tuple[dict, int]:
    """(ARMTConfig kwargs, number of segments) of a preset."""
    cfg = dict(ARMT_PRESETS[name])
    return cfg, cfg.pop("n_segments")


def example_model(name: str, seed: int = 0):
    """(model, default segment count) of a named example: 'armt-<preset>' or 'rmt-tiny' (the
    negative case: its memory flows from the top layer to the next segment's first layer).
    Random weights, float32, eval mode; nothing is downloaded.

    >>> model, S = example_model("armt-tiny")
    >>> type(model).__name__, S
    ('ARMT', 8)
    """
    torch.manual_seed(seed)
    if name.startswith("armt-") and name[5:] in ARMT_PRESETS:
        cfg, S = split_preset(name[5:])
        return ARMT(ARMTConfig(**cfg)).eval(), S
    if name == "rmt-tiny":
        cfg, S = split_preset("tiny")
        cfg.pop("d_mem")
        return RMT(RMTConfig(**cfg)).eval(), S
    raise ValueError(f"unknown example model {name!r}: choose one of {', '.join(EXAMPLE_MODELS)}")


EXAMPLE_MODELS = tuple(f"armt-{p}" for p in ARMT_PRESETS) + ("rmt-tiny",)
