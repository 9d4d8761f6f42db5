"""Whether the reward model learns anything that bag-of-words misses: the model trained on the
residual of the bag-of-words baseline, beside the model as the stage trains it.

    python bench/reward_residual.py [--params params.yaml] [--sft models/sft]
                                    [--pairs data/preferences/pairs.jsonl] [--json PATH]

Reads the pairs of the last `dvc repro reward` and trains, with the stage's functions and
`reward.*` params, from the same seed:

- the reward model as the stage trains it;
- the same model stacked on bag-of-words: each response's bag-of-words score is added to the
  model's as a fixed offset in the Bradley–Terry loss, so the model learns only what the word
  counts leave unexplained. The train responses' offsets are cross-fitted over the folds of
  train prompts that choose the baseline's C (`cross_fitted_scores`: a response's own labels
  did not shape its offset, where the full fit's would be optimistic on the pairs it was fitted
  to); the val responses' come from the baseline fitted to all train pairs, which val loss (the
  kept step) and the scores below use.

Each is scored on the val pairs as `reports/reward.json` scores the stage's
(`held_out_metrics`): gold-order accuracy ± SE by prompt and the paired gap to bag-of-words;
the stacked model as offset plus model, and its residual (the model's own score) alone. Where
the stacked model is level with bag-of-words and its residual orders gold pairs at chance, the
model found nothing in these pairs that word counts miss.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _pairs import add_pairs_args, load_pairs
from _results import add_json_arg, write
from lmpipe.reward.baseline import cross_fitted_scores
from lmpipe.reward.data import PreferenceBatch
from lmpipe.reward.evaluation import fit_baselines, held_out_metrics
from lmpipe.reward.model import build_reward_model
from lmpipe.reward.training import train_reward_model


def offsets_by_sequence(encoded: dict, train_scores: dict, scorer) -> dict[tuple[int, ...], float]:
    """The offset of every encoded sequence: cross-fitted for train, the full fit's for val."""
    out: dict[tuple[int, ...], float] = {}
    texts = list(dict.fromkeys(p[s] for _, p in encoded["val"] for s in ("chosen", "rejected")))
    val_scores = dict(zip(texts, scorer.score(texts).tolist(), strict=True))
    for e, p in encoded["train"]:
        out[tuple(e.chosen)] = train_scores[(p["prompt"], p["chosen"])]
        out[tuple(e.rejected)] = train_scores[(p["prompt"], p["rejected"])]
    for e, p in encoded["val"]:
        out[tuple(e.chosen)] = val_scores[p["chosen"]]
        out[tuple(e.rejected)] = val_scores[p["rejected"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pairs_args(ap)
    add_json_arg(ap)
    args = ap.parse_args()

    run = load_pairs(args)
    cfg, template, context, encoded = run.cfg, run.template, run.context, run.encoded
    baselines = fit_baselines(template, encoded)
    bow = baselines["bow"]
    train_scores = cross_fitted_scores([p for _, p in encoded["train"]], bow["C"])
    table = offsets_by_sequence(encoded, train_scores, bow["scorer"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(encoded['train'])} train / {len(encoded['val'])} val pairs; bag-of-words "
        f"{bow['gold_order_accuracy']:.3f} (C {bow['C']:g})",
        flush=True,
    )

    def batch_offset(batch: PreferenceBatch) -> torch.Tensor:
        ids, lengths = batch.input_ids.tolist(), batch.lengths.tolist()
        return torch.tensor([table[tuple(r[:n])] for r, n in zip(ids, lengths, strict=True)])

    def seq_offset(seqs: list[list[int]]) -> np.ndarray:
        return np.array([table[tuple(s)] for s in seqs])

    out = []

    def row(label: str, m: dict, kept: int) -> None:
        gap, se = m["gold_order_gap_to_baseline"], m["gold_order_gap_to_baseline_se"]
        r = {
            "model": label,
            "gold_order": f"{m['gold_order_accuracy']:.3f} ± {m['gold_order_accuracy_se']:.3f}",
            "gap": f"{gap:+.3f} ± {se:.3f}",
            "val_accuracy": f"{m['val_accuracy']:.3f}",
            "kept_step": kept,
        }
        out.append(r)
        print(" | ".join(str(v) for v in r.values()), flush=True)

    for stacked in (False, True):
        model = build_reward_model(run.sft, run.seed, cfg.pooling, run.marker, run.marker_last)
        res = train_reward_model(
            model,
            encoded,
            cfg,
            run.seed,
            template.pad_id,
            offset=batch_offset if stacked else None,
        )
        model.eval()
        if not stacked:
            m = held_out_metrics(model, template, encoded, context, baselines)
            row("reward model (the stage's)", m, res.kept_step)
            continue
        m = held_out_metrics(model, template, encoded, context, baselines, offset=seq_offset)
        row("bag-of-words + reward model trained on its residual", m, res.kept_step)
        m = held_out_metrics(model, template, encoded, context, baselines)
        row("its residual alone (the model's own score)", m, res.kept_step)
    out.append(
        {
            "model": f"bag-of-words baseline (C {bow['C']:g})",
            "gold_order": f"{bow['gold_order_accuracy']:.3f} ± {bow['gold_order_accuracy_se']:.3f}",
            "gap": "",
            "val_accuracy": f"{bow['val_accuracy']:.3f}",
            "kept_step": "",
        }
    )
    caption = (
        f"Pairs: {len(encoded['train']):,} / {len(encoded['val']):,} train / val "
        f"({m['gold_order_pairs']:,} val pairs whose gold scores differ by ≥ 0.1 count for gold "
        f"order); the train responses' bag-of-words offsets cross-fitted over "
        f"{len(set(p['prompt'] for _, p in encoded['train']))} train prompts in 3 folds."
    )
    print(caption)
    write(args.json, {"rows": out, "caption": caption})


if __name__ == "__main__":
    main()
