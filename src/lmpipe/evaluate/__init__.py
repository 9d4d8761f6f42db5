"""Evaluation: metrics, model engines (PyTorch and ONNX) and the report card."""
