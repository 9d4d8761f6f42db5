"""Gold scorers: the stand-in for a human judge (Gao et al. 2022's "gold reward model").

They label preference pairs and evaluate policies; they never see a model, and RL never
optimises them directly (it optimises the learned proxy). Each maps (prompts, responses) to an
array of floats; `make_gold(name, ...)` picks one from the registry.

- `vader`: VADER compound sentiment of the response, in [-1, 1] ("write happier continuations").
- `keyword`: 1.0 if the response contains one of the words (whole word, any case), else 0.0 —
  GDC's pointwise constraint b(x).
- `length`: number of words in the response — trivially learnable, for tests and sanity checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from lmpipe.data.stats import vader_compound

GoldScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def vader(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return np.array([vader_compound(r) for r in responses], dtype=np.float64)


def keyword(words: Sequence[str]) -> GoldScorer:
    if not words:
        raise ValueError("the keyword scorer needs at least one word")
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def score(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.array([1.0 if pattern.search(r) else 0.0 for r in responses])

    return score


def length(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return np.array([len(r.split()) for r in responses], dtype=np.float64)


GOLD: dict[str, Callable[..., GoldScorer]] = {
    "vader": lambda **_: vader,
    "keyword": lambda keywords=(), **_: keyword(keywords),
    "length": lambda **_: length,
}


def make_gold(name: str, **options) -> GoldScorer:
    """The scorer called `name`; options (e.g. `keywords`) go to scorers that take them."""
    if name not in GOLD:
        raise ValueError(f"unknown gold scorer {name!r}; known: {', '.join(GOLD)}")
    return GOLD[name](**options)


def gold_of(manifest: dict) -> GoldScorer:
    """The gold scorer a reward model's preferences were labelled with (its `lmpipe.json`), so
    every later stage judges with the same one."""
    pref = manifest["params"]["preference"]
    return make_gold(pref["gold"], keywords=pref.get("keywords", ()))
