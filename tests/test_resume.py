"""A resumed or repeated run writes the same bytes: wall-clock figures stay out of what later
stages read, and the checkpoint of a run whose output is in place is removed."""

import csv
import json

from lmpipe.config import Params, TokenizerParams
from lmpipe.io import speed_csv, without_wall_clock, write_history_csv, write_json
from lmpipe.stage import manifest, prune_checkpoints


def history(tps: float) -> list[dict[str, float]]:
    return [
        {"step": 5, "train/loss": 2.5, "train/lr": 0.01, "train/tokens_per_sec": tps},
        {"step": 10, "train/loss": 2.25, "train/tokens_per_sec": tps * 1.1, "eval/loss": 2.4},
        {"step": 10, "rl/episodes_per_sec": tps, "rl/generate_share": 0.4},
    ]


def test_history_csv_keeps_wall_clock_columns_in_their_own_file(tmp_path):
    a, b = tmp_path / "a" / "pretrain.csv", tmp_path / "b" / "pretrain.csv"
    write_history_csv(a, history(1000.0))
    write_history_csv(b, history(1234.5))
    assert a.read_bytes() == b.read_bytes()  # the curves later stages read: same bytes
    assert speed_csv(a).name == "pretrain_speed.csv"
    assert speed_csv(a).read_bytes() != speed_csv(b).read_bytes()
    rows = list(csv.DictReader(a.open()))
    assert list(rows[0]) == ["step", "train/loss", "train/lr", "eval/loss"]
    speed = list(csv.DictReader(speed_csv(a).open()))
    assert list(speed[0]) == [
        "step",
        "train/tokens_per_sec",
        "rl/episodes_per_sec",
        "rl/generate_share",
    ]
    assert [r["train/tokens_per_sec"] for r in speed] == ["1000", "1100", ""]


def test_history_without_wall_clock_columns_still_writes_both_files(tmp_path):
    write_history_csv(tmp_path / "p.csv", [{"step": 0, "eval/loss": 3.0}])
    assert (tmp_path / "p.csv").read_text().splitlines() == ["step,eval/loss", "0,3"]
    assert (tmp_path / "p_speed.csv").read_text().splitlines() == ["step"]


def test_manifest_has_no_run_id_or_timings_and_repeats_exactly():
    params = Params(seed=1, sections={"tokenizer": TokenizerParams(vocab_size=512)})
    tags = {
        "input.data.sha256": "ab" * 32,
        "input.data.path": "data/prepared",
        "lineage.data.run_id": "r1",
        "git.commit": "c0ffee",
        "git.dirty": "false",
    }
    pruned = {"tokens_per_sec_b8": 9.0, "speedup_b1": 1.2, "ppl": 3.0}
    report = {
        "val_loss": 2.0,
        "train_seconds": 12.3,
        "tokens_per_sec": 4e4,
        "variants": {"pruned": pruned},
    }
    one = manifest("pretrain", params, tags, report, "pretrain-0123")
    again = manifest(
        "pretrain",
        params,
        {**tags, "lineage.data.run_id": "r2"},
        {**report, "train_seconds": 99.0, "tokens_per_sec": 1.0},
        "pretrain-0123",
    )
    assert json.dumps(one, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert one["metrics"] == {"val_loss": 2.0, "variants": {"pruned": {"ppl": 3.0}}}
    assert set(one["inputs"]) == {"input.data.sha256", "input.data.path"}
    assert one["run_key"] == "pretrain-0123" and "mlflow_run_id" not in one
    assert without_wall_clock({"eval_seconds": 1, "x": {"stage_seconds": 2}}) == {"x": {}}


def test_prune_removes_only_checkpoints_of_runs_whose_output_is_in_place(tmp_path):
    cache, models = tmp_path / "ckpt", tmp_path / "models"
    for name in ("pretrain-aaa", "pretrain-bbb", "compress-distill-ccc", "rl-ddd"):
        (cache / name).mkdir(parents=True)
        (cache / name / "checkpoint.pt").write_bytes(b"x" * 10)
    write_json(models / "pretrain" / "lmpipe.json", {"run_key": "pretrain-aaa"})
    write_json(
        models / "compressed" / "distilled" / "lmpipe.json", {"run_key": "compress-distill-ccc"}
    )
    write_json(models / "sft" / "lmpipe.json", {"stage": "sft"})  # older manifest: no key
    (models / "rl").mkdir()
    (models / "rl" / "lmpipe.json").write_text("{not json")  # never a reason to fail a stage
    removed = prune_checkpoints(cache, models)
    assert sorted(p.name for p in removed) == ["compress-distill-ccc", "pretrain-aaa"]
    assert sorted(p.name for p in cache.iterdir()) == ["pretrain-bbb", "rl-ddd"]
    assert prune_checkpoints(tmp_path / "missing", models) == []
