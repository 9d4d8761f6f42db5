"""The default run stage by stage, read from the committed `reports/*.json`: each stage's
quality figure against its goal or baseline, and its training time and speed, as Markdown.
Reads only; `make repro` makes the reports.

    python bench/pipeline_report.py [--reports reports] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import add_json_arg, reports_date, write

ROOT = Path(__file__).resolve().parents[1]


def table(reports: Path) -> list[list[str]]:
    """(stage, figure, value) rows from a run's reports."""

    def read(name: str) -> dict:
        return json.loads((reports / f"{name}.json").read_text())

    prep, pre, sft, rm, rl = (read(n) for n in ("prepare", "pretrain", "sft", "reward", "rl"))
    comp, exp, ev, head = read("compress"), read("export"), read("metrics"), read("headline")
    dist, pruned, quant = (comp["variants"][k] for k in ("distilled", "pruned", "quantized"))
    docs, tokens = prep["documents"], prep["tokens"]
    best = {b["n"]: b for b in ev["best_of_n"]}
    reach = [n for n in best if best[n]["gold"] >= head["rl_gold"]]
    n_best = min(reach) if reach else max(best)
    return [
        [
            "prepare",
            "train / val / test documents",
            f"{docs['train']:,} / {docs['val']:,} / {docs['test']:,}",
        ],
        [
            "prepare",
            "train / val / test tokens; characters a token",
            f"{tokens['train']:,} / {tokens['val']:,} / {tokens['test']:,}; "
            f"{prep['chars_per_token']:.2f}",
        ],
        [
            "pretrain",
            "val loss (nats/token) against the bigram / unigram baselines",
            f"{pre['val_loss']:.3f} against {pre['baseline_bigram_loss']:.3f} / "
            f"{pre['baseline_unigram_loss']:.3f}",
        ],
        [
            "pretrain",
            "training: steps, seconds, tokens/s",
            f"{pre['steps']}, {pre['train_seconds']:.0f} s, {pre['tokens_per_sec']:,.0f}",
        ],
        [
            "sft",
            "val loss on responses (ppl); EOS within the budget",
            f"{sft['val_loss']:.3f} ({sft['val_ppl']:.1f}); {sft['eos_rate']:.2f}",
        ],
        [
            "sft",
            "training: steps, seconds, tokens/s",
            f"{sft['steps']}, {sft['train_seconds']:.0f} s, {sft['tokens_per_sec']:,.0f}",
        ],
        [
            "reward",
            "gold-order accuracy (± SE; goal ≥ 0.85), bag-of-words baseline",
            f"{rm['gold_order_accuracy']:.3f} ± {rm['gold_order_accuracy_se']:.3f}, "
            f"{rm['baseline_bow_gold_order_accuracy']:.3f}",
        ],
        [
            "reward",
            "sampling / training / whole stage, seconds; training tokens/s",
            f"{rm['sample_seconds']:.0f} / {rm['train_seconds']:.0f} / "
            f"{rm['stage_seconds']:.0f} s; {rm['tokens_per_sec']:,.0f}",
        ],
        [
            "rl",
            f"{rl['algo']} gold, SFT → policy (gain ± SE; goal ≥ +0.2) at KL to SFT",
            f"{rl['gold_reward']['init']:.3f} → {rl['gold_reward']['final']:.3f} "
            f"({rl['gold_gain']:+.3f} ± {rl['gold_gain_se']:.3f}) at {rl['kl_to_ref']:.2f} nats",
        ],
        [
            "rl",
            "distinct-2, SFT → policy; lowest batch-mean KL",
            f"{rl['distinct_2_init']:.3f} → {rl['distinct_2']:.3f}; {rl['min_batch_kl']:.2f}",
        ],
        [
            "rl",
            "training: steps, seconds, episodes/s, generation share",
            f"{rl['steps']}, {rl['train_seconds']:.0f} s, {rl['episodes_per_sec']:.1f}, "
            f"{rl['generate_share']:.0%}",
        ],
        [
            "compress",
            "distilled: gold gain kept (goal ≥ 0.8) at this share of the parameters",
            f"{dist['gold_gain_retained']:.2f} at {dist['params_ratio']:.1%}",
        ],
        [
            "compress",
            "pruned: val ppl ÷ the teacher's after recovery (goal ≤ 1.10)",
            f"{pruned['val_ppl_ratio']:.4f}",
        ],
        [
            "compress",
            "quantized int8: size ÷ fp32 (goal ≤ 35%), val ppl change (goal ≤ 2%)",
            f"{quant['size_ratio']:.1%}, {quant['val_ppl_ratio'] - 1:+.2%}",
        ],
        [
            "compress",
            "training seconds: distillation / pruned model's recovery",
            f"{dist['train_seconds']:.0f} / {pruned['train_seconds']:.0f} s",
        ],
        [
            "export",
            "rl bundle: max abs Δlogit against PyTorch; greedy sequences identical",
            f"{exp['rl']['max_abs_logit_diff']:.1e}; {exp['rl']['greedy_sequences_identical']:.0%}",
        ],
        [
            "export",
            "rl int8 bundle: size, greedy-token agreement with fp32, ppl change",
            f"{exp['rl']['int8']['size_mb']:.2f} MB, "
            f"{exp['rl']['int8']['greedy_token_match']:.3f}, "
            f"{exp['rl']['int8']['ppl_change']:+.2%}",
        ],
        [
            "evaluate",
            "RL policy: gold (± SE) at KL to SFT",
            f"{head['rl_gold']:.3f} ± {head['rl_gold_se']:.3f} at {head['rl_kl']:.2f} nats",
        ],
        [
            "evaluate",
            "best-of-n from SFT that reaches the policy's gold: n, gold, KL bound",
            f"{n_best}, {best[n_best]['gold']:.3f}, {best[n_best]['kl_bound']:.2f} nats",
        ],
        ["evaluate", "report-card flags", str(len(ev["flags"]))],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=Path, default=ROOT / "reports")
    add_json_arg(ap)
    args = ap.parse_args()
    rows = table(args.reports)
    print("| stage | figure | value |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    write(args.json, {"rows": rows}, date=reports_date(args.reports.resolve()))


if __name__ == "__main__":
    main()
