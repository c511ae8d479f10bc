"""What an exported graph is keyed by: the content of everything of a model that enters it.

model_key hashes content_digest (every submodule's class and plain attributes, every parameter
and buffer's bytes) with the shapes, options and versions; parameter_fingerprint is the cheap
per-call test (object, storage, version counter) that decides whether the digest must be taken
again.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import itertools

import torch
from torch import nn

from wavefront.contract.version import __version__

# Bumped when the exported graphs change form, so a graph cached by older code of the same version
# is exported again (2: the decode step writes the memory only in the call that ends a segment).
GRAPH_FORM = 2


def model_key(model: nn.Module, *parts) -> str:
    """A hash of everything of `model` that enters an exported graph (content_digest) and of
    `parts` (shapes, options, call arguments), with the wavefront, torch and onnxruntime versions.

    >>> model_key(nn.LayerNorm(4)) == model_key(nn.LayerNorm(4, eps=0.1))
    False
    """
    return content_key(content_digest(model), *parts)


def content_key(content: str, *parts) -> str:
    import onnxruntime

    text = plain_text((content, parts, __version__, GRAPH_FORM, torch.__version__, onnxruntime.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# nn.Module's own bookkeeping (hooks, parameter tables, the training flag: graphs are always
# exported in eval mode) is not a setting of the model
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def content_digest(model: nn.Module) -> str:
    """sha256 of what a graph exported from `model` depends on: every submodule's name, class
    and plain attributes (eps, rope theta, head counts, a Hugging Face config, ...; plain_text)
    and every parameter and buffer, persistent or not, by name, shape, dtype and bytes.

    >>> content_digest(nn.Linear(2, 2)) == content_digest(nn.Linear(2, 2))  # other random weights
    False
    """
    h = hashlib.sha256()
    for name, m in model.named_modules():
        attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}:{plain_text(attrs)}\n".encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{plain_text(t)}\n".encode())
    return h.hexdigest()


def plain_text(value, _depth: int = 0) -> str:
    """A stable text of a value that may enter a graph as a constant: numbers and strings with
    their type, containers (dicts sorted), dtypes, enums, dataclasses, configs by to_dict(),
    tensors by their bytes, functions and classes by name, other objects by class and attributes.
    Modules give only their class: registered submodules are walked by content_digest.

    >>> plain_text((1, 1.0, True, None))
    'tuple[int(1),float(1.0),bool(True),NoneType(None)]'
    """
    d = _depth + 1
    if _depth > 8:  # deep object graphs: cut (a shorter text only means fewer disk-cache hits)
        return "..."
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return f"{type(value).__name__}({value!r})"
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return f"tensor({tuple(value.shape)},{value.dtype},{hashlib.sha256(data).hexdigest()})"
    if isinstance(value, (torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{','.join(plain_text(v, d) for v in value)}]"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}[{','.join(sorted(plain_text(v, d) for v in value))}]"
    if isinstance(value, dict):
        return "{" + ",".join(sorted(f"{plain_text(k, d)}:{plain_text(v, d)}" for k, v in value.items())) + "}"
    name = f"{getattr(type(value), '__module__', '')}.{type(value).__qualname__}"
    if isinstance(value, nn.Module):
        return f"module {name}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    if isinstance(value, functools.partial):
        return f"partial({plain_text(value.func, d)},{plain_text(value.args, d)},{plain_text(value.keywords, d)})"
    if callable(getattr(value, "to_dict", None)):  # Hugging Face configs
        try:
            return f"{name}{plain_text(value.to_dict(), d)}"
        except Exception:  # noqa: BLE001 (a to_dict that fails: the class and attributes below)
            pass
    if dataclasses.is_dataclass(value):
        return f"{name}{plain_text({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, d)}"
    if callable(value) and hasattr(value, "__qualname__"):  # functions, bound methods, builtins
        return f"function {getattr(value, '__module__', '')}.{value.__qualname__}"
    if hasattr(value, "__dict__"):
        return f"{name}{plain_text(vars(value), d)}"
    return name


def parameter_fingerprint(model: nn.Module) -> tuple:
    """Per parameter and buffer: the object, its storage, its version counter (bumped by every
    in-place write but writes through `.data`), shape, dtype and device. Cheap enough per call.

    >>> lin = nn.Linear(2, 2)
    >>> before = parameter_fingerprint(lin)
    >>> with torch.no_grad():
    ...     _ = lin.weight.mul_(2)
    >>> parameter_fingerprint(lin) == before
    False
    """
    return tuple((id(t), t.data_ptr(), t._version, t.shape, t.dtype, t.device)
                 for t in itertools.chain(model.parameters(), model.buffers()))


__all__ = ["content_digest", "model_key", "parameter_fingerprint", "plain_text"]
