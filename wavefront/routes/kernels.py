"""Adapters for Hugging Face models whose time loop wavefront can replace by a native scan.

Mamba (transformers 5.x): every MambaMixer calls the module-level `mamba_selective_scan`
(a Python loop over time on CPU). The loop is affine in its state (h = exp(dt A) h + dt B u),
so it runs as wavefront's selective-scan kernel instead: the optimized model swaps that one
function for the duration of each of its calls (restored afterwards, also on error), with the
model's own forward, outputs and weights. transformers 4.x inlines the loop in the mixer's
slow_forward; that layout is refused with a clear message. Calls are not thread-safe: two
threads running the same transformers module at once would both see the swap.
"""
from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F
from torch import nn

import wavefront.backends.scans.selective.native as native_selective
from wavefront.backends.scans.selective.chunked import selective_scan_torch
from wavefront.routes.base import Optimized
from wavefront.routes.explanation import NO_SEGMENTS, Explanation


def _mamba_module():
    try:
        return importlib.import_module("transformers.models.mamba.modeling_mamba")
    except ImportError:
        return None


def _native_mamba_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, **unused):
    """transformers' mamba_selective_scan signature, computed by the native kernel (float32)."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)

    def f32(t):
        return t.float().contiguous() if t is not None else None

    # the native kernel is a ctypes call: an export traces the torch form
    scan = selective_scan_torch if torch.compiler.is_exporting() else native_selective.selective_scan
    y, h = scan(f32(hidden_states), f32(dt), f32(A), f32(B), f32(C), f32(D), f32(z))
    y = y.to(hidden_states.dtype)
    return (y, h) if return_last_state else y


class MambaScanAdapter:
    """Recognises Hugging Face Mamba models (MambaForCausalLM / MambaModel)."""

    name = "hf-mamba"

    def matches(self, model) -> bool:
        return type(model).__name__ in ("MambaForCausalLM", "MambaModel") and \
            type(model).__module__.startswith("transformers.models.mamba")

    def check(self, model) -> str:
        """'' if supported, else why not."""
        mm = _mamba_module()
        if mm is None or not hasattr(mm, "mamba_selective_scan"):
            import transformers
            return (f"transformers {transformers.__version__} inlines Mamba's scan loop in MambaMixer.slow_forward; "
                    "wavefront replaces the module-level mamba_selective_scan of transformers 5.x")
        if any(p.device.type != "cpu" for p in model.parameters()):
            return "the native selective scan runs on the CPU (move the model there, or use the CUDA kernels)"
        if native_selective.library() is None:
            return f"the native selective scan could not be built: {native_selective.KERNEL.error}"
        return ""

    def patches(self):
        return [(_mamba_module(), "mamba_selective_scan", _native_mamba_scan)]

    def describe(self, model) -> str:
        n = sum(1 for m in model.modules() if type(m).__name__ == "MambaMixer")
        return (f"{type(model).__name__} (adapter {self.name}): {n} Mamba mixers; selective scan "
                "h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t is affine in its state: runs as the native selective scan")


SCAN_ADAPTERS = [MambaScanAdapter()]


def scan_adapter_for(model):
    return next((a for a in SCAN_ADAPTERS if a.matches(model)), None)


@contextlib.contextmanager
def swapped(patches):
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


class KernelSubstitutedModel(Optimized):
    """A model whose time-loop functions run as wavefront's kernels; same forward signature and outputs."""

    route = "kernel substitution"
    precision = torch.float32  # the native selective scan computes in float32

    def __init__(self, model: nn.Module, adapter, options: dict, verify: bool = False):
        super().__init__(model, options, verify)
        self.adapter = adapter

    def run(self, *args, **kwargs):
        with swapped(self.adapter.patches()):
            return self.model(*args, **kwargs)

    def describe_route(self) -> str:
        return f"the {self.adapter.name} kernel substitution"

    def rewrites(self) -> list[str]:
        return [self.adapter.describe(self.model)]

    def export_kind(self) -> str:
        return self.adapter.name

    def explain(self, n_segments: int | None = None) -> Explanation:
        return preview(self.model, n_segments)


def recognise(model: nn.Module) -> str | None:
    """'' when an adapter substitutes kernels in `model`, the reason when one recognises it but
    cannot, None when none recognises it."""
    adapter = scan_adapter_for(model)
    return None if adapter is None else adapter.check(model)


def build(model: nn.Module, options: dict, verify: bool, log) -> KernelSubstitutedModel:
    adapter = scan_adapter_for(model)
    return log.run("kernel substitution", lambda: KernelSubstitutedModel(model, adapter, options, verify),
                   lambda m: adapter.describe(model))


def preview(model: nn.Module, n_segments: int | None = None) -> Explanation:
    adapter = scan_adapter_for(model)
    why = adapter.check(model)
    return Explanation(type(model).__name__, adapter.name, adapter.describe(model), NO_SEGMENTS,
                       f"unchanged ({why})" if why else "native scan", 0, None)


__all__ = ["KernelSubstitutedModel", "build", "preview", "recognise", "scan_adapter_for"]
