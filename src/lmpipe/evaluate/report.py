"""`reports/report.md` and `reports/figures/`: the report card, drawn from the metrics dict."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_training_curves(plots: Mapping[str, Mapping[str, list[float]]], path: Path) -> None:
    """One panel per stage: its losses (train and eval) against the step."""
    plt = _plt()
    stages = [s for s, c in plots.items() if c]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3.2))
    axes = np.atleast_1d(axes)
    for ax, stage in zip(axes, stages, strict=False):
        cols = plots[stage]
        step = cols.get("step", [])
        keys = [k for k in cols if k.endswith("loss") and "policy" not in k and "value" not in k]
        if stage == "rl":
            keys = [k for k in ("rl/score", "rl/gold", "rl/kl") if k in cols]
        for k in keys:
            x = [s for s, v in zip(step, cols[k], strict=True) if v == v]
            y = [v for v in cols[k] if v == v]
            ax.plot(x, y, label=k, marker="." if len(x) < 20 else None)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_overoptimisation(
    rl: Mapping[str, list[float]],
    best_of_n: Sequence[Mapping[str, float]],
    points: Mapping[str, Mapping[str, float]],
    path: Path,
) -> None:
    """Gold score and RL reward (proxy, or the missing-EOS penalty) against √KL to SFT: RL
    training batches (coloured by step), best-of-n from SFT at its KL bound, evaluated models."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    panels = (
        (axes[0], "rl/gold", "gold", "gold_reward", "gold score"),
        (axes[1], "rl/score", "proxy", "rl_score", "proxy reward (missing-EOS penalty included)"),
    )
    for ax, curve, bon_key, point_key, title in panels:
        if rl.get("rl/kl") and rl.get(curve):
            kl = np.sqrt(np.clip(np.asarray(rl["rl/kl"], dtype=float), 0, None))
            y = np.asarray(rl[curve], dtype=float)
            ok = np.isfinite(kl) & np.isfinite(y)
            steps = np.asarray(rl.get("step", range(len(kl))), dtype=float)
            sc = ax.scatter(kl[ok], y[ok], c=steps[ok], s=10, cmap="viridis", alpha=0.7,
                            label="RL training batches")  # fmt: skip
            fig.colorbar(sc, ax=ax, label="RL step")
        if best_of_n:
            x = [math.sqrt(b["kl_bound"]) for b in best_of_n]
            ax.plot(x, [b[bon_key] for b in best_of_n], "s--", color="tab:orange",
                    label="best-of-n from SFT (KL bound)")  # fmt: skip
            for b, xi in zip(best_of_n, x, strict=True):
                ax.annotate(f"n={b['n']}", (xi, b[bon_key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        for name, row in points.items():
            if row.get(point_key) is not None and row.get("kl_to_sft") is not None:
                ax.plot(math.sqrt(max(row["kl_to_sft"], 0)), row[point_key], "o", ms=7,
                        label=f"{name} (evaluated)")  # fmt: skip
        ax.set_xlabel("√KL to SFT (√nats per sequence)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_distributions(scores: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
    """Histograms of gold and proxy scores of each named model's samples."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, key in zip(axes, ("gold", "proxy"), strict=True):
        for name, s in scores.items():
            v = np.asarray(s[key], dtype=float)
            v = v[np.isfinite(v)]
            if len(v):
                ax.hist(v, bins=25, alpha=0.5, label=f"{name} (mean {v.mean():.2f})")
        ax.set_title(f"{key} score of samples")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_size_quality(variants: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Size on disk against gold score and perplexity, one point per model."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "gold_reward", "gold score"), (axes[1], "ppl", "test ppl")):
        for name, row in variants.items():
            if row.get(key) is None or row.get("size_mb") is None:
                continue
            ax.plot(row["size_mb"], row[key], "o")
            ax.annotate(name, (row["size_mb"], row[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} against size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    out += ["", "## Best-of-n from SFT (proxy-ranked)", "",
            "| n | KL bound (nats) | gold | proxy |", "|---:|---:|---:|---:|"]  # fmt: skip
    for b in metrics["best_of_n"]:
        out.append(f"| {b['n']} | {b['kl_bound']:.3f} | {b['gold']:.3f} | {b['proxy']:.3f} |")
    rl, bon = metrics["variants"].get("rl"), metrics["best_of_n"]
    if rl and bon:
        better = [b for b in bon if b["gold"] >= rl["gold_reward"]]
        if better:
            b = better[0]
            out += ["", f"Best-of-{b['n']} from SFT reaches the RL policy's gold score "
                        f"({b['gold']:.3f} ≥ {rl['gold_reward']:.3f}) at KL ≤ {b['kl_bound']:.2f} "
                        f"nats, against the policy's {rl['kl_to_sft']:.2f}."]  # fmt: skip
        else:
            out += ["", f"The RL policy's gold score ({rl['gold_reward']:.3f}) is above every "
                        f"best-of-n up to n = {bon[-1]['n']} ({bon[-1]['gold']:.3f}, KL ≤ "
                        f"{bon[-1]['kl_bound']:.2f} nats; the policy's KL is "
                        f"{rl['kl_to_sft']:.2f})."]  # fmt: skip
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
