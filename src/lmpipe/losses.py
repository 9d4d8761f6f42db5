"""Losses over (positions × vocabulary) logits, made a chunk of positions at a time: the
next-token cross-entropy of pretraining and SFT, and the forward KL of distillation.

Autograd's versions make an fp32 copy of the whole logit tensor, run several passes over it and
keep its log-softmax for the backward pass. These read each chunk once while it is in the cache,
compute the loss and its gradient together, and keep only the gradient (`python
bench/losses.py`). The value is the fp32 one; the gradient is the fp32 gradient in the
logits' dtype (bf16 under autocast), as autograd gives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 19
"""Logits read at a time on the CPU (2 MB in fp32, so a chunk's softmaxes stay in the cache); 32
times as many on accelerators, where fewer, larger kernels pay."""


def _rows_per_chunk(logits: torch.Tensor) -> int:
    budget = CHUNK_ELEMENTS * (1 if logits.device.type == "cpu" else 32)
    return max(1, budget // logits.shape[-1])


def _log_softmax32(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log softmax(logits / T); bf16 logits are upcast before the division."""
    if temperature == 1:
        return F.log_softmax(logits, -1, dtype=torch.float32)
    return F.log_softmax(logits.float() / temperature, -1)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
        n = logits.shape[0]
        with_grad = ctx.needs_input_grad[0]
        shape = logits.shape if with_grad else 0
        grad = torch.empty(shape, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = _rows_per_chunk(logits)
        for i in range(0, n, rows):
            y = labels[i : i + rows]
            target = y != ignore_index
            keep = target.float()[:, None]
            y = torch.where(target, y, 0)[:, None]
            logp = _log_softmax32(logits[i : i + rows])
            total -= (logp.gather(1, y) * keep).sum()
            if with_grad:  # softmax − one-hot, zero where there is no target
                g = torch.exp(logp, out=grad[i : i + rows])
                g.scatter_add_(1, y, -keep).mul_(keep)
        ctx.dtype = logits.dtype
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g).to(ctx.dtype), None, None


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Σ over positions whose label is not `ignore_index` of −log softmax(logits)[label]:
    `F.cross_entropy(logits.float(), labels, reduction="sum")` for (N, V) logits and (N,)
    labels."""
    return _CrossEntropySum.apply(logits, labels, ignore_index)


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float):
        with_grad = ctx.needs_input_grad[0]
        grad = torch.empty(s.shape if with_grad else 0, dtype=torch.float32, device=s.device)
        kl = torch.zeros((), dtype=torch.float32, device=s.device)
        rows = _rows_per_chunk(s)
        for i in range(0, s.shape[0], rows):
            log_ps = _log_softmax32(s[i : i + rows], temperature)
            log_pt = _log_softmax32(t[i : i + rows], temperature)
            p_t = log_pt.exp()
            kl += log_pt.sub_(log_ps).mul_(p_t).sum()
            if with_grad:  # softmax(s/T) − softmax(t/T), divided by T in the backward pass
                torch.sub(log_ps.exp_(), p_t, out=grad[i : i + rows])
        ctx.temperature, ctx.dtype = temperature, s.dtype
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g / ctx.temperature).to(ctx.dtype), None, None


def forward_kl_sum(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher/T) ‖ softmax(student/T)) for (N, V) logits; the
    gradient flows to the student's only."""
    return _ForwardKL.apply(student, teacher.detach(), temperature)
