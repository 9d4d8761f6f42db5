"""What the rl stage reports: π₀ and the trained policy on held-out prompts, the distance of each
to the posterior π* = π₀·exp(r/β)/Z (`lmpipe.rl.posterior`), the best-of-n frontier π₀ reaches
at each KL, and how the run converged. `reports/rl.json` is `rl_report`'s dict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmpipe.config import RLParams
from lmpipe.data.stats import distinct_ngram_ratio
from lmpipe.rl.posterior import draw, posterior_kl, rescore
from lmpipe.scoring import Samples, ScoreFn
from lmpipe.stats import (
    best_of_n,
    best_of_n_by_prompt,
    best_of_n_kl_bound,
    cluster_se,
    sample_gold_order,
)


def nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


@dataclass
class EvalSet:
    """The held-out prompts, and how responses to them are sampled, scored and judged."""

    text: list[str]
    ids: list[list[int]]
    score_fn: ScoreFn
    decode: Callable[[list[int]], str]  # response token ids → the assistant's text
    gold: Callable[[list[str], list[str]], Sequence[float]]  # (prompts, responses) → gold
    sample_kw: dict[str, Any]  # `draw`'s max_new_tokens, temperature, eos_id, pad_id, penalty

    def summary(self, s: Samples) -> tuple[list[str], dict[str, Any]]:
        """(decoded responses, their figures): gold, proxy, RL score, KL, entropy, distinct-2
        and EOS rate, with per-prompt gold and proxy means (the unit of the gains' SEs)."""
        texts = [self.decode(r) for r in s.responses]
        g = self.gold([self.text[i] for i in s.prompt_index], texts)
        proxy = s.proxy[~np.isnan(s.proxy)]
        idx, gold_arr = np.asarray(s.prompt_index), np.asarray(g)
        rows = range(len(self.text))
        by_prompt = {
            "gold": np.array([nanmean(gold_arr[idx == i]) for i in rows]),
            "proxy": np.array([nanmean(s.proxy[idx == i]) for i in rows]),
        }
        return texts, {
            "by_prompt": by_prompt,
            "gold_each": gold_arr,
            "gold": float(np.mean(g)),
            "proxy": float(np.mean(proxy)) if proxy.size else float("nan"),
            "score": float(np.mean(s.scores)),
            "kl": float(np.mean(s.kl)),
            "kl_k3": float(np.mean(s.kl_k3)),
            "entropy": float(np.mean(s.entropy)),
            "distinct_2": distinct_ngram_ratio(texts, 2),
            "eos_rate": float(np.mean(s.ended)),
        }


@dataclass
class Evaluation:
    """One model's samples on the eval prompts, decoded, and their figures."""

    samples: Samples
    texts: list[str]
    figures: dict[str, Any]
    seconds: float


def evaluate_reference(
    ref: torch.nn.Module, ev: EvalSet, cfg: RLParams, generator: torch.Generator
) -> tuple[Evaluation, list[dict[str, float]]]:
    """π₀ with `rl.posterior_samples` a prompt (log Z's N): the report's "init" figures (its
    distinct-2 over the first `rl.eval_samples` a prompt, as many as the policy has), and
    the best-of-n frontier from the same samples."""
    t0 = time.perf_counter()
    ref_s = draw(
        ref, ref, ev.ids, cfg.posterior_samples, ev.score_fn, generator=generator, **ev.sample_kw
    )
    texts, init = ev.summary(ref_s)
    init.update(posterior_kl(ref_s, ref_s, cfg.kl_coef, len(ev.ids)))
    best_of = best_of_n_frontier(ref_s.scores, init["gold_each"], len(ev.ids), cfg.kl_coef)
    n_post, n_eval = cfg.posterior_samples, cfg.eval_samples
    init["distinct_2"] = distinct_ngram_ratio(
        [t for i, t in enumerate(texts) if i % n_post < n_eval], 2
    )
    return Evaluation(ref_s, texts, init, time.perf_counter() - t0), best_of


def evaluate_policy(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    ev: EvalSet,
    cfg: RLParams,
    init: Evaluation,
    generator: torch.Generator,
) -> Evaluation:
    """The policy with `rl.eval_samples` a prompt, and its KL(π‖π*) with log Z from π₀'s
    samples (`init`) and its own, pooled (the policy rescoring π₀'s). A `generator` of another
    device than the policy's (π₀ placed apart) gives way to one of the same seed there."""
    t0 = time.perf_counter()
    device = next(policy.parameters()).device
    if generator.device.type != device.type:
        generator = torch.Generator(device=device).manual_seed(generator.initial_seed())
    pol_s = draw(
        policy, ref, ev.ids, cfg.eval_samples, ev.score_fn, generator=generator, **ev.sample_kw
    )
    texts, final = ev.summary(pol_s)
    pol_of_ref = rescore(
        policy, ev.ids, init.samples, temperature=cfg.temperature, pad_id=ev.sample_kw["pad_id"]
    )
    final.update(posterior_kl(init.samples, pol_s, cfg.kl_coef, len(ev.ids), pol_of_ref))
    return Evaluation(pol_s, texts, final, time.perf_counter() - t0)


BEST_OF_N = (1, 2, 4, 8, 16, 32)
"""The n of the best-of-n frontier, as far as the π₀ samples a prompt allow."""


def best_of_ns(samples: int) -> list[int]:
    """The n of `BEST_OF_N` that `samples` π₀ samples a prompt allow."""
    return [n for n in BEST_OF_N if n <= samples]


def best_of_n_frontier(
    scores: np.ndarray, gold: np.ndarray, n_prompts: int, beta: float
) -> list[dict[str, float]]:
    """Best-of-n from π₀ on the eval prompts, ranked by the RL reward, from the π₀ samples the
    log Z estimate drew: RL reward, gold, KL bound and J ≥ reward − β·bound for each n, the
    frontier a converged policy should reach at its KL."""
    select = np.asarray(scores, np.float64).reshape(n_prompts, -1)
    out = []
    for n in best_of_ns(select.shape[1]):
        got = best_of_n(select, {"gold": np.asarray(gold).reshape(n_prompts, -1)}, n)
        bound = best_of_n_kl_bound(n)
        out.append(
            {
                "n": n,
                "kl_bound": bound,
                "score": got["select"],
                "gold": got["gold"],
                "objective_j_lower": got["select"] - beta * bound,
            }
        )
    return out


def gold_against_best_of_n(
    scores: np.ndarray, gold: np.ndarray, n_prompts: int, policy_gold: np.ndarray, kl: float
) -> dict[str, float]:
    """The policy's gold minus best-of-n's from π₀ at the policy's KL, paired by prompt: each
    prompt's best-of-n gold interpolated between the n whose KL bounds bracket `kl` (beyond
    the largest n's bound, that n's), as the β sweep compares them; with its standard error
    over the prompts. Best-of-n's KL is at most its bound, so this is RL's gain over a lower
    estimate of best-of-n's frontier."""
    select = np.asarray(scores, np.float64).reshape(n_prompts, -1)
    g = np.asarray(gold, np.float64).reshape(n_prompts, -1)
    ns = best_of_ns(select.shape[1])
    bounds = [best_of_n_kl_bound(n) for n in ns]
    per_n = np.stack([best_of_n_by_prompt(select, {"gold": g}, n)["gold"] for n in ns])
    at_kl = np.array([np.interp(kl, bounds, prompt) for prompt in per_n.T])
    d = np.asarray(policy_gold, np.float64) - at_kl
    d = d[np.isfinite(d)]
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {
        "gold_vs_best_of_n": float(d.mean()) if d.size else float("nan"),
        "gold_vs_best_of_n_se": se,
    }


def j_slope_ratio(history: list[dict], tail: float = 0.2) -> tuple[float, float]:
    """How fast the training batches' J = score − β·KL still rises over the last `tail` of the
    steps, as a share of its mean rise over the run (least-squares slopes): near 0 or below
    once the run has converged, near 1 or above where the budget stopped it; and its standard
    error, from the scatter of the tail's J about its line (the mean slope's own error, fitted
    on five times the steps, is left out)."""
    steps = np.array([h["step"] for h in history], dtype=float)
    j = np.array([h["rl/score"] - h["rl/beta"] * h["rl/kl"] for h in history])
    last = steps > steps.max() * (1 - tail) if len(steps) else steps.astype(bool)
    if last.sum() < 3 or len(steps) < 5:
        return float("nan"), float("nan")
    overall = np.polyfit(steps, j, 1)[0]
    if overall <= 0:
        return float("nan"), float("nan")
    x, y = steps[last], j[last]
    slope, icept = np.polyfit(x, y, 1)
    resid = y - (slope * x + icept)
    se = math.sqrt(float(resid @ resid) / (x.size - 2) / float(((x - x.mean()) ** 2).sum()))
    return float(slope / overall), se / float(overall)


def gain_with_se(name: str, init: np.ndarray, final: np.ndarray) -> dict[str, float]:
    """`<name>_gain` from π₀ to the policy on the same eval prompts, and its standard error
    from the per-prompt differences (prompts where either side has no value left out)."""
    d = np.asarray(final, np.float64) - np.asarray(init, np.float64)
    d = d[np.isfinite(d)]
    se = cluster_se(d, np.arange(d.size))  # one difference per prompt: s/√n
    return {f"{name}_gain": float(d.mean()) if d.size else float("nan"), f"{name}_gain_se": se}


def reward_gold_order(init: Evaluation, final: Evaluation, n_eval: int, n_post: int) -> dict:
    """How often the reward model orders two samples of a prompt as gold does, on SFT's and on
    the policy's own samples; as many π₀ samples a prompt as the policy has (`n_eval` of its
    `n_post`), so that both count pairs alike."""
    ref_s, pol_s = init.samples, final.samples
    first = np.arange(len(ref_s.scores)) % n_post < n_eval
    return {
        "sft": sample_gold_order(
            ref_s.proxy[first],
            init.figures["gold_each"][first],
            np.asarray(ref_s.prompt_index)[first],
        ),
        "policy": sample_gold_order(pol_s.proxy, final.figures["gold_each"], pol_s.prompt_index),
    }


@dataclass
class Run:
    """How training went: the logged history, β at the end, and where the time went."""

    history: list[dict[str, float]]
    beta_final: float
    train_seconds: float
    generate_seconds: float
    train_prompts: int
    world_size: int
    precision: str


def rl_report(
    cfg: RLParams, init: Evaluation, final: Evaluation, best_of: list[dict], run: Run
) -> dict[str, Any]:
    """`reports/rl.json`: the gains from π₀ to the policy with their SEs, KL to π₀ and to π*,
    log Z, J, the reward model's order on each model's samples, best-of-n, speed."""
    a, b = init.figures, final.figures
    episodes = cfg.steps * min(cfg.prompts_per_step, run.train_prompts) * cfg.samples_per_prompt
    batch_kl = [h["rl/kl"] for h in run.history]
    slope_ratio, slope_ratio_se = j_slope_ratio(run.history)
    elapsed = max(run.train_seconds, 1e-9)
    return {
        "algo": cfg.algo,
        "world_size": run.world_size,
        "precision": run.precision,
        "beta": cfg.kl_coef,
        "beta_final": run.beta_final,
        "gold_reward": {"init": a["gold"], "final": b["gold"]},
        **gain_with_se("gold", a["by_prompt"]["gold"], b["by_prompt"]["gold"]),
        **gain_with_se("proxy", a["by_prompt"]["proxy"], b["by_prompt"]["proxy"]),
        "proxy_reward": {"init": a["proxy"], "final": b["proxy"]},
        "kl_to_ref": b["kl"],
        "kl_to_ref_k3": b["kl_k3"],
        "posterior_kl": b["posterior_kl"],
        "posterior_kl_interval": [b["posterior_kl_low"], b["posterior_kl_high"]],
        "posterior_kl_init": a["posterior_kl"],
        "log_z": b["log_z"],
        "log_z_interval": [b["log_z_low"], b["log_z_high"]],
        "log_z_samples_per_prompt": {"ref": cfg.posterior_samples, "policy": cfg.eval_samples},
        "reward_max": b["reward_max"],
        "objective_j": {"init": a["objective_j"], "final": b["objective_j"]},
        "objective_j_se": b["objective_j_se"],
        "reward_gold_order": reward_gold_order(
            init, final, cfg.eval_samples, cfg.posterior_samples
        ),
        "best_of_n": best_of,
        **gold_against_best_of_n(
            init.samples.scores,
            a["gold_each"],
            len(b["by_prompt"]["gold"]),
            b["by_prompt"]["gold"],
            b["kl"],
        ),
        "entropy": b["entropy"],
        "entropy_init": a["entropy"],
        "distinct_2": b["distinct_2"],
        "distinct_2_init": a["distinct_2"],
        "eos_rate": {"init": a["eos_rate"], "final": b["eos_rate"]},
        "min_batch_kl": float(min(batch_kl)) if batch_kl else float("nan"),
        "j_slope_ratio": slope_ratio,
        "j_slope_ratio_se": slope_ratio_se,
        "episodes_per_sec": episodes / elapsed,
        "generate_share": run.generate_seconds / elapsed,
        "train_seconds": run.train_seconds,
        "eval_seconds": init.seconds + final.seconds,
        "eval_prompts": len(b["by_prompt"]["gold"]),
        "steps": cfg.steps,
        "episodes": episodes,
    }


def side_by_side(ev: EvalSet, init: Evaluation, final: Evaluation, cfg: RLParams) -> str:
    """The first policy sample and the first SFT sample of each eval prompt, as text."""
    n_eval, n_post = cfg.eval_samples, cfg.posterior_samples
    return "\n\n".join(
        f"PROMPT: {ev.text[i // n_eval]}\nRL: {t}\nSFT: {init.texts[(i // n_eval) * n_post]}"
        for i, t in enumerate(final.texts)
        if i % n_eval == 0
    )
