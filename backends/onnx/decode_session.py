"""An exported decode step (decode_graph.py) run in onnxruntime as generate() feeds it: the same
`stream(memory, batch, dtype, device).feed(ids)` as wavefront/kv_decode.py's cached decoder, so
optimize(model, backend="onnxruntime").generate() decodes in onnxruntime, one token per call."""
from __future__ import annotations

import json

import numpy as np
import torch
from wavefront.backends.onnx.graph_io import PAST_SEEN, past_name
from wavefront.backends.onnx.session import Session
from wavefront.passes.segment_plan import stack_state

from wavefront.contract.kv_window import piece_offset


class OnnxDecodeSession:
    """A decode-step graph in one onnxruntime session."""

    def __init__(self, path: str, providers=("CPUExecutionProvider",), strict: bool = True):
        import onnx

        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        if meta.get("wavefront.kind") != "decode step":
            raise ValueError(f"{path} is not a decode-step graph (export it with export_onnx(..., decode=True))")
        self.segment_len = int(meta["wavefront.segment_len"])
        self.layout = json.loads(meta["wavefront.state_layout"])
        self.session = Session(path, providers, strict=strict)
        self.providers = self.session.providers

    def stream(self, memory, batch: int, dtype, device, grow: bool = False) -> "OnnxDecodeStream":
        """A stream starting at the segment after `memory` (a MemoryState; None: fresh memory)."""
        if grow:
            raise ValueError("memory_writes=False grows a segment past segment_len, which the decode-step graph "
                             "refuses: generate on backend='torch' for that")
        past = {}
        if memory is not None:
            for p, t in enumerate(stack_state(memory.leaves(), self.layout)):
                past[past_name(p)] = t.detach().cpu().numpy()
            past[PAST_SEEN] = np.array(memory.segments_seen, np.int64)
        return OnnxDecodeStream(self, past, device)

    def describe(self) -> str:
        return self.session.describe()


class OnnxDecodeStream:
    """feed(ids) -> the logits of the next tokens (see decode_graph.py); the memory and the cache
    stay in onnxruntime's arrays between calls."""

    def __init__(self, owner: OnnxDecodeSession, past: dict, device):
        self.owner, self.past, self.device, self._offset = owner, past, device, 0

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        self._offset = piece_offset(self._offset, n, self.owner.segment_len)  # torch's message, before the graph's
        names, values = ["input_ids", *self.past], [ids.long(), *(torch.from_numpy(v) for v in self.past.values())]
        outs = dict(zip(self.owner.session.outputs, self.owner.session.run(*values, names=names)))
        self.past = {k.replace("present_", "past_"): v.numpy() for k, v in outs.items() if k.startswith("present_")}
        self._offset += n
        return outs["logits"].to(self.device)


__all__ = ["OnnxDecodeSession", "OnnxDecodeStream"]
