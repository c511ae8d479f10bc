"""Marker for modules wavefront treats as one opaque operation when it captures a graph."""
from torch import nn


class OpaqueModule(nn.Module):
    """A module torch.fx capture keeps as a single call (a leaf): used around foreign code
    (Hugging Face decoder layers, rotary tables) whose internals are not ours to rewrite."""
