"""The compress stage through the real `dvc repro` (tiny params): variants, report, loading."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import writer_run

pytestmark = pytest.mark.e2e

ROW_KEYS = {"params", "size_mb", "val_ppl", "kl_to_teacher", "gold_reward", "proxy_reward",
            "tokens_per_sec_b1", "tokens_per_sec_b8", "eos_rate"}  # fmt: skip


def test_compress_report_scores_every_variant_next_to_the_teacher(tiny_repo):
    rep = json.loads((tiny_repo / "reports" / "compress.json").read_text())
    assert set(rep["variants"]) == {"distilled", "pruned", "quantized"}
    for name, row in [("teacher", rep["teacher"]), ("sft", rep["sft"]), *rep["variants"].items()]:
        assert set(row) >= ROW_KEYS, name
        assert all(np.isfinite(row[k]) for k in ROW_KEYS - {"proxy_reward"}), name
        # the reward model only judges responses that ended with EOS: none ended, no proxy
        assert np.isfinite(row["proxy_reward"]) == (row["eos_rate"] > 0), name
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
