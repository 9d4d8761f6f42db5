"""Compress: distil, prune and quantize the RL policy; score every variant next to the teacher.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from lmpipe import dist, stage
from lmpipe.batches import split_parts
from lmpipe.chat import load_template
from lmpipe.compress import quantize as q8
from lmpipe.compress.distill import DistillLoss, MixedBatches, build_student, teacher_examples
from lmpipe.compress.prune import magnitude_importance, prune, taylor_importance
from lmpipe.compress.score import sample_scores, tokens_per_sec, val_metrics, val_metrics_many
from lmpipe.config import load_params
from lmpipe.data.tokenizer import read_tokens
from lmpipe.gold import make_gold
from lmpipe.io import atomic_dir, read_json, read_jsonl, write_json
from lmpipe.model import context_length, load_model, n_params, read_manifest, save_model
from lmpipe.reward.model import RewardModel
from lmpipe.tracking import NullTracker, RenamingTracker, model_card, stage_run
from lmpipe.train import (
    TokenWindows,
    checkpoint_store,
    lm_loss_sum,
    train,
    write_history_csv,
)

log = logging.getLogger("compress")


def main() -> None:
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
    args = ap.parse_args()

    params = load_params(args.params, ["compress", "tracking"])
    cfg = params.compress
    info, device = dist.setup(cfg.device)
    inputs = {"teacher": args.teacher, "sft": args.sft, "reward": args.reward, "data": args.data}
    pref = read_manifest(args.reward)["params"]["preference"]
    gold = make_gold(pref["gold"], keywords=pref.get("keywords", ()))

    run = stage_run("compress", params, params.tracking, inputs)
    with run if info.is_main else contextlib.nullcontext(NullTracker()) as tracker:
        template = load_template(args.data)
        pad, stops = template.pad_id, template.stop_ids
        meta = read_json(args.data / "meta.json")
        train_tokens = read_tokens(args.data / "train.bin", meta["dtype"])
        val_tokens = read_tokens(args.data / "val.bin", meta["dtype"])
        teacher = load_model(args.teacher, device).requires_grad_(False)
        context = context_length(teacher)
        window = min(cfg.window or context, context)  # a base's context can be thousands
        # every rank evaluates the whole global batch's worth: the val set of one process
        val = TokenWindows(val_tokens, window, cfg.batch_size * info.world, 0).fixed_batches(
            cfg.eval_batches
        )

        def fitting(rows: list[dict], limit: int) -> tuple[list[str], list[list[int]]]:
            pairs = [(r["prompt"], template.prompt_ids(r["prompt"])) for r in rows]
            pairs = [(t, p) for t, p in pairs if len(p) + cfg.max_new_tokens <= context][:limit]
            return [t for t, _ in pairs], [p for _, p in pairs]

        gen = torch.Generator(device=device).manual_seed(params.seed)
        _, rl_prompts = fitting(read_jsonl(args.data / "prompts" / "rl.jsonl"), cfg.teacher_samples)
        t0 = time.perf_counter()
        # every process draws the same teacher samples (same seed); training is what is split
        examples = teacher_examples(
            teacher, rl_prompts, max_new_tokens=cfg.max_new_tokens, eos_id=stops,
            pad_id=pad, temperature=1.0, generator=gen,
        ) if cfg.teacher_samples else []  # fmt: skip
        sample_seconds = time.perf_counter() - t0

        def batches(seed: int, split: bool = True) -> MixedBatches:
            """Each process's slice of every global batch (`split`), or the whole global batch."""
            size, rank, world = (
                (cfg.batch_size, info.rank, info.world) if split
                else (cfg.batch_size * info.world, 0, 1)
            )  # fmt: skip
            return MixedBatches(
                train_tokens, window, examples, size, cfg.sample_fraction, seed, pad, rank, world,
            )  # fmt: skip

        importance = None
        if cfg.prune or (cfg.distill and cfg.student_init == "teacher"):
            if cfg.prune_importance == "taylor":
                calib = batches(params.seed + 7, split=False)  # the same pruning on every rank
                draws = [calib.next_batch() for _ in range(cfg.calibration_batches)]
                calibration = [b for d in draws for b in split_parts(d)]
                importance = taylor_importance(teacher, calibration, lm_loss_sum)
            else:
                importance = magnitude_importance(teacher)

        key = stage.checkpoint_key(params, inputs)
        kd = DistillLoss(teacher, cfg.kd_temperature, cfg.kd_alpha)
        history: dict[int, dict[str, float]] = {}

        def fit(model, kind: str, seed: int) -> dict[str, float]:
            train_cfg = cfg.train_params(kind)
            renamed = {"eval/loss": f"{kind}/eval_loss"}
            result = train(
                model, batches(seed), train_cfg, val_batches=val, loss_sum=kd,
                tracker=RenamingTracker(tracker, renamed),
                checkpoints=checkpoint_store(args.cache, f"compress-{kind}", key), prefix=kind,
            )  # fmt: skip
            for row in result.history:
                merged = history.setdefault(row["step"], {"step": row["step"]})
                merged.update({renamed.get(k, k): v for k, v in row.items() if k != "step"})
            return {"train_seconds": result.train_seconds, "tokens_per_sec": result.tokens_per_sec}

        variants: dict[str, torch.nn.Module] = {}
        extra: dict[str, dict] = {}
        if cfg.distill:
            student = build_student(teacher, cfg, importance, params.seed)
            extra["distilled"] = {"init": cfg.student_init, **fit(student, "distill", params.seed)}
            variants["distilled"] = student
        if cfg.prune:
            pruned = prune(teacher, importance, cfg.prune_mlp, cfg.prune_heads)
            before = val_metrics(pruned, teacher, val)
            extra["pruned"] = {
                "importance": cfg.prune_importance,
                "mlp_neurons": pruned.config.intermediate_size
                if pruned.config.model_type == "llama" else pruned.config.n_inner,
                "val_ppl_before_recovery": before["val_ppl"],
                "kl_to_teacher_before_recovery": before["kl_to_teacher"],
            }  # fmt: skip
            if cfg.recovery_steps:
                extra["pruned"].update(fit(pruned, "recovery", params.seed + 2))
            variants["pruned"] = pruned
        if cfg.quantize:
            variants["quantized"] = q8.quantize_int8(teacher, cfg.quantize_embeddings)
        if not info.is_main:  # saving, scoring and outputs are rank 0's
            dist.teardown()
            return
        write_history_csv(args.plots, [history[s] for s in sorted(history)])

        with atomic_dir(args.out) as tmp:
            for name, model in variants.items():
                kind = {"distilled": "distill", "pruned": "recovery"}.get(name)
                run_key = checkpoint_store(args.cache, f"compress-{kind}", key).directory.name
                man = stage.manifest(
                    "compress", params, tracker.tags, {}, run_key if kind else None
                )
                man["variant"], man["teacher"] = name, str(args.teacher)
                if name == "quantized":
                    man["quantization"] = q8.describe(cfg.quantize_embeddings)
                    q8.save_quantized(model, tmp / name, args.data, man)
                else:
                    save_model(model, tmp / name, args.data, man)

        # ---- score the teacher, the SFT model and every variant the same way
        rm = RewardModel.load(args.reward, device)
        eval_text, eval_ids = fitting(
            read_jsonl(args.data / "prompts" / "eval.jsonl"), cfg.eval_prompts
        )

        def decode(resp: list[int]) -> str:  # the assistant text only
            return template.decode(resp)

        def score_fn(prompts, responses):
            return rm.score_ids([[*p, *r] for p, r in zip(prompts, responses, strict=True)])

        rows, samples = {}, {}
        folders = {"teacher": args.teacher, "sft": args.sft}
        folders.update({name: args.out / name for name in variants})
        models = {  # as saved; the teacher is the one loaded from its folder above
            name: teacher
            if name == "teacher"
            else load_model(folder, "cpu" if name == "quantized" else device)
            for name, folder in folders.items()
        }
        vals = val_metrics_many(models, teacher, val)
        for name, folder in folders.items():
            model = models[name]
            row = {"params": n_params(model), "size_mb": q8.weight_bytes(folder) / 1e6}
            if name == "quantized":  # the untied int8 head is a second copy of the embedding
                row["stored_params"], row["params"] = row["params"], n_params(teacher)
            row.update(vals[name])
            scores, samples[name] = sample_scores(
                model, eval_ids, eval_text, cfg.eval_samples, score_fn, gold, decode,
                max_new_tokens=cfg.max_new_tokens, eos_id=stops, pad_id=pad,
                seed=params.seed + 3,
            )  # fmt: skip
            row.update(scores)
            for b in (1, 8):
                row[f"tokens_per_sec_b{b}"] = tokens_per_sec(
                    model, eval_ids, batch_size=b, new_tokens=cfg.speed_new_tokens, pad_id=pad
                )
            rows[name] = {**row, **extra.get(name, {})}
            log.info(
                "%-9s %8d params %6.2f MB  ppl %.2f  KL %.4f  gold %.3f  proxy %.2f  %.0f tok/s",
                name, row["params"], row["size_mb"], row["val_ppl"], row["kl_to_teacher"],
                row["gold_reward"], row["proxy_reward"], row["tokens_per_sec_b8"],
            )  # fmt: skip

        report = summarize(rows, sample_seconds, len(examples), str(device))
        report["world_size"] = info.world
        tracker.log_text(
            "\n\n".join(
                f"PROMPT: {eval_text[i // cfg.eval_samples]}\n"
                + "\n".join(f"{n.upper()}: {samples[n][i]}" for n in samples)
                for i in range(0, len(samples["teacher"]), cfg.eval_samples)
            ),
            "samples.txt",
        )
        tracker.log_outputs({"models": args.out})
        if params.tracking.log_models:
            keys = ("val_ppl", "kl_to_teacher", "gold_reward", "proxy_reward", "size_mb")
            for name in variants:
                card = model_card(f"compress ({name})", rows[name], keys)
                stage.log_model(
                    tracker, args.out / name, name, "policy", f"lmpipe-{name}-torch", card
                )
        tracker.log_report(report, "reports/compress.json")
        write_json(args.report, report)
        for kind in ("distill", "recovery"):
            checkpoint_store(args.cache, f"compress-{kind}", key).clear()

    dist.teardown()


def summarize(rows: dict[str, dict], sample_seconds: float, n_samples: int, device: str) -> dict:
    """compress.json: the teacher and SFT rows, one row per variant, the targets' figures."""
    t, s = rows["teacher"], rows["sft"]
    variants = {k: v for k, v in rows.items() if k not in ("teacher", "sft")}
    gain = t["gold_reward"] - s["gold_reward"]
    for v in variants.values():
        v["params_ratio"] = v["params"] / t["params"]
        v["size_ratio"] = v["size_mb"] / t["size_mb"]
        v["val_ppl_ratio"] = v["val_ppl"] / t["val_ppl"]
        v["gold_gain_retained"] = (v["gold_reward"] - s["gold_reward"]) / gain if gain else math.nan
        v["speedup_b1"] = v["tokens_per_sec_b1"] / t["tokens_per_sec_b1"]
        v["speedup_b8"] = v["tokens_per_sec_b8"] / t["tokens_per_sec_b8"]
    return {
        "teacher": t,
        "sft": s,
        "variants": variants,
        "teacher_samples": n_samples,
        "teacher_sample_seconds": sample_seconds,
        "device": device,
    }


if __name__ == "__main__":
    stage.run(main, "compress")
