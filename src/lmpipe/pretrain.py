"""Pretraining: the model it starts from (a fresh one of `model`'s shape, or the base model),
training on token windows or the base passed through as it is (`pretrain.max_steps: 0`), and
the report's figures next to the unigram and bigram baselines on the same val split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe import base as base_lib
from lmpipe.base import Base
from lmpipe.baselines import bigram_loss, unigram_loss
from lmpipe.batches import Batch
from lmpipe.checkpoints import CheckpointStore
from lmpipe.config import BaseParams, ModelParams, ParamsError, PretrainParams
from lmpipe.io import write_history_csv
from lmpipe.model import build_model, n_params
from lmpipe.precision import use_bf16
from lmpipe.tracking.tracker import NullTracker
from lmpipe.train import BatchSource, TrainResult, evaluate, train


def resolve_base(cfg: BaseParams, pcfg: PretrainParams) -> Base | None:
    """The base model pretraining continues (None: from scratch); ParamsError when
    `pretrain.max_steps: 0` would pass through a base that is not there."""
    base = base_lib.resolve(cfg)
    if base is None and pcfg.max_steps == 0:
        raise ParamsError(
            "pretrain.max_steps = 0 passes a base model through, but base.model is '' (from "
            "scratch): set pretrain.max_steps > 0 or name a base model"
        )
    return base


def start_model(
    base: Base | None, mcfg: ModelParams, meta: dict[str, Any], seed: int
) -> torch.nn.Module:
    """A fresh model of `mcfg`'s shape for the prepared data's vocabulary (`meta`), initialised
    from `seed`, or the base model; BaseError if the base has fewer embeddings than the
    tokenizer has tokens."""
    if base is None:
        return build_model(mcfg, meta["vocab_size"], meta["special_tokens"], seed)
    model = base_lib.load_model(base)
    if model.get_input_embeddings().num_embeddings < meta["vocab_size"]:
        raise base_lib.BaseError(
            f"base.model has {model.get_input_embeddings().num_embeddings} embeddings for "
            f"a tokenizer of {meta['vocab_size']} tokens: the tokenizer is not the model's"
        )
    return model


def fit(
    model: torch.nn.Module,
    source: BatchSource,
    val: Sequence[Batch],
    cfg: PretrainParams,
    tracker: NullTracker,
    store: CheckpointStore,
    plot_csv: Path,
    device: torch.device,
) -> TrainResult:
    """`train` for `pretrain.max_steps`, or with 0 steps the model as it is: its val loss, the
    one row of the per-step CSV, and no training."""
    if cfg.max_steps:
        return train(
            model,
            source,
            cfg,
            val_batches=val,
            tracker=tracker,
            checkpoints=store,
            plot_csv=plot_csv,
            prefix="train",
        )
    loss = evaluate(model, val, device, use_bf16(cfg.precision, device))
    write_history_csv(plot_csv, [{"step": 0, "eval/loss": loss}])
    return TrainResult(loss, 0.0, 0.0, 0, 0)


def report(
    result: TrainResult,
    model: torch.nn.Module,
    tokens: tuple[np.ndarray, np.ndarray],
    vocab_size: int,
    world: int,
    base_model: str | None,
) -> dict[str, Any]:
    """The stage's figures: val loss and perplexity, the baselines' losses on the same
    (train, val) `tokens`, speed and size; `base` names the base model when there is one."""
    train_tokens, val_tokens = tokens
    return {
        "val_loss": result.val_loss,
        "val_ppl": math.exp(result.val_loss),
        "baseline_unigram_loss": unigram_loss(train_tokens, val_tokens, vocab_size),
        "baseline_bigram_loss": bigram_loss(train_tokens, val_tokens, vocab_size),
        "tokens_per_sec": result.tokens_per_sec,
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "params": n_params(model),
        "world_size": world,
        **({"base": base_model} if base_model is not None else {}),
    }
