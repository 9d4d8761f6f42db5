"""The compress stage's report: the teacher, the SFT model and every variant measured alike — val
perplexity and KL to the teacher on the same windows, the report card's sampling and judging
(`lmpipe.evaluate.card`), generation speed and size — and each variant's ratios to the teacher."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmpipe.batches import Batch
from lmpipe.compress import quantize as q8
from lmpipe.compress.score import val_metrics_many
from lmpipe.evaluate.card import Judge, PromptSet, sample_and_judge, sample_summary
from lmpipe.evaluate.engines import TorchEngine
from lmpipe.model import load_model, n_params

log = logging.getLogger("compress")
SPEED_BATCHES = (1, 8)


def score_models(
    folders: Mapping[str, Path],
    teacher: torch.nn.Module,
    val: Sequence[Batch],
    prompts: PromptSet,
    judge: Judge,
    cfg: Any,
    seed: int,
    device: str,
    template: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """One row per model folder (`teacher` is the loaded teacher, the others load from their
    folders; the int8 model on the CPU) and each model's sample texts. `cfg`: the compress
    params (`max_new_tokens`, `speed_new_tokens`)."""
    models = {
        name: teacher
        if name == "teacher"
        else load_model(folder, "cpu" if name == "quantized" else device)
        for name, folder in folders.items()
    }
    vals = val_metrics_many(models, teacher, val)
    rows, texts = {}, {}
    for name, folder in folders.items():
        model = models[name]
        dev = str(next(model.parameters()).device)
        engine = TorchEngine(
            name,
            folder,
            template.end_of_turn_id,
            template.pad_id,
            dev,
            template.stop_ids,
            model=model,
        )
        row = {"params": n_params(model), "size_mb": q8.weight_bytes(folder) / 1e6}
        if name == "quantized":  # the untied int8 head is a second copy of the embedding
            row["stored_params"], row["params"] = row["params"], n_params(teacher)
        row.update(vals[name])
        scored = sample_and_judge(engine, prompts, judge, cfg.max_new_tokens, seed)
        row.update(sample_summary(scored))
        texts[name] = scored.texts
        for b in SPEED_BATCHES:
            speed = engine.speed(prompts.ids[0], b, cfg.speed_new_tokens)
            row[f"tokens_per_sec_b{b}"] = speed["tokens_per_sec"]
        rows[name] = row
        log.info(
            "%-9s %8d params %6.2f MB  ppl %.2f  KL %.4f  gold %.3f  proxy %.2f  %.0f tok/s",
            name,
            row["params"],
            row["size_mb"],
            row["val_ppl"],
            row["kl_to_teacher"],
            row["gold_reward"],
            row["proxy_reward"] or math.nan,
            row["tokens_per_sec_b8"],
        )
    return rows, texts


def summarize(rows: dict[str, dict], sample_seconds: float, n_samples: int, device: str) -> dict:
    """compress.json: the teacher and SFT rows, one row per variant with its ratios to the
    teacher and the share of RL's gold gain over SFT it keeps."""
    t, s = rows["teacher"], rows["sft"]
    variants = {k: v for k, v in rows.items() if k not in ("teacher", "sft")}
    gain = t["gold_reward"] - s["gold_reward"]
    for v in variants.values():
        v["params_ratio"] = v["params"] / t["params"]
        v["size_ratio"] = v["size_mb"] / t["size_mb"]
        v["val_ppl_ratio"] = v["val_ppl"] / t["val_ppl"]
        v["gold_gain_retained"] = (v["gold_reward"] - s["gold_reward"]) / gain if gain else math.nan
        for b in SPEED_BATCHES:
            v[f"speedup_b{b}"] = v[f"tokens_per_sec_b{b}"] / t[f"tokens_per_sec_b{b}"]
    return {
        "teacher": t,
        "sft": s,
        "variants": variants,
        "teacher_samples": n_samples,
        "teacher_sample_seconds": sample_seconds,
        "device": device,
    }


def side_by_side_text(prompts: PromptSet, texts: Mapping[str, list[str]]) -> str:
    """Every model's first sample of each prompt, one block a prompt (the run's samples.txt)."""
    return "\n\n".join(
        f"PROMPT: {prompts.texts[i // prompts.n]}\n"
        + "\n".join(f"{n.upper()}: {texts[n][i]}" for n in texts)
        for i in range(0, len(next(iter(texts.values()))), prompts.n)
    )
