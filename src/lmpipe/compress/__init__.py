"""Compression of the aligned policy: distillation, structured pruning, int8 quantization."""
