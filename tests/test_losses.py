"""The chunked losses against autograd's, in float64, across chunk boundaries and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmpipe import losses
from lmpipe.losses import cross_entropy_sum, forward_kl_sum


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_cross_entropy_sum_matches_torch_with_ignored_positions(chunk_rows, monkeypatch):
    """Value and gradient of F.cross_entropy(reduction="sum"), in float64; 3 rows a chunk
    splits the 10 rows unevenly; ignored rows get no gradient."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_rows * 13)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 13, generator=g, requires_grad=True)
    y = torch.randint(0, 13, (10,), generator=g)
    y[[0, 4, 9]] = -100
    loss = cross_entropy_sum(x, y)
    (grad,) = torch.autograd.grad(loss * 0.5, x)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x64, y, ignore_index=-100, reduction="sum")
    (ref * 0.5).backward()
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(grad.double(), x64.grad, atol=1e-6)
    assert not grad[[0, 4, 9]].any()


def test_cross_entropy_sum_of_bf16_logits_is_the_fp32_loss_with_a_bf16_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 50, generator=g).bfloat16().requires_grad_(True)
    y = torch.randint(0, 50, (21,), generator=g)
    loss = cross_entropy_sum(x, y)
    (grad,) = torch.autograd.grad(loss * 0.01, x)
    x32 = x.detach().float().requires_grad_(True)
    ref = F.cross_entropy(x32, y, reduction="sum")
    (ref * 0.01).backward()
    assert grad.dtype == torch.bfloat16
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(grad.float(), x32.grad, rtol=2**-7, atol=1e-8)


def test_the_losses_without_grad_give_autograds_values():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 6, 9, generator=g).unbind()
    y = torch.randint(0, 9, (6,), generator=g)
    with torch.no_grad():
        ce, kl = cross_entropy_sum(s, y), forward_kl_sum(s, t, 2.0)
    assert float(ce) == pytest.approx(float(F.cross_entropy(s, y, reduction="sum")), rel=1e-6)
    ref = F.kl_div(
        F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum"
    )
    assert float(kl) == pytest.approx(float(ref), rel=1e-5)


def test_forward_kl_is_zero_for_identical_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 40, generator=g)
    assert abs(float(forward_kl_sum(s, s))) < 1e-5
    assert float(forward_kl_sum(s, torch.randn(7, 40, generator=g))) > 0.1


def test_cross_entropy_sum_takes_any_ignore_index_as_torch_does():
    """An ignore index outside the vocabulary (here V itself) is never gathered."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 13, generator=g)
    y = torch.randint(0, 13, (6,), generator=g)
    y[2] = 13
    ref = F.cross_entropy(x, y, ignore_index=13, reduction="sum")
    assert float(cross_entropy_sum(x, y, ignore_index=13)) == pytest.approx(float(ref), rel=1e-6)
