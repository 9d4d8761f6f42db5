"""The numbers on the report card: pure functions of samples, scores and log-probabilities."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from lmpipe.data.stats import distinct_ngram_ratio

__all__ = [
    "alignment_flags",
    "distinct_ngram_ratio",
    "flags",
    "nll_of_targets",
    "self_bleu",
]


def nll_of_targets(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """(Σ −log p(target), number of targets) for logits (..., V) and integer targets (...);
    targets < 0 are skipped. Log-softmax in float64 so that sums over many tokens stay exact."""
    x = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    t = targets.reshape(-1)
    keep = t >= 0
    x, t = x[keep], t[keep]
    if not len(t):
        return 0.0, 0
    m = x.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return float((log_z - x[np.arange(len(t)), t]).sum()), len(t)


def self_bleu(texts: Sequence[str], max_texts: int = 200) -> float:
    """Mean sentence BLEU (sacrebleu, 0–1) of each text against all the others as references:
    1 when every text is the same, near 0 for unrelated texts. Texts without words are skipped;
    the first `max_texts` are used (the cost is quadratic)."""
    from sacrebleu.metrics import BLEU

    texts = [t for t in texts if t.strip()][:max_texts]
    if len(texts) < 2:
        return float("nan")
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return float(np.mean(scores) / 100)


def _quarter_means(series: Sequence[float]) -> tuple[float, float]:
    x = np.asarray([v for v in series if v == v], dtype=np.float64)  # NaNs dropped
    k = max(1, len(x) // 4)
    return float(x[:k].mean()), float(x[-k:].mean())


def flags(
    rl_curve: Mapping[str, Sequence[float]],
    rows: Mapping[str, Mapping[str, float]],
    *,
    gold_drop: float = 0.02,
    entropy_ratio: float = 0.5,
    eos_drop: float = 0.1,
) -> list[str]:
    """Warnings, in words, about the RL run: the proxy rose while the gold score fell (between
    the first and last quarter of training, or RL against SFT in this evaluation), entropy
    collapsed (last quarter below `entropy_ratio` × first), the EOS rate dropped."""
    out: list[str] = []
    proxy, gold = rl_curve.get("rl/proxy", []), rl_curve.get("rl/gold", [])
    if len([v for v in proxy if v == v]) >= 4 and len([v for v in gold if v == v]) >= 4:
        (p0, p1), (g0, g1) = _quarter_means(proxy), _quarter_means(gold)
        if p1 > p0 and g1 < g0 - gold_drop:
            out.append(
                f"Reward hacking during RL: the proxy score rose ({p0:.3f} → {p1:.3f}) while the "
                f"gold score fell ({g0:.3f} → {g1:.3f}) between the first and last quarter of "
                "training. Raise rl.kl_coef, stop earlier, or improve the reward model."
            )
    sft, rl = rows.get("sft"), rows.get("rl")
    if sft and rl:
        # proxy_reward is None where no sample ended with EOS (the proxy scores ended ones).
        rl_proxy, sft_proxy = rl["proxy_reward"], sft["proxy_reward"]
        proxy_rose = None not in (rl_proxy, sft_proxy) and rl_proxy > sft_proxy
        if proxy_rose and rl["gold_reward"] < sft["gold_reward"]:
            out.append(
                f"The RL policy scores higher than SFT on the proxy ({sft['proxy_reward']:.3f} → "
                f"{rl['proxy_reward']:.3f}) but lower on the gold score ({sft['gold_reward']:.3f} "
                f"→ {rl['gold_reward']:.3f}): the reward model is being exploited."
            )
        if rl["eos_rate"] < sft["eos_rate"] - eos_drop:
            out.append(
                f"The EOS rate dropped from {sft['eos_rate']:.2f} (SFT) to {rl['eos_rate']:.2f} "
                "(RL): responses run to the length limit. Check rl.missing_eos_penalty."
            )
    ent = rl_curve.get("rl/entropy", [])
    if len([v for v in ent if v == v]) >= 4:
        e0, e1 = _quarter_means(ent)
        if e1 < entropy_ratio * e0:
            out.append(
                f"Entropy collapsed during RL: {e0:.2f} → {e1:.2f} nats/token between the first "
                "and last quarter. Raise rl.kl_coef or lower the learning rate."
            )
    return out


def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def alignment_flags(
    reward: Mapping[str, float],
    rl: Mapping[str, float],
    reward_curve: Mapping[str, Sequence[float]],
    *,
    z: float = 2.0,
    chance_margin: float = 0.1,
    overfit_rise: float = 0.02,
) -> list[str]:
    """What a user must not miss about the reward model and RL, in words with what to change.

    `reward` and `rl` are the stages' reports (their manifests' metrics); `reward_curve` the
    reward stage's curves. Flags a reward model that orders held-out pairs as gold does less
    often than the bag-of-words baseline (by the paired gap), one near chance (val accuracy
    within `z` SE or `chance_margin` of 0.5), one whose val loss rose by more than
    `overfit_rise` (relative) after its best eval, and RL whose gold or proxy gain is within
    `z` standard errors of zero.
    """
    out: list[str] = []
    acc, base = reward.get("gold_order_accuracy"), reward.get("baseline_bow_gold_order_accuracy")
    gap, gap_se = (
        reward.get("gold_order_gap_to_baseline"),
        reward.get("gold_order_gap_to_baseline_se"),
    )
    if _finite(acc, base) and acc < base:
        noise = (
            f"{gap:+.3f} ± {gap_se:.3f} SE by prompt, "
            + ("beyond noise" if _finite(gap, gap_se) and gap + z * gap_se < 0 else "within noise")
            if _finite(gap, gap_se)
            else "no standard error"
        )
        tokens = reward.get("baseline_tokens_gold_order_accuracy")
        pieces = (
            f"; over the model's own tokens the same baseline gets {tokens:.3f}, so the gap is "
            "likely the cost of composing words from the tokenizer's pieces"
            if _finite(tokens) and acc >= tokens
            else ""
        )
        out.append(
            f"The reward model is below its baseline: it orders held-out pairs as gold does "
            f"{acc:.3f} of the time against {base:.3f} for bag-of-words logistic regression on "
            f"the same pairs ({noise}){pieces}. RL optimises what it learned. Measured on the "
            "default task, the gap is the backbone's: a pretrained base model (base.model, "
            "docs/base-models.md) draws level with the baseline, where the reward model's "
            "learning rate, weight decay and steps, twice the preference prompts, and a bigger "
            "or longer-pretrained model from scratch do not (docs/stages.md, reward)."
        )
    va, va_se = reward.get("val_accuracy"), reward.get("val_accuracy_se")
    if _finite(va) and (va < 0.5 + chance_margin or (_finite(va_se) and va - z * va_se <= 0.5)):
        se = f" ± {va_se:.3f} SE by prompt" if _finite(va_se) else ""
        out.append(
            f"The reward model is near chance: val accuracy {va:.3f}{se} on held-out labels. "
            "Check label_gold_agreement in reports/reward.json (noisy labels: lower "
            "preference.tau), and train on more pairs."
        )
    loss = [v for v in reward_curve.get("eval/loss", []) if v == v]
    steps = [
        s
        for s, v in zip(
            reward_curve.get("step", []), reward_curve.get("eval/loss", []), strict=False
        )
        if v == v
    ]
    if len(loss) >= 3:
        best = int(np.argmin(loss))
        if best < len(loss) - 1 and loss[-1] > loss[best] * (1 + overfit_rise):
            at = f" at step {steps[best]:.0f}" if len(steps) == len(loss) else ""
            # with keep_best the kept weights are already the best eval's: fewer steps only
            # save time, so the advice is what regularises
            advice = (
                " The model kept is the one of its best eval (reward.keep_best), so fewer "
                "reward.max_steps would only save time; more preference pairs or more "
                "reward.weight_decay regularise it."
                if reward.get("kept_step") is not None
                else " Set reward.keep_best: true (or fewer reward.max_steps); more preference "
                "pairs or more reward.weight_decay regularise it."
            )
            out.append(
                f"The reward model over-fit: its val loss fell to {loss[best]:.3f}{at} and rose "
                f"to {loss[-1]:.3f} by the end of training ({reward.get('pairs', {})} pairs)."
                f"{advice}"
            )
    for name, advice in (
        (
            "gold",
            "Check the reward-model flags; if there are none, raise rl.steps or lower rl.kl_coef.",
        ),
        (
            "proxy",
            "RL did not optimise its own objective: raise rl.lr or rl.steps, or check "
            "rl/approx_kl and rl/clipfrac in reports/plots/rl.csv.",
        ),
    ):
        gain, se = rl.get(f"{name}_gain"), rl.get(f"{name}_gain_se")
        if _finite(gain, se) and gain < z * se:
            out.append(
                f"RL did not move the {name} score beyond noise: {gain:+.3f} ± {se:.3f} (SE over "
                f"{rl.get('eval_prompts', '?')} eval prompts) from SFT to the policy, at "
                f"{rl.get('kl_to_ref', float('nan')):.2f} nats of KL. {advice}"
            )
    return out
