"""Compress: distil, prune and quantize the RL policy; score every variant next to the teacher.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from lmpipe import dist, stage
from lmpipe.chat import load_template
from lmpipe.checkpoints import checkpoint_store
from lmpipe.compress import quantize as q8
from lmpipe.compress.run import KINDS, compress, training_data
from lmpipe.config import load_params
from lmpipe.evaluate import card
from lmpipe.evaluate.compressed import score_models, side_by_side_text, summarize
from lmpipe.io import atomic_dir, write_history_csv, write_json
from lmpipe.model import context_length, load_model, save_model
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run
from lmpipe.tracking.tracker import NullTracker

CARD_KEYS = ("val_ppl", "kl_to_teacher", "gold_reward", "proxy_reward", "size_mb")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--teacher", type=Path, required=True, help="RL policy (models/rl)")
    ap.add_argument("--sft", type=Path, required=True, help="SFT model: the gain baseline")
    ap.add_argument("--reward", type=Path, required=True, help="reward model (proxy score)")
    ap.add_argument("--data", type=Path, required=True, help="prepared data")
    ap.add_argument("--out", type=Path, required=True, help="folder of variants")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="per-step CSV")
    ap.add_argument("--cache", type=Path, default=Path(".cache/checkpoints"))
    return ap.parse_args()


def save_variants(variants, args, params, tags, store) -> None:
    """Each variant's folder with its manifest; the int8 model in torchao's own layout."""
    with atomic_dir(args.out) as tmp:
        for name, model in variants.items():
            kind = KINDS.get(name)
            run_key = store(kind).directory.name if kind else None
            man = stage.manifest("compress", params, tags, {}, run_key)
            man["variant"], man["teacher"] = name, str(args.teacher)
            if name == "quantized":
                man["quantization"] = q8.describe(params.compress.quantize_embeddings)
                q8.save_quantized(model, tmp / name, args.data, man)
            else:
                save_model(model, tmp / name, args.data, man)


def main() -> None:
    args = parse_args()
    params = load_params(args.params, ["compress", "tracking"])
    cfg, seed = params.compress, params.seed
    info, device = dist.setup(cfg.device)
    inputs = {"teacher": args.teacher, "sft": args.sft, "reward": args.reward, "data": args.data}
    key = stage.checkpoint_key(params, inputs)

    def store(kind: str):
        return checkpoint_store(args.cache, f"compress-{kind}", key)

    run = stage_run("compress", params, params.tracking, inputs)
    with run if info.is_main else contextlib.nullcontext(NullTracker()) as tracker:
        template = load_template(args.data)
        teacher = load_model(args.teacher, device).requires_grad_(False)
        corpus, val, sample_seconds = training_data(
            teacher, template, args.data, cfg, seed, info.rank, info.world
        )
        done = compress(teacher, corpus, val, cfg, seed, tracker, store)
        if not info.is_main:  # saving, scoring and outputs are rank 0's
            dist.teardown()
            return
        write_history_csv(args.plots, done.curves())
        save_variants(done.variants, args, params, tracker.tags, store)

        judge, _ = card.judge_of(args.reward, args.teacher, template, str(device))
        prompts = card.prompt_set(
            template,
            args.data,
            context_length(teacher),
            cfg.max_new_tokens,
            cfg.eval_prompts,
            cfg.eval_samples,
            "compress",
        )
        folders = {"teacher": args.teacher, "sft": args.sft}
        folders.update({name: args.out / name for name in done.variants})
        rows, texts = score_models(
            folders, teacher, val, prompts, judge, cfg, seed + 3, str(device), template
        )
        for name, extra in done.extra.items():
            rows[name].update(extra)
        report = summarize(rows, sample_seconds, len(corpus.examples), str(device))
        report["world_size"] = info.world
        tracker.log_text(side_by_side_text(prompts, texts), "samples.txt")
        tracker.log_outputs({"models": args.out})
        for name in done.variants if params.tracking.log_models else ():
            card_text = model_card(f"compress ({name})", rows[name], CARD_KEYS)
            stage.log_model(
                tracker, args.out / name, name, "policy", f"lmpipe-{name}-torch", card_text
            )
        tracker.log_report(report, "reports/compress.json")
        write_json(args.report, report)
        for kind in KINDS.values():
            store(kind).clear()

    dist.teardown()


if __name__ == "__main__":
    stage.run(main, "compress")
