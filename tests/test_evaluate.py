"""Report-card metrics against hand-computed values, and the report built from fixture metrics."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from lmpipe import stats as S
from lmpipe.evaluate import figures as F
from lmpipe.evaluate import metrics as M
from lmpipe.evaluate import report as R


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert M.distinct_ngram_ratio(texts, 1) == pytest.approx(4 / 6)  # the cat sat ran
    assert M.distinct_ngram_ratio(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice


def test_self_bleu_is_one_for_copies_and_low_for_unrelated_texts():
    same = ["the little cat sat on the warm mat today"] * 4
    assert M.self_bleu(same) == pytest.approx(1.0)
    other = ["alpha beta gamma delta", "one two three four", "red green blue white"]
    assert M.self_bleu(other) < 0.05
    mixed = M.self_bleu(same[:2] + other)
    assert 0.05 < mixed < 1.0
    assert math.isnan(M.self_bleu(["only one"]))


def test_nll_of_targets_matches_a_hand_computed_softmax():
    logits = np.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # p = (1/4, 3/4), (1/2, 1/2)
    targets = np.array([[1, 0]])
    nll, n = M.nll_of_targets(logits, targets)
    assert n == 2 and nll == pytest.approx(-math.log(0.75) - math.log(0.5))
    nll, n = M.nll_of_targets(logits, np.array([[1, -1]]))  # -1 is skipped
    assert n == 1 and nll == pytest.approx(-math.log(0.75))
    # perplexity of a uniform model is the vocabulary size
    u = np.zeros((3, 5, 7))
    nll, n = M.nll_of_targets(u, np.zeros((3, 5), dtype=int))
    assert math.exp(nll / n) == pytest.approx(7.0)


def test_best_of_n_equals_the_average_over_every_subset():
    rng = np.random.default_rng(0)
    select = rng.normal(size=(3, 6))
    gold = rng.normal(size=(3, 6))
    for n in (1, 2, 3, 6):
        want = [
            np.mean(
                [
                    gold[p, max(sub, key=lambda j: select[p, j])]
                    for sub in itertools.combinations(range(6), n)
                ]
            )
            for p in range(3)
        ]
        got = S.best_of_n(select, {"gold": gold}, n)
        assert got["gold"] == pytest.approx(np.mean(want))
        by_prompt = S.best_of_n_by_prompt(select, {"gold": gold}, n)
        np.testing.assert_allclose(by_prompt["gold"], want)
    assert S.best_of_n(select, {}, 1)["select"] == pytest.approx(select.mean())
    with pytest.raises(ValueError, match="at least 7"):
        S.best_of_n(select, {}, 7)


def test_best_of_n_kl_bound():
    assert S.best_of_n_kl_bound(1) == 0.0
    assert S.best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert S.best_of_n_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)


def row(gold, proxy, eos=0.9):
    return {"gold_reward": gold, "proxy_reward": proxy, "eos_rate": eos, "kl_to_sft": 1.0}


def test_flags_name_reward_hacking_entropy_collapse_and_eos_drop():
    healthy = {
        "rl/proxy": [0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4],
        "rl/gold": [0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5],
        "rl/entropy": [4.0, 3.9, 3.9, 3.8, 3.8, 3.7, 3.7, 3.6],
    }
    assert M.flags(healthy, {"sft": row(0.2, 0.0), "rl": row(0.5, 1.0)}) == []
    hacked = {**healthy, "rl/gold": [0.3, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0]}
    (f,) = M.flags(hacked, {})
    assert "proxy score rose" in f and "gold score fell" in f
    collapsed = {**healthy, "rl/entropy": [4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5]}
    (f,) = M.flags(collapsed, {})
    assert "Entropy collapsed" in f
    fs = M.flags({}, {"sft": row(0.3, 0.0, 0.9), "rl": row(0.2, 1.0, 0.5)})
    assert any("exploited" in f for f in fs) and any("EOS rate dropped" in f for f in fs)
    # No sample of a model ended with EOS: no proxy score to compare, the EOS flag still works.
    fs = M.flags({}, {"sft": row(0.3, None, 0.9), "rl": row(0.2, 1.0, 0.5)})
    assert not any("exploited" in f for f in fs) and any("EOS rate dropped" in f for f in fs)


GOOD_RM = {
    "gold_order_accuracy": 0.90,
    "baseline_bow_gold_order_accuracy": 0.85,
    "gold_order_gap_to_baseline": 0.05,
    "gold_order_gap_to_baseline_se": 0.01,
    "val_accuracy": 0.85,
    "val_accuracy_se": 0.02,
}
GOOD_RL = {
    "gold_gain": 0.30,
    "gold_gain_se": 0.05,
    "proxy_gain": 0.8,
    "proxy_gain_se": 0.1,
    "eval_prompts": 32,
    "kl_to_ref": 4.0,
}
FALLING = {"step": [50, 100, 150, 200], "eval/loss": [0.6, 0.5, 0.45, 0.44]}


def test_alignment_flags_name_a_weak_reward_model_and_rl_that_did_not_move():
    assert M.alignment_flags(GOOD_RM, GOOD_RL, FALLING) == []
    # below the baseline beyond noise (the real-corpus run of the issue), and near chance
    weak = {
        **GOOD_RM,
        "gold_order_accuracy": 0.699,
        "gold_order_gap_to_baseline": -0.154,
        "gold_order_gap_to_baseline_se": 0.03,
        "val_accuracy": 0.575,
    }
    below, chance = M.alignment_flags(weak, GOOD_RL, FALLING)
    assert "below its baseline" in below and "0.699" in below and "beyond noise" in below
    assert "base.model" in below  # the lever that measurably closes the gap
    assert "near chance" in chance and "0.575" in chance
    assert "own tokens" not in below  # no token baseline in this report
    # at or above the baseline over its own tokens: the flag says where the gap comes from
    (pieces,) = M.alignment_flags(
        {**weak, "val_accuracy": 0.8, "baseline_tokens_gold_order_accuracy": 0.69}, GOOD_RL, FALLING
    )
    assert "own tokens the same baseline gets 0.690" in pieces
    (lower,) = M.alignment_flags(
        {**weak, "val_accuracy": 0.8, "baseline_tokens_gold_order_accuracy": 0.75}, GOOD_RL, FALLING
    )
    assert "own tokens" not in lower
    # below, within noise; and accuracy 0.65 but with a wide SE is still near chance
    close = {
        **GOOD_RM,
        "gold_order_accuracy": 0.84,
        "gold_order_gap_to_baseline": -0.01,
        "gold_order_gap_to_baseline_se": 0.02,
        "val_accuracy": 0.65,
        "val_accuracy_se": 0.1,
    }
    below, chance = M.alignment_flags(close, GOOD_RL, FALLING)
    assert "within noise" in below and "near chance" in chance
    # val loss rose after its best evaluation: over-fit, and the kept step is said
    rising = {
        "step": [50, 100, 150, 200, 250, 300],
        "eval/loss": [0.69, 0.62, 0.6, 0.64, 0.7, 0.75],
    }
    (f,) = M.alignment_flags({**GOOD_RM, "kept_step": 150}, GOOD_RL, rising)
    assert "over-fit" in f and "step 150" in f and "reward.keep_best" in f
    assert "only save time" in f  # the kept weights are the best eval's already
    (f,) = M.alignment_flags(GOOD_RM, GOOD_RL, rising)  # keep_best off: it is the remedy
    assert "over-fit" in f and "reward.keep_best: true" in f and "only save time" not in f
    # RL: a gold gain within two SE of zero; a proxy that did not move
    (f,) = M.alignment_flags(
        GOOD_RM, {**GOOD_RL, "gold_gain": 0.023, "gold_gain_se": 0.03}, FALLING
    )
    assert "did not move the gold score" in f and "+0.023 ± 0.030" in f
    fs = M.alignment_flags(GOOD_RM, {**GOOD_RL, "proxy_gain": -0.1}, FALLING)
    assert len(fs) == 1 and "did not move the proxy score" in fs[0]
    # older reports without the figures: no flag rather than a crash
    assert M.alignment_flags({}, {}, {}) == []


def fixture_metrics():
    names = ["pretrain", "sft", "rl", "distilled", "pruned", "quantized", "onnx-rl", "onnx-rl-int8"]
    variants = {}
    for i, name in enumerate(names):
        variants[name] = {
            "ppl": 30 + i,
            "gold_reward": 0.1 * i,
            "proxy_reward": 0.2 * i,
            "kl_to_sft": 0.5 * i,
            "rl_score": 0.1 * i,
            "distinct_1": 0.5,
            "distinct_2": 0.7,
            "self_bleu": 0.2,
            "response_tokens": 30.0,
            "eos_rate": 0.9,
            "tokens_per_sec": 1000.0,
            "latency_ms_per_token": 2.5,
            "size_mb": 20.0 - i,
            "objective_j": 0.1 * i - 0.1 * i,
        }
    best = [
        {
            "n": n,
            "kl_bound": S.best_of_n_kl_bound(n),
            "gold": 0.1 + 0.02 * n,
            "proxy": 0.1 * n,
            "objective_j_lower": 0.1 * n - 0.2 * S.best_of_n_kl_bound(n),
        }
        for n in (1, 2, 4, 8, 16)
    ]
    return {
        "variants": variants,
        "best_of_n": best,
        "flags": ["Entropy collapsed: test"],
        "eval": {
            "prompts": 4,
            "samples_per_prompt": 2,
            "seed": 1,
            "max_new_tokens": 8,
            "ppl_tokens": 100,
            "speed_batch": 8,
            "speed_new_tokens": 8,
        },
    }


def test_report_contains_every_model_flags_and_figures(tmp_path):
    metrics = fixture_metrics()
    side = [
        {
            "prompt": "Tom saw a dog.",
            "responses": {"sft": "It ran.", "rl": "It was happy!", "onnx-rl-int8": "It was glad."},
        }
    ]
    md = R.markdown(metrics, side)
    for name in metrics["variants"]:
        assert f"| {name} |" in md
    assert "Entropy collapsed: test" in md and "| 16 |" in md and "It was glad." in md
    curves = {
        "pretrain": {"step": [1, 2, 3], "train/loss": [3, 2, 1], "eval/loss": [3.1, 2.1, 1.2]},
        "rl": {
            "step": [1, 2, 3],
            "rl/score": [0, 1, 2],
            "rl/gold": [0.1, 0.2, 0.3],
            "rl/proxy": [0, 1, 2],
            "rl/kl": [0, 1, math.nan],
        },
    }
    F.figure_training_curves(curves, tmp_path / "a.png")
    F.figure_overoptimisation(
        curves["rl"], metrics["best_of_n"], {"rl": metrics["variants"]["rl"]}, tmp_path / "b.png"
    )
    F.figure_distributions({"sft": {"gold": np.zeros(5), "proxy": np.ones(5)}}, tmp_path / "c.png")
    F.figure_size_quality(metrics["variants"], tmp_path / "d.png")
    for f in "abcd":
        assert (tmp_path / f"{f}.png").read_bytes()[:4] == b"\x89PNG"


def test_training_curves_one_panel_per_concern_with_rl_kl_apart_from_reward():
    curves = {
        "pretrain": {"step": [1, 2], "train/loss": [3, 2], "eval/loss": [math.nan, 2.1]},
        "sft": {},
        "rl": {
            "step": [1, 2],
            "rl/score": [0, 1],
            "rl/gold": [0.1, 0.2],
            "rl/kl": [0, 5],
            "rl/policy_loss": [1, 1],
        },
    }
    panels = F._curve_panels(curves)
    assert [(p[0], [k for k, _ in p[4]]) for p in panels] == [
        ("pretrain", ["train/loss", "eval/loss"]),
        ("rl", ["rl/score", "rl/gold"]),
        ("rl", ["rl/kl"]),
    ]
    assert all(p[2] and p[3] for p in panels)  # every panel has axis labels


def test_headline_picks_the_dozen_figures_by_their_short_names():
    metrics = fixture_metrics()
    h = R.headline(metrics)
    assert h["sft_gold"] == pytest.approx(0.1) and h["rl_gold"] == pytest.approx(0.2)
    assert h["rl_kl"] == pytest.approx(1.0) and h["rl_ppl"] == 32
    assert h["int8_gold"] == pytest.approx(0.7) and h["int8_size_mb"] == 13
    assert h["bon_gold"] == pytest.approx(0.1 + 0.02 * 16)  # the largest n
    assert h["rl_objective_j"] == 0.0
    assert h["bon_n4_j_lower"] == pytest.approx(0.4 - 0.2 * S.best_of_n_kl_bound(4))
    assert h["flag_count"] == 1 and isinstance(h["flag_count"], int)
    assert "rl_gold_se" not in h  # not in the fixture: left out, never null
    assert all(re.fullmatch(r"(sft|rl|bon|int8|flag)_\w+", k) for k in h)
    # no int8 bundle (export skipped) and no best-of-n: those figures are left out
    del metrics["variants"]["onnx-rl-int8"]
    h = R.headline({**metrics, "best_of_n": []})
    assert not any(k.startswith(("int8_", "bon_")) for k in h) and "rl_gold" in h


def test_read_curves_keeps_missing_values_as_nan(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("step,a,b\n1,0.5,\n2,,3\n")
    cols = R.read_curves(p)
    assert cols["step"] == [1, 2] and cols["a"][0] == 0.5 and math.isnan(cols["a"][1])
    assert R.read_curves(tmp_path / "missing.csv") == {}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_torch_engine_scores_like_the_generic_engine(tmp_path, arch):
    """TorchEngine's own response log-probs and NLL (prompts shared, head on the response
    only, all in torch) equal Engine's generic ones (full logits, numpy), which ONNX uses."""
    from lmpipe.config import ModelParams
    from lmpipe.evaluate.engines import Engine, TorchEngine
    from lmpipe.model import build_model, save_model

    special = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}
    cfg = ModelParams(arch=arch, d_model=32, n_layers=2, n_heads=2, context=24, init_std=0.3)
    save_model(build_model(cfg, 40, special, seed=0), tmp_path, tmp_path, {"stage": "sft"})
    e = TorchEngine("sft", tmp_path, eos=2, pad=0)
    prompts = [[1, 3, 9, 10, 4]] * 3 + [[1, 3, 11, 4]] * 2
    responses = [[20, 21], [22], [23, 24, 25], [26], []]
    ended = [True, False, True, True, True]  # one cut at the limit, one that is only EOS
    got = e.response_logprobs(prompts, responses, ended, batch_size=4)
    want = Engine.response_logprobs(e, prompts, responses, ended, batch_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got < 0).all()
    windows = np.random.default_rng(0).integers(5, 40, (5, 13))
    (s_got, n_got), (s_want, n_want) = e.nll(windows, 2), Engine.nll(e, windows, 2)
    assert n_got == n_want == 60 and s_got == pytest.approx(s_want, rel=1e-6)
