"""What the reward stage measures of a trained reward model: held-out pairs against the labels
and the gold order, beside the bag-of-words baseline; and its normalisation on fresh samples of
the SFT policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from lmpipe.chat import ChatTemplate
from lmpipe.model import load_model
from lmpipe.reward.baseline import bag_of_words_baseline
from lmpipe.reward.data import PreferenceExample
from lmpipe.reward.metrics import pair_metrics
from lmpipe.reward.model import encode_for_reward, fit_normalisation
from lmpipe.reward.scoring import raw_scores
from lmpipe.sampling import sample_responses
from lmpipe.stats import cluster_se, gold_agreement

BASELINES = ("bow", "tokens")


def fit_baselines(
    template: ChatTemplate,
    encoded: dict[str, list[tuple[PreferenceExample, dict[str, Any]]]],
    which: Sequence[str] = BASELINES,
) -> dict[str, dict[str, Any]]:
    """`bag_of_words_baseline` of the encoded pairs over lowercased words (`bow`) and over the
    template's tokens (`tokens`), those of `which`."""
    train = [p for _, p in encoded["train"]]
    val = [p for _, p in encoded["val"]]
    units = {
        "bow": None,
        "tokens": lambda t: template.tokenizer.encode(t, add_special_tokens=False).tokens,
    }
    return {k: bag_of_words_baseline(train, val, units[k]) for k in which}


def held_out_metrics(
    model: torch.nn.Module,
    template: ChatTemplate,
    encoded: dict[str, list[tuple[PreferenceExample, dict[str, Any]]]],
    context: int,
    baselines: dict[str, dict[str, Any]] | None = None,
    offset: Callable[[list[list[int]]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """`pair_metrics` of the val pairs, the Spearman correlation of reward and gold over their
    distinct responses, and the bag-of-words baseline (trained on the train pairs, its
    regularisation chosen by cross-validation over their prompts) on the same pairs, with the
    model's gold-order accuracy minus the baseline's (SE by prompt); and the same baseline over
    the model's own tokens. `baselines` passes either baseline (`fit_baselines`' keys) already
    fitted on these pairs, so that scoring several models on them fits each once. `offset`
    gives a fixed score per sequence added to the model's (a model trained on another's
    residual: `training.train_reward_model`'s `offset`)."""
    val_ex = [e for e, _ in encoded["val"]]
    rows = [p for _, p in encoded["val"]]
    # reward vs gold on the distinct held-out responses too; one call scores each once
    texts = {(p["prompt"], p[s]): p[f"gold_{s}"] for p in rows for s in ("chosen", "rejected")}
    seqs = [encode_for_reward(template, pr, re, context) for pr, re in texts]
    n = len(val_ex)
    every = [e.chosen for e in val_ex] + [e.rejected for e in val_ex] + seqs
    scores = raw_scores(model, every, template.pad_id)
    if offset is not None:
        scores = scores + offset(every)
    gold_c, gold_r = [p["gold_chosen"] for p in rows], [p["gold_rejected"] for p in rows]
    prompts = [p["prompt"] for p in rows]
    metrics = pair_metrics(scores[:n], scores[n : 2 * n], gold_c, gold_r, prompts=prompts)
    metrics["val_gold_spearman"] = float(spearmanr(scores[2 * n :], list(texts.values())).statistic)

    fitted = baselines or {}
    missing = [k for k in BASELINES if k not in fitted]
    fitted = {**fitted, **fit_baselines(template, encoded, missing)}
    bow, pieces = fitted["bow"], fitted["tokens"]
    # the model against the baseline on the same pairs: a paired difference, SE by prompt
    ours, sel = gold_agreement(scores[:n], scores[n : 2 * n], gold_c, gold_r)
    theirs, _ = gold_agreement(bow["margin"], np.zeros(n), gold_c, gold_r)
    gap = ours[sel].astype(float) - theirs[sel]
    return {
        **metrics,
        "baseline_bow_val_accuracy": bow["val_accuracy"],
        "baseline_bow_gold_order_accuracy": bow["gold_order_accuracy"],
        "baseline_bow_C": bow["C"],
        "baseline_tokens_gold_order_accuracy": pieces["gold_order_accuracy"],
        "baseline_tokens_C": pieces["C"],
        "gold_order_gap_to_baseline": float(gap.mean()) if gap.size else float("nan"),
        "gold_order_gap_to_baseline_se": cluster_se(gap, np.asarray(prompts, object)[sel]),
    }


def normalise_on_policy(
    model: torch.nn.Module,
    sft_dir: str | Path,
    template: ChatTemplate,
    prompts: Sequence[str],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    context: int,
    device: torch.device,
) -> tuple[dict[str, float], int]:
    """`fit_normalisation` on `n` fresh samples of the SFT policy (the policy RL starts from),
    cycling through `prompts`, over those that end with EOS and fit the context; with how many
    that were."""
    sft = load_model(sft_dir, device)  # fp32: the policy RL starts from, as it samples
    fresh = sample_responses(
        sft,
        template,
        [prompts[i % len(prompts)] for i in range(n)],
        max_new_tokens,
        temperature,
        seed=seed,
        batch_size=256,
    )
    fresh = [s for s in fresh if s["ended_with_eos"]]
    seqs = [encode_for_reward(template, s["prompt"], s["response"], 10**9) for s in fresh]
    seqs = [s for s in seqs if len(s) <= context]
    return fit_normalisation(raw_scores(model, seqs, template.pad_id)), len(seqs)
