import json

import pytest

from lmpipe.data import sft
from lmpipe.data.sources import DataError


def test_split_sentences_keeps_punctuation_and_quotes():
    text = 'She smiled. "Are you sure?" he asked! Then silence... The end'
    assert sft.split_sentences(text) == [
        "She smiled.",
        '"Are you sure?"',
        "he asked!",
        "Then silence...",
        "The end",
    ]


def test_make_pair_takes_prompt_then_continuation():
    doc = "One. Two two. Three three three. Four."
    kw = dict(max_prompt_chars=100, max_response_chars=100)
    assert sft.make_pair(doc, 1, 2, **kw) == {
        "prompt": "One.",
        "response": "Two two. Three three three.",
    }
    assert sft.make_pair(doc, 2, 5, **kw) == {
        "prompt": "One. Two two.",
        "response": "Three three three. Four.",
    }
    assert sft.make_pair("Only one sentence.", 1, 2, **kw) is None
    assert sft.make_pair(doc, 1, 2, max_prompt_chars=3, max_response_chars=100) is None
    cut = sft.make_pair(doc, 1, 3, max_prompt_chars=100, max_response_chars=12)
    assert cut == {"prompt": "One.", "response": "Two two."}


def test_read_pairs_good_and_malformed(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2", "id": 3}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert sft.read_pairs(f) == [
        {"prompt": "p1", "response": "r1"},
        {"prompt": "p2", "response": "r2"},
    ]
    f.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: no field 'response'"):
        sft.read_pairs(f)
    with pytest.raises(DataError, match="is not a file"):
        sft.read_pairs(tmp_path / "missing.jsonl")


def test_split_pairs_seeded_and_nonempty():
    pairs = [{"prompt": str(i), "response": "r"} for i in range(10)]
    s = sft.split_pairs(pairs, 0.2, seed=1)
    assert len(s["val"]) == 2 and len(s["train"]) == 8
    assert s == sft.split_pairs(pairs, 0.2, seed=1)
    assert len(sft.split_pairs(pairs[:2], 0.01, seed=1)["val"]) == 1
