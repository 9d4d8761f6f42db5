"""Statistics the reports share: standard errors clustered by prompt, agreement with the gold
order, and best-of-n's expected outcome and KL bound. Pure numpy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    return {
        "accuracy": float(agree[sel].mean()),
        "se": cluster_se(agree[sel], idx[a][sel]),
        "pairs": int(sel.sum()),
    }


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n ‖ base) ≤ log n − (n − 1)/n, in nats (Beirami et al. 2024; exact for a
    continuous score without ties)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_by_prompt(
    select: np.ndarray, values: Mapping[str, np.ndarray], n: int
) -> dict[str, np.ndarray]:
    """Expected values of the sample that best-of-n keeps, for each prompt's m ≥ n samples.

    `select` (P, m) is the score best-of-n ranks by (the proxy reward); each `values[k]` (P, m)
    is measured on the kept sample. Unbiased: over all n-subsets of a prompt's m samples, the
    sample of rank i (ascending by `select`) is the kept one in C(i−1, n−1) of the C(m, n)
    subsets. One value a prompt, (P,) for each key and for `select`."""
    m = select.shape[1]
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt, got {m}")
    ranks = np.arange(1, m + 1)
    weight = np.array([math.comb(i - 1, n - 1) for i in ranks], dtype=np.float64)
    weight /= math.comb(m, n)
    order = np.argsort(select, axis=1, kind="stable")
    out = {}
    for key, v in {"select": select, **values}.items():
        ordered = np.take_along_axis(np.asarray(v, dtype=np.float64), order, 1)
        out[key] = (ordered * weight).sum(1)
    return out


def best_of_n(select: np.ndarray, values: Mapping[str, np.ndarray], n: int) -> dict[str, float]:
    """`best_of_n_by_prompt` averaged over the prompts."""
    return {k: float(v.mean()) for k, v in best_of_n_by_prompt(select, values, n).items()}
