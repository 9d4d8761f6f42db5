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


def mixture_log_z(
    r0: torch.Tensor, d0: torch.Tensor, rp: torch.Tensor, dp: torch.Tensor, beta: float
) -> torch.Tensor:
    """log Ẑ per prompt from N samples of π₀ and M of the policy π, pooled by the balance
    heuristic: each sample x weighs π₀(x)·exp(r/β)/(N·π₀(x) + M·π(x)), and Ẑ, their sum, is
    unbiased for Z = E_π₀[exp(r/β)]. (P, N) and (P, M) rewards r and log-ratios d = log π(x)
    − log π₀(x) (Σ k1); M = 0 gives the plain π₀ estimate logsumexp(r/β) − log N. The policy's
    samples reach the high-reward tail that π₀ rarely draws; where π ≈ π₀ they count as π₀'s.
    """
    n, m = r0.shape[1], rp.shape[1]
    r = torch.cat([r0, rp], 1).double() / beta
    d = torch.cat([d0, dp], 1).double()
    log_m = math.log(m) if m else -math.inf
    return torch.logsumexp(r - torch.logaddexp(torch.full_like(d, math.log(n)), log_m + d), 1)


def log_z_lower(log_z: torch.Tensor, delta: float) -> float:
    """A lower bound on the prompts' mean log Z that holds with probability ≥ 1 − δ, from
    per-prompt unbiased Ẑ of independent prompts: E[Π Ẑᵢ/Zᵢ] = 1, so by Markov
    P(mean log(Ẑᵢ/Zᵢ) ≥ log(1/δ)/P) ≤ δ. No assumption on the reward."""
    return float(log_z.mean()) - math.log(1 / delta) / len(log_z)


def log_z_upper(log_z: torch.Tensor, n0: int, beta: float, r_max: float, delta: float) -> float:
    """An upper bound on the prompts' mean log Z that holds with probability ≥ 1 − δ if no
    reward exceeds `r_max`. Ẑ is a sum of independent non-negative terms, each at most
    b = exp(r_max/β)/N (N = `n0`, the π₀ samples), so Z − Ẑ ≤ √(2·b·Z·log(1/δ')) with
    probability 1 − δ' (the lower tail of a sum of non-negative variables, Σ E[X²] ≤ b·Z);
    solved for √Z, at δ' = δ/P for each prompt so that all hold at once. Never above
    r_max/β, where log Z is at most."""
    p = len(log_z)
    log_b = r_max / beta - math.log(n0)
    log_c2 = math.log(2 * math.log(p / delta)) + log_b  # c² = 2·b·log(P/δ)
    # √Z ≤ (c + √(c² + 4Ẑ))/2, in logs: log Z ≤ 2·log((c + √(c² + 4Ẑ))/2)
    c = torch.full_like(log_z, 0.5 * log_c2, dtype=torch.float64)
    root = 0.5 * torch.logaddexp(torch.full_like(c, log_c2), math.log(4) + log_z.double())
    upper = 2 * (torch.logaddexp(c, root) - math.log(2))
    return float(upper.clamp(max=r_max / beta).mean())


def posterior_kl_bounds(
    r0: torch.Tensor,
    d0: torch.Tensor,
    rp: torch.Tensor,
    dp: torch.Tensor,
    beta: float,
    r_max: float,
    delta: float = 0.05,
) -> dict[str, float]:
    """log Z, J and KL(π‖π*) = log Z − J/β, averaged over prompts, each with an interval.

    (P, N) rewards and log-ratios log π/π₀ of π₀'s samples, (P, M) of the policy's (as in
    `mixture_log_z`). log Ẑ is biased low (Jensen), so the point estimate of KL(π‖π*) is too;
    it is clipped at 0. The log Z interval is [`log_z_lower`, `log_z_upper`] (each side holds
    with probability ≥ 1 − δ; the upper one if no reward exceeds `r_max`), J's is its mean ±
    z·SE over the policy's samples (normal, one-sided δ), and the KL interval combines them.
    """
    log_z = mixture_log_z(r0, d0, rp, dp, beta)
    seq = (rp - beta * dp).double()
    j_i = seq.mean(1)
    j = float(j_i.mean())
    m = seq.shape[1]
    j_se = float(torch.sqrt((seq.var(1) / m).sum()) / len(j_i)) if m > 1 else float("nan")
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - delta)))
    lo, hi = log_z_lower(log_z, delta), log_z_upper(log_z, r0.shape[1], beta, r_max, delta)
    j_lo, j_hi = j - z * j_se, j + z * j_se
    return {
        "log_z": float(log_z.mean()),
        "log_z_low": lo,
        "log_z_high": hi,
        "objective_j": j,
        "objective_j_se": j_se,
        "posterior_kl": max(0.0, float(log_z.mean()) - j / beta),
        "posterior_kl_low": max(0.0, lo - j_hi / beta),
        "posterior_kl_high": max(0.0, hi - j_lo / beta),
    }
