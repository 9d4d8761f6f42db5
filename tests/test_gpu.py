"""The CUDA path: bf16 autocast, TF32, fused AdamW, MFU. Skipped where CUDA is absent (CI)."""

import numpy as np
import pytest
import torch

from lmpipe.batches import TokenWindows
from lmpipe.config import ModelParams, PretrainParams
from lmpipe.model import build_model
from lmpipe.precision import peak_flops, use_bf16
from lmpipe.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}


@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_training_bf16_learns_and_reports_mfu(compile_):
    device = torch.device("cuda")
    assert use_bf16("auto", device) == torch.cuda.is_bf16_supported()
    model = build_model(
        ModelParams(d_model=128, n_layers=2, n_heads=4, context=64), 100, SPECIAL, seed=0
    ).to(device)
    tokens = np.tile(np.arange(3, 60, dtype=np.uint16), 200)
    src = TokenWindows(tokens, 64, 16, seed=0)
    cfg = PretrainParams(
        max_steps=60,
        warmup_steps=5,
        lr=3e-3,
        log_every=5,
        eval_every=30,
        checkpoint_every=0,
        compile=compile_,
        peak_tflops=100.0,
    )
    res = train(model, src, cfg, val_batches=src.fixed_batches(1))
    losses = [r["train/loss"] for r in res.history]
    assert losses[-1] < 0.3 * losses[0]
    assert all(0 < r["train/mfu"] < 1 for r in res.history)
    assert torch.backends.cuda.matmul.allow_tf32


def test_known_gpu_peak_table():
    name = torch.cuda.get_device_name()
    peak = peak_flops(PretrainParams(), torch.device("cuda"))
    if any(k in name for k in ("H100", "H200", "A100")):
        assert peak is not None and peak >= 312e12


def test_cuda_chunked_losses_match_the_cpu_ones():
    """`lmpipe.losses` on CUDA (larger chunks, several of them here) against the CPU: value
    and bf16 gradient."""
    from lmpipe.losses import cross_entropy_sum, forward_kl_sum

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3000, 8192, generator=g).bfloat16()
    t = torch.randn(3000, 8192, generator=g).bfloat16()
    y = torch.randint(0, 8192, (3000,), generator=g)
    y[::7] = -100
    out = {}
    for dev in ("cpu", "cuda"):
        x = s.to(dev).requires_grad_(True)
        loss = cross_entropy_sum(x, y.to(dev)) + forward_kl_sum(x, t.to(dev), 2.0)
        loss.backward()
        out[dev] = (float(loss), x.grad.float().cpu())
    assert out["cuda"][0] == pytest.approx(out["cpu"][0], rel=1e-5)
    assert torch.allclose(out["cuda"][1], out["cpu"][1], rtol=2**-7, atol=1e-7)
