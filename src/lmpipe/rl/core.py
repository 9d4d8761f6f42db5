"""The math of KL-regularised RL, as pure tensor functions (tested against closed forms).

Shapes: (B, T) per-token tensors over response positions with a bool `mask` of real tokens
(EOS included, padding excluded); (B,) per-sequence tensors. Log-probabilities always come from
temperature-scaled logits, the same in rollout, reference and training passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# --------------------------------------------------------------------------- KL estimators
# x ~ π, log r = log π₀(x) − log π(x) (Schulman, "Approximating KL divergence").


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """−log r = log π − log π₀: unbiased, high variance, negative on single samples."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """½ (log r)²: biased, low variance."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(r − 1) − log r: unbiased, never negative, low variance (for monitoring)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2).to(x.dtype)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean)/std over real tokens; without the shift only the scale changes (rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- rewards / GAE


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (mask is a prefix of ones)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def token_rewards(
    scores: torch.Tensor, k1: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """r_t = −β·k1_t on every response token, plus the sequence score on the last one."""
    r = -beta * k1 * mask
    idx = last_index(mask)
    r[torch.arange(len(r)), idx] += scores
    return r * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; V after the last real token is 0.

    δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}; returns (advantages, returns = A + V).
    """
    m = mask.to(rewards.dtype)
    values = values * m
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


# --------------------------------------------------------------------------- PPO losses


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_var: torch.Tensor


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> PolicyLossStats:
    """Clipped surrogate max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), mean over real tokens."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_var = masked_var(ratio, mask)
    return PolicyLossStats(loss, clipfrac, approx_kl, ratio_mean, ratio_var)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5·max((V − R)², (clip(V, V_old ± c) − R)²) over real tokens; also the clip fraction."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    return loss, masked_mean((l2 > l1).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_r = float(masked_var(returns, mask))
    return float("nan") if var_r == 0 else 1.0 - float(masked_var(returns - values, mask)) / var_r


class AdaptiveKL:
    """Ziegler et al. (2019): e = clip(KL/target − 1, ±0.2), β ← β·(1 + e·n/horizon).
    With `target` None, β stays fixed."""

    def __init__(self, beta: float, target: float | None, horizon: float) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            e = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.beta *= 1 + e * n / self.horizon
        return self.beta


# --------------------------------------------------------------------------- RLOO


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, k) sequence rewards → A_i = R_i − mean of the other k − 1 samples of its prompt."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


# --------------------------------------------------------------------------- DPG / posterior


def log_mean_exp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


@dataclass
class DpgEstimates:
    """Per-prompt importance-sampling estimates from samples of a proposal q."""

    log_z: torch.Tensor  # (P,) log Ẑ = log mean_q(P/q)
    kl_p_pi: torch.Tensor  # (P,) KL(p‖π)
    kl_p_q: torch.Tensor  # (P,) KL(p‖q)
    tvd_p_pi: torch.Tensor  # (P,) TVD(p, π)


def dpg_estimates(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    log_pi: torch.Tensor,
    log_z: torch.Tensor | None = None,
) -> DpgEstimates:
    """(P, k) unnormalised target log P(x), proposal log q(x), policy log π(x) for k samples of
    q per prompt. `log_z` (P,) replaces the batch estimate (e.g. a running average)."""
    log_w = log_p - log_q
    lz = log_mean_exp(log_w) if log_z is None else log_z
    w_norm = torch.exp(log_w - lz[:, None])  # P/(Z·q)
    kl_p_pi = (w_norm * (log_p - lz[:, None] - log_pi)).mean(1)
    kl_p_q = (w_norm * (log_p - lz[:, None] - log_q)).mean(1)
    tvd = 0.5 * (torch.exp(log_pi - log_q) - w_norm).abs().mean(1)
    return DpgEstimates(lz, kl_p_pi, kl_p_q, tvd)


def dpg_weights(
    log_p: torch.Tensor, log_q: torch.Tensor, log_pi: torch.Tensor, log_z: torch.Tensor
):
    """GDC++ advantage, divided by Z: P/(Z·q) − π/q, the weight of ∇log π(x)."""
    return torch.exp(log_p - log_q - log_z[:, None]) - torch.exp(log_pi - log_q)


def log_z_estimate(
    rewards: torch.Tensor, beta: float, n_boot: int = 200, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, N) rewards of N samples of π₀ per prompt → log Ẑ per prompt (logsumexp(r/β) − log N,
    biased low) with a 90% bootstrap interval per prompt."""
    x = rewards.double() / beta
    log_z = log_mean_exp(x)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[1], (n_boot, x.shape[1]), generator=g)
    boot = torch.stack([log_mean_exp(x[:, i]) for i in idx], dim=1)  # (P, n_boot)
    lo, hi = torch.quantile(boot, torch.tensor([0.05, 0.95], dtype=boot.dtype), dim=1)
    return log_z, lo, hi
