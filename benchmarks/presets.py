"""Model sizes the benchmarks share (the configs the issues name)."""

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
