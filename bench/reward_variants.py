"""Reward-model variants trained on the pairs of the last `reward` run, scored like the stage.

    python bench/reward_variants.py                      # the stage's params
    python bench/reward_variants.py --pooling last mean
    python bench/reward_variants.py --batching prompt --batch-size 8 32
    python bench/reward_variants.py --lr 5e-4 1e-3 2e-3 --steps 300 600
    python bench/reward_variants.py --weight-decay 0 0.1 1
    python bench/reward_variants.py --seeds 5          # seed, seed + 1, … seed + 4

Reads `data/preferences/pairs.jsonl` (written by `dvc repro reward`), trains each variant
(pooling × batching × batch size × learning rate × steps × weight decay) with the stage's loop
and `reward.*` params from params.yaml, overridden by the flags, and prints the held-out
accuracy against the labels and against the gold order (pairs whose gold scores differ by
>= 0.1) and the paired gap to the bag-of-words baseline, as in `reports/reward.json`
(`lmpipe.reward.evaluation.held_out_metrics`), with the training time and the passes over the
train prompts (or pairs) that the kept step had made: where `keep_best` keeps an earlier step
than the last, val loss rose after it, and more steps or bigger batches over-fit the pairs.
`--seeds N` trains each variant from N seeds (the head's initialisation and the batches' order;
the pairs stay the same), so a variant's difference can be read against the seeds' spread.
`--batching pair` batches `batch_size` independent pairs (a response is scored once per pair it
is in); `prompt` batches `batch_size` prompts with all their labelled pairs, each response
scored once (see `reward.batching`). With the stage's params a variant reproduces the stage's
figures exactly (same seed, same batches).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _pairs import add_pairs_args, load_pairs
from _results import add_json_arg, write
from lmpipe.reward.data import preference_groups
from lmpipe.reward.evaluation import fit_baselines, held_out_metrics
from lmpipe.reward.model import build_reward_model
from lmpipe.reward.training import train_reward_model


def main() -> None:
    ap = argparse.ArgumentParser()
    add_pairs_args(ap)
    ap.add_argument("--pooling", nargs="+", default=None, help="default: reward.pooling")
    ap.add_argument("--batching", nargs="+", default=None, choices=["pair", "prompt"])
    ap.add_argument(
        "--batch-size", type=int, nargs="+", default=None, help="default: reward.batch_size"
    )
    ap.add_argument("--lr", type=float, nargs="+", default=None, help="default: reward.lr")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="default: reward.max_steps")
    ap.add_argument(
        "--weight-decay", type=float, nargs="+", default=None, help="default: reward.weight_decay"
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds a variant, from the params' seed")
    add_json_arg(ap)
    args = ap.parse_args()

    run = load_pairs(args)
    cfg, template, context, encoded = run.cfg, run.template, run.context, run.encoded
    val = encoded["val"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(encoded['train'])} train / {len(val)} val pairs; "
        f"{args.batch_size or [cfg.batch_size]} prompts or pairs a step"
    )
    # each optimizer step draws batch_size groups (prompts, or pairs) of the train split
    train_groups = {
        b: len(preference_groups(encoded["train"], b)) for b in args.batching or [cfg.batching]
    }
    rows, gaps = [], []
    baselines = fit_baselines(template, encoded)  # the same pairs for every variant: fit once
    grid = [
        (b, bs, p, lr, steps, wd, run.seed + i)
        for b in args.batching or [cfg.batching]
        for bs in args.batch_size or [cfg.batch_size]
        for p in args.pooling or [cfg.pooling]
        for lr in args.lr or [cfg.lr]
        for steps in args.steps or [cfg.max_steps]
        for wd in args.weight_decay or [cfg.weight_decay]
        for i in range(args.seeds)
    ]
    for batching, batch_size, pooling, lr, steps, weight_decay, seed in grid:
        t0 = time.perf_counter()
        model = build_reward_model(run.sft, seed, pooling, run.marker, run.marker_last)
        variant = cfg.model_copy(
            update={
                "batching": batching,
                "batch_size": batch_size,
                "pooling": pooling,
                "lr": lr,
                "max_steps": steps,
                "weight_decay": weight_decay,
            }
        )
        result = train_reward_model(model, encoded, variant, seed, template.pad_id)
        passes = result.kept_step * batch_size / train_groups[batching]
        model.eval()
        m = held_out_metrics(model, template, encoded, context, baselines)
        gap, gap_se = m["gold_order_gap_to_baseline"], m["gold_order_gap_to_baseline_se"]
        print(
            f"batching {batching:6s} batch size {batch_size} pooling {pooling:5s} lr {lr:g} "
            f"steps {steps} weight decay {weight_decay:g} "
            f"seed {seed}  val_accuracy {m['val_accuracy']:.3f}  "
            f"gold_order_accuracy {m['gold_order_accuracy']:.3f} "
            f"({m['gold_order_pairs']} pairs), bag-of-words "
            f"{m['baseline_bow_gold_order_accuracy']:.3f}, gap {gap:+.3f} ± {gap_se:.3f}  "
            f"kept step {result.kept_step} ({passes:.1f} passes), "
            f"training {result.train_seconds:.0f} s, "
            f"{time.perf_counter() - t0:.0f} s in all"
        )
        se = {k: m.get(f"{k}_se") for k in ("val_accuracy", "gold_order_accuracy")}
        rows.append(
            {
                "batching": batching,
                "batch_size": batch_size,
                "pooling": pooling,
                "lr": f"{lr:g}",
                "steps": steps,
                "weight_decay": f"{weight_decay:g}",
                "seed": seed,
                "kept_step": result.kept_step,
                "passes": f"{passes:.1f}",
                **{k: f"{m[k]:.3f}" + (f" ± {se[k]:.3f}" if se[k] is not None else "") for k in se},
                "baseline": f"{m['baseline_bow_gold_order_accuracy']:.3f}",
                "gap": f"{gap:+.3f} ± {gap_se:.3f}",
            }
        )
        gaps.append(gap)
    caption = ""
    if len(gaps) > 1:
        caption = (
            f"Gap to bag-of-words over the {len(gaps)} rows: mean {statistics.mean(gaps):+.3f}, "
            f"SD {statistics.stdev(gaps):.3f}, highest {max(gaps):+.3f}."
        )
        print(caption)
    write(args.json, {"rows": rows, "caption": caption})


if __name__ == "__main__":
    main()
