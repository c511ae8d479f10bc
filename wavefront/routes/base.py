"""Optimized: what optimize() returns, whatever route it took, and the one verify-once path.

Every result holds the user's model (`model`, the truth every check compares with), the options
optimize() was called with (`options`: pickling optimizes the model again with them), the
stages its route ran (`stage_log`, wavefront.stages) and a CallGate (calls share it; a verifying
call or a new capture takes it alone). A route supplies `run` (the fast call), and where its
reference is not simply the model's own forward, `reference` and `compared`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from wavefront.backends.onnx.module_export import export_module
from wavefront.call_gate import CallGate
from wavefront.contract.checks import check_outputs
from wavefront.reoptimize import reoptimize
from wavefront.scheduler.train_mode import eval_mode
from wavefront.stages import Stage, StageLog

SKIP = object()  # reference(): this call cannot be compared (verify a later one)


class Optimized(nn.Module):
    """The model run by one route of optimize(); same forward signature and outputs as the model.

    verify=True compares the first call with the model's own forward (in eval mode when the
    model is training: dropout draws differ between any two runs), with the tolerance of the
    one table (wavefront.contract.checks.VERIFY_RTOL) for the output's dtype, or for `precision`
    when the route computes in a less precise dtype; a difference raises VerificationError.

    >>> import wavefront
    >>> from wavefront.models import MinGRU
    >>> fast = wavefront.optimize(MinGRU(4), verify=True)
    >>> isinstance(fast, Optimized), fast.route
    (True, 'time loops')
    """

    route = ""  # the route's name, as explain() and stages() show it
    precision: torch.dtype | None = None  # the least precise dtype the route computes in, if below the output's

    def __init__(self, model: nn.Module, options: dict, verify: bool = False):
        super().__init__()
        self.model = model
        self.options = dict(options)  # what optimize() was called with, verify aside
        self.verify = verify
        self._verify_requested = verify
        object.__setattr__(self, "stage_log", StageLog())
        object.__setattr__(self, "_gate", CallGate())

    # --- what a route provides
    def run(self, *args, **kwargs):
        """The fast call."""
        raise NotImplementedError

    def before_call(self) -> None:
        """Follow changes to the model before a call (a new capture, new sessions)."""

    def reference(self, *args, **kwargs):
        """The result the fast call must equal: the model's own forward (SKIP: compare a later call)."""
        return self.model(*args, **kwargs)

    def compared(self, out, ref):
        """(the tensors of the fast result, their twins in the reference) that verify compares:
        by default every floating tensor of each, in order."""
        return out, ref

    def explain(self, n_segments: int | None = None):
        """What this route found and ran (wavefront.explain)."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        """The stages the route ran, with what the last call added (wavefront.stages)."""
        return list(self.stage_log)

    # --- the same for every route
    def forward(self, *args, **kwargs):
        self.before_call()
        if self.verify:  # the verifying call may switch the model to eval mode: no other call meanwhile
            with self._gate.exclusive():
                out = self.run(*args, **kwargs)
                if self.verify:
                    self._verify_call(args, kwargs, out)
                return out
        with self._gate.shared():
            return self.run(*args, **kwargs)

    def _verify_call(self, args, kwargs, out) -> None:
        modules = list(self.model.modules())
        training = any(m.training for m in modules)
        with torch.no_grad(), eval_mode(modules if training else ()):
            ref = self.reference(*args, **kwargs)
            if ref is SKIP:
                return
            if training:  # compare like with like: the fast call again, in eval mode too
                out = self.run(*args, **kwargs)
        got, want = self.compared(out, ref)
        check_outputs(got, want, f"{type(self.model).__name__} under {self.describe_route()} (vs its own forward)",
                      at_least=self.precision)
        self.verify = False  # verified on the first comparable call, as documented

    def running(self):
        """The context the model's own code runs in under this route (its loops lifted, its
        kernels swapped in): entered by every call, and around the model's own generate()."""
        return contextlib.nullcontext()

    def generate(self, *args, **kwargs):
        """The model's own generate() (transformers' GenerationMixin for a Hugging Face model), every
        forward it makes running under this route.

        >>> import wavefront
        >>> wavefront.optimize(torch.nn.Linear(2, 2)).generate()
        Traceback (most recent call last):
        ...
        AttributeError: Linear has no generate(): there is nothing to generate with
        """
        generate = getattr(self.model, "generate", None)
        if not callable(generate):
            raise AttributeError(f"{type(self.model).__name__} has no generate(): there is nothing to generate with")
        self.before_call()
        with self._gate.shared(), self.running():
            return generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str) -> None:
        """The model in Hugging Face's folder layout, with optimize()'s options
        (wavefront/pretrained.py); `wavefront.from_pretrained(save_directory)` builds it again."""
        from wavefront.pretrained import save_pretrained
        save_pretrained(self, save_directory)

    @property
    def config(self):
        """The model's config (for a wrapped Hugging Face model, that model's), None without one."""
        return _of_model(self.model, "config")

    @property
    def generation_config(self):
        """The model's generation config (transformers' GenerationConfig), None without one."""
        return _of_model(self.model, "generation_config")

    def describe_route(self) -> str:
        return f"route {self.route!r}"

    def rewrites(self) -> list[str]:
        """What the route rewrote, a line each (ONNX metadata, explain())."""
        return []

    def export_kind(self) -> str:
        """The `wavefront.kind` an exported graph records."""
        return self.route

    def export_onnx(self, example_inputs, path: str, *, dynamic: bool = True, time_dims=None, dynamic_shapes=None,
                    kwargs: dict | None = None, check: bool = True, decode: bool = False):
        """This model as an ONNX graph (wavefront.export_onnx documents the arguments), exported in
        eval mode; the model's own train/eval flags come back after."""
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        how = dict(dynamic=dynamic, time_dims=time_dims, dynamic_shapes=dynamic_shapes, kwargs=dict(kwargs or {}),
                   check=check)
        if decode:
            if self.export_kind() != "segments":
                from wavefront.backends.onnx.graphs import ExportError
                raise ExportError(f"decode=True exports a segment model's decode step; this model runs on the "
                                  f"{self.route} route: export it without decode")
            how["decode"] = True
        with eval_mode(self.modules()):
            return self._export(example_inputs, path, **how)

    def _export(self, example_inputs: tuple, path: str, **how):
        """The module as it runs (loops lifted, kernels substituted), its time dims dynamic."""
        return export_module(self, example_inputs, path, kind=self.export_kind(), rewrites=self.rewrites(), **how)

    def __reduce__(self):
        # Pickling (torch.save, copy.deepcopy) keeps the model and the options; loading optimizes
        # it again: captured graphs, stacks, compiled kernels and sessions are not data.
        return (reoptimize, (self.model, {**self.options, "verify": self.verify}))


def _of_model(model: nn.Module, name: str):
    """`model.<name>`, else that of the Hugging Face model it wraps (wrap_armt's `hf_model`), else None."""
    for owner in (model, getattr(model, "hf_model", None)):
        value = getattr(owner, name, None) if owner is not None else None
        if value is not None:
            return value
    return None


__all__ = ["Optimized", "SKIP"]
