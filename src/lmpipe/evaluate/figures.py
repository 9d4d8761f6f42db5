"""`reports/figures/`: the report card's figures (matplotlib, drawn off-screen), from the
training curves and the metrics dict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite_xy(step: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = [(s, v) for s, v in zip(step, values, strict=True) if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


_LOSS_LABELS = {
    "train/loss": "train",
    "eval/loss": "eval (held-out)",
    "distill/loss": "distil: train",
    "distill/eval_loss": "distil: eval",
    "recovery/loss": "pruned recovery: train",
    "recovery/eval_loss": "pruned recovery: eval",
}
_LOSS_UNITS = {
    "pretrain": "cross-entropy (nats/token)",
    "sft": "cross-entropy (nats/response token)",
    "reward": "Bradley–Terry loss (nats/pair)",
    "compress": "loss (nats/token, log scale)",
}
_RL_REWARD = (
    ("rl/proxy", "proxy (reward model)"),
    ("rl/score", "RL reward (proxy, EOS penalty)"),
    ("rl/gold", "gold scorer"),
)
_RL_KL = (("rl/kl", "KL (log-ratio)"), ("rl/kl_k3", "KL (k3 estimator)"))

Panel = tuple[str, str, str, str, list[tuple[str, str]]]
"""(stage, title, x label, y label, [(column, legend label)]) of one training-curve panel."""


def _curve_panels(plots: Mapping[str, Mapping[str, list[float]]]) -> list[Panel]:
    """The training-curve panels in pipeline order: one loss panel per training stage and, for
    RL, reward and KL apart (KL is ten times the reward's scale)."""
    panels: list[Panel] = []
    for stage, cols in plots.items():
        if not cols:
            continue
        if stage == "rl":
            reward = [(k, label) for k, label in _RL_REWARD if k in cols]
            kl = [(k, label) for k, label in _RL_KL if k in cols]
            x = "RL step (rollout batch)"
            if reward:
                title = "RL: reward per rollout batch"
                panels.append((stage, title, x, "mean reward per response", reward))
            if kl:
                panels.append((stage, "RL: KL to SFT", x, "KL (nats/response)", kl))
            continue
        keys = [
            (k, _LOSS_LABELS.get(k, k))
            for k in cols
            if k.endswith("loss") and "policy" not in k and "value" not in k
        ]
        if keys:
            title = "compress: distillation and pruning" if stage == "compress" else f"{stage} loss"
            ylabel = _LOSS_UNITS.get(stage, "loss")
            panels.append((stage, title, "optimiser step", ylabel, keys))
    return panels


def figure_training_curves(plots: Mapping[str, Mapping[str, list[float]]], path: Path) -> None:
    """A grid, three panels a row: each stage's losses (train and eval) against the step, and
    RL's reward and KL to SFT in panels of their own."""
    plt = _plt()
    panels = _curve_panels(plots)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (stage, title, xlabel, ylabel, keys) in zip(flat, panels, strict=False):
        cols = plots[stage]
        step = cols.get("step", list(range(len(next(iter(cols.values()))))))
        phases = list(dict.fromkeys(k.split("/")[0] for k, _ in keys))
        for i, (k, label) in enumerate(keys):
            x, y = _finite_xy(step, cols[k])
            sparse = len(x) < 20 or "eval" in k
            # a phase's train and eval curves (distill/…, recovery/…) share a colour
            phase = k.split("/")[0]
            grouped = phase not in ("train", "eval", "rl")
            colour = f"C{phases.index(phase) if grouped else i}"
            ls = "--" if grouped and "eval" in k else "-"
            ax.plot(
                x,
                y,
                label=label,
                marker="o" if sparse else None,
                ms=3.5,
                lw=1.4,
                color=colour,
                ls=ls,
            )
        if stage == "compress":
            # the distillation and recovery losses differ tenfold: a log axis shows both
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# Evaluated models get fixed colours and shapes that are not the best-of-n line's orange.
_POINT_STYLES = (
    ("tab:blue", "o"),
    ("tab:red", "D"),
    ("tab:green", "^"),
    ("tab:purple", "v"),
    ("tab:brown", "P"),
    ("tab:pink", "X"),
)


def figure_overoptimisation(
    rl: Mapping[str, list[float]],
    best_of_n: Sequence[Mapping[str, float]],
    points: Mapping[str, Mapping[str, float]],
    path: Path,
) -> None:
    """Gold score and RL reward (proxy, or the missing-EOS penalty) against √KL to SFT: RL
    training batches (coloured by step), best-of-n from SFT at its KL bound, evaluated models.
    One legend and one colour bar for both panels, outside the axes, so no data is hidden."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    panels = (
        (axes[0], "rl/gold", "gold", "gold_reward", "gold score", "gold score (mean per response)"),
        (
            axes[1],
            "rl/score",
            "proxy",
            "rl_score",
            "RL reward",
            "RL reward (proxy; penalty without EOS)",
        ),
    )
    handles: dict[str, Any] = {}
    sc = None
    for ax, curve, bon_key, point_key, title, ylabel in panels:
        if rl.get("rl/kl") and rl.get(curve):
            kl = np.sqrt(np.clip(np.asarray(rl["rl/kl"], dtype=float), 0, None))
            y = np.asarray(rl[curve], dtype=float)
            ok = np.isfinite(kl) & np.isfinite(y)
            steps = np.asarray(rl.get("step", range(len(kl))), dtype=float)
            sc = ax.scatter(
                kl[ok],
                y[ok],
                c=steps[ok],
                s=12,
                cmap="viridis",
                alpha=0.75,
                label="RL training batch",
            )
        if best_of_n:
            x = [math.sqrt(b["kl_bound"]) for b in best_of_n]
            ax.plot(
                x,
                [b[bon_key] for b in best_of_n],
                "s--",
                color="tab:orange",
                ms=6,
                label="best-of-n from SFT (at its KL bound)",
            )
            # below-right of each square: off the rising line and inside the axes
            for b, xi in zip(best_of_n, x, strict=True):
                ax.annotate(
                    f"n={b['n']}",
                    (xi, b[bon_key]),
                    fontsize=8,
                    xytext=(6, -10),
                    textcoords="offset points",
                    color="tab:orange",
                )
        for (name, row), (colour, marker) in zip(points.items(), _POINT_STYLES * 4, strict=False):
            if row.get(point_key) is not None and row.get("kl_to_sft") is not None:
                ax.plot(
                    math.sqrt(max(row["kl_to_sft"], 0)),
                    row[point_key],
                    marker,
                    ms=8,
                    color=colour,
                    mec="black",
                    mew=0.6,
                    ls="none",
                    label=f"{name} (evaluated)",
                )
        ax.set_xlabel("√KL to SFT (√nats per response)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} against √KL", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.1)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    if sc is not None:
        fig.colorbar(sc, ax=list(axes), label="RL step", fraction=0.03, pad=0.02)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="lower center",
            fontsize=8,
            ncol=min(4, len(handles)),
            frameon=False,
        )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def figure_distributions(scores: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
    """Histograms of gold and proxy scores of each named model's samples, on shared bins, with
    each model's mean as a dashed line; headroom above the bars keeps the legend off them."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = {
        "gold": ("gold score of a response", "gold score per response"),
        "proxy": (
            "proxy reward (reward model) of a response that ended",
            "proxy reward per response",
        ),
    }
    for ax, key in zip(axes, ("gold", "proxy"), strict=True):
        values = {name: np.asarray(s[key], dtype=float) for name, s in scores.items()}
        values = {name: v[np.isfinite(v)] for name, v in values.items()}
        pooled = np.concatenate([v for v in values.values() if len(v)] or [np.zeros(1)])
        bins = np.histogram_bin_edges(pooled, bins=25)  # shared, so the bars line up
        for i, (name, v) in enumerate(values.items()):
            colour = f"C{i % 10}"
            if len(v):
                ax.hist(
                    v,
                    bins=bins,
                    alpha=0.45,
                    color=colour,
                    edgecolor=colour,
                    label=f"{name}: mean {v.mean():.2f} (n={len(v)})",
                )
                ax.axvline(v.mean(), color=colour, ls="--", lw=1.3)
        ax.set_xlabel(labels[key][0])
        ax.set_ylabel("responses per bin")
        ax.set_title(labels[key][1], fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        _, top = ax.get_ylim()
        ax.set_ylim(0, top * 1.3)
        ax.legend(fontsize=8, loc="upper center", ncol=2, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


_PIPELINE_ORDER = ("pretrain", "sft", "rl", "quantized", "distilled", "pruned")


def _variant_order(name: str) -> tuple[int, str, int]:
    """Pipeline order of the model a variant came from, then PyTorch, ONNX fp32, ONNX int8."""
    family = name.removeprefix("onnx-").removesuffix("-int8")
    rank = _PIPELINE_ORDER.index(family) if family in _PIPELINE_ORDER else len(_PIPELINE_ORDER)
    return rank, family, name.startswith("onnx-") + name.endswith("-int8")


def _variant_style(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per model name: colour by the model it came from ("onnx-rl-int8" → rl),
    marker by runtime and precision, so the legend reads as a grid rather than 12 labels."""
    families: dict[str, str] = {}
    out = {}
    for name in names:
        family = name.removeprefix("onnx-").removesuffix("-int8")
        colour = families.setdefault(family, f"C{len(families) % 10}")
        marker = ("^" if name.endswith("-int8") else "s") if name.startswith("onnx-") else "o"
        out[name] = (colour, marker)
    return out


def figure_size_quality(variants: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Size on disk against gold score (± one standard error) and test perplexity, one point per
    model; one legend outside the axes names them, as labels beside the points would overlap."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    style = _variant_style(sorted(variants, key=_variant_order))
    panels = (
        (axes[0], "gold_reward", "gold score (mean per response, ± 1 SE)", "gold score"),
        (axes[1], "ppl", "test perplexity", "test perplexity"),
    )
    handles: dict[str, Any] = {}
    for ax, key, ylabel, title in panels:
        for name in style:
            row = variants[name]
            if row.get(key) is None or row.get("size_mb") is None:
                continue
            colour, marker = style[name]
            se = row.get(f"{key}_se")
            h = ax.errorbar(
                row["size_mb"],
                row[key],
                yerr=se,
                fmt=marker,
                color=colour,
                ms=7,
                mec="black",
                mew=0.5,
                capsize=2,
                elinewidth=0.8,
                alpha=0.9,
                label=name,
            )
            handles.setdefault(name, h)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(ylabel)
        better = "higher" if key == "gold_reward" else "lower"
        ax.set_title(f"{title} against size ({better} is better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(0.08)
    fig.tight_layout()
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=8,
            frameon=False,
            title="model: ○ PyTorch, □ ONNX, △ ONNX int8",
            title_fontsize=8,
        )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
