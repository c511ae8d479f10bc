"""generate() for optimized segment models, with Hugging Face's semantics.

A segment model's logits for the last token of a sequence depend on two things only: the memory
after the sequence's finished segments and the tokens of its current (last, maybe partial)
segment; that is how the model itself cuts the sequence. So decoding never recomputes the
sequence: the prompt's finished segments are prefilled once under the optimized schedule (the
diagonal wavefront), then the current segment is decoded from the memory before it.

With a key/value cache (wavefront/kv_decode.py, when the cell's blocks take one and the decoder's
check proves it gives the cell's own results) each new token runs the model's own cell on that
token alone: one token (and the memory rows) per layer, attending to the segment's cached
keys/values. Each such run also returns the memory the segment would write if it ended there, so
when the segment fills, its memory is already written: that column of cells, computed once.
Otherwise each token runs its current segment whole (at most segment_len tokens) from the memory
before it. Either way greedy tokens equal those of recomputing the model on the growing
sequence, across segment boundaries and for any batch.

Unlike the public ARMT client's generate (which feeds the prompt's last partial segment
and every generated token to the base model with the memory read-only, so tokens past a segment
boundary never see that segment written to memory), this generate writes memory at every
segment boundary, exactly as the model's own forward on the longer sequence would.
`memory_writes=False` gives the client's behaviour: the prompt's last segment and every new token
form one segment that grows past segment_len in the key/value cache, reading the memory of the
finished prompt segments and never writing it (needs the cache).

Sampling, temperature, top-k and top-p use transformers' logits warpers (the well-kept ones);
greedy decoding needs nothing beyond torch.
"""
from __future__ import annotations

import warnings

import torch

from wavefront.contract.segment import check_attention_mask, check_input_ids

# The generation settings this generate() reads (from keyword arguments, else `generation_config`).
SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
            "eos_token_id", "pad_token_id", "use_cache", "memory_writes")
_DEFAULT_MAX_LENGTH = 20  # transformers' GenerationConfig default


def _settings(generation_config, kwargs: dict) -> dict:
    """The settings: keyword arguments first, then the generation config's, then transformers' defaults."""
    unknown = sorted(set(kwargs) - set(SETTINGS))
    if unknown:
        raise TypeError(f"generate() got unsupported argument(s) {unknown}: it takes input_ids, attention_mask, "
                        f"generation_config, logits_processor and {', '.join(SETTINGS)}")
    out = {}
    for name in SETTINGS:
        value = kwargs.get(name)
        if value is None and generation_config is not None:
            value = getattr(generation_config, name, None)
        out[name] = value
    out["do_sample"] = bool(out["do_sample"])
    out["use_cache"] = out["use_cache"] is None or bool(out["use_cache"])  # transformers' default: True
    out["memory_writes"] = out["memory_writes"] is None or bool(out["memory_writes"])
    for name, default in (("temperature", 1.0), ("top_k", None), ("top_p", 1.0), ("min_new_tokens", 0)):
        out[name] = default if out[name] is None else out[name]
    eos = out["eos_token_id"]
    out["eos_token_id"] = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return out


def _processors(s: dict, logits_processor):
    """The logits processors (the user's, then min_new_tokens) and, when sampling, transformers'
    warpers in its order (temperature, top-k, top-p)."""
    steps = list(logits_processor or [])
    warpers = []
    if s["do_sample"] and (s["temperature"] != 1.0 or s["top_k"] or s["top_p"] < 1.0):
        try:
            from transformers.generation.logits_process import (
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )
        except ImportError as e:
            raise ImportError("sampling with temperature, top_k or top_p uses transformers' logits warpers: "
                              "pip install transformers (greedy decoding needs nothing more)") from e
        if s["temperature"] != 1.0:
            warpers.append(TemperatureLogitsWarper(float(s["temperature"])))
        if s["top_k"]:
            warpers.append(TopKLogitsWarper(int(s["top_k"])))
        if s["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(float(s["top_p"])))
    return steps, warpers


def segment_generate(model, segment_len: int, input_ids: torch.Tensor, *, decode=None, cached=None, dtype=None,
                     attention_mask=None, generation_config=None, logits_processor=None,
                     **kwargs) -> torch.LongTensor:
    """The prompt and the generated tokens [batch, prompt + new] of a segment model `model`
    (called as model(input_ids, memory) -> .logits, .memory) that cuts its input into segments of
    `segment_len` tokens; `decode` (the same call, default `model`) runs each token's current
    segment, or `cached` (a checked CachedSegmentDecoder, with the model's `dtype`) feeds it one
    token at a time. See the module docstring; OptimizedModel.generate calls this.

    >>> import wavefront
    >>> from wavefront.models import ARMT, ARMTConfig
    >>> armt = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4))
    >>> fast = wavefront.optimize(armt)
    >>> fast.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=6).shape
    torch.Size([1, 11])
    """
    check_input_ids(input_ids)  # the segment models' own checks and messages
    check_attention_mask(attention_mask, input_ids)
    s = _settings(generation_config, kwargs)
    prompt = input_ids.shape[1]
    if s["max_new_tokens"] is not None:
        budget = int(s["max_new_tokens"])
    else:
        budget = int(s["max_length"] if s["max_length"] is not None else _DEFAULT_MAX_LENGTH) - prompt
        if budget <= 0:
            warnings.warn(f"the prompt has {prompt} tokens, not fewer than max_length: nothing is generated; set "
                          "max_new_tokens", stacklevel=3)
            budget = 0  # as transformers: the prompt comes back
    if budget < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {budget}")
    eos, pad = s["eos_token_id"], s["pad_token_id"]
    if eos and pad is None:
        pad = eos[0]  # as transformers does (it says so with a warning)
    processors, warpers = _processors(s, logits_processor)
    if not s["use_cache"]:  # as transformers' use_cache=False: no key/value cache, the segment runs whole
        cached = None
    writes = s["memory_writes"]
    if not writes and cached is None:
        raise ValueError("memory_writes=False grows the prompt's last segment past segment_len in the key/value "
                         "cache; this call has none (use_cache=False, or a model whose cell takes none: see "
                         "decode_reason)")
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)

    ids = input_ids
    current = (prompt - 1) // segment_len  # the segment holding the last token
    with torch.no_grad():
        memory = model(ids[:, :current * segment_len]).memory if current else None  # prefill: the schedule
        if cached is not None and budget:  # the current segment's prompt tokens, then one token per step
            stream = cached.stream(memory, ids.shape[0], dtype, ids.device, grow=not writes)
            logits = stream.feed(ids[:, current * segment_len:])
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        for step in range(budget):
            start = current * segment_len
            if cached is None:
                out = (decode or model)(ids[:, start:], memory)  # the current segment, from the memory before it
                logits = out.logits
            elif step:
                logits = stream.feed(ids[:, -1:])
            scores = logits[:, -1, :]
            for p in processors:
                scores = p(ids, scores)
            if step < s["min_new_tokens"] and eos:
                scores = scores.clone()
                scores[:, eos] = -float("inf")
            if s["do_sample"]:
                for w in warpers:
                    scores = w(ids, scores)
                token = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            if eos:
                token = torch.where(unfinished, token, torch.as_tensor(pad, dtype=token.dtype, device=token.device))
            ids = torch.cat([ids, token.to(ids.dtype)[:, None]], dim=1)
            if writes and ids.shape[1] - start > segment_len:  # a new segment: the full one's memory is written
                memory, current = (out.memory if cached is None else None), current + 1
            if eos:
                unfinished &= ~torch.isin(token, eos_t)
                if not bool(unfinished.any()):
                    break
    return ids


__all__ = ["SETTINGS", "segment_generate"]
