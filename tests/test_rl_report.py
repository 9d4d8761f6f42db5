"""The rl stage's report computations on hand-made samples: best-of-n frontier, the J slope
ratio, gains with their standard errors, the reward model's order, and the report's shape."""

import math

import numpy as np
import pytest

from lmpipe.config import RLParams
from lmpipe.rl import report as R
from lmpipe.rl.posterior import Samples


def samples(scores, proxy, gold_prompt_index, n_prompts=2):
    n = len(scores)
    return Samples(
        prompt_index=list(gold_prompt_index),
        responses=[[5, 2]] * n,
        ended=np.ones(n, dtype=bool),
        scores=np.asarray(scores, float),
        proxy=np.asarray(proxy, float),
        kl=np.zeros(n),
        kl_k3=np.zeros(n),
        entropy=np.ones(n),
        logp=np.zeros(n),
    )


def test_best_of_n_frontier_ranks_by_the_reward_and_bounds_the_kl():
    # 2 prompts x 4 samples; gold = 10 x score, so best-of-n's gold is 10 x its score
    scores = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 5.0, -1.0]])
    out = R.best_of_n_frontier(scores.ravel(), 10 * scores.ravel(), 2, beta=0.5)
    assert [r["n"] for r in out] == [1, 2, 4]  # n above the samples a prompt: left out
    assert out[0]["score"] == pytest.approx(scores.mean()) and out[0]["kl_bound"] == 0.0
    assert out[-1]["score"] == pytest.approx((3.0 + 5.0) / 2)  # n = m: the best sample
    for r in out:
        assert r["gold"] == pytest.approx(10 * r["score"])
        assert r["kl_bound"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
        assert r["objective_j_lower"] == pytest.approx(r["score"] - 0.5 * r["kl_bound"])


def test_j_slope_ratio_is_near_one_for_a_line_and_near_zero_once_flat():
    line = [{"step": s, "rl/score": 2.0 * s, "rl/beta": 0.1, "rl/kl": 0.0} for s in range(1, 21)]
    assert R.j_slope_ratio(line) == pytest.approx((1.0, 0.0), abs=1e-9)
    flat = [{**h, "rl/score": min(h["rl/score"], 20.0)} for h in line]  # flat from step 10
    assert R.j_slope_ratio(flat) == pytest.approx((0.0, 0.0), abs=1e-9)
    # J = score − β·KL: a KL that grows as fast as the score leaves J flat, so no rise at all
    no_rise = [{**h, "rl/kl": 20.0 * h["step"]} for h in line]
    assert all(math.isnan(x) for x in R.j_slope_ratio(no_rise))
    assert all(math.isnan(x) for x in R.j_slope_ratio(line[:4]))  # too few points


def test_j_slope_ratio_se_is_the_spread_of_the_ratio_over_noisy_runs():
    """40 steps of J = 0.03·step + N(0, 0.15²), as the default run's batches scatter: over
    2000 draws the reported SE averages the ratio's spread, and ±2 SE covers 1 about 95% of
    the time (the tail's 8 points make a t interval with 6 degrees of freedom: a bit less)."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, 41)
    ratios, ses = [], []
    for _ in range(2000):
        j = 0.03 * steps + rng.normal(0, 0.15, steps.size)
        hist = [
            {"step": s, "rl/score": v, "rl/beta": 0.2, "rl/kl": 0.0}
            for s, v in zip(steps, j, strict=True)
        ]
        r, se = R.j_slope_ratio(hist)
        ratios.append(r)
        ses.append(se)
    ratios, ses = np.array(ratios), np.array(ses)
    assert np.median(ses) == pytest.approx(ratios.std(), rel=0.15)
    assert 0.88 < np.mean(np.abs(ratios - 1) < 2 * ses) < 0.97


def test_gain_with_se_pairs_prompts_and_skips_missing_ones():
    init, final = np.array([0.0, 1.0, np.nan, 2.0]), np.array([1.0, 1.0, 3.0, 4.0])
    got = R.gain_with_se("gold", init, final)
    d = np.array([1.0, 0.0, 2.0])
    assert got["gold_gain"] == pytest.approx(d.mean())
    assert got["gold_gain_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))


def test_reward_gold_order_counts_pairs_within_a_prompt_on_equal_sample_counts():
    # π₀: 4 samples a prompt of which the first 2 count (as many as the policy's 2)
    ref = samples(
        [0, 1, 9, 9, 0, 1, 9, 9], [0.0, 1.0, 9.0, 9.0, 1.0, 0.0, 9.0, 9.0], [0, 0, 0, 0, 1, 1, 1, 1]
    )
    pol = samples([0, 1, 0, 1], [0.0, 1.0, 0.0, 1.0], [0, 0, 1, 1])
    gold_ref = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    init = R.Evaluation(ref, [], {"gold_each": gold_ref}, 0.0)
    final = R.Evaluation(pol, [], {"gold_each": np.array([0.0, 1.0, 1.0, 0.0])}, 0.0)
    got = R.reward_gold_order(init, final, n_eval=2, n_post=4)
    # SFT: prompt 0 ordered as gold, prompt 1 reversed; the policy: the same
    assert got["sft"]["pairs"] == 2 and got["sft"]["accuracy"] == 0.5
    assert got["policy"]["pairs"] == 2 and got["policy"]["accuracy"] == 0.5


def test_summary_report_and_side_by_side_from_hand_made_samples():
    texts = {5: "yes", 6: "no"}
    ev = R.EvalSet(
        ["p0", "p1"],
        [[1], [1]],
        score_fn=None,
        decode=lambda r: texts[r[0]],
        gold=lambda prompts, responses: [1.0 if t == "yes" else 0.0 for t in responses],
        sample_kw={},
    )
    s = samples([1.0, -2.0, 0.5, 0.5], [1.0, np.nan, 0.5, 0.5], [0, 0, 1, 1])
    s.responses = [[5], [6], [6], [6]]
    got_texts, fig = ev.summary(s)
    assert got_texts == ["yes", "no", "no", "no"]
    assert fig["gold"] == 0.25 and fig["proxy"] == pytest.approx(2.0 / 3)
    assert fig["by_prompt"]["gold"].tolist() == [0.5, 0.0]
    assert fig["by_prompt"]["proxy"].tolist() == [1.0, 0.5]  # the NaN left out
    assert fig["eos_rate"] == 1.0 and fig["score"] == 0.0

    cfg = RLParams(eval_samples=2, posterior_samples=2, steps=5, prompts_per_step=4)
    post = {
        "posterior_kl": 1.0,
        "posterior_kl_low": 0.5,
        "posterior_kl_high": 2.0,
        "log_z": 0.3,
        "log_z_low": 0.1,
        "log_z_high": 0.4,
        "reward_max": 1.0,
        "objective_j": 0.2,
        "objective_j_se": 0.1,
    }
    init = R.Evaluation(s, got_texts, {**fig, **post}, 1.0)
    final = R.Evaluation(s, got_texts, {**fig, **post}, 2.0)
    history = [{"step": i, "rl/score": 0.1 * i, "rl/beta": 0.2, "rl/kl": 0.5} for i in (1, 2)]
    run = R.Run(
        history,
        0.2,
        train_seconds=4.0,
        generate_seconds=1.0,
        train_prompts=3,
        world_size=1,
        precision="fp32",
    )
    rep = R.rl_report(cfg, init, final, [], run)
    assert rep["episodes"] == 5 * 3 * 2  # prompts a step: at most the training prompts
    assert rep["episodes_per_sec"] == pytest.approx(30 / 4.0)
    assert rep["generate_share"] == pytest.approx(0.25) and rep["eval_seconds"] == 3.0
    assert rep["gold_gain"] == 0.0 and rep["eval_prompts"] == 2
    assert rep["min_batch_kl"] == 0.5 and math.isnan(rep["j_slope_ratio"])
    assert R.side_by_side(ev, init, final, cfg) == "PROMPT: p0\nRL: yes\nSFT: yes\n\n" + (
        "PROMPT: p1\nRL: no\nSFT: no"
    )


def test_gold_against_best_of_n_interpolates_each_prompt_and_pairs_them():
    """The policy's gold minus best-of-n's at its KL, by prompt: at an n's own KL bound it is
    that n's per-prompt gold, between two bounds the linear blend, beyond the largest n that
    n's; a prompt effect shared by the policy and π₀ cancels from the gap and from its SE,
    which is the SE of the per-prompt differences."""
    rng = np.random.default_rng(0)
    p, m = 12, 8
    scores = rng.normal(size=(p, m))
    gold = scores + rng.normal(scale=0.5, size=(p, m))
    policy = rng.normal(loc=1.0, size=p)
    by_n = {n: R.best_of_n_by_prompt(scores, {"gold": gold}, n)["gold"] for n in (1, 2, 4, 8)}
    b2, b4 = R.best_of_n_kl_bound(2), R.best_of_n_kl_bound(4)
    none = np.zeros(p)

    def diff(kl, offset=none):
        g = gold + offset[:, None]
        return R.gold_against_best_of_n(scores.ravel(), g.ravel(), p, policy + offset, kl)

    at4 = diff(b4)
    d = policy - by_n[4]
    assert at4["gold_vs_best_of_n"] == pytest.approx(d.mean())
    assert at4["gold_vs_best_of_n_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(p))
    mid = diff(0.25 * b2 + 0.75 * b4)["gold_vs_best_of_n"]
    assert mid == pytest.approx((policy - 0.25 * by_n[2] - 0.75 * by_n[4]).mean())
    assert diff(50.0)["gold_vs_best_of_n"] == pytest.approx((policy - by_n[8]).mean())
    # a large per-prompt effect in both: an unpaired SE would grow with it, the paired one not
    shifted = diff(b4, offset=rng.normal(scale=10.0, size=p))
    assert shifted["gold_vs_best_of_n"] == pytest.approx(at4["gold_vs_best_of_n"])
    assert shifted["gold_vs_best_of_n_se"] == pytest.approx(at4["gold_vs_best_of_n_se"])
