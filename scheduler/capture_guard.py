"""CaptureGuard: does what capture() saw still describe the user's model?

A capture holds what it read from the model at optimize() time: the module objects it called,
the parameter and buffer objects its graphs and stacks point at (FX graphs keep references of
their own), the plain attributes its traced code baked in as constants (an eps, a head count),
the train/eval flag of traced code that branches on it, and copies of modules (lane clones).
The user may change any of these afterwards: load_state_dict(..., assign=True) puts new
Parameter objects in place, model.to() new buffers, `norm.eps = ...` a new constant, a module
swapped for another or a layer appended. The guard records all of it once and, before every call,
compares it with the live model in one flat pass of identity, size and equality checks (about
70-100 us for the 3-layer test models, 260 us for a 12-layer GPT-2 on this CPU); a difference
names itself, and the caller captures again rather than run stale. `volatile` attribute names
are state the model's own code rewrites as it runs (the public ARMT code's W_mem, seg_num, ...):
not part of what a capture reads, so never a reason to capture again.

In-place value changes (an optimizer step, `with no_grad(): w.mul_(2)`) need no guard: every
captured graph reads the live tensors. The train/eval flag of modules that run live, or whose
copies are synced before each call (module_fold.LaneBlock.sync_modes), is not guarded either, so
model.train() / model.eval() never forces a new capture of a model whose traced code ignores it.
"""
from __future__ import annotations

import torch
from torch import nn
from wavefront.scheduler.train_mode import reads_training

_SKIP_ATTRS = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                         "_is_full_backward_hook"})


def _plain(value) -> bool:
    """A value traced code could have baked in as a constant (compared by ==)."""
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device)):
        return True
    if isinstance(value, (tuple, list, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _snapshot(value):
    return tuple(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


class CaptureGuard:
    """The parts of `root` (the model the user passed) a capture depends on.

    `traced` are the modules whose Python code torch.fx ran while tracing (not called as leaves):
    their train/eval flag is guarded when their code reads it, since the trace baked one branch.

    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> guard = CaptureGuard(m)
    >>> guard.changed()
    ''
    >>> m.load_state_dict(nn.Sequential(nn.Linear(2, 2)).state_dict(), assign=True)
    <All keys matched successfully>
    >>> guard.changed()
    "parameter '0.weight' is a new tensor object (load_state_dict(assign=True), or assigned)"
    """

    def __init__(self, root: nn.Module, traced=(), volatile=frozenset()):
        self.root, self._volatile = root, frozenset(volatile)
        self._sizes: list[tuple[nn.Module, tuple[int, int, int, int], str]] = []  # what was added or removed
        self._baked: list[tuple[nn.Module, str, torch.Tensor, str]] = []  # plain tensor attributes of traced code
        self._modules: list[tuple[dict, str, nn.Module, str]] = []
        self._tensors: list[tuple[dict, str, torch.Tensor, tuple, str, str]] = []
        self._attrs: list[tuple[nn.Module, str, object, str]] = []
        self._modes: list[tuple[nn.Module, bool, str]] = []
        traced_ids = {id(m) for m in traced}
        seen: set[int] = set()
        self._walk(root, "", seen, traced_ids)

    def _walk(self, m: nn.Module, path: str, seen: set, traced_ids: set) -> None:
        if id(m) in seen:  # a module shared under two names: its contents are recorded once
            return
        seen.add(id(m))
        prefix = path + "." if path else ""
        for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
            for name, t in table.items():
                if t is not None:
                    self._tensors.append((table, name, t, (t.shape, t.dtype, t.device), kind, prefix + name))
        self._sizes.append((m, _sizes(m, self._volatile), path or "<model>"))
        for name, value in vars(m).items():
            if name in _SKIP_ATTRS or name in self._volatile or "hook" in name or name.startswith("__"):
                continue
            if _plain(value):
                self._attrs.append((m, name, _snapshot(value), prefix + name))
            elif isinstance(value, torch.Tensor) and id(m) in traced_ids:  # torch.fx keeps this very object
                self._baked.append((m, name, value, prefix + name))
        if id(m) in traced_ids and reads_training(m):
            self._modes.append((m, m.training, path or "<model>"))
        for name, child in m._modules.items():
            if child is not None:
                self._modules.append((m._modules, name, child, prefix + name))
                self._walk(child, prefix + name, seen, traced_ids)

    def changed(self) -> str:
        """'' when the model is as captured, else what changed (the first difference found)."""
        for m, sizes, path in self._sizes:
            if _sizes(m, self._volatile) != sizes:
                return f"'{path}' gained or lost a submodule, parameter, buffer or attribute"
        for m, name, t, path in self._baked:
            if m.__dict__.get(name) is not t:
                return f"tensor attribute '{path}' (a constant of the traced code) was replaced"
        for table, name, child, path in self._modules:
            if table.get(name) is not child:
                return f"module '{path}' was replaced"
        for table, name, t, meta, kind, path in self._tensors:
            now = table.get(name)
            if now is not t:
                return f"{kind} '{path}' is a new tensor object (load_state_dict(assign=True), or assigned)"
            if (now.shape, now.dtype, now.device) != meta:
                return f"{kind} '{path}' changed shape, dtype or device (model.to(...)?)"
        for m, name, value, path in self._attrs:
            now = m.__dict__.get(name, _MISSING)
            if now is not value and _snapshot(now) != value and not (value != value and now != now):  # NaN == NaN
                return f"attribute '{path}' changed from {value!r} to {now!r}"
        for m, flag, path in self._modes:
            if m.training != flag:
                return f"'{path}' switched to {'training' if m.training else 'eval'} mode and its traced code reads the flag"
        return ""


_MISSING = object()


def _sizes(m: nn.Module, volatile=frozenset()) -> tuple[int, int, int, int]:
    d = m.__dict__
    n = len(d) - sum(k in d for k in volatile) if volatile else len(d)  # state the model's code adds is not a change
    return len(d["_modules"]), len(d["_parameters"]), len(d["_buffers"]), n
