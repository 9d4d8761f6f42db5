"""How well scores order preference pairs: accuracy against labels and gold, calibration, and
standard errors clustered by prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmpipe.stats import cluster_se, gold_agreement


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
