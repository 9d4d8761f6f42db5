"""`reports/report.md` and `reports/headline.json`: the report card and its headline figures,
drawn from the metrics dict; its figures are drawn by `lmpipe.evaluate.figures`."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmpipe.evaluate import figures as F

if TYPE_CHECKING:  # the card imports torch; the report and `lmpipe compare` do not
    from lmpipe.evaluate.card import PromptSet

COLUMNS = [
    ("ppl", "ppl", "{:.2f}"),
    ("gold_reward", "gold", "{:.3f}"),
    ("proxy_reward", "proxy", "{:.2f}"),
    ("kl_to_sft", "KL to SFT", "{:.2f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("self_bleu", "self-BLEU", "{:.3f}"),
    ("response_tokens", "length", "{:.1f}"),
    ("eos_rate", "EOS rate", "{:.2f}"),
    ("tokens_per_sec", "tokens/s", "{:,.0f}"),
    ("latency_ms_per_token", "ms/token", "{:.2f}"),
    ("size_mb", "MB", "{:.2f}"),
]


HEADLINE: tuple[tuple[str, str], ...] = (
    ("sft_gold", "variants.sft.gold_reward"),
    ("rl_gold", "variants.rl.gold_reward"),
    ("rl_gold_se", "variants.rl.gold_reward_se"),
    ("rl_proxy", "variants.rl.proxy_reward"),
    ("rl_kl", "variants.rl.kl_to_sft"),
    ("rl_objective_j", "variants.rl.objective_j"),
    ("rl_ppl", "variants.rl.ppl"),
    ("rl_distinct_2", "variants.rl.distinct_2"),
    ("rl_eos_rate", "variants.rl.eos_rate"),
    ("int8_gold", "variants.onnx-rl-int8.gold_reward"),
    ("int8_size_mb", "variants.onnx-rl-int8.size_mb"),
    ("int8_tokens_per_sec", "variants.onnx-rl-int8.tokens_per_sec"),
)
"""(name, dotted path in reports/metrics.json) of the figures that say how a pipeline run went:
did RL beat SFT on the gold judge, at what KL and perplexity, without collapse or lost EOS, and
what the shipped int8 ONNX bundle keeps of it. Flat names with the prefixes sft_, rl_, int8_, bon_
and flag_, which no other metric or param has without a dot after it, so that one regex keeps them
in `dvc exp show` (docs/tracking.md)."""


def headline(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The dozen numbers of `reports/headline.json` from the evaluate report: `HEADLINE`, the
    gold score of best-of-n from SFT at the largest n, and how many flags were raised. A figure
    whose model was not evaluated is left out rather than written as null."""
    out: dict[str, float | int] = {}
    for name, path in HEADLINE:
        value: Any = metrics
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    if metrics.get("best_of_n"):
        out["bon_gold"] = float(max(metrics["best_of_n"], key=lambda b: b["n"])["gold"])
        four = [b for b in metrics["best_of_n"] if b["n"] == 4 and "objective_j_lower" in b]
        if four:  # the J that a converged RL policy must at least reach
            out["bon_n4_j_lower"] = float(four[0]["objective_j_lower"])
    out["flag_count"] = len(metrics.get("flags", ()))
    return out


def read_curves(path: str | Path) -> dict[str, list[float]]:
    """A per-step CSV as columns of floats (NaN where a step has no value)."""
    path = Path(path)
    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
    return cols


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return spec.format(value)


def summary_table(variants: Mapping[str, Mapping[str, Any]]) -> str:
    head = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for name, row in variants.items():
        cells = [fmt(row.get(key), spec) for key, _, spec in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(metrics: Mapping[str, Any], side_by_side: Sequence[Mapping[str, Any]]) -> str:
    ev = metrics["eval"]
    out = [
        "# lmpipe report card",
        "",
        f"{ev['prompts']} held-out prompts × {ev['samples_per_prompt']} samples per model "
        f"(temperature 1, up to {ev['max_new_tokens']} new tokens, seed {ev['seed']}); "
        f"perplexity on {ev['ppl_tokens']:,} test tokens; speed on this machine "
        f"({ev['speed_new_tokens']} tokens, batch {ev['speed_batch']} for tokens/s, batch 1 for "
        "ms/token). KL to SFT is per sequence in nats, on each model's own samples.",
        "",
        summary_table(metrics["variants"]),
        "",
        "## Flags",
        "",
    ]
    out += [f"- {f}" for f in metrics["flags"]] or [
        "- none: the reward model beats its baseline and is not near chance or over-fit; RL "
        "moved gold and proxy beyond noise, without reward hacking, entropy collapse or an "
        "EOS-rate drop."
    ]
    out += [
        "",
        "## Best-of-n from SFT (proxy-ranked)",
        "",
        "J = RL reward − β·KL is the objective RL maximises (β = rl.kl_coef); best-of-n's "
        "KL is at most its bound, so its J is at least the one shown.",
        "",
        "| n | KL bound (nats) | gold | proxy | J ≥ |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b in metrics["best_of_n"]:
        j = b.get("objective_j_lower")
        j_text = "" if j is None else f"{j:.3f}"
        out.append(
            f"| {b['n']} | {b['kl_bound']:.3f} | {b['gold']:.3f} | {b['proxy']:.3f} | {j_text} |"
        )
    rl, bon = metrics["variants"].get("rl"), metrics["best_of_n"]
    if rl and bon and rl.get("objective_j") is not None and "objective_j_lower" in bon[0]:
        beaten = [b for b in bon if b["objective_j_lower"] > rl["objective_j"]]
        verdict = (
            f"best-of-{beaten[0]['n']} reaches at least {beaten[0]['objective_j_lower']:.3f}: "
            "RL stopped short of the optimum of its own objective."
            if beaten
            else "no best-of-n point's J bound is above it."
        )
        out += [
            "",
            f"The RL policy's J is {rl['objective_j']:.3f} (RL reward {rl['rl_score']:.3f}, "
            f"KL {rl['kl_to_sft']:.2f} nats); {verdict}",
        ]
    if rl and bon:
        better = [b for b in bon if b["gold"] >= rl["gold_reward"]]
        if better:
            b = better[0]
            out += [
                "",
                f"Best-of-{b['n']} from SFT reaches the RL policy's gold score "
                f"({b['gold']:.3f} ≥ {rl['gold_reward']:.3f}) at KL ≤ {b['kl_bound']:.2f} "
                f"nats, against the policy's {rl['kl_to_sft']:.2f}.",
            ]
        else:
            out += [
                "",
                f"The RL policy's gold score ({rl['gold_reward']:.3f}) is above every "
                f"best-of-n up to n = {bon[-1]['n']} ({bon[-1]['gold']:.3f}, KL ≤ "
                f"{bon[-1]['kl_bound']:.2f} nats; the policy's KL is "
                f"{rl['kl_to_sft']:.2f}).",
            ]
    out += [
        "",
        "## Figures",
        "",
        "![training curves](figures/training_curves.png)",
        "",
        "![gold and proxy against √KL](figures/overoptimisation.png)",
        "",
        "![score distributions](figures/score_distributions.png)",
        "",
        "![size against quality](figures/size_quality.png)",
        "",
        "## Side by side",
        "",
    ]
    for item in side_by_side:
        out += [f"**Prompt:** {item['prompt']}", ""]
        for name, text in item["responses"].items():
            out.append(f"- *{name}*: {text.strip() or '(empty)'}")
        out.append("")
    return "\n".join(out)


def settings(prompts: PromptSet, windows: np.ndarray, cfg: Any, seed: int, device: str) -> dict:
    """The `eval` block of `reports/metrics.json`: what every model was evaluated on."""
    return {
        "prompts": len(prompts.ids),
        "samples_per_prompt": prompts.n,
        "seed": seed,
        "max_new_tokens": cfg.max_new_tokens,
        "ppl_tokens": int(windows[:, 1:].size),
        "speed_batch": cfg.speed_batch,
        "speed_new_tokens": cfg.speed_new_tokens,
        "device": device,
    }


def side_by_side(
    texts: Mapping[str, list[str]], prompts: PromptSet, count: int
) -> list[dict[str, Any]]:
    """The first sample of SFT, RL and the int8 ONNX policy for the first `count` prompts."""
    shown = [k for k in ("sft", "rl", "onnx-rl-int8") if k in texts]
    return [
        {"prompt": prompts.texts[i], "responses": {k: texts[k][i * prompts.n] for k in shown}}
        for i in range(min(count, len(prompts.ids)))
    ]


def write_figures(
    curves: Mapping[str, Mapping[str, list[float]]],
    best: Sequence[Mapping[str, float]],
    variants: Mapping[str, Mapping[str, Any]],
    scores: Mapping[str, Any],
    out: Path,
) -> None:
    """The report card's four figures into `out`."""
    F.figure_training_curves(curves, out / "training_curves.png")
    keys = ("gold_reward", "rl_score", "kl_to_sft")
    points = {
        k: {key: variants[k][key] for key in keys}
        for k in ("sft", "rl", "distilled", "pruned")
        if k in variants
    }
    F.figure_overoptimisation(curves.get("rl", {}), best, points, out / "overoptimisation.png")
    dists = {
        k: {"gold": scores[k].gold, "proxy": scores[k].proxy} for k in ("sft", "rl") if k in scores
    }
    F.figure_distributions(dists, out / "score_distributions.png")
    F.figure_size_quality(variants, out / "size_quality.png")
