"""Reward: preference pairs (SFT samples labelled by a gold scorer, or a JSONL), a Bradley–Terry
reward model on the SFT backbone, and its normalisation on fresh SFT samples.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from lmpipe import dist, stage
from lmpipe.chat import load_template
from lmpipe.checkpoints import checkpoint_store
from lmpipe.config import load_params
from lmpipe.gold import make_gold
from lmpipe.io import atomic_dir, read_jsonl, write_json
from lmpipe.model import n_params, save_model
from lmpipe.reward.evaluation import held_out_metrics, normalise_on_policy
from lmpipe.reward.metrics import label_gold_agreement
from lmpipe.reward.model import build_reward_model
from lmpipe.reward.preferences import collect_preferences, write_pairs
from lmpipe.reward.training import train_reward_model
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run
from lmpipe.tracking.tracker import NullTracker

log = logging.getLogger("reward")

CARD_KEYS = ("val_accuracy", "gold_order_accuracy", "val_gold_spearman")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", type=Path, required=True, help="SFT model (models/sft)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (data/prepared)")
    ap.add_argument("--pairs", type=Path, required=True, help="pairs folder (data/preferences)")
    ap.add_argument("--out", type=Path, required=True, help="model folder (models/reward)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
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
        rl_prompts = [r["prompt"] for r in read_jsonl(args.data / "prompts" / "rl.jsonl")]
        prefs = collect_preferences(
            args.model,
            template,
            rl_prompts,
            pcfg,
            gold,
            seed=params.seed,
            precision=cfg.precision,
            device=device,
        )
        if info.is_main:
            write_pairs(args.pairs, prefs, pcfg)

        # the reward model starts from a fresh copy of the backbone
        marker, last = template.response_marker or (None, False)
        model = build_reward_model(args.model, params.seed, cfg.pooling, marker, last).to(device)
        store = checkpoint_store(args.cache, "reward", stage.checkpoint_key(params, inputs))
        result = train_reward_model(
            model,
            prefs.encoded,
            cfg,
            params.seed,
            template.pad_id,
            info.rank,
            info.world,
            tracker=tracker,
            checkpoints=store,
            plot_csv=args.plots,
            prefix="train",
        )
        model.eval()
        if not info.is_main:  # evaluation, normalisation and outputs are rank 0's
            dist.teardown()
            return

        metrics = held_out_metrics(model, template, prefs.encoded, prefs.context)
        t0 = time.perf_counter()
        norm, norm_samples = normalise_on_policy(
            model,
            args.model,
            template,
            rl_prompts,
            cfg.norm_samples,
            max_new_tokens=pcfg.max_new_tokens,
            temperature=pcfg.temperature,
            seed=params.seed + 1,
            context=prefs.context,
            device=device,
        )
        report = {
            **metrics,
            "val_loss": result.val_loss,
            "kept_step": result.kept_step,
            "normalization": norm,
            "pairs": prefs.counts,
            "label_gold_agreement": label_gold_agreement(prefs.encoded["train"]),
            **prefs.stats,
            "norm_samples": norm_samples,
            "params": n_params(model),
            "tokens_per_sec": result.tokens_per_sec,
            "sample_seconds": prefs.seconds,
            "train_seconds": result.train_seconds,
            "normalise_seconds": time.perf_counter() - t0,
            "stage_seconds": time.perf_counter() - t_stage,
            "world_size": info.world,
        }
        man = stage.manifest("reward", params, tracker.tags, report, store.directory.name)
        with atomic_dir(args.out) as tmp:
            save_model(model, tmp, args.data, {**man, "normalization": norm})
        tracker.log_outputs({"pairs": args.pairs, "model": args.out})
        if params.tracking.log_models:
            card = model_card("reward", report, CARD_KEYS)
            stage.log_model(tracker, args.out, "model", "reward", "lmpipe-reward-torch", card)
        tracker.log_report(report, "reports/reward.json")
        write_json(args.report, report)
        store.clear()
        log.info(
            "gold-order accuracy %.3f (%d pairs), val accuracy %.3f, Spearman %.3f; "
            "sampling %.0fs, training %.0fs",
            report["gold_order_accuracy"],
            report["gold_order_pairs"],
            report["val_accuracy"],
            report["val_gold_spearman"],
            prefs.seconds,
            result.train_seconds,
        )
    dist.teardown()


if __name__ == "__main__":
    stage.run(main, "reward")
