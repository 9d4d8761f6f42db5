"""The default run's reward model, RL and critic figures, read from the committed reports
(`reports/reward.json`, `reports/rl.json`, `reports/plots/rl.csv`), as a Markdown table: what
decides whether RL got close to its target. Reads only; `make repro` makes the reports.

    python bench/rl_report.py [--reports reports] [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from _results import add_json_arg, reports_date, write

ROOT = Path(__file__).resolve().parents[1]


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])


def critic_share(policy_norm: np.ndarray, critic_norm: np.ndarray, clip: float) -> np.ndarray:
    """The critic's share of the gradient the optimiser steps on, each clipped on its own."""
    p, c = np.minimum(policy_norm, clip), np.minimum(critic_norm, clip)
    return c / (p + c)


def c_of(report: dict, which: str) -> str:
    """The baseline's regularisation, where the report has it (older reports used C = 1)."""
    c = report.get(f"baseline_{which}_C")
    return f" (C {c:g})" if c is not None else ""


def table(reports: Path) -> list[list[str]]:
    """(figure, value) rows from a run's reward.json, rl.json and plots/rl.csv."""
    rm = json.loads((reports / "reward.json").read_text())
    rl = json.loads((reports / "rl.json").read_text())
    rows = list(csv.DictReader((reports / "plots" / "rl.csv").open()))
    steps = column(rows, "step")
    ev = column(rows, "rl/explained_variance")
    share = critic_share(column(rows, "rl/grad_norm"), column(rows, "rl/value_grad_norm"), 1.0)
    best = {b["n"]: b for b in rl["best_of_n"]}
    lo, hi = rl["posterior_kl_interval"]
    j = rl["objective_j"]
    order = rl.get("reward_gold_order", {})
    out = [
        (
            "reward model, val accuracy (± SE by prompt)",
            f"{rm['val_accuracy']:.3f} ± {rm['val_accuracy_se']:.3f}",
        ),
        (
            "reward model, gold-order accuracy (± SE by prompt)",
            f"{rm['gold_order_accuracy']:.3f} ± {rm['gold_order_accuracy_se']:.3f}",
        ),
        (
            "bag-of-words baseline, gold-order accuracy (its C by cross-validation)",
            f"{rm['baseline_bow_gold_order_accuracy']:.3f}{c_of(rm, 'bow')}",
        ),
        (
            "bag-of-tokens baseline (the model's own tokens), gold-order accuracy (its C)",
            f"{rm['baseline_tokens_gold_order_accuracy']:.3f}{c_of(rm, 'tokens')}"
            if "baseline_tokens_gold_order_accuracy" in rm
            else "not in this report",
        ),
        (
            "reward model − baseline, paired (± SE)",
            f"{rm['gold_order_gap_to_baseline']:+.3f} ± {rm['gold_order_gap_to_baseline_se']:.3f}",
        ),
        (
            "reward model, calibration error against labels / gold",
            f"{rm['calibration_error_labels']:.3f} / {rm['calibration_error_gold']:.3f}",
        ),
    ]
    if "sft" in order and "policy" in order:
        out.append(
            (
                "reward model's gold-order accuracy on SFT's / the policy's samples (± SE)",
                f"{order['sft']['accuracy']:.3f} ± {order['sft']['se']:.3f} / "
                f"{order['policy']['accuracy']:.3f} ± {order['policy']['se']:.3f}",
            )
        )
    out += [
        (
            f"RL ({rl['algo']}) gold gain (± SE over {rl['eval_prompts']} eval prompts)",
            f"{rl['gold_gain']:+.3f} ± {rl['gold_gain_se']:.3f}",
        ),
        ("RL proxy gain", f"{rl['proxy_gain']:+.3f} ± {rl['proxy_gain_se']:.3f}"),
        ("RL KL to SFT (nats per sequence)", f"{rl['kl_to_ref']:.2f}"),
        (
            f"objective J = RL reward − {rl['beta']}·KL, SFT → policy (± SE)",
            f"{j['init']:.3f} → {j['final']:.3f} ± {rl['objective_j_se']:.3f}",
        ),
        (
            "best-of-4 / best-of-16 from SFT, same prompts: J lower bound",
            f"{best[4]['objective_j_lower']:.3f} / {best[16]['objective_j_lower']:.3f}",
        ),
        (
            "RL gold − best-of-n's at RL's KL, paired by eval prompt (± SE)",
            f"{rl['gold_vs_best_of_n']:+.3f} ± {rl['gold_vs_best_of_n_se']:.3f}"
            if "gold_vs_best_of_n" in rl
            else "—",
        ),
        (
            "KL(π‖π*): SFT → policy (policy's 95% interval)",
            f"{rl['posterior_kl_init']:.2f} → {rl['posterior_kl']:.2f} [{lo:.2f}, {hi:.2f}]",
        ),
        (
            "training J's slope over the last 20% of steps ÷ its mean slope (± SE)",
            f"{rl['j_slope_ratio']:.2f}"
            + (f" ± {rl['j_slope_ratio_se']:.2f}" if "j_slope_ratio_se" in rl else ""),
        ),
        (
            "critic: explained variance at step 1; lowest from step 10; median",
            f"{ev[0]:.2f}; {np.nanmin(ev[steps >= 10]):.2f}; {np.nanmedian(ev):.2f}",
        ),
        (
            "critic's share of the clipped gradient (median, max over steps)",
            f"{np.nanmedian(share):.2f}, {np.nanmax(share):.2f}",
        ),
    ]
    return [list(r) for r in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=Path, default=ROOT / "reports")
    add_json_arg(ap)
    args = ap.parse_args()
    rows = table(args.reports)
    print("| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    write(args.json, {"rows": rows}, date=reports_date(args.reports.resolve()))


if __name__ == "__main__":
    main()
