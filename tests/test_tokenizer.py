import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmpipe.data.sources import DataError
from lmpipe.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    encode_documents,
    load_tokenizer,
    read_tokens,
    save_tokenizer,
    special_ids,
    token_dtype,
    train_tokenizer,
    write_tokens,
)

CORPUS = [
    f"The {a} {n} of {p} found a {o} and felt {f}."
    for a in ("old", "young", "quiet", "brave", "tired")
    for n in ("baker", "sailor", "painter", "miller")
    for p in ("Velmora", "Ashford", "the hills", "the harbour")
    for o in ("key", "lamp", "letter")
    for f in ("happy", "sad", "calm")
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=340, min_frequency=2)


def test_special_tokens_first_and_distinct(tok):
    ids = special_ids(tok)
    assert [ids[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert ids[PAD] != ids[EOS]
    assert tok.get_vocab_size() == 340


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(tok, text):
    # byte-level BPE is lossless on any string, including ones it never saw
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_hf_wrapper_roundtrip_and_specials(tok, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "naïve café — 日本語 🙂 tabs\tand\nnewlines  double  spaces "
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert hf.pad_token_id != hf.eos_token_id
    assert load_tokenizer(tmp_path).get_vocab_size() == tok.get_vocab_size()


def test_vocab_larger_than_corpus_can_fill():
    with pytest.raises(DataError, match=r"tokenizer.vocab_size = 5000 is larger.*at most \d+"):
        train_tokenizer(["tiny corpus", "tiny corpus again"], vocab_size=5000)


def test_token_file_stream_and_roundtrip(tok, tmp_path):
    docs = ["The old baker", "found a key."]
    arr = encode_documents(tok, docs, batch=1)
    ids = special_ids(tok)
    assert arr.dtype == np.uint16
    assert arr[0] == ids[BOS] and arr[-1] == ids[EOS]
    assert (arr == ids[EOS]).sum() == 2 and (arr == ids[BOS]).sum() == 2
    write_tokens(arr, tmp_path / "x.bin")
    back = read_tokens(tmp_path / "x.bin", "uint16")
    np.testing.assert_array_equal(back, arr)
    text = tok.decode(back.tolist(), skip_special_tokens=True)
    assert text == "The old bakerfound a key."


def test_dtype_choice_and_truncated_file(tmp_path):
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32
    (tmp_path / "t.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_tokens(tmp_path / "t.bin", "uint16")
