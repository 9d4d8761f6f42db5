"""Reward: preference pairs (SFT samples labelled by a gold scorer, or a JSONL), a Bradley–Terry
reward model on the SFT backbone, and its normalisation on fresh SFT samples.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from lmpipe import dist, stage
from lmpipe.chat import load_template
from lmpipe.config import load_params
from lmpipe.data.sources import DataError
from lmpipe.gold import make_gold
from lmpipe.io import atomic_dir, write_json
from lmpipe.model import context_length, load_model, n_params, save_model
from lmpipe.precision import use_bf16
from lmpipe.reward import (
    PreferenceBatches,
    bag_of_words_baseline,
    build_reward_model,
    cluster_se,
    encode_for_reward,
    encode_pairs,
    fit_normalisation,
    gold_agreement,
    pair_metrics,
    preference_groups,
    preference_loss_sum,
    raw_scores,
    read_preference_file,
    sample_and_label,
    val_prompts,
)
from lmpipe.sampling import sample_responses
from lmpipe.tracking import NullTracker, model_card, stage_run
from lmpipe.train import checkpoint_store, train

log = logging.getLogger("reward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", type=Path, required=True, help="SFT model (models/sft)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (data/prepared)")
    ap.add_argument("--pairs", type=Path, required=True, help="pairs folder (data/preferences)")
    ap.add_argument("--out", type=Path, required=True, help="model folder (models/reward)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    args = ap.parse_args()

    params = load_params(args.params, ["preference", "reward", "tracking"])
    pcfg, cfg = params.preference, params.reward
    inputs = {"model": args.model, "data": args.data}
    if pcfg.source == "file":
        inputs["preferences"] = Path(pcfg.path)
    gold = make_gold(pcfg.gold, keywords=pcfg.keywords)
    t_stage = time.perf_counter()

    info, device = dist.setup(cfg.device)

    run = stage_run("reward", params, params.tracking, inputs)
    with run if info.is_main else contextlib.nullcontext(NullTracker()) as tracker:
        template = load_template(args.data)
        pad = template.pad_id
        sft = load_model(args.model, device)
        rl_prompts = [r["prompt"] for r in read_jsonl(args.data / "prompts" / "rl.jsonl")]

        t0 = time.perf_counter()
        if pcfg.source == "gold":
            # every process draws the same samples (same seed): the pairs, and so the training
            # data, are those of one process; only the training is split across processes
            prompts = rl_prompts[: pcfg.prompts]
            # bf16 weights: 1.6x the tokens/s on an AVX512-BF16 CPU (bench/sampling_throughput.py)
            bf16 = use_bf16(pcfg.precision if pcfg.precision != "auto" else cfg.precision, device)
            samples, pairs = sample_and_label(
                sft.to(torch.bfloat16) if bf16 else sft, template, prompts,
                k=pcfg.samples_per_prompt, max_new_tokens=pcfg.max_new_tokens,
                temperature=pcfg.temperature, gold=gold, tau=pcfg.tau, seed=params.seed,
                batch_size=pcfg.batch_size,
            )  # fmt: skip
            if not pairs:
                raise DataError(
                    f"no preference pairs: of {len(samples)} samples, "
                    f"{sum(x['ended_with_eos'] for x in samples)} ended with EOS within "
                    f"preference.max_new_tokens = {pcfg.max_new_tokens}, and a pair needs two "
                    "distinct ones for a prompt. Raise preference.max_new_tokens or "
                    "samples_per_prompt, or train SFT longer so the model learns to stop"
                )
            sample_stats = {
                "samples": len(samples),
                "sample_precision": "bf16" if bf16 else "fp32",
                "samples_eos_rate": float(np.mean([s["ended_with_eos"] for s in samples])),
            }
        else:
            pairs = read_preference_file(pcfg.path)
            for p in pairs:  # gold scores of the file's texts, for analysis
                p["gold_chosen"], p["gold_rejected"] = gold(
                    [p["prompt"]] * 2, [p["chosen"], p["rejected"]]
                ).tolist()
            sample_stats = {}
        sample_seconds = time.perf_counter() - t0
        held_out = val_prompts([p["prompt"] for p in pairs], pcfg.val_fraction, params.seed)
        for p in pairs:
            p["split"] = "val" if p["prompt"] in held_out else "train"

        context = context_length(sft)
        encoded = encode_pairs(template, pairs, context)
        if not encoded["train"] or not encoded["val"]:
            raise DataError(
                f"{len(encoded['train'])} train and {len(encoded['val'])} val pairs fit the "
                f"context of {context} tokens; more prompts or shorter responses are needed"
            )
        if info.is_main:
            with atomic_dir(args.pairs) as tmp:
                with (tmp / "pairs.jsonl").open("w", encoding="utf-8") as f:
                    for p in pairs:
                        f.write(json.dumps(p, ensure_ascii=False) + "\n")
                write_json(
                    tmp / "meta.json",
                    {"source": pcfg.source, "gold": pcfg.gold, "tau": pcfg.tau,
                     "pairs": {s: len(v) for s, v in encoded.items()}, **sample_stats},
                )  # fmt: skip
        del sft  # sampling is done; the reward model starts from a fresh copy of the backbone

        marker, last = template.response_marker or (None, False)
        model = build_reward_model(args.model, params.seed, cfg.pooling, marker, last).to(device)
        train_groups = preference_groups(encoded["train"], cfg.batching)
        val_groups = preference_groups(encoded["val"], cfg.batching)
        # under torchrun each process takes its slice of every global batch (batch_size each)
        source = PreferenceBatches(train_groups, cfg.batch_size, params.seed, pad, info.rank,
                                   info.world)  # fmt: skip
        # every rank evaluates the whole global batch's worth: the val set of one process
        val = PreferenceBatches(val_groups, cfg.batch_size * info.world, 0, pad).fixed_batches(
            cfg.eval_batches
        )
        val_ex = [e for e, _ in encoded["val"]]
        store = checkpoint_store(args.cache, "reward", stage.checkpoint_key(params, inputs))
        result = train(
            model, source, cfg, val_batches=val, loss_sum=preference_loss_sum(cfg.margin),
            tracker=tracker, checkpoints=store, plot_csv=args.plots, prefix="train",
        )  # fmt: skip
        model.eval()
        if not info.is_main:  # evaluation, normalisation and outputs are rank 0's
            dist.teardown()
            return

        # held-out pairs: accuracy against the labels and against the gold order
        rows = [p for _, p in encoded["val"]]
        # reward vs gold on the distinct held-out responses too; one call scores each once
        texts = {(p["prompt"], p[s]): p[f"gold_{s}"] for p in rows for s in ("chosen", "rejected")}
        seqs = [encode_for_reward(template, pr, re, context) for pr, re in texts]
        n = len(val_ex)
        scores = raw_scores(
            model, [e.chosen for e in val_ex] + [e.rejected for e in val_ex] + seqs, pad
        )
        gold_c, gold_r = [p["gold_chosen"] for p in rows], [p["gold_rejected"] for p in rows]
        prompts = [p["prompt"] for p in rows]
        metrics = pair_metrics(scores[:n], scores[n : 2 * n], gold_c, gold_r, prompts=prompts)
        metrics["val_gold_spearman"] = float(
            spearmanr(scores[2 * n :], list(texts.values())).statistic
        )

        # normalisation on fresh samples of the SFT policy (the policy RL starts from)
        t0 = time.perf_counter()
        sft = load_model(args.model, device)  # fp32: the policy RL starts from, as it samples
        fresh = sample_responses(
            sft, template, [rl_prompts[i % len(rl_prompts)] for i in range(cfg.norm_samples)],
            pcfg.max_new_tokens, pcfg.temperature, seed=params.seed + 1, batch_size=256,
        )  # fmt: skip
        fresh = [s for s in fresh if s["ended_with_eos"]]
        fresh_seqs = [encode_for_reward(template, s["prompt"], s["response"], 10**9) for s in fresh]
        fresh_seqs = [s for s in fresh_seqs if len(s) <= context]
        norm = fit_normalisation(raw_scores(model, fresh_seqs, pad))
        normalise_seconds = time.perf_counter() - t0

        bow = bag_of_words_baseline([p for _, p in encoded["train"]], rows)
        # the model against the baseline on the same pairs: a paired difference, SE by prompt
        ours, sel = gold_agreement(scores[:n], scores[n : 2 * n], gold_c, gold_r)
        theirs, _ = gold_agreement(bow["margin"], np.zeros(n), gold_c, gold_r)
        gap = ours[sel].astype(float) - theirs[sel]
        report = {
            **metrics,
            "baseline_bow_val_accuracy": bow["val_accuracy"],
            "baseline_bow_gold_order_accuracy": bow["gold_order_accuracy"],
            "gold_order_gap_to_baseline": float(gap.mean()) if gap.size else float("nan"),
            "gold_order_gap_to_baseline_se": cluster_se(gap, np.asarray(prompts, object)[sel]),
            "val_loss": result.val_loss,
            "kept_step": result.kept_step,
            "normalization": norm,
            "pairs": {s: len(v) for s, v in encoded.items()},
            "label_gold_agreement": label_gold_agreement(encoded["train"]),
            **sample_stats,
            "norm_samples": len(fresh_seqs),
            "params": n_params(model),
            "tokens_per_sec": result.tokens_per_sec,
            "sample_seconds": sample_seconds,
            "train_seconds": result.train_seconds,
            "normalise_seconds": normalise_seconds,
            "stage_seconds": time.perf_counter() - t_stage,
            "world_size": info.world,
        }
        man = stage.manifest("reward", params, tracker.tags, report, store.directory.name)
        man["normalization"] = norm
        with atomic_dir(args.out) as tmp:
            save_model(model, tmp, args.data, man)
        tracker.log_outputs({"pairs": args.pairs, "model": args.out})
        if params.tracking.log_models:
            keys = ("val_accuracy", "gold_order_accuracy", "val_gold_spearman")
            card = model_card("reward", report, keys)
            stage.log_model(tracker, args.out, "model", "reward", "lmpipe-reward-torch", card)
        tracker.log_report(report, "reports/reward.json")
        write_json(args.report, report)
        store.clear()
        log.info(
            "gold-order accuracy %.3f (%d pairs), val accuracy %.3f, Spearman %.3f; "
            "sampling %.0fs, training %.0fs",
            report["gold_order_accuracy"], report["gold_order_pairs"], report["val_accuracy"],
            report["val_gold_spearman"], sample_seconds, result.train_seconds,
        )  # fmt: skip
    dist.teardown()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def label_gold_agreement(pairs) -> float:
    """Share of labelled pairs whose chosen response gold scores higher, over the pairs gold
    does not tie (a tie has no order to agree with)."""
    rows = [p for _, p in pairs if p["gold_chosen"] != p["gold_rejected"]]
    return float(np.mean([p["gold_chosen"] > p["gold_rejected"] for p in rows]))


if __name__ == "__main__":
    stage.run(main, "reward")
