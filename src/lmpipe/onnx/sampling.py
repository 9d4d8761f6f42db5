"""The next token from a batch of logits, in numpy: greedy, or a draw after temperature, top-k
and top-p."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Rows of logits with everything outside the top-k and outside the smallest set whose
    probability reaches top_p set to −inf. The most likely token always stays, so top_p = 0
    is greedy rather than an empty distribution."""
    out = logits.astype(np.float64, copy=True)
    if top_k and top_k < out.shape[-1]:
        kth = np.partition(out, -top_k, axis=-1)[:, -top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(softmax(out), order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        out[drop] = -np.inf
    return out


def next_tokens(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """One token per row: greedy when temperature is 0, else a draw from the filtered,
    temperature-scaled distribution. The logits are shifted by their maximum before the division,
    so a tiny temperature (1e-300) gives the limit, all mass on the argmax, and never inf − inf
    = NaN."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # −inf for whatever a tiny temperature pushes off
        z = (z - z.max(-1, keepdims=True)) / temperature  # ≤ 0 everywhere, 0 at the argmax
    p = softmax(filter_logits(z, top_k, top_p))
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)
