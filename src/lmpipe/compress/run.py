"""The compression procedure: unit importance, the distilled student, the pruned model and its
recovery, and the int8 model, each trained by the shared loop on the same corpus + teacher-sample
mix. Saving and scoring the variants are the stage's."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe.batches import Batch, Example, TokenWindows, split_parts
from lmpipe.checkpoints import CheckpointStore
from lmpipe.compress import quantize as q8
from lmpipe.compress.distill import DistillLoss, MixedBatches, build_student, teacher_examples
from lmpipe.compress.prune import Importance, magnitude_importance, prune, taylor_importance
from lmpipe.compress.score import val_metrics
from lmpipe.config import CompressParams
from lmpipe.data.tokenizer import read_tokens
from lmpipe.io import read_json, read_jsonl
from lmpipe.model import context_length
from lmpipe.tracking.tracker import RenamingTracker
from lmpipe.train import lm_loss_sum, train

KINDS = {"distilled": "distill", "pruned": "recovery"}
"""The variants the loop trains, and the name of their training run (checkpoints, curves)."""


@dataclass
class Corpus:
    """What the students train on: corpus windows and teacher samples, this process's slice."""

    tokens: np.ndarray
    window: int
    examples: Sequence[Example]
    batch_size: int  # per process
    sample_fraction: float
    pad_id: int
    rank: int = 0
    world: int = 1

    def batches(self, seed: int, split: bool = True) -> MixedBatches:
        """Each process's slice of every global batch (`split`), or the whole global batch."""
        size, rank, world = (
            (self.batch_size, self.rank, self.world)
            if split
            else (self.batch_size * self.world, 0, 1)
        )
        return MixedBatches(
            self.tokens,
            self.window,
            self.examples,
            size,
            self.sample_fraction,
            seed,
            self.pad_id,
            rank,
            world,
        )


@dataclass
class Compressed:
    variants: dict[str, torch.nn.Module] = field(default_factory=dict)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # each variant's report rows
    history: dict[int, dict[str, float]] = field(default_factory=dict)  # training curves by step

    def curves(self) -> list[dict[str, float]]:
        return [self.history[s] for s in sorted(self.history)]


def training_data(
    teacher: torch.nn.Module,
    template: Any,
    data: Path,
    cfg: CompressParams,
    seed: int,
    rank: int,
    world: int,
) -> tuple[Corpus, list[Batch], float]:
    """The students' corpus (train windows and one teacher sample for each of the first
    `cfg.teacher_samples` RL prompts that fit), the fixed val batches every model is measured
    on, and the seconds the teacher sampled for."""
    meta = read_json(data / "meta.json")
    context = context_length(teacher)
    window = min(cfg.window or context, context)  # a base's context can be thousands
    # every rank evaluates the whole global batch's worth: the val set of one process
    val = TokenWindows(
        read_tokens(data / "val.bin", meta["dtype"]), window, cfg.batch_size * world, 0
    ).fixed_batches(cfg.eval_batches)
    rows = read_jsonl(data / "prompts" / "rl.jsonl")
    _, ids = template.fitting_prompts(
        [r["prompt"] for r in rows], context, cfg.max_new_tokens, cfg.teacher_samples
    )
    t0 = time.perf_counter()
    # each process samples its share of the prompts and gathers the rest: one process's list
    examples = (
        teacher_examples(
            teacher,
            ids,
            max_new_tokens=cfg.max_new_tokens,
            eos_id=template.stop_ids,
            pad_id=template.pad_id,
            temperature=1.0,
            seed=seed,
        )
        if cfg.teacher_samples
        else []
    )
    seconds = time.perf_counter() - t0
    corpus = Corpus(
        read_tokens(data / "train.bin", meta["dtype"]),
        window,
        examples,
        cfg.batch_size,
        cfg.sample_fraction,
        template.pad_id,
        rank,
        world,
    )
    return corpus, val, seconds


def importance_of(
    teacher: torch.nn.Module, corpus: Corpus, cfg: CompressParams, seed: int
) -> Importance | None:
    """How much each MLP neuron and head matters, when pruning or a teacher-sliced student
    needs it: Taylor scores on calibration batches (the same on every rank), or magnitudes."""
    if not (cfg.prune or (cfg.distill and cfg.student_init == "teacher")):
        return None
    if cfg.prune_importance != "taylor":
        return magnitude_importance(teacher)
    calib = corpus.batches(seed + 7, split=False)
    draws = [calib.next_batch() for _ in range(cfg.calibration_batches)]
    return taylor_importance(teacher, [b for d in draws for b in split_parts(d)], lm_loss_sum)


def compress(
    teacher: torch.nn.Module,
    corpus: Corpus,
    val: Sequence[Batch],
    cfg: CompressParams,
    seed: int,
    tracker: Any,
    store: Callable[[str], CheckpointStore],
) -> Compressed:
    """The variants `cfg` switches on; `store(kind)` gives each training run its checkpoints."""
    out = Compressed()
    importance = importance_of(teacher, corpus, cfg, seed)
    kd = DistillLoss(teacher, cfg.kd_temperature, cfg.kd_alpha)

    def fit(model: torch.nn.Module, kind: str, seed: int) -> dict[str, float]:
        renamed = {"eval/loss": f"{kind}/eval_loss"}
        result = train(
            model,
            corpus.batches(seed),
            cfg.train_params(kind),
            val_batches=val,
            loss_sum=kd,
            tracker=RenamingTracker(tracker, renamed),
            checkpoints=store(kind),
            prefix=kind,
        )
        for row in result.history:
            merged = out.history.setdefault(row["step"], {"step": row["step"]})
            merged.update({renamed.get(k, k): v for k, v in row.items() if k != "step"})
        return {"train_seconds": result.train_seconds, "tokens_per_sec": result.tokens_per_sec}

    if cfg.distill:
        student = build_student(teacher, cfg, importance, seed)
        out.extra["distilled"] = {"init": cfg.student_init, **fit(student, "distill", seed)}
        out.variants["distilled"] = student
    if cfg.prune:
        pruned = prune(teacher, importance, cfg.prune_mlp, cfg.prune_heads)
        before = val_metrics(pruned, teacher, val)
        c = pruned.config
        out.extra["pruned"] = {
            "importance": cfg.prune_importance,
            "mlp_neurons": c.intermediate_size if c.model_type == "llama" else c.n_inner,
            "val_ppl_before_recovery": before["val_ppl"],
            "kl_to_teacher_before_recovery": before["kl_to_teacher"],
        }
        if cfg.recovery_steps:
            out.extra["pruned"].update(fit(pruned, "recovery", seed + 2))
        out.variants["pruned"] = pruned
    if cfg.quantize:
        out.variants["quantized"] = q8.quantize_int8(teacher, cfg.quantize_embeddings)
    return out
