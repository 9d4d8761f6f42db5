import json

import pytest

from lmpipe.config import DataParams
from lmpipe.data import sources
from lmpipe.data.sources import DataError


def cfg(**kw) -> DataParams:
    return DataParams(**kw)


def test_text_source_splits_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\n\n  second doc  \n \nthird")
    (tmp_path / "b.txt").write_text("from b\r\n\r\nb two")
    docs = sources.read_text(cfg(source="text", path="*.txt"), tmp_path)
    assert docs == ["first doc line one\nline two", "  second doc  ", "third", "from b", "b two"]


def test_text_source_chunks(tmp_path):
    words = " ".join(f"w{i}" for i in range(400))
    (tmp_path / "a.txt").write_text(words)
    docs = sources.read_text(cfg(source="text", path="a.txt", chunk_chars=100), tmp_path)
    assert "".join(docs) == words
    assert all(len(d) <= 100 for d in docs)
    assert all(d.startswith(" ") or d == docs[0] for d in docs)  # cut at whitespace


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"data.path = 'missing/\*.txt' matches no file"):
        sources.read_text(cfg(source="text", path="missing/*.txt"), tmp_path)


def test_undecodable_bytes_are_counted_and_located(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good line\nbad \xff here \xfe\nok")
    c = cfg(source="text", path="bad.txt")
    with pytest.raises(DataError) as e:
        sources.read_text(c, tmp_path)
    msg = str(e.value)
    assert "2 byte(s) are not valid utf-8" in msg
    assert "line 2 col 5 (byte 0xff)" in msg
    assert "data.encoding_errors" in msg and "'replace'" in msg
    replaced = sources.read_text(
        cfg(source="text", path="bad.txt", encoding_errors="replace"), tmp_path
    )
    assert replaced == ["good line\nbad \ufffd here \ufffd\nok"]
    ignored = sources.read_text(
        cfg(source="text", path="bad.txt", encoding_errors="ignore"), tmp_path
    )
    assert ignored == ["good line\nbad  here \nok"]


def test_jsonl_source_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two", "x": 1}) + "\n")
    assert sources.read_jsonl(cfg(source="jsonl", path="d.jsonl", field="body"), tmp_path) == [
        "one",
        "two",
    ]
    f.write_text(json.dumps({"body": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: no field 'body' \(this row has: text\)"):
        sources.read_jsonl(cfg(source="jsonl", path="d.jsonl", field="body"), tmp_path)
    f.write_text('{"body": "one"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        sources.read_jsonl(cfg(source="jsonl", path="d.jsonl", field="body"), tmp_path)
    f.write_text('{"body": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'body' must be a string, got int"):
        sources.read_jsonl(cfg(source="jsonl", path="d.jsonl", field="body"), tmp_path)


def test_hf_source_from_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["alpha doc", "beta doc"]}),
            "test": datasets.Dataset.from_dict({"content": ["gamma doc"]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    c = cfg(source="hf", path="saved", field="content", hf_split="test")
    assert sources.read_hf(c, tmp_path) == ["gamma doc"]
    single = tmp_path / "single"
    ds["train"].save_to_disk(str(single))
    assert sources.read_hf(cfg(source="hf", path=str(single), field="content"), tmp_path) == [
        "alpha doc",
        "beta doc",
    ]
    with pytest.raises(DataError, match="data.hf_split = 'validation' is not in"):
        sources.read_hf(
            cfg(source="hf", path="saved", field="content", hf_split="validation"), tmp_path
        )
    with pytest.raises(DataError, match="data.field = 'text' is not a column.*content"):
        sources.read_hf(cfg(source="hf", path="saved", hf_split="test"), tmp_path)


def test_clean_normalises_and_trims():
    # NFC composes e + combining acute; control chars go; space runs collapse; 3+ newlines -> 2
    raw = "  Cafe\u0301\t\t ok \x07\r\n\n\n\nnext   line  "
    assert sources.clean(raw) == "Caf\u00e9 ok\n\nnext line"
    assert sources.clean("\ufb01ne", "NFKC") == "fine"
    assert sources.clean("\ufb01ne", "none") == "\ufb01ne"


def test_dedupe_keeps_first_and_order():
    assert sources.dedupe(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_split_is_seeded_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(100)]
    s1 = sources.split_documents(docs, 0.1, 0.2, seed=3)
    s2 = sources.split_documents(docs, 0.1, 0.2, seed=3)
    s3 = sources.split_documents(docs, 0.1, 0.2, seed=4)
    assert s1 == s2 and s1 != s3
    assert (len(s1["train"]), len(s1["val"]), len(s1["test"])) == (70, 10, 20)
    assert sorted(s1["train"] + s1["val"] + s1["test"]) == sorted(docs)


def test_split_leaving_empty_split_fails():
    with pytest.raises(DataError, match="leave a split empty"):
        sources.split_documents(["a", "b", "c", "d", "e"], 0.05, 0.05, seed=0)


def test_prepare_documents_counts_and_rejects_degenerate_corpora():
    docs, counts = sources.prepare_documents(
        [
            "a long enough document",
            "a long enough document",
            "short",
            "another long document",
            "third long document here",
        ],
        cfg(min_chars=10),
    )
    assert docs == ["a long enough document", "another long document", "third long document here"]
    assert counts == {"read": 5, "too_short": 1, "duplicates": 1, "kept": 3}
    with pytest.raises(DataError, match="2 exact duplicates"):
        sources.prepare_documents(["the same text, again and again"] * 3, cfg())
    with pytest.raises(DataError, match="produced no documents"):
        sources.prepare_documents([], cfg())
