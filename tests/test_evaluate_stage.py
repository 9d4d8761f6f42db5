"""The evaluate stage through the real `dvc repro` (tiny params): every model on the report card."""

import json
import math

import pytest

from conftest import run

pytestmark = pytest.mark.e2e

MODELS = {
    "pretrain",
    "sft",
    "rl",
    "distilled",
    "pruned",
    "quantized",
    "onnx-rl",
    "onnx-rl-int8",
    "onnx-distilled",
    "onnx-distilled-int8",
    "onnx-pruned",
    "onnx-pruned-int8",
}
DESIGN_KEYS = {
    "ppl",
    "gold_reward",
    "proxy_reward",
    "kl_to_sft",
    "distinct_2",
    "tokens_per_sec",
    "latency_ms_per_token",
    "size_mb",
}


def test_metrics_cover_every_model_with_the_design_keys(tiny_repo):
    m = json.loads((tiny_repo / "reports" / "metrics.json").read_text())
    assert set(m["variants"]) == MODELS
    for name, row in m["variants"].items():
        assert set(row) >= DESIGN_KEYS, name
        for key in DESIGN_KEYS - {"proxy_reward"}:  # proxy is None when no sample ended
            assert math.isfinite(row[key]), (name, key)
        assert 0 <= row["eos_rate"] <= 1 and row["size_mb"] > 0
    v = m["variants"]
    assert v["sft"]["kl_to_sft"] == 0.0  # its own samples scored by itself
    assert v["onnx-rl"]["ppl"] == pytest.approx(v["rl"]["ppl"], rel=1e-4)  # same weights
    assert v["onnx-rl-int8"]["size_mb"] < v["onnx-rl"]["size_mb"]
    assert [b["n"] for b in m["best_of_n"]] == [1, 2, 4]
    assert m["best_of_n"][0]["kl_bound"] == 0.0
    beta = json.loads((tiny_repo / "models" / "rl" / "lmpipe.json").read_text())["params"]["rl"][
        "kl_coef"
    ]
    for b in m["best_of_n"]:
        assert b["objective_j_lower"] == pytest.approx(b["proxy"] - beta * b["kl_bound"])
    for row in v.values():  # J = RL reward − β·KL to SFT, the objective RL maximises
        assert row["objective_j"] == pytest.approx(row["rl_score"] - beta * row["kl_to_sft"])
    assert isinstance(m["flags"], list)


def test_report_samples_and_figures_are_written(tiny_repo):
    rep = tiny_repo / "reports"
    md = (rep / "report.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in md
    for fig in ("training_curves", "overoptimisation", "score_distributions", "size_quality"):
        assert (rep / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{fig}.png" in md
    rows = [json.loads(x) for x in (rep / "samples.jsonl").read_text().splitlines()]
    m = json.loads((rep / "metrics.json").read_text())["eval"]
    assert len(rows) == len(MODELS) * m["prompts"] * m["samples_per_prompt"]
    assert {r["model"] for r in rows} == MODELS
    shown = run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout
    assert "reports/metrics.json" in shown


def test_the_report_card_carries_the_alignment_flags_of_the_stages_reports(tiny_repo):
    """The flags come from reports/reward.json, reports/rl.json and the reward curve as the
    stages wrote them (their manifests), and each appears in the report card."""
    from lmpipe.evaluate import metrics as M
    from lmpipe.evaluate.report import read_curves

    rm = json.loads((tiny_repo / "reports" / "reward.json").read_text())
    rl = json.loads((tiny_repo / "reports" / "rl.json").read_text())
    for key in (
        "val_accuracy_se",
        "gold_order_accuracy_se",
        "gold_order_gap_to_baseline",
        "gold_order_gap_to_baseline_se",
        "kept_step",
    ):
        assert key in rm, key
    assert rm["kept_step"] in {10, 20}  # tiny: eval_every 10, max_steps 20
    assert math.isfinite(rl["gold_gain"]) and rl["gold_gain_se"] > 0
    want = M.alignment_flags(rm, rl, read_curves(tiny_repo / "reports/plots/reward.csv"))
    m = json.loads((tiny_repo / "reports" / "metrics.json").read_text())
    assert [f for f in m["flags"] if f in want] == want
    md = (tiny_repo / "reports" / "report.md").read_text()
    assert all(f in md for f in want)
