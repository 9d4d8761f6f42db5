"""The optimizer and learning-rate schedules: AdamW without weight decay on norms and biases;
the training loop's linear warmup then cosine decay to a floor; RL's warmup then linear decay."""

from __future__ import annotations

import math
from typing import Any

import torch

from lmpipe.config import RLParams, TrainParams


def lr_at(step: int, cfg: TrainParams) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr_ratio·lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def rl_lr_at(step: int, cfg: RLParams) -> float:
    """RL's rate at a rollout step: linear warmup over rl.warmup_steps (the first step at
    lr/(w+1), since Adam's first updates move every weight by about the rate whatever the
    advantages' scale), then constant or linear decay to 0 at rl.steps."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.lr * (step + 1) / (w + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.steps - step) / (cfg.steps - w))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights); never norms or biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainParams) -> torch.optim.AdamW:
    """AdamW, fused kernel where the device has one (CUDA and CPU in torch ≥ 2.4)."""
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
