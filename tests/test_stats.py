"""Corpus statistics: n-gram diversity and overlap by hand and against a naive version, and the
VADER sentiment summary."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmpipe.data import stats


def naive_ngrams(texts, n):
    out = []
    for t in texts:
        w = [x.lower() for x in re.findall(r"[\w']+", t)]
        out += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return out


def test_words_lowercase_and_keep_apostrophes():
    assert stats.words("Tiro's CAT, the cat-flap!  ok") == [
        "tiro's",
        "cat",
        "the",
        "cat",
        "flap",
        "ok",
    ]
    assert stats.words("...") == []


def test_distinct_ngram_ratio_by_hand():
    # words a b a b -> bigrams (a b) (b a) (a b): 2 distinct of 3; case and punctuation ignored
    assert stats.distinct_ngram_ratio(["A b, a B"], 2) == pytest.approx(2 / 3)
    assert stats.distinct_ngram_ratio(["the cat the dog"], 1) == pytest.approx(3 / 4)
    assert stats.distinct_ngram_ratio(["x y z"], 3) == 1.0


def test_distinct_ngram_ratio_does_not_join_documents():
    # joined, "a b a b" would give (a b) (b a) (a b) = 2/3; per document it is (a b) twice = 1/2
    assert stats.distinct_ngram_ratio(["a b", "a b"], 2) == pytest.approx(1 / 2)
    # joined, "a b" would be one bigram; apart, there are none
    assert stats.distinct_ngram_ratio(["a", "b"], 2) == 0.0
    assert stats.distinct_ngram_ratio([], 4) == 0.0
    assert stats.distinct_ngram_ratio(["", "one two three"], 4) == 0.0
    with pytest.raises(ValueError):
        stats.distinct_ngram_ratio(["a b"], 0)


def test_ngram_overlap_by_hand():
    ref = ["The cat sat on the mat."]
    # held-out bigrams (the cat) (cat ran) (ran on) (on the) (the mat): 3 of 5 are in ref
    assert stats.ngram_overlap(["the cat ran on the mat"], ref, 2) == pytest.approx(3 / 5)
    # counted with multiplicity: (a b) (b a) (a b) against a ref holding only (a b) -> 2/3
    assert stats.ngram_overlap(["a b a b"], ["a b"], 2) == pytest.approx(2 / 3)
    # the default n is 8: a document seen whole overlaps fully, a changed word breaks 8 grams
    doc = "one two three four five six seven eight nine ten"
    assert stats.ngram_overlap([doc], [doc]) == 1.0
    assert stats.ngram_overlap([doc.replace("five", "FIVE!")], [doc]) == 1.0
    assert stats.ngram_overlap([doc.replace("five", "5")], [doc]) == 0.0


def test_ngram_overlap_never_joins_documents():
    # reference documents are not joined: "x a" + "b y" hold no (a b)
    assert stats.ngram_overlap(["a b"], ["x a", "b y"], 2) == 0.0
    # held-out documents are not joined either: "a" and "b" have no bigram to count
    assert stats.ngram_overlap(["a", "b"], ["a b"], 2) == 0.0
    assert stats.ngram_overlap([], ["a b"], 2) == 0.0
    assert stats.ngram_overlap(["a b"], [], 2) == 0.0


texts_strategy = st.lists(
    st.lists(st.sampled_from(["a", "b", "c", "D", "é", "it's"]), max_size=10).map(" ".join),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(texts=texts_strategy, other=texts_strategy, n=st.integers(1, 4))
def test_ngram_statistics_match_a_naive_implementation(texts, other, n):
    grams = naive_ngrams(texts, n)
    expected = len(set(grams)) / len(grams) if grams else 0.0
    assert stats.distinct_ngram_ratio(texts, n) == pytest.approx(expected)
    ref = set(naive_ngrams(other, n))
    expected = sum(g in ref for g in grams) / len(grams) if grams and ref else 0.0
    assert stats.ngram_overlap(texts, other, n) == pytest.approx(expected)


KEYS = {"n", "mean", "std", "p10", "p50", "p90", "frac_positive", "frac_negative"}


def test_sentiment_summary_of_positive_and_negative_texts():
    pos = stats.sentiment_summary(["What a wonderful, happy day! I love it."] * 3)
    neg = stats.sentiment_summary(["This is terrible, I hate it and I am so sad."] * 3)
    assert set(pos) == set(neg) == KEYS
    assert pos["n"] == 3 and isinstance(pos["n"], int)
    assert all(isinstance(pos[k], float) for k in KEYS - {"n"})
    assert pos["mean"] > 0.5 and pos["std"] == 0.0 and pos["p10"] == pos["p90"] == pos["mean"]
    assert pos["frac_positive"] == 1.0 and pos["frac_negative"] == 0.0
    assert neg["mean"] < -0.5 and neg["frac_negative"] == 1.0 and neg["frac_positive"] == 0.0


def test_sentiment_summary_of_a_mix():
    texts = ["I love this, it is wonderful!", "I hate this, it is awful.", "The bus is at four."]
    s = stats.sentiment_summary(texts)
    scores = sorted(stats.vader_compound(t) for t in texts)
    assert scores[0] < -0.5 and scores[1] == 0.0 and scores[2] > 0.5
    assert s["mean"] == pytest.approx(sum(scores) / 3)
    assert s["p50"] == 0.0 and s["p10"] < 0 < s["p90"]
    assert s["frac_positive"] == pytest.approx(1 / 3) and s["frac_negative"] == pytest.approx(1 / 3)
    assert s["std"] > 0.5


def test_sentiment_summary_samples_at_most_max_texts_by_seed():
    texts = [f"Day {i}: " + ("good " * (i % 5)) + ("bad " * (i % 3)) for i in range(60)]
    a = stats.sentiment_summary(texts, max_texts=10, seed=1)
    assert a["n"] == 10
    assert stats.sentiment_summary(texts, max_texts=10, seed=1) == a
    others = [stats.sentiment_summary(texts, max_texts=10, seed=s)["mean"] for s in range(2, 7)]
    assert any(m != a["mean"] for m in others)
    assert stats.sentiment_summary(texts, max_texts=1000)["n"] == 60
    with pytest.raises(ValueError):
        stats.sentiment_summary(texts, max_texts=0)


def test_sentiment_summary_of_nothing():
    s = stats.sentiment_summary([])
    assert s["n"] == 0 and set(s) == KEYS and all(s[k] == 0.0 for k in KEYS - {"n"})


def test_analyzer_is_created_once():
    assert stats._analyzer() is stats._analyzer()
