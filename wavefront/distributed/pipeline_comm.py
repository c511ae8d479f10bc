"""Point-to-point transfers between neighbouring pipeline stages, on torch.distributed's own ops.

A stage sends each segment's boundary values (a list of values, any pytree of tensors and
constants) to the next rank. The receiver must allocate buffers of the right shape: the first
time a kind of segment is sent (key: batch, segment length, training or not) the sender sends the
values' structure, shapes, dtypes and requires_grad flags with send_object_list, and both sides
cache it; later segments of that kind send the tensors alone (isend / recv). Constants in the
values (Python numbers...) are sent with every segment when there are any. The receiver compares
the key it expects with the one sent, so ranks called with different inputs fail with a message
instead of garbling tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._pytree import (
    tree_flatten,
    tree_unflatten,
    treespec_dumps,
    treespec_loads,
)


class StageLink:
    """The transfers between this rank and one neighbour (group ranks), in both directions."""

    def __init__(self, group, peer: int, device):
        self.group, self.peer, self.device = group, peer, torch.device(device)
        self._meta: dict = {}
        self._obj_device = self.device if self.device.type != "cpu" else None

    def send(self, values: list, key) -> list:
        """Send `values`; returns the pending isend handles (wait on them before the tensors change)."""
        leaves, spec = tree_flatten(values)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        consts = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        shapes = [(tuple(t.shape), t.dtype, bool(t.requires_grad)) for t in tensors]
        positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        has_consts = len(positions) < len(leaves)
        meta = self._meta.get(("send", key))
        if meta is None:
            meta = self._meta[("send", key)] = (key, spec, shapes, has_consts, positions)
            dist.send_object_list([((key, _dumps(spec), shapes, has_consts, positions), consts)], group_dst=self.peer,
                                  group=self.group, device=self._obj_device)
        else:
            if (spec, shapes) != (meta[1], meta[2]):
                raise RuntimeError(f"a segment of the same kind {key} has other boundary values than the first one "
                                   f"({shapes} vs {meta[2]}): the stage cannot announce them to the next rank")
            if has_consts:
                dist.send_object_list([consts], group_dst=self.peer, group=self.group, device=self._obj_device)
        return [dist.isend(t.detach().contiguous(), group_dst=self.peer, group=self.group) for t in tensors]

    def recv(self, key, train: bool) -> list:
        """Receive what the peer's send() sent for a segment of kind `key`. In training, tensors the
        sender's graph tracks come back as fresh leaves that require grad."""
        meta = self._meta.get(("recv", key))
        if meta is None:
            box = [None]
            dist.recv_object_list(box, group_src=self.peer, group=self.group, device=self._obj_device)
            meta, consts = box[0]
            meta = (meta[0], _loads(meta[1]), *meta[2:])
            if meta[0] != key:
                raise RuntimeError(f"this rank expected a segment of kind {key} (batch, length, training) but the "
                                   f"previous rank sent {meta[0]}: call the pipeline with the same input on every rank")
            self._meta[("recv", key)] = meta
        else:
            consts = None
            if meta[3]:
                box = [None]
                dist.recv_object_list(box, group_src=self.peer, group=self.group, device=self._obj_device)
                consts = box[0]
        _, spec, shapes, _, positions = meta
        leaves = list(consts) if consts is not None else [None] * spec.num_leaves
        tensors = []
        for shape, dtype, grad in shapes:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(t, group_src=self.peer, group=self.group)
            tensors.append(t.requires_grad_() if grad and train else t)
        for i, t in zip(positions, tensors):
            leaves[i] = t
        return tree_unflatten(leaves, spec)

    def send_grads(self, grads: list[torch.Tensor]) -> list:
        return [dist.isend(g.contiguous(), group_dst=self.peer, group=self.group) for g in grads]

    def recv_grads(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for t in like:
            g = torch.empty_like(t, memory_format=torch.contiguous_format)
            dist.recv(g, group_src=self.peer, group=self.group)
            out.append(g)
        return out


def _dumps(spec):
    """The structure as text where torch can write it (pickling a TreeSpec warns in torch 2.13)."""
    try:
        return ("json", treespec_dumps(spec))
    except Exception:  # a container type the JSON form does not know: pickle it
        return ("spec", spec)


def _loads(packed):
    kind, value = packed
    return treespec_loads(value) if kind == "json" else value


def wait_all(handles: list) -> None:
    for h in handles:
        h.wait()
    handles.clear()


__all__ = ["StageLink", "wait_all"]
