"""The prepare stage through its script and through the real `dvc repro`."""

import json

import numpy as np
import pytest
import yaml

from conftest import SHARED_CORPORA, copy_repo, run, writer_run
from lmpipe.data.tokenizer import load_tokenizer, read_tokens

pytestmark = pytest.mark.e2e


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dvc_repro_prepare_outputs(tiny_repo):
    out = tiny_repo / "data" / "prepared"
    report = json.loads((tiny_repo / "reports" / "prepare.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val", "test"):
        arr = read_tokens(out / f"{split}.bin", meta["dtype"])
        assert arr.size == report["tokens"][split] > 0
        assert arr.max() < report["vocab_size"]
    assert report["vocab_size"] == 512 and meta["dtype"] == "uint16"
    docs = report["documents"]
    assert (
        docs["train"] + docs["val"] + docs["test"]
        == docs["read"] - docs["duplicates_removed"] - docs["too_short_removed"]
    )
    assert 2.0 < report["chars_per_token"] < 8.0
    # the val token file decodes back to its documents: BOS doc EOS ...
    tok = load_tokenizer(out)
    val = read_tokens(out / "val.bin", meta["dtype"])
    eos = meta["special_tokens"]["<|eos|>"]
    assert (val == eos).sum() == docs["val"]
    first = val[: int(np.argmax(val == eos)) + 1].tolist()
    assert tok.decode(first, skip_special_tokens=True).endswith((".", "!", "?"))
    # SFT pairs and prompt sets
    sft_train = read_jsonl(out / "sft" / "train.jsonl")
    assert len(sft_train) == report["sft_pairs"]["train"] > 0
    assert all(
        set(r) == {"prompt", "response"} and r["prompt"] and r["response"] for r in sft_train
    )
    assert len(read_jsonl(out / "prompts" / "rl.jsonl")) == report["prompts"]["rl"] == 32
    assert len(read_jsonl(out / "prompts" / "eval.jsonl")) == report["prompts"]["eval"] == 16
    # corpus statistics are real numbers, and the builtin corpus varies in sentiment
    corpus = report["corpus"]
    assert 0 < corpus["distinct_4gram_ratio"] <= 1
    assert 0 <= corpus["val_8gram_in_train"] <= 1
    assert corpus["ending_sentiment"]["std"] >= 0.3
    # lineage: the MLflow run that made the folder is found by its content
    run_ = writer_run(tiny_repo, "data/prepared")
    assert run_.data.tags["lmpipe.stage"] == "prepare"
    assert run_.data.params["tokenizer.vocab_size"] == "512"
    assert run_.data.metrics["report/tokens.train"] == report["tokens"]["train"]


def test_rerun_is_cached_and_deterministic(tiny_repo):
    status = run(["dvc", "status"], tiny_repo)
    assert "up to date" in status.stdout
    out = tiny_repo / "data" / "prepared"
    before = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    before["tokenizer.json"] = (out / "tokenizer.json").read_bytes()
    kept = {f: (tiny_repo / f).read_bytes() for f in ("dvc.lock", "reports/prepare.json")}
    run(["dvc", "repro", "-f", "prepare"], tiny_repo)
    for name, data in before.items():
        assert (out / name).read_bytes() == data, f"{name} differs between two runs"
    # put the shared repo back as it was (meta.json names the new MLflow run, so data/prepared
    # hashes differently and every later stage would be stale for the tests that follow)
    for f, data in kept.items():
        (tiny_repo / f).write_bytes(data)
    run(["dvc", "checkout", "--force", "prepare"], tiny_repo)
    assert "up to date" in run(["dvc", "status"], tiny_repo).stdout


def test_bad_input_fails_clearly_and_keeps_previous_output(tmp_path):
    repo = copy_repo(tmp_path, {"data": {"builtin_stories": 50}, "tokenizer": {"vocab_size": 300}})
    run(["dvc", "repro", "prepare"], repo)
    out = repo / "data" / "prepared"
    snapshot = sorted(p.relative_to(out) for p in out.rglob("*"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update({"source": "text", "path": "corpus/none-*.txt"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    res = run(
        [
            "python",
            "stages/prepare.py",
            "--out",
            "data/prepared",
            "--report",
            "reports/prepare.json",
        ],
        repo,
        check=False,
    )
    assert res.returncode == 2
    assert "prepare: error: data.path = 'corpus/none-*.txt' matches no file" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == snapshot
    assert not list(repo.glob("data/.prepared.tmp-*"))
    params["data"] = {"val_fraction": "lots"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    res = run(["python", "stages/prepare.py", "--out", "x", "--report", "y"], repo, check=False)
    assert res.returncode == 2 and "data.val_fraction = 'lots'" in res.stderr


@pytest.mark.skipif(
    not (SHARED_CORPORA / "tinyshakespeare.txt").exists(),
    reason="../shared/corpora/tinyshakespeare.txt is absent (it is not part of the project)",
)
def test_prepare_on_tinyshakespeare(tmp_path):
    repo = copy_repo(
        tmp_path,
        {
            "data": {
                "source": "text",
                "path": str(SHARED_CORPORA / "tinyshakespeare.txt"),
                "rl_prompts": 600,
                "rl_prompts_min": 400,
                "eval_prompts": 20,
            },
            "tokenizer": {"vocab_size": 2048},
        },
    )
    run(["dvc", "repro", "prepare"], repo)
    report = json.loads((repo / "reports" / "prepare.json").read_text())
    # speeches separated by blank lines: about 7k distinct documents, 1.1M characters
    assert 5000 < sum(report["documents"][s] for s in ("train", "val", "test")) < 8000
    assert 1_000_000 < sum(report["characters"].values()) < 1_120_000
    assert report["vocab_size"] == 2048
    assert report["tokens"]["train"] > 200_000
    # 348 val speeches give ~130 RL prompts; the rest up to rl_prompts_min come from train ones
    rl = read_jsonl(repo / "data" / "prepared" / "prompts" / "rl.jsonl")
    assert len(rl) == report["prompts"]["rl"] == 400
    assert 0 < report["prompts"]["rl_from_train"] < 400
    n_val = 400 - report["prompts"]["rl_from_train"]
    added = [r["prompt"] for r in rl[n_val:]]
    assert len(set(added)) == len(added) and not set(added) & {r["prompt"] for r in rl[:n_val]}
    tok = load_tokenizer(repo / "data" / "prepared")
    line = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tok.decode(tok.encode(line).ids) == line
