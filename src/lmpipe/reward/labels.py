"""The noisy labeller: Bradley–Terry draws over a gold scorer's scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def preference_prob(g_a: np.ndarray, g_b: np.ndarray, tau: float) -> np.ndarray:
    """P(a ≻ b) under the Bradley–Terry labeller σ((g(a) − g(b)) / τ); τ = 0 is exact
    (ties are a coin flip)."""
    diff = np.asarray(g_a, dtype=np.float64) - np.asarray(g_b, dtype=np.float64)
    if tau == 0:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-diff / tau))


def label_pairs(gold: Sequence[float], tau: float, rng: np.random.Generator) -> list[dict]:
    """Every pair (i, j), i < j, of one prompt's responses, labelled by a Bradley–Terry draw.

    Returns `{"chosen", "rejected", "p_chosen"}` with response indices and the labeller's
    probability of the choice it made.
    """
    g = np.asarray(gold, dtype=np.float64)
    out = []
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            p = float(preference_prob(g[i], g[j], tau))
            i_wins = rng.random() < p
            c, r = (i, j) if i_wins else (j, i)
            out.append({"chosen": c, "rejected": r, "p_chosen": p if i_wins else 1 - p})
    return out


def expected_agreement(g_a: np.ndarray, g_b: np.ndarray, tau: float) -> float:
    """Expected share of labels that agree with the gold order, over pairs whose gold differs."""
    diff = np.abs(np.asarray(g_a) - np.asarray(g_b))
    diff = diff[diff > 0]
    if diff.size == 0:
        return float("nan")
    return float(np.mean(preference_prob(diff, np.zeros_like(diff), tau)))
