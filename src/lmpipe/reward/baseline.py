"""The bag-of-words reference the reward model is compared with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmpipe.reward.metrics import pair_metrics

SIDES = ("chosen", "rejected")


def bag_of_words_baseline(
    train: Sequence[dict],
    val: Sequence[dict],
    tokenize: Callable[[str], list[str]] | None = None,
) -> dict[str, Any]:
    """An honest reference for the reward model: logistic regression on word-count differences
    (chosen − rejected) of the same training pairs, scored like the reward model on val.
    `tokenize` counts other units than lowercased words (the model's own tokens: a bag of
    tokens, which shows what splitting words into pieces costs a model that cannot compose them).

    Rows carry `chosen`, `rejected` (texts) and `gold_chosen`, `gold_rejected`.
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

    x = diff(train)
    clf = LogisticRegression(fit_intercept=False, max_iter=2000)
    clf.fit(vstack([x, -x]), np.r_[np.ones(x.shape[0]), np.zeros(x.shape[0])])
    margin = diff(val) @ clf.coef_.ravel()
    out = pair_metrics(
        margin,
        np.zeros_like(margin),
        [p["gold_chosen"] for p in val],
        [p["gold_rejected"] for p in val],
        prompts=[p.get("prompt", i) for i, p in enumerate(val)],
    )
    return {**out, "margin": margin}
