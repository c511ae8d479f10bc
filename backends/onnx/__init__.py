"""ONNX: export (graphs.py), the one session class (session.py), the segment program's export
and call (segments.py), keys of exported graphs (model_key.py) and
optimize(..., backend="onnxruntime") (runtime_model.py)."""
