"""The rl stage through the real `dvc repro` (tiny params): report keys, curves, the model."""

import csv
import json

import numpy as np
import pytest

from conftest import RL_INPUTS, run_in_own_store, stage_cmd, writer_run
from lmpipe.io import hash_path

pytestmark = pytest.mark.e2e


def test_rl_stage_outputs(tiny_repo):
    from transformers import AutoModelForCausalLM

    rep = json.loads((tiny_repo / "reports" / "rl.json").read_text())
    assert rep["algo"] == "ppo"
    for key in ("gold_reward", "proxy_reward"):
        assert set(rep[key]) == {"init", "final"} and all(np.isfinite(list(rep[key].values())))
    for key in ("kl_to_ref", "posterior_kl", "log_z", "entropy", "distinct_2", "episodes_per_sec"):
        assert np.isfinite(rep[key]), key
    lo, hi = rep["log_z_interval"]
    assert lo <= rep["log_z"] <= hi
    lo, hi = rep["posterior_kl_interval"]
    assert 0 <= lo <= rep["posterior_kl"] <= hi
    assert rep["log_z_interval"][1] <= rep["reward_max"] / rep["beta"] + 1e-9
    order = rep["reward_gold_order"]
    # the tiny models may end no response with EOS (no proxy score): then no pairs, NaN;
    # which do varies between machines (a clean-clone CI run had none for SFT), so neither
    # side may count on pairs
    for side in ("sft", "policy"):
        got = order[side]
        assert 0 <= got["accuracy"] <= 1 if got["pairs"] else np.isnan(got["accuracy"]), side
    best = rep["best_of_n"]
    assert [b["n"] for b in best][:3] == [1, 2, 4] and best[0]["kl_bound"] == 0.0
    for b in best:  # J bound = reward − β·KL bound, the frontier the policy is judged against
        assert b["objective_j_lower"] == pytest.approx(b["score"] - rep["beta"] * b["kl_bound"])
    assert best[0]["objective_j_lower"] == pytest.approx(rep["objective_j"]["init"])
    assert rep["episodes_per_sec"] > 0 and 0 < rep["generate_share"] < 1
    rows = list(csv.DictReader((tiny_repo / "reports/plots/rl.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    cols = [
        "rl/score",
        "rl/gold",
        "rl/kl",
        "rl/kl_k3",
        "rl/beta",
        "rl/entropy",
        "rl/approx_kl",
        "rl/clipfrac",
        "rl/value_loss",
        "rl/explained_variance",
        "rl/ratio_mean",
        "rl/response_len",
        "rl/eos_frac",
    ]
    for col in cols:
        assert col in rows[0], col
    speed = list(csv.DictReader((tiny_repo / "reports/plots/rl_speed.csv").open()))
    assert [r["step"] for r in speed] == [r["step"] for r in rows]
    assert "rl/episodes_per_sec" in speed[0] and "rl/episodes_per_sec" not in rows[0]
    man = json.loads((tiny_repo / "models/rl/lmpipe.json").read_text())
    assert man["inputs"]["input.reward.sha256"] == hash_path(tiny_repo / "models/reward")
    lineage = writer_run(tiny_repo, "models/rl").data.tags["lineage.reward.run_id"]
    assert lineage == writer_run(tiny_repo, "models/reward").info.run_id
    model = AutoModelForCausalLM.from_pretrained(str(tiny_repo / "models" / "rl"))
    assert model.config.vocab_size == 512


def test_rl_rerun_is_byte_identical(tiny_repo, tmp_path):
    """The stage run again on the same inputs writes the same weights and clears its checkpoint
    (exact resume of the RL state is tested in test_rl_toy.py)."""
    import hashlib

    from conftest import run

    def digest(folder):
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    run(stage_cmd("rl", "params.yaml", tmp_path, "a", **RL_INPUTS), tiny_repo)
    assert digest(tmp_path / "a") == digest(tiny_repo / "models" / "rl")
    assert not list((tmp_path / "cache").glob("rl-*/checkpoint.pt"))


def run_rl(repo, tmp_path, name, **env):
    """The rl stage on `tmp_path/params.yaml` into `tmp_path/name`, with its own MLflow store:
    the process result, the report, the store's runs and the per-step rows."""
    out = tmp_path / name
    cmd = stage_cmd("rl", tmp_path / "params.yaml", out, "rl", **RL_INPUTS)
    res, runs = run_in_own_store(cmd, repo, tmp_path / f"{name}.db", **env)
    with (out / "rl.csv").open() as f:
        rows = list(csv.DictReader(f))
    return res, json.loads((out / "rl.json").read_text()), runs, rows


def test_rl_under_torchrun_matches_one_process_and_only_rank_0_writes(tiny_repo, tmp_path):
    import yaml

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["rl"]["precision"] = "fp32"  # bf16 rounds a split update differently: other samples
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    res, ddp, ddp_runs, ddp_rows = run_rl(
        tiny_repo, tmp_path, "ddp", LMPIPE_NPROC="2", LMPIPE_LOG_LEVEL="INFO"
    )
    assert "torchrun --nproc_per_node=2 --standalone stages/rl.py" in res.stderr
    _, one, _, one_rows = run_rl(tiny_repo, tmp_path, "one")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp_runs) == 1  # rank 0's run
    # the same rollouts (each rank samples its prompt groups on per-row streams, then gathers)
    # and the same update (split by prompt groups, gradients summed): only float order differs
    assert len(ddp_rows) == len(one_rows) > 0
    for key in ("rl/score", "rl/kl", "rl/policy_loss", "rl/value_loss"):
        a = [float(r[key]) for r in ddp_rows]
        b = [float(r[key]) for r in one_rows]
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=key)
    assert ddp["gold_reward"]["final"] == pytest.approx(one["gold_reward"]["final"], abs=0.02)


def test_rl_sharded_under_torchrun_matches_one_process(tiny_repo, tmp_path):
    import yaml

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["rl"].update({"precision": "fp32", "sharding": "fsdp", "steps": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    res, sharded, _, sharded_rows = run_rl(
        tiny_repo, tmp_path, "fsdp", LMPIPE_NPROC="2", LMPIPE_LOG_LEVEL="INFO"
    )
    assert "torchrun --nproc_per_node=2 --standalone stages/rl.py" in res.stderr
    _, one, _, one_rows = run_rl(tiny_repo, tmp_path, "one")
    assert sharded["world_size"] == 2 and one["world_size"] == 1
    assert len(sharded_rows) == len(one_rows) == 3
    for key in ("rl/score", "rl/kl", "rl/policy_loss", "rl/value_loss"):
        a = [float(r[key]) for r in sharded_rows]
        b = [float(r[key]) for r in one_rows]
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=key)
    assert sorted(p.name for p in (tmp_path / "fsdp" / "rl").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "rl").iterdir()
    )
