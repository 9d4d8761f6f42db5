"""Corpus statistics: how memorisable a corpus is, and how its texts vary in sentiment.

All functions are pure (apart from a cached VADER analyzer) and deterministic.

Word n-grams are compared through 64-bit keys: each word gets an integer id, and the ids of an
n-gram are mixed with a splitmix64-style hash in numpy. That keeps about 8 bytes per n-gram
(a few MB of text means a few million n-grams) instead of a Python tuple each. Two different
n-grams share a key with probability about 2**-64, so for any real corpus the results are
exact.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np

if TYPE_CHECKING:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_WORD = re.compile(r"[\w']+")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def words(text: str) -> list[str]:
    """The lower-cased words of `text`: runs of word characters and apostrophes."""
    return [w.lower() for w in _WORD.findall(text)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MUL1
    x = x ^ (x >> np.uint64(27))
    x = x * _MUL2
    return x ^ (x >> np.uint64(31))


def _ngram_keys(texts: Sequence[str], n: int, vocab: dict[str, int]) -> np.ndarray:
    """One uint64 key per word n-gram of each text (n-grams never cross texts).

    `vocab` maps words to ids and grows as new words are seen; pass the same dict for texts
    whose n-grams are compared with each other.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids: list[int] = []
    lengths: list[int] = []
    for text in texts:
        ws = words(text)
        if len(ws) < n:
            continue
        ids.extend([vocab.setdefault(w, len(vocab)) for w in ws])
        lengths.append(len(ws))
    if not ids:
        return np.zeros(0, dtype=np.uint64)
    arr = np.asarray(ids, dtype=np.uint64)
    m = arr.size - n + 1  # every start position in the concatenation, valid or not
    key = np.full(m, np.uint64(n), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            key = _mix(key ^ (arr[j : j + m] * _GOLDEN))
    # keep only the starts whose n-gram ends inside its own text
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    end_of_text = np.repeat(ends, lengths)[:m]
    return key[np.arange(m) + n <= end_of_text]


def distinct_ngram_ratio(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams divided by all word n-grams, over all `texts`.

    Words are `words(text)`; n-grams are counted within each text (never across two texts).
    1.0 means no n-gram repeats anywhere; low values mean a repetitive, memorisable corpus.
    Returns 0.0 when there are no n-grams at all.
    """
    keys = _ngram_keys(texts, n, {})
    if keys.size == 0:
        return 0.0
    return float(np.unique(keys).size / keys.size)


def ngram_overlap(held_out: Sequence[str], reference: Sequence[str], n: int = 8) -> float:
    """Fraction of the word n-grams of `held_out` that also occur anywhere in `reference`.

    Held-out n-grams are counted with multiplicity (an n-gram seen twice counts twice); an
    n-gram is a hit when it occurs at least once in any reference text. With n = 8, a high
    value means whole phrases of unseen documents can be copied from the training documents.
    Returns 0.0 when `held_out` has no n-grams.
    """
    vocab: dict[str, int] = {}
    ref = np.unique(_ngram_keys(reference, n, vocab))
    held = _ngram_keys(held_out, n, vocab)
    if held.size == 0 or ref.size == 0:
        return 0.0
    pos = np.minimum(np.searchsorted(ref, held), ref.size - 1)
    return float(np.count_nonzero(ref[pos] == held) / held.size)


class SentimentSummary(TypedDict):
    """VADER compound scores of a set of texts: count, moments, percentiles and signs."""

    n: int
    mean: float
    std: float
    p10: float
    p50: float
    p90: float
    frac_positive: float
    frac_negative: float


_ANALYZER: SentimentIntensityAnalyzer | None = None


def _analyzer() -> SentimentIntensityAnalyzer:
    """The VADER analyzer, created on first use (loading its lexicon takes a moment)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def vader_compound(text: str) -> float:
    """VADER's compound score of `text`, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def sentiment_summary(
    texts: Sequence[str], max_texts: int = 5000, seed: int = 0
) -> SentimentSummary:
    """Summarise the VADER compound scores of `texts`.

    When there are more than `max_texts` texts, a random sample of `max_texts` of them
    (seeded by `seed`) is scored. Returns `n` (texts scored), `mean`, `std` (population),
    the 10th, 50th and 90th percentiles, and the fractions with compound >= 0.05
    (`frac_positive`) and <= -0.05 (`frac_negative`), VADER's usual thresholds. With no texts,
    `n` is 0 and every other value is 0.0.
    """
    if max_texts < 1:
        raise ValueError(f"max_texts must be >= 1, got {max_texts}")
    if len(texts) > max_texts:
        picked = sorted(random.Random(seed).sample(range(len(texts)), max_texts))
        texts = [texts[i] for i in picked]
    scores = np.array([vader_compound(t) for t in texts], dtype=np.float64)
    if scores.size == 0:
        zero = 0.0
        return SentimentSummary(
            n=0,
            mean=zero,
            std=zero,
            p10=zero,
            p50=zero,
            p90=zero,
            frac_positive=zero,
            frac_negative=zero,
        )
    p10, p50, p90 = np.percentile(scores, [10, 50, 90])
    return SentimentSummary(
        n=int(scores.size),
        mean=float(scores.mean()),
        std=float(scores.std()),
        p10=float(p10),
        p50=float(p50),
        p90=float(p90),
        frac_positive=float(np.mean(scores >= 0.05)),
        frac_negative=float(np.mean(scores <= -0.05)),
    )
