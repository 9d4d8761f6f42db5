"""Which float precision a device trains in, the device's peak throughput, and a model's FLOPs
per token (with the peak, what the loop's train/mfu is computed from).

`precision: auto` resolves per machine: bf16 autocast where the hardware runs it natively (CUDA
with bf16 support, CPUs with AMX or AVX-512 BF16), fp32 elsewhere.
"""

from __future__ import annotations

import torch

from lmpipe.config import TrainParams

# Dense bf16 peak of known accelerators, for train/mfu (vendor datasheets, without sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
    "T4": 65.0,
}


def cpu_fast_bf16() -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU: with AMX tiles, or with
    AVX-512 BF16 (measured 1.30-1.47x fp32 on an AMD EPYC with avx512_bf16). On CPUs without
    either (AVX2 only) oneDNN emulates bf16, measured 30x slower than fp32
    (bench/train_throughput.py)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """`auto`: bf16 on CUDA with bf16 support, and on CPUs with AMX or AVX-512 BF16."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_fast_bf16()


def peak_flops(cfg: TrainParams, device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s: `peak_tflops` when set, else a known GPU's from PEAK_TFLOPS, else
    None (no MFU is logged)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def flops_per_token(model: torch.nn.Module) -> float:
    """6·N for the matmuls (forward + backward) + attention scores, as in the PaLM appendix."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    d = getattr(c, "hidden_size", None) or c.n_embd
    ctx = getattr(c, "max_position_embeddings", None) or c.n_positions
    return 6 * n + 12 * layers * d * ctx
