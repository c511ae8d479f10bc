"""Greedy generation with onnxruntime alone, from a segment model's two exported graphs.

    python examples/onnx_generate.py [--onnx armt.onnx] [--new-tokens 16]

The segment graph (`wavefront.export_onnx(fast, (ids,), path)`) takes input_ids [batch, tokens]
of any batch and length and returns the logits and the memory after them (present_memory.*,
present_segments_seen). The decode-step graph (`export_onnx(..., decode=True)`) takes the next
tokens of the current segment with that segment's key/value cache (past_key.*, past_value.*) and
the memory before it, and returns their logits, the grown cache and, when the tokens fill the
segment, the memory it wrote (and an empty cache). Both name their memory alike, so `generate`
below prefills the prompt's finished segments with the first (the diagonal schedule inside),
then feeds the rest of the prompt and every new token to the second, one token per step,
handing each call's present_* back as the next call's past_*. It needs numpy and onnxruntime
only; the end of the script checks its tokens against wavefront's torch generate().
"""
import argparse

import numpy as np
import onnxruntime as ort


def _presents(session, values) -> dict:
    """A call's present_* outputs renamed as the next call's past_* inputs."""
    out = dict(zip([o.name for o in session.get_outputs()], values))
    return out, {name.replace("present_", "past_"): v for name, v in out.items() if name.startswith("present_")}


def generate(segments: ort.InferenceSession, decode: ort.InferenceSession, prompt: np.ndarray,
             new_tokens: int) -> np.ndarray:
    """Greedy decoding: prompt [batch, tokens] int64 -> [batch, tokens + new_tokens]."""
    seg = int(decode.get_modelmeta().custom_metadata_map["wavefront.segment_len"])
    ids, past = prompt, {}  # no memory yet: the graphs' defaults are fresh memory and an empty cache
    finished = (ids.shape[1] - 1) // seg * seg  # the prompt's whole segments before its last one
    if finished:  # prefill them in one call
        _, past = _presents(segments, segments.run(None, {"input_ids": ids[:, :finished]}))
    out, past = _presents(decode, decode.run(None, {"input_ids": ids[:, finished:], **past}))  # the rest
    for step in range(new_tokens):
        token = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        ids = np.concatenate([ids, token], axis=1)
        if step + 1 < new_tokens:  # one token per call; a call that fills the segment writes its memory
            out, past = _presents(decode, decode.run(None, {"input_ids": token, **past}))
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
    model = ARMT(ARMTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, segment_len=8,
                            n_mem_tokens=2, d_mem=8)).eval()
    fast = wavefront.optimize(model)
    prompt = torch.randint(0, 64, (2, 19))  # two rows; the prompt ends inside its third segment
    step_path = args.onnx.replace(".onnx", "") + "_decode.onnx"
    wavefront.export_onnx(fast, (prompt,), args.onnx)  # each graph is checked in onnxruntime against the model
    wavefront.export_onnx(fast, (prompt,), step_path, decode=True)

    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime notes at load that the memory and cache inputs have defaults
    sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in (args.onnx, step_path)]
    tokens = generate(*sessions, prompt.numpy(), args.new_tokens)
    expected = fast.generate(prompt, max_new_tokens=args.new_tokens).numpy()
    print("onnxruntime tokens:", tokens[:, prompt.shape[1]:].tolist())
    print("torch generate    :", expected[:, prompt.shape[1]:].tolist())
    assert (tokens == expected).all(), "onnxruntime's greedy tokens differ from torch's"
    print("tokens match")
