"""The bag-of-words reference the reward model is compared with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmpipe.reward.metrics import pair_metrics

SIDES = ("chosen", "rejected")
# inverse regularisation strengths tried, half a decade apart: sklearn's default C = 1 is not
# the best on these pairs for words nor for tokens, so a fixed C would flatter the reward model
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def bag_of_words_baseline(
    train: Sequence[dict],
    val: Sequence[dict],
    tokenize: Callable[[str], list[str]] | None = None,
    c_grid: Sequence[float] = C_GRID,
    folds: int = 3,
) -> dict[str, Any]:
    """An honest reference for the reward model: logistic regression on word-count differences
    (chosen − rejected) of the same training pairs, its regularisation C chosen by
    cross-validation over the train prompts (the label log-loss, the reward model's own
    criterion for its kept step), scored like the reward model on val.
    `tokenize` counts other units than lowercased words (the model's own tokens: a bag of
    tokens, which shows what splitting words into pieces costs a model that cannot compose them).

    Rows carry `chosen`, `rejected` (texts), `gold_chosen`, `gold_rejected` and, for the folds,
    `prompt` (rows without one are their own group). Returns `pair_metrics` of val, the
    `margin` of each val pair, the chosen `C` and each C's `cv_log_loss`.
    """
    from scipy.sparse import vstack
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    # each response is in up to k - 1 pairs: count the words of each distinct text once
    texts = list(dict.fromkeys(p[s] for rows in (train, val) for p in rows for s in SIDES))
    vec = CountVectorizer(analyzer=tokenize or "word").fit(
        list(dict.fromkeys(p[s] for p in train for s in SIDES))
    )
    counts = vec.transform(texts)
    row = {t: i for i, t in enumerate(texts)}

    def diff(rows):
        return counts[[row[p["chosen"]] for p in rows]] - counts[[row[p["rejected"]] for p in rows]]

    def fit(x, c, start=None):
        # both orders of every pair, no intercept: the model cannot prefer the first-named side
        clf = LogisticRegression(C=c, fit_intercept=False, max_iter=2000, warm_start=True)
        if start is not None:  # the previous C's weights: the path's next fit takes fewer steps
            clf.coef_ = start[None].copy()
        clf.fit(vstack([x, -x]), np.r_[np.ones(x.shape[0]), np.zeros(x.shape[0])])
        return clf.coef_.ravel()

    x = diff(train)
    cv = cv_log_loss(x, [p.get("prompt", i) for i, p in enumerate(train)], c_grid, folds, fit)
    c = min(cv, key=cv.get) if cv else 1.0
    margin = diff(val) @ fit(x, c)
    out = pair_metrics(
        margin,
        np.zeros_like(margin),
        [p["gold_chosen"] for p in val],
        [p["gold_rejected"] for p in val],
        prompts=[p.get("prompt", i) for i, p in enumerate(val)],
    )
    return {**out, "margin": margin, "C": c, "cv_log_loss": cv}


def cv_log_loss(
    x, groups: Sequence[Any], c_grid: Sequence[float], folds: int, fit: Callable
) -> dict[float, float]:
    """Each C's mean −log σ(margin) on held-out train pairs, over `folds` folds of whole prompts
    (a prompt's pairs share responses, so splitting them would leak); empty with under 2
    prompts. C rises through the grid, each fold warm-started from the last C's weights, and
    stops at the first C that does worse than the one before: the weaker the regularisation
    the slower the fit, and this assumes the held-out loss is unimodal in C (a second dip
    further up the grid would be missed)."""
    from sklearn.model_selection import GroupKFold

    code = {g: i for i, g in enumerate(dict.fromkeys(groups))}  # prompts and row numbers alike
    folds = min(folds, len(code))
    if folds < 2 or not c_grid:
        return {}
    splits = list(GroupKFold(folds).split(x, groups=[code[g] for g in groups]))
    starts: list[Any] = [None] * folds
    out: dict[float, float] = {}
    prev = np.inf
    for c in sorted(float(c) for c in c_grid):
        nll = 0.0
        for f, (fit_rows, held) in enumerate(splits):
            starts[f] = fit(x[fit_rows], c, starts[f])
            nll += float(np.logaddexp(0.0, -(x[held] @ starts[f])).sum())
        out[c] = nll / x.shape[0]
        if out[c] > prev:
            break
        prev = out[c]
    return out
