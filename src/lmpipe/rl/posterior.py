"""Distance to the posterior π* = π₀·exp(r/β)/Z on fixed prompts (Korbak, Perez & Buckley 2022).

J(π) = E_π[r] − β·KL(π‖π₀) = β·(log Z − KL(π‖π*)), so KL(π‖π*) = log Z − J/β. log Z(c) comes from
N samples of π₀ per prompt (log Ẑ = logsumexp(r/β) − log N, biased low, with a bootstrap
interval); J(c) from the policy's own samples with the per-sequence Σ k1. r is exactly the RL
reward: the normalised proxy score, or the missing-EOS penalty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmpipe.rl import core
from lmpipe.rl.loop import ScoreFn, score_generation
from lmpipe.rl.rollout import response_logprobs
from lmpipe.sampling import Generation, generate


@dataclass
class Samples:
    """Samples of one model on prompts repeated n times (prompt-major)."""

    prompt_index: list[int]
    responses: list[list[int]]  # token ids, EOS included when present
    ended: np.ndarray
    scores: np.ndarray  # the RL reward: proxy or missing-EOS penalty
    proxy: np.ndarray  # NaN where no EOS
    kl: np.ndarray  # Σ k1 per sequence against the reference
    kl_k3: np.ndarray
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # mean per token


@torch.no_grad()
def draw(
    model: torch.nn.Module,
    ref: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    n: int,
    score_fn: ScoreFn,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int | Sequence[int],
    pad_id: int,
    penalty: float | None,
    generator: torch.Generator,
    batch_size: int = 256,
    logprobs: bool = True,
) -> Samples:
    """n samples of `model` per prompt, scored, with Σ k1/k3 against `ref` (0 when model is ref)
    and entropies; with `logprobs` False those three are NaN and no log-prob pass runs."""
    index = [i for i in range(len(prompts)) for _ in range(n)]
    out: dict[str, list] = {k: [] for k in ("resp", "ended", "scores", "proxy", "kl", "k3", "ent")}
    was_training = model.training
    model.eval()
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        gen: Generation = generate(
            model, batch, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            temperature=temperature, generator=generator,
        )  # fmt: skip
        scores, proxy = score_generation(gen, batch, score_fn, penalty)
        lengths = gen.lengths.tolist()
        out["resp"] += [r[:n_].tolist() for r, n_ in zip(gen.response.cpu(), lengths, strict=True)]
        out["ended"] += gen.ended.cpu().tolist()
        out["scores"] += scores.tolist()
        out["proxy"] += proxy.tolist()
        if not logprobs:
            for key in ("kl", "k3", "ent"):
                out[key] += [math.nan] * len(rows)
            continue
        everything = slice(None)
        logp, ent = response_logprobs(model, gen, everything, temperature)
        mask = gen.response_mask
        ref_logp = (
            logp if model is ref else response_logprobs(ref, gen, everything, temperature, False)[0]
        )
        out["kl"] += (core.kl_k1(logp, ref_logp) * mask).sum(-1).cpu().tolist()
        out["k3"] += (core.kl_k3(logp, ref_logp) * mask).sum(-1).cpu().tolist()
        out["ent"] += core.masked_mean(ent, mask, dim=-1).cpu().tolist()
    model.train(was_training)
    return Samples(
        index, out["resp"], np.array(out["ended"]), np.array(out["scores"]),
        np.array(out["proxy"]), np.array(out["kl"]), np.array(out["k3"]), np.array(out["ent"]),
    )  # fmt: skip


def posterior_kl(
    ref_samples: Samples, policy_samples: Samples, beta: float, n_prompts: int, seed: int = 0
) -> dict[str, float]:
    """log Ẑ per prompt, J and KL(π‖π*) = log Ẑ − J/β per prompt, averaged.

    Z = E_π₀[exp(r/β)] = E_π[exp((r − β·Σk1)/β)]: two estimates, one from π₀'s samples and one
    by importance sampling from the policy's own. Both are biased low (the tail of exp(r/β) is
    what a finite sample misses), so log Ẑ is the larger of the two per prompt; the policy's
    one is at least J/β by Jensen on the same samples, so the KL estimate is never negative.
    The interval is the bootstrap's over the chosen estimator's samples: it shows the sampling
    spread, not the unseen tail, and may still lie below the truth.
    """
    r0 = torch.tensor(ref_samples.scores).view(n_prompts, -1)
    log_z0, lo0, hi0 = core.log_z_estimate(r0, beta, seed=seed)
    seq_reward = torch.tensor(
        policy_samples.scores - beta * policy_samples.kl, dtype=torch.float64
    ).view(n_prompts, -1)
    log_zp, lop, hip = core.log_z_estimate(seq_reward, beta, seed=seed)
    use_policy = log_zp > log_z0
    log_z = torch.where(use_policy, log_zp, log_z0)
    lo, hi = torch.where(use_policy, lop, lo0), torch.where(use_policy, hip, hi0)
    j = seq_reward.mean(1)
    kl_star = (log_z - j / beta).clamp_min(0.0)  # ≥ 0 up to rounding
    return {
        "log_z": float(log_z.mean()),
        "log_z_low": float(lo.mean()),
        "log_z_high": float(hi.mean()),
        "log_z_from_ref": float(log_z0.mean()),
        "log_z_from_policy": float(log_zp.mean()),
        "objective_j": float(j.mean()),
        "posterior_kl": float(kl_star.mean()),
        "posterior_kl_low": float((lo - j / beta).clamp_min(0.0).mean()),
        "posterior_kl_high": float((hi - j / beta).clamp_min(0.0).mean()),
        "prompts_with_log_z_below_j": int((log_z0 - j / beta < 0).sum()),
        "n_ref_samples": int(r0.shape[1]),
    }
