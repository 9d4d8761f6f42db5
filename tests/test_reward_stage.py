"""The reward stage through the real `dvc repro` (tiny params), and its file source."""

import json
import re

import numpy as np
import pytest
import yaml

from conftest import curve_values, run, run_in_own_store, writer_run

pytestmark = pytest.mark.e2e


def test_reward_stage_outputs(tiny_repo):
    from lmpipe.reward.model import RewardModel

    rep = json.loads((tiny_repo / "reports" / "reward.json").read_text())
    for key in ("val_accuracy", "gold_order_accuracy", "val_gold_spearman"):
        assert np.isfinite(rep[key]), key
    assert 0 <= rep["val_accuracy"] <= 1 and -1 <= rep["val_gold_spearman"] <= 1
    assert rep["normalization"]["gain"] > 0
    assert rep["sample_seconds"] > 0 and rep["train_seconds"] > 0
    pairs = [json.loads(x) for x in (tiny_repo / "data/preferences/pairs.jsonl").open()]
    assert {p["split"] for p in pairs} == {"train", "val"}
    assert not {p["prompt"] for p in pairs if p["split"] == "val"} & {
        p["prompt"] for p in pairs if p["split"] == "train"
    }
    assert all({"gold_chosen", "gold_rejected", "p_chosen"} <= p.keys() for p in pairs)
    rm = RewardModel.load(tiny_repo / "models" / "reward")
    scores = rm.score_text([p["prompt"] for p in pairs[:4]], [p["chosen"] for p in pairs[:4]])
    assert scores.shape == (4,) and np.isfinite(scores).all()
    man = json.loads((tiny_repo / "models/reward/lmpipe.json").read_text())
    run_ = writer_run(tiny_repo, "models/reward")
    assert run_.data.tags["lineage.model.run_id"] == writer_run(tiny_repo, "models/sft").info.run_id
    assert writer_run(tiny_repo, "data/preferences").info.run_id == run_.info.run_id
    assert man["normalization"] == rep["normalization"]
    header = (tiny_repo / "reports/plots/reward.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "eval/loss" in header


def test_reward_from_a_preference_file(tiny_repo, tmp_path):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    prompts_file = tiny_repo / "data/prepared/prompts/rl.jsonl"
    prompts = [json.loads(x)["prompt"] for x in prompts_file.open()]
    rows = [
        {"prompt": p, "chosen": "She was happy and glad.", "rejected": "He was sad."}
        for p in prompts
    ]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params["preference"].update(source="file", path=str(pairs_file))
    params["reward"]["checkpoint_every"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        "python",
        "stages/reward.py",
        "--params",
        str(tmp_path / "params.yaml"),
        "--model",
        "models/sft",
        "--data",
        "data/prepared",
        "--pairs",
        str(tmp_path / "prefs"),
        "--out",
        str(tmp_path / "rm"),
        "--report",
        str(tmp_path / "reward.json"),
        "--plots",
        str(tmp_path / "reward.csv"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    env = {"LMPIPE_LOG_LEVEL": "INFO", "LMPIPE_PROGRESS_S": "0"}  # a progress line every step
    res = run(cmd, tiny_repo, extra_env=env)
    # a log fit for a file: no redrawn progress bars, no misleading "MISSING weight" report,
    # none of MLflow's advice that does not apply, plain progress lines and one summary line
    log = res.stdout + res.stderr
    assert "\r" not in log and "Loading weights" not in log, log[-2000:]
    assert "MISSING" not in log and "downstream task" not in log, log[-2000:]
    for noise in ("Downloading artifacts", "type hints", "input example", "CloudPickle"):
        assert noise not in log, noise
    assert "reward INFO" in log
    assert re.search(r"progress INFO train 5/20 \(25%\), loss \S+, tokens_per_s", log), log
    assert re.search(r"reward INFO reward finished in \d+s: val_accuracy ", log.splitlines()[-1])
    rep = json.loads((tmp_path / "reward.json").read_text())
    assert rep["pairs"]["train"] + rep["pairs"]["val"] == len(rows)
    assert rep["val_accuracy"] > 0.9  # one fixed, easy preference

    # a malformed row: a clear error naming file and line, and nothing written
    pairs_file.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    (tmp_path / "rm").rename(tmp_path / "rm_before")
    res = run(cmd, tiny_repo, check=False)
    assert res.returncode == 2
    assert f"reward: error: {pairs_file}:2: no field 'chosen'" in res.stderr
    assert not (tmp_path / "rm").exists()


def test_reward_under_torchrun_matches_one_process_and_only_rank_0_writes(tiny_repo, tmp_path):

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    # fp32: bf16 rounds differently for a batch of 4 groups than for one of 8
    params["reward"].update(
        {
            "batch_size": 4,
            "max_steps": 8,
            "eval_every": 8,
            "log_every": 1,
            "checkpoint_every": 0,
            "precision": "fp32",
        }
    )
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(params))
    params["reward"]["batch_size"] = 8
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(params))

    def reward(name, **env):
        out = tmp_path / name
        cmd = [
            "python",
            "stages/reward.py",
            "--params",
            str(tmp_path / f"{name}.yaml"),
            "--model",
            "models/sft",
            "--data",
            "data/prepared",
            "--pairs",
            str(out / "pairs"),
            "--out",
            str(out / "rm"),
            "--report",
            str(out / "reward.json"),
            "--plots",
            str(out / "reward.csv"),
            "--cache",
            str(out / "cache"),
        ]
        res, runs = run_in_own_store(cmd, tiny_repo, tmp_path / f"{name}.db", **env)
        curve = curve_values(out / "reward.csv", "train/loss")
        return res, json.loads((out / "reward.json").read_text()), runs, curve, out

    res, ddp, ddp_runs, ddp_curve, ddp_out = reward(
        "ddp", LMPIPE_NPROC="2", LMPIPE_LOG_LEVEL="INFO"
    )
    assert "torchrun --nproc_per_node=2 --standalone stages/reward.py" in res.stderr
    _, one, _, one_curve, one_out = reward("one")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp_runs) == 1  # one MLflow run: rank 0's
    # the same pairs (each rank samples its prompts' groups and gathers the rest), the same
    # global batches of 8 groups: only float order differs
    pairs = [(o / "pairs/pairs.jsonl").read_bytes() for o in (ddp_out, one_out)]
    assert pairs[0] == pairs[1]
    assert len(ddp_curve) == len(one_curve) == 8
    np.testing.assert_allclose(ddp_curve, one_curve, rtol=2e-4)
    for key in ("val_loss", "gold_order_accuracy", "val_accuracy"):
        assert ddp[key] == pytest.approx(one[key], abs=2e-3, nan_ok=True), key
