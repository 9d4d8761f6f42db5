"""Distance to the posterior π* = π₀·exp(r/β)/Z on fixed prompts (Korbak, Perez & Buckley 2022).

J(π) = E_π[r] − β·KL(π‖π₀) = β·(log Z − KL(π‖π*)), so KL(π‖π*) = log Z − J/β. log Z(c) comes from
N samples of π₀ and the policy's own samples per prompt, pooled (`core.mixture_log_z`), with an
interval whose lower end always holds and whose upper end holds if no response scores above the
best one sampled (`core.posterior_kl_bounds`); J(c) from the policy's samples with the
per-sequence Σ k1. r is exactly the RL reward: the normalised proxy score, or the missing-EOS
penalty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmpipe.logprobs import response_logprobs
from lmpipe.rl import core
from lmpipe.sampling import Generation, pack
from lmpipe.scoring import Samples, ScoreFn, sample_scored


def draw(
    model: torch.nn.Module,
    ref: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    n: int,
    score_fn: ScoreFn,
    *,
    temperature: float,
    logprobs: bool = True,
    **sampling: Any,
) -> Samples:
    """n samples of `model` per prompt, scored, with Σ k1/k3 against `ref` (0 when model is ref)
    and entropies; with `logprobs` False those three are NaN and no log-prob pass runs.
    `sampling`: `sample_scored`'s other keywords (max_new_tokens, eos_id, pad_id, penalty,
    generator, batch_size)."""

    def measure(gen: Generation) -> dict[str, list[float]]:
        everything = slice(None)
        logp, ent = response_logprobs(model, gen, everything, temperature)
        mask = gen.response_mask
        ref_logp = (
            logp if model is ref else response_logprobs(ref, gen, everything, temperature, False)[0]
        )
        return {
            "kl": (core.kl_k1(logp, ref_logp) * mask).sum(-1).cpu().tolist(),
            "k3": (core.kl_k3(logp, ref_logp) * mask).sum(-1).cpu().tolist(),
            "ent": core.masked_mean(ent, mask, dim=-1).cpu().tolist(),
            "logp": (logp.double() * mask).sum(-1).cpu().tolist(),
        }

    return sample_scored(
        model,
        prompts,
        n,
        score_fn,
        temperature=temperature,
        measure=measure if logprobs else None,
        **sampling,
    )


@torch.no_grad()
def rescore(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    samples: Samples,
    *,
    temperature: float,
    pad_id: int,
    batch_size: int = 256,
) -> np.ndarray:
    """Σ log-prob of each of `samples` (drawn by another model) under `model`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(samples.responses), batch_size):
        end = start + batch_size
        rows = samples.prompt_index[start:end]
        gen = pack(
            [prompts[i] for i in rows],
            samples.responses[start:end],
            samples.ended[start:end].tolist(),
            pad_id,
            device,
        )
        logp, _ = response_logprobs(model, gen, slice(None), temperature, False)
        out += (logp.double() * gen.response_mask).sum(-1).cpu().tolist()
    model.train(was_training)
    return np.array(out)


def posterior_kl(
    ref_samples: Samples,
    policy_samples: Samples,
    beta: float,
    n_prompts: int,
    policy_logp_of_ref: np.ndarray | None = None,
    delta: float = 0.05,
) -> dict[str, float]:
    """log Ẑ, J and KL(π‖π*) = log Ẑ − J/β averaged over prompts, with intervals
    (`core.posterior_kl_bounds`). `policy_logp_of_ref`: the policy's Σ log-prob of π₀'s samples
    (`rescore`); None when the policy is π₀. The upper ends take the largest reward of any
    sample, π₀'s or the policy's, as the largest there is: they hold if none is larger."""
    r0 = torch.tensor(ref_samples.scores, dtype=torch.float64).view(n_prompts, -1)
    if policy_logp_of_ref is None:
        d0 = torch.zeros_like(r0)
    else:
        d0 = torch.tensor(policy_logp_of_ref - ref_samples.logp).view(n_prompts, -1)
    rp = torch.tensor(policy_samples.scores, dtype=torch.float64).view(n_prompts, -1)
    dp = torch.tensor(policy_samples.kl, dtype=torch.float64).view(n_prompts, -1)
    r_max = float(max(r0.max(), rp.max()))
    out = core.posterior_kl_bounds(r0, d0, rp, dp, beta, r_max, delta)
    out.update(
        {
            "reward_max": r_max,
            "n_ref_samples": int(r0.shape[1]),
            "n_policy_samples": int(rp.shape[1]),
        }
    )
    return out
