"""Reward-model variants trained on the pairs of the last `reward` run, scored like the stage.

    python bench/reward_pooling.py                       # pooling last vs mean, stage defaults
    python bench/reward_pooling.py --pooling mean --lr 1e-3 --steps 300

Reads `data/preferences/pairs.jsonl` (written by `dvc repro reward`), trains each variant with the
stage's loop and `reward.*` params from params.yaml (overridden by the flags), and prints the
held-out accuracy against the labels and against the gold order (pairs whose gold scores differ
by >= 0.1), as in `reports/reward.json`. With the same params a variant reproduces the stage's
figures exactly (same seed, same batches). Each variant takes about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmpipe.config import load_params
from lmpipe.data.tokenizer import PAD, load_tokenizer, special_ids
from lmpipe.model import context_length, load_model
from lmpipe.reward import (
    PreferenceBatches,
    PreferenceExample,
    build_reward_model,
    encode_for_reward,
    pair_metrics,
    preference_loss_sum,
    raw_scores,
)
from lmpipe.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sft", default="models/sft")
    ap.add_argument("--pairs", default="data/preferences/pairs.jsonl")
    ap.add_argument("--pooling", nargs="+", default=["last", "mean"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()

    params = load_params(args.params, ["reward"])
    update = {"checkpoint_every": 0, "eval_every": 10**9}
    if args.lr is not None:
        update["lr"] = args.lr
    if args.steps is not None:
        update["max_steps"] = args.steps
    cfg = params.reward.model_copy(update=update)
    tok = load_tokenizer(args.sft)
    pad = special_ids(tok)[PAD]
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line]
    context = context_length(load_model(args.sft))
    split: dict[str, list[tuple[PreferenceExample, dict]]] = {"train": [], "val": []}
    for p in rows:
        c = encode_for_reward(tok, p["prompt"], p["chosen"], context)
        r = encode_for_reward(tok, p["prompt"], p["rejected"], context)
        if c and r:
            split[p["split"]].append((PreferenceExample(c, r), p))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(split['train'])} train / {len(split['val'])} val pairs; "
        f"lr {cfg.lr}, {cfg.max_steps} steps x {cfg.batch_size} pairs"
    )
    val = split["val"]
    for pooling in args.pooling:
        t0 = time.perf_counter()
        model = build_reward_model(args.sft, params.seed, pooling)
        source = PreferenceBatches([e for e, _ in split["train"]], cfg.batch_size, params.seed, pad)
        train(model, source, cfg, val_batches=[], loss_sum=preference_loss_sum(cfg.margin))
        model.eval()
        m = pair_metrics(
            raw_scores(model, [e.chosen for e, _ in val], pad),
            raw_scores(model, [e.rejected for e, _ in val], pad),
            [p["gold_chosen"] for _, p in val],
            [p["gold_rejected"] for _, p in val],
        )
        print(
            f"pooling {pooling:5s} val_accuracy {m['val_accuracy']:.3f}  "
            f"gold_order_accuracy {m['gold_order_accuracy']:.3f} "
            f"({m['gold_order_pairs']} pairs)  {time.perf_counter() - t0:.0f} s"
        )


if __name__ == "__main__":
    main()
