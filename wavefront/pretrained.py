"""save_pretrained / from_pretrained for optimized models, in Hugging Face's folder layout.

A folder holds what the optimized model is built from, never what optimize() derives (captured
graphs, stacks, compiled kernels: optimize() rebuilds them on loading):
  - a Hugging Face model (one optimize() lifted or gave kernels): that model's own save_pretrained
    (config.json, model.safetensors), loadable by transformers alone;
  - an ARMT over a Hugging Face model (wrap_armt): the base model the same way, plus
    `wavefront_memory.safetensors` (memory tokens and associative memories, the weights the base
    does not have);
  - a standalone wavefront ARMT: `model.safetensors` and its ARMTConfig;
and `wavefront.json` (which of these, the wrapping sizes, optimize()'s options).

Weights are written from copies: under diagonal batching the parameters are views into per-layer
stacks, which share storage, and safetensors (or transformers' tied-weight detection) would take
shared storage for tied weights.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

MANIFEST = "wavefront.json"
MEMORY_WEIGHTS = "wavefront_memory.safetensors"
WEIGHTS = "model.safetensors"


def _copies(tensors: dict) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def save_pretrained(optimized, save_directory: str) -> None:
    """Write `optimized` (what optimize() returned, or a model) to `save_directory` (see the module
    docstring); `from_pretrained(save_directory)` builds it again.

    >>> import tempfile, wavefront
    >>> from wavefront.models import ARMT, ARMTConfig
    >>> fast = wavefront.optimize(ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32)))
    >>> folder = tempfile.mkdtemp()
    >>> fast.save_pretrained(folder)
    >>> again = wavefront.from_pretrained(folder)
    >>> ids = torch.randint(0, 256, (1, 40))
    >>> torch.allclose(again(ids).logits, fast(ids).logits, atol=1e-5)
    True
    """
    from safetensors.torch import save_file

    from wavefront.models.armt import ARMT
    model = getattr(optimized, "model", optimized)
    options = dict(getattr(optimized, "options", {}))
    os.makedirs(save_directory, exist_ok=True)
    hf_model = getattr(model, "hf_model", None)
    if hf_model is not None and hasattr(hf_model, "save_pretrained"):  # wrap_armt
        hf_model.save_pretrained(save_directory, state_dict=_copies(hf_model.state_dict()))
        base = {id(p) for p in (*hf_model.parameters(), *hf_model.buffers())}
        own = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in base}
        save_file(_copies(own), os.path.join(save_directory, MEMORY_WEIGHTS))
        memory = model.cell.layers[0].memory
        manifest = {"kind": "wrap_armt", "segment_len": model.segment_len, "n_mem_tokens": model.cell.n_mem_tokens,
                    "d_mem": memory.d_mem, "nu": memory.nu}
    elif hasattr(model, "save_pretrained") and hasattr(model, "config"):  # a Hugging Face model
        model.save_pretrained(save_directory, state_dict=_copies(model.state_dict()))
        manifest = {"kind": "transformers"}
    elif isinstance(model, ARMT):
        save_file(_copies(model.state_dict()), os.path.join(save_directory, WEIGHTS))
        manifest = {"kind": "armt", "config": dataclasses.asdict(model.config)}
    else:
        raise TypeError(f"save_pretrained writes Hugging Face models, wrap_armt models and wavefront ARMTs; "
                        f"{type(model).__name__} is none of them: save its state_dict with torch.save and build it "
                        "again before optimize()")
    manifest.update({"options": options, "training": model.training,
                     "dtype": str(next(model.parameters()).dtype).replace("torch.", "")})
    with open(os.path.join(save_directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=str)


def _load_weights(model: nn.Module, path: str, what: str, loaded_already: frozenset = frozenset()) -> None:
    """Load `path` into `model`: every weight not in `loaded_already` must be in it, nothing else."""
    from safetensors.torch import load_file
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    missing = [k for k in missing if k not in loaded_already]
    if unexpected or missing:
        raise ValueError(f"{path} does not hold the weights of this {what}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")


def from_pretrained(save_directory: str, **options):
    """The optimized model save_pretrained wrote to `save_directory`, built again and optimized
    with the options it was optimized with (keywords override them: schedule=, backend=, ...)."""
    path = os.path.join(save_directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{save_directory} has no {MANIFEST}: it was not written by wavefront's "
                                "save_pretrained (a Hugging Face folder loads with transformers, then optimize())")
    with open(path) as f:
        manifest = json.load(f)
    dtype = getattr(torch, manifest["dtype"])
    kind = manifest["kind"]
    if kind in ("transformers", "wrap_armt"):
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(save_directory, local_files_only=True).to(dtype)
        if kind == "transformers":
            model = base
        else:
            from wavefront.models.hf import wrap_armt
            model = wrap_armt(base, manifest["segment_len"], manifest["n_mem_tokens"], manifest["d_mem"],
                              manifest["nu"])
            base_ids = {id(v) for v in (*base.parameters(), *base.buffers())}
            from_base = frozenset(k for k, v in model.state_dict(keep_vars=True).items() if id(v) in base_ids)
            _load_weights(model, os.path.join(save_directory, MEMORY_WEIGHTS), "ARMT's memory", from_base)
    elif kind == "armt":
        from wavefront.models.armt import ARMT, ARMTConfig
        config = dict(manifest["config"])
        if config.get("d_ff_per_layer") is not None:
            config["d_ff_per_layer"] = tuple(config["d_ff_per_layer"])
        model = ARMT(ARMTConfig(**config)).to(dtype)
        _load_weights(model, os.path.join(save_directory, WEIGHTS), "ARMT")
    else:
        raise ValueError(f"{path} names a kind {kind!r} this wavefront does not know: a newer wavefront wrote it")
    model.train(manifest["training"])
    import wavefront
    return wavefront.optimize(model, **{**manifest["options"], **options})


__all__ = ["from_pretrained", "save_pretrained"]
