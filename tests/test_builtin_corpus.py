"""The built-in story corpus: deterministic, well-formed, varied, and mixed in sentiment."""

import os
import re
import subprocess
import sys

import pytest

from lmpipe.data import stats
from lmpipe.data.builtin import generate_stories
from lmpipe.data.sft import split_sentences


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_stories(2000, 1)


def continuation(story: str) -> str:
    return " ".join(split_sentences(story)[1:])


def test_same_seed_same_stories_different_seed_different_stories():
    a = generate_stories(100, 3)
    assert a == generate_stories(100, 3)
    b = generate_stories(100, 4)
    assert a != b
    assert len(set(a) & set(b)) == 0
    # a longer corpus from the same seed starts with the shorter one
    assert generate_stories(150, 3)[:100] == a
    assert generate_stories(0, 3) == []
    with pytest.raises(ValueError):
        generate_stories(-1, 3)


def test_stories_do_not_depend_on_the_process_hash_seed():
    # str hashing is salted per process; the generator must not depend on it (set order etc.)
    code = "from lmpipe.data.builtin import generate_stories; print(repr(generate_stories(30, 7)))"
    outs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        outs.append(run.stdout)
    assert outs[0] == outs[1] == repr(generate_stories(30, 7)) + "\n"


def test_each_story_is_an_opening_sentence_then_a_continuation(corpus):
    for story in corpus:
        sents = split_sentences(story)
        assert 4 <= len(sents) <= 7, story
        for s in sents:
            assert s[0].isupper() and s[-1] in ".!?", s
        first = sents[0]
        assert first.endswith(".") and 40 <= len(first) <= 300, first
        # the opening introduces the protagonist by name ("... named Tiro" / "Tiro, a baker from")
        assert " named " in first or " from " in first, first
        assert story == " ".join(sents)  # single spaces between sentences, nothing stray


def test_protagonist_of_the_opening_appears_in_the_continuation(corpus):
    # the name follows "named", or else it is the story's first word
    shown = 0
    for story in corpus:
        first = split_sentences(story)[0]
        m = re.search(r" named ([A-Z][a-z]+)", first) or re.match(r"([A-Z][a-z]+)", first)
        shown += m.group(1) in continuation(story)
    assert shown / len(corpus) > 0.9


def test_text_is_plain_and_grammatical_in_the_ways_we_can_check(corpus):
    text = "\n".join(corpus)
    assert text.isascii()
    assert "{" not in text and "}" not in text  # every slot was filled
    assert "  " not in text and " ," not in text and ",," not in text and ",." not in text
    assert not re.search(r"\b(\w+) \1\b", text, flags=re.IGNORECASE), "doubled word"
    # a/an agree with the next word's sound (the only exceptions we generate: "a one-eyed ...")
    assert not re.search(r"\b[Aa] [aeiou](?!ne-)", text)
    assert not re.search(r"\b[Aa]n [^aeiou\s]", text)
    # a sentence never starts with a lower-case word after a lead-in's comma is dropped
    assert not re.search(r"[.!?] [a-z]", text)


def test_corpus_is_hard_to_memorise(corpus):
    assert len(set(corpus)) >= len(corpus) - 2
    assert stats.distinct_ngram_ratio(corpus, 4) >= 0.25
    n = len(corpus) // 10
    assert stats.ngram_overlap(corpus[:n], corpus[n:], 8) <= 0.5
    # thousands of distinct character names: count the capitalised words in the corpus
    names = set(re.findall(r"\b[A-Z][a-z]{2,}\b", " ".join(corpus)))
    assert len(names) > 3000


def test_continuations_span_happy_and_sad(corpus):
    summary = stats.sentiment_summary([continuation(s) for s in corpus], seed=0)
    assert summary["n"] == len(corpus)
    assert summary["std"] >= 0.3
    assert -0.3 <= summary["mean"] <= 0.3
    assert summary["frac_positive"] >= 0.3 and summary["frac_negative"] >= 0.3
    assert summary["p10"] <= -0.5 and summary["p90"] >= 0.5


def test_sentiment_follows_the_story_arc_not_noise(corpus):
    # the last two strongly-felt sentences of a story (outcome, aftermath or the turn before
    # it) agree in sign far more often than the 50% that moods drawn at random would give
    agree = total = 0
    for story in corpus[:800]:
        scores = [stats.vader_compound(s) for s in split_sentences(story)[1:]]
        strong = [c for c in scores if abs(c) >= 0.3]
        if len(strong) >= 2:
            total += 1
            agree += (strong[-1] > 0) == (strong[-2] > 0)
    assert total > 400
    assert agree / total > 0.7
