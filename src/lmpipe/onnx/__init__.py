"""ONNX: export with a KV cache (`export`, needs torch) and generation with onnxruntime alone
(`runtime` with `bundle` and `sampling`, importing neither torch nor transformers)."""
