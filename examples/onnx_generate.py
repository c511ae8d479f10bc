"""Greedy generation with onnxruntime alone, from a segment model's exported graph.

    python examples/onnx_generate.py [--onnx armt.onnx] [--new-tokens 16]

The graph takes input_ids [batch, tokens] (any batch and length) and optionally the memory of
the finished segments (past_memory.*, past_segments_seen); it returns the logits and the memory
after the input (present_*). A segment model's next token depends only on the memory before the
current segment and that segment's tokens, so `generate` below keeps the finished segments'
memory and runs only the current segment per token; when it is full, that run's memory is the
next segment's. It needs numpy and onnxruntime only; the end of the script checks its tokens
against wavefront's torch generate().
"""
import argparse

import numpy as np
import onnxruntime as ort


def generate(session: ort.InferenceSession, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding: prompt [batch, tokens] int64 -> [batch, tokens + new_tokens]."""
    seg = int(session.get_modelmeta().custom_metadata_map["wavefront.segment_len"])
    outputs = [o.name for o in session.get_outputs()]
    ids = prompt
    past = {}  # the memory of the finished segments: none yet (the graph's defaults: fresh memory)
    current = (ids.shape[1] - 1) // seg  # the segment holding the last token
    if current:  # prefill the prompt's finished segments in one call (the diagonal schedule inside)
        out = dict(zip(outputs, session.run(None, {"input_ids": ids[:, :current * seg]})))
        past = {name.replace("present_", "past_"): v for name, v in out.items() if name.startswith("present_")}
    for _ in range(new_tokens):
        start = current * seg
        out = dict(zip(outputs, session.run(None, {"input_ids": ids[:, start:], **past})))
        token = out["logits"][:, -1].argmax(-1)
        ids = np.concatenate([ids, token[:, None].astype(np.int64)], axis=1)
        if ids.shape[1] - start > seg:  # the new token opens a segment: the full one's memory is kept
            past = {name.replace("present_", "past_"): v for name, v in out.items() if name.startswith("present_")}
            current += 1
    return ids


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", default="armt_generate.onnx")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()

    import torch

    import wavefront
    from wavefront.models import ARMT, ARMTConfig

    torch.manual_seed(0)
    model = ARMT(ARMTConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_len=8,
                            n_mem_tokens=2, d_mem=8)).eval()
    fast = wavefront.optimize(model)
    prompt = torch.randint(0, 64, (2, 19))  # two rows; the prompt ends inside its third segment
    wavefront.export_onnx(fast, (prompt,), args.onnx)  # checked in onnxruntime against the model

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime notes at load that the memory inputs have defaults
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    tokens = generate(session, prompt.numpy(), args.new_tokens)
    expected = fast.generate(prompt, max_new_tokens=args.new_tokens).numpy()
    print("onnxruntime tokens:", tokens[:, prompt.shape[1]:].tolist())
    print("torch generate    :", expected[:, prompt.shape[1]:].tolist())
    assert (tokens == expected).all(), "onnxruntime's greedy tokens differ from torch's"
    print("tokens match")
