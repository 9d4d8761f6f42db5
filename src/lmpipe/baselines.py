"""Honest baselines for language-model loss: add-one smoothed unigram and bigram models.

Fitted on the train tokens, scored on val tokens, in nats per token — the numbers a trained
transformer has to beat. Counting is sparse (only observed bigrams), so any vocab size works.
"""

from __future__ import annotations

import numpy as np


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Mean −log p(x) with p(x) = (c(x) + 1) / (N + V)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size)
    logp = np.log(counts + 1.0) - np.log(len(train) + vocab_size)
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


def bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Mean −log p(y|x) over val pairs with p(y|x) = (c(x, y) + 1) / (c(x, ·) + V)."""
    tr = np.asarray(train, dtype=np.int64)
    va = np.asarray(val, dtype=np.int64)
    keys, counts = np.unique(tr[:-1] * vocab_size + tr[1:], return_counts=True)
    ctx = np.bincount(tr[:-1], minlength=vocab_size)
    q = va[:-1] * vocab_size + va[1:]
    pos = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
    pair = np.where(keys[pos] == q, counts[pos], 0)
    logp = np.log(pair + 1.0) - np.log(ctx[va[:-1]] + vocab_size)
    return float(-logp.mean())
