"""The compress stage through the real `dvc repro` (tiny params): variants, report, loading."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import RL_INPUTS, curve_values, run_in_own_store, stage_cmd, writer_run

pytestmark = pytest.mark.e2e

ROW_KEYS = {
    "params",
    "size_mb",
    "val_ppl",
    "kl_to_teacher",
    "gold_reward",
    "proxy_reward",
    "tokens_per_sec_b1",
    "tokens_per_sec_b8",
    "eos_rate",
}


def test_compress_report_scores_every_variant_next_to_the_teacher(tiny_repo):
    rep = json.loads((tiny_repo / "reports" / "compress.json").read_text())
    assert set(rep["variants"]) == {"distilled", "pruned", "quantized"}
    for name, row in [("teacher", rep["teacher"]), ("sft", rep["sft"]), *rep["variants"].items()]:
        assert set(row) >= ROW_KEYS, name
        assert all(np.isfinite(row[k]) for k in ROW_KEYS - {"proxy_reward"}), name
        # the reward model only judges responses that ended with EOS: none ended, no proxy
        assert (row["proxy_reward"] is not None) == (row["eos_rate"] > 0), name
    t, v = rep["teacher"], rep["variants"]
    assert t["kl_to_teacher"] == 0.0
    assert v["distilled"]["params"] < t["params"]
    assert v["pruned"]["params"] < t["params"]
    assert v["pruned"]["val_ppl_before_recovery"] > 0
    assert v["quantized"]["size_mb"] < 0.5 * t["size_mb"]
    assert v["quantized"]["val_ppl_ratio"] == pytest.approx(1.0, abs=0.02)
    rows = list(csv.DictReader((tiny_repo / "reports/plots/compress.csv").open()))
    assert {"distill/loss", "distill/eval_loss", "recovery/eval_loss"} <= set(rows[0])


def test_every_variant_loads_with_the_common_loader_and_generates(tiny_repo):
    from transformers import AutoModelForCausalLM

    from lmpipe.model import load_model
    from lmpipe.sampling import generate

    root = tiny_repo / "models" / "compressed"
    compress_run = writer_run(tiny_repo, "models/compressed")
    assert (
        compress_run.data.tags["lineage.teacher.run_id"]
        == writer_run(tiny_repo, "models/rl").info.run_id
    )
    for name in ("distilled", "pruned", "quantized"):
        man = json.loads((root / name / "lmpipe.json").read_text())
        assert man["variant"] == name
        assert len(man["inputs"]["input.teacher.sha256"]) == 64
        model = load_model(root / name)
        g = generate(model, [[1, 5, 6, 7]], max_new_tokens=5, eos_id=-1, pad_id=0, greedy=True)
        assert g.response.shape == (1, 5)
    pruned = AutoModelForCausalLM.from_pretrained(str(root / "pruned"))
    full = AutoModelForCausalLM.from_pretrained(str(tiny_repo / "models" / "rl"))
    assert pruned.config.intermediate_size < full.config.intermediate_size
    q = load_model(root / "quantized")
    assert q.model.layers[0].mlp.up_proj.weight.qdata.dtype == torch.int8
    assert json.loads((root / "quantized/lmpipe.json").read_text())["quantization"]["method"]


def test_distillation_under_torchrun_matches_one_process(tiny_repo, tmp_path):

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["compress"].update(
        {
            "batch_size": 4,
            "distill_steps": 6,
            "recovery_steps": 4,
            "eval_every": 6,
            "checkpoint_every": 0,
            "precision": "fp32",
        }
    )
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(params))
    params["compress"]["batch_size"] = 8
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(params))

    def compress(name, **env):
        out = tmp_path / name
        params = tmp_path / f"{name}.yaml"
        cmd = stage_cmd("compress", params, out, "models", teacher="models/rl", **RL_INPUTS)
        res, runs = run_in_own_store(cmd, tiny_repo, tmp_path / f"{name}.db", **env)
        keys = ("distill/loss", "recovery/loss")
        curves = {k: curve_values(out / "compress.csv", k) for k in keys}
        return res, json.loads((out / "compress.json").read_text()), runs, curves

    res, ddp, ddp_runs, ddp_curves = compress("ddp", LMPIPE_NPROC="2", LMPIPE_LOG_LEVEL="INFO")
    assert "torchrun --nproc_per_node=2 --standalone stages/compress.py" in res.stderr
    _, one, _, one_curves = compress("one")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert len(ddp_runs) == 1  # rank 0's run
    # the same teacher samples (each rank samples its share and gathers the rest), the same
    # pruning and global batches: only float order differs
    # (a KD loss near 0, as the tiny pruned student's 4e-4, differs in its last bits: atol)
    for key in ("distill/loss", "recovery/loss"):
        assert len(ddp_curves[key]) == len(one_curves[key]) > 0, key
        np.testing.assert_allclose(
            ddp_curves[key], one_curves[key], rtol=5e-4, atol=2e-6, err_msg=key
        )
    for name in ("distilled", "pruned"):
        a, b = ddp["variants"][name]["val_ppl"], one["variants"][name]["val_ppl"]
        assert a == pytest.approx(b, rel=2e-3), name
