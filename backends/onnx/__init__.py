"""ONNX: export of a module as it runs (module_export.py) and of the segment program (segments.py),
torch.export -> torch.onnx and the check (graphs.py), the one session class (session.py), keys of
exported graphs (model_key.py). optimize(..., backend="onnxruntime") is wavefront/routes/onnxruntime.py."""
