"""ONNX: export with a KV cache (`export`, needs torch) and generation with onnxruntime alone
(`runtime`, imports neither torch nor transformers)."""
