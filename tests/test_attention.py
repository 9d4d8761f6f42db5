"""The attention kernel is chosen per device and can be switched on a loaded model: both kernels
compute the same function (padding included), so the choice changes speed, not results."""

import pytest
import torch

from lmpipe.config import ModelParams
from lmpipe.model import attention_for, build_model, set_attention
from lmpipe.sampling import generate

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}


def test_kernel_per_device_and_override(monkeypatch):
    monkeypatch.delenv("LMPIPE_ATTENTION", raising=False)
    assert attention_for() == attention_for("cpu") == "eager"
    assert attention_for("cuda:0") == attention_for(torch.device("cuda")) == "sdpa"
    monkeypatch.setenv("LMPIPE_ATTENTION", "sdpa")
    assert attention_for("cpu") == "sdpa"
    monkeypatch.setenv("LMPIPE_ATTENTION", "flash")
    with pytest.raises(ValueError, match="LMPIPE_ATTENTION"):
        attention_for("cpu")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kernels_agree_on_padded_batches_and_samples(arch, monkeypatch):
    monkeypatch.delenv("LMPIPE_ATTENTION", raising=False)
    cfg = ModelParams(arch=arch, d_model=32, n_layers=2, n_heads=4, n_kv_heads=0, context=32)
    model = build_model(cfg, 50, SPECIAL, seed=0).eval()
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(3, 50, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    out, tokens = {}, {}
    for kernel in ("eager", "sdpa"):
        set_attention(model, kernel)
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out[kernel] = logits[mask.bool()]
        gen = torch.Generator().manual_seed(0)
        tokens[kernel] = generate(
            model, prompts, max_new_tokens=8, eos_id=2, pad_id=0, greedy=True, generator=gen
        ).response
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens["eager"], tokens["sdpa"])


def test_set_attention_ignores_modules_without_a_config():
    layer = torch.nn.Linear(2, 2)
    assert set_attention(layer, "eager") is layer
