"""How well scores order preference pairs: accuracy against labels and gold, calibration, and
standard errors clustered by prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def cluster_se(values: Sequence[float] | np.ndarray, clusters: Sequence[Any]) -> float:
    """Standard error of the mean of `values` whose observations are correlated within clusters
    (the pairs of one prompt share its responses): the cluster-robust estimate, NaN below two
    clusters. Independent observations (one per cluster) give the usual s/√n."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan")
    ids = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)[1]
    n_c = int(ids.max()) + 1
    if n_c < 2:
        return float("nan")
    sums = np.bincount(ids, weights=x - x.mean(), minlength=n_c)
    return float(np.sqrt(n_c / (n_c - 1) * np.sum(sums**2)) / x.size)


def gold_agreement(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    g_chosen: np.ndarray,
    g_rejected: np.ndarray,
    min_gold_gap: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: whether the scores order it as gold does, and whether gold differs enough
    (at least `min_gold_gap`) for that to count; gold ties are left out, not disagreements."""
    gc, gr = np.asarray(g_chosen), np.asarray(g_rejected)
    sel = np.abs(gc - gr) >= min_gold_gap
    return np.sign(np.asarray(r_chosen) - np.asarray(r_rejected)) == np.sign(gc - gr), sel


def calibration_error(p_first: np.ndarray, first_wins: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(first ≻ second) against outcomes: |mean predicted −
    frequency| per equal-width bin of the prediction, weighted by the bin's share. Each pair
    counts in both orders (p, y) and (1 − p, 1 − y), so it does not depend on which response
    is called first."""
    p = np.concatenate([np.asarray(p_first, float), 1 - np.asarray(p_first, float)])
    y = np.concatenate([np.asarray(first_wins, float), 1 - np.asarray(first_wins, float)])
    if not p.size:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            err += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(err)


def sample_gold_order(
    scores: np.ndarray, gold: np.ndarray, prompt_index: Sequence[int], min_gold_gap: float = 0.1
) -> dict[str, float]:
    """How often the reward model orders two samples of the same prompt as gold does, over
    every such pair whose gold differs by at least `min_gold_gap` (a sample without a score,
    NaN, is left out): its accuracy on a policy's own samples, with the SE by prompt."""
    scores, gold = np.asarray(scores, float), np.asarray(gold, float)
    idx = np.asarray(prompt_index)
    a_all, b_all = [], []
    for p in np.unique(idx):
        rows = np.flatnonzero((idx == p) & np.isfinite(scores))
        a, b = np.triu_indices(len(rows), k=1)
        a_all.append(rows[a])
        b_all.append(rows[b])
    a, b = np.concatenate(a_all or [[]]).astype(int), np.concatenate(b_all or [[]]).astype(int)
    agree, sel = gold_agreement(scores[a], scores[b], gold[a], gold[b], min_gold_gap)
    if not sel.any():
        return {"accuracy": float("nan"), "se": float("nan"), "pairs": 0}
    return {"accuracy": float(agree[sel].mean()), "se": cluster_se(agree[sel], idx[a][sel]),
            "pairs": int(sel.sum())}  # fmt: skip


def pair_metrics(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    g_chosen: np.ndarray,
    g_rejected: np.ndarray,
    min_gold_gap: float = 0.1,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy against the labels, and against the gold order where gold differs enough; with
    the pairs' prompts, each with its standard error by prompt."""
    rc, rr = np.asarray(r_chosen), np.asarray(r_rejected)
    agree, sel = gold_agreement(rc, rr, g_chosen, g_rejected, min_gold_gap)
    p_chosen = 1 / (1 + np.exp(-(rc - rr)))  # the Bradley-Terry model's P(chosen ≻ rejected)
    gold_wins = np.asarray(g_chosen) > np.asarray(g_rejected)
    out = {
        "val_accuracy": float(np.mean(rc > rr)),
        "gold_order_accuracy": float(np.mean(agree[sel])) if sel.any() else float("nan"),
        "gold_order_pairs": int(sel.sum()),
        "calibration_error_labels": calibration_error(p_chosen, np.ones_like(p_chosen)),
        "calibration_error_gold": calibration_error(p_chosen[sel], gold_wins[sel]),
    }
    if prompts is not None:
        clusters = np.asarray(prompts, dtype=object)
        out["val_accuracy_se"] = cluster_se(rc > rr, clusters)
        out["gold_order_accuracy_se"] = cluster_se(agree[sel], clusters[sel])
        out["val_prompts"] = len(set(prompts))
    return out


def label_gold_agreement(pairs: Sequence[tuple[Any, dict[str, Any]]]) -> float:
    """Share of labelled pairs whose chosen response gold scores higher, over the pairs gold
    does not tie (a tie has no order to agree with); `pairs` are (example, row) as
    `encode_pairs` gives them."""
    rows = [p for _, p in pairs if p["gold_chosen"] != p["gold_rejected"]]
    return float(np.mean([p["gold_chosen"] > p["gold_rejected"] for p in rows]))
