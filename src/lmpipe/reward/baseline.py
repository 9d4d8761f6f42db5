"""The bag-of-words reference the reward model is compared with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmpipe.reward.metrics import pair_metrics

SIDES = ("chosen", "rejected")
# inverse regularisation strengths tried, half a decade apart: sklearn's default C = 1 is not
# the best on these pairs for words nor for tokens, so a fixed C would flatter the reward model
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class WordScorer:
    """A fitted bag-of-words model: the score of a text is its unit counts times `weights`."""

    vectorizer: Any  # a fitted sklearn CountVectorizer
    weights: np.ndarray

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.vectorizer.transform(list(texts)) @ self.weights, dtype=np.float64)


def count_vectorizer(texts: Sequence[str], tokenize: Callable[[str], list[str]] | None = None):
    """sklearn's CountVectorizer over lowercased words (or `tokenize`'s units), fitted to the
    distinct `texts`."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(analyzer=tokenize or "word").fit(list(dict.fromkeys(texts)))


def fit_pairs(x, c: float, start: np.ndarray | None = None) -> np.ndarray:
    """Weights of a logistic regression on count differences `x` (chosen − rejected) with
    inverse regularisation `c`: both orders of every pair and no intercept, so the model cannot
    prefer the first-named side; `start` warm-starts it (the previous C's weights)."""
    from scipy.sparse import vstack
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, fit_intercept=False, max_iter=2000, warm_start=True)
    if start is not None:  # the path's next fit takes fewer steps from the last C's weights
        clf.coef_ = start[None].copy()
    clf.fit(vstack([x, -x]), np.r_[np.ones(x.shape[0]), np.zeros(x.shape[0])])
    return clf.coef_.ravel()


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
    `margin` of each val pair, the chosen `C`, each C's `cv_log_loss` and the fitted `scorer`
    (`WordScorer`).
    """
    # each response is in up to k - 1 pairs: count the words of each distinct text once
    texts = list(dict.fromkeys(p[s] for rows in (train, val) for p in rows for s in SIDES))
    vec = count_vectorizer([p[s] for p in train for s in SIDES], tokenize)
    counts = vec.transform(texts)
    row = {t: i for i, t in enumerate(texts)}

    def diff(rows):
        return counts[[row[p["chosen"]] for p in rows]] - counts[[row[p["rejected"]] for p in rows]]

    x = diff(train)
    cv = cv_log_loss(x, [p.get("prompt", i) for i, p in enumerate(train)], c_grid, folds, fit_pairs)
    c = min(cv, key=cv.get) if cv else 1.0
    weights = fit_pairs(x, c)
    margin = diff(val) @ weights
    out = pair_metrics(
        margin,
        np.zeros_like(margin),
        [p["gold_chosen"] for p in val],
        [p["gold_rejected"] for p in val],
        prompts=[p.get("prompt", i) for i, p in enumerate(val)],
    )
    return {**out, "margin": margin, "C": c, "cv_log_loss": cv, "scorer": WordScorer(vec, weights)}


def cross_fitted_scores(
    train: Sequence[dict],
    c: float,
    tokenize: Callable[[str], list[str]] | None = None,
    folds: int = 3,
) -> dict[tuple[Any, str], float]:
    """Each train response's bag-of-words score from the model fitted, at `c`, on the other
    folds of whole prompts (the folds `cv_log_loss` uses): a score the response's own labels
    did not shape, keyed by (prompt, text). What a model stacked on bag-of-words trains
    against, where the full fit's scores would be optimistic on the pairs it was fitted to."""
    groups = [p.get("prompt", i) for i, p in enumerate(train)]
    splits = prompt_folds(groups, folds)
    if not splits:
        raise ValueError(f"cross-fitting needs at least 2 prompts, not {len(set(groups))}")
    vec = count_vectorizer([p[s] for p in train for s in SIDES], tokenize)
    x = vec.transform([p["chosen"] for p in train]) - vec.transform([p["rejected"] for p in train])
    out: dict[tuple[Any, str], float] = {}
    for fit_rows, held in splits:
        scorer = WordScorer(vec, fit_pairs(x[fit_rows], c))
        keys = list(dict.fromkeys((groups[i], train[i][s]) for i in held for s in SIDES))
        out.update(zip(keys, scorer.score([t for _, t in keys]).tolist(), strict=True))
    return out


def prompt_folds(groups: Sequence[Any], folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, held-out rows) of `folds` folds of whole groups (a prompt's pairs share its
    responses, so splitting them would leak), fewer with fewer groups; none under 2 groups."""
    from sklearn.model_selection import GroupKFold

    code = {g: i for i, g in enumerate(dict.fromkeys(groups))}  # prompts and row numbers alike
    folds = min(folds, len(code))
    if folds < 2:
        return []
    ids = [code[g] for g in groups]
    return list(GroupKFold(folds).split(np.zeros((len(ids), 1)), groups=ids))


def cv_log_loss(
    x, groups: Sequence[Any], c_grid: Sequence[float], folds: int, fit: Callable
) -> dict[float, float]:
    """Each C's mean −log σ(margin) on held-out train pairs, over `folds` folds of whole prompts
    (a prompt's pairs share responses, so splitting them would leak); empty with under 2
    prompts. C rises through the grid, each fold warm-started from the last C's weights, and
    stops at the first C that does worse than the one before: the weaker the regularisation
    the slower the fit, and this assumes the held-out loss is unimodal in C (a second dip
    further up the grid would be missed)."""
    splits = prompt_folds(groups, folds)
    if not splits or not c_grid:
        return {}
    starts: list[Any] = [None] * len(splits)
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
