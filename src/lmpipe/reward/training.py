"""The Bradley–Terry objective and the reward model's training run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lmpipe.config import RewardParams
from lmpipe.reward.data import (
    PreferenceBatch,
    PreferenceBatches,
    PreferenceExample,
    preference_groups,
)
from lmpipe.reward.scoring import sequence_scores
from lmpipe.train import TrainResult, train


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected − margin) (softplus form: stable for any gap)."""
    return F.softplus(-(r_chosen - r_rejected - margin))


Offset = Callable[[PreferenceBatch], torch.Tensor]
"""A fixed score added to the model's for each row of a batch (another model's, say): the model
then learns the residual of that score."""


def preference_loss_sum(margin: float = 0.0, offset: Offset | None = None):
    """`loss_sum(model, batch)` for the training loop: summed Bradley–Terry loss of a batch, of
    the model's scores plus `offset`'s where one is given."""

    def loss_sum(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        r = sequence_scores(model, batch.input_ids, lengths=batch.lengths)
        if offset is not None:
            r = r.float() + offset(batch).to(r.device, torch.float32)
        return bradley_terry_loss(r[batch.chosen], r[batch.rejected], margin).sum()

    return loss_sum


def train_reward_model(
    model: torch.nn.Module,
    encoded: dict[str, list[tuple[PreferenceExample, dict[str, Any]]]],
    cfg: RewardParams,
    seed: int,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
    offset: Offset | None = None,
    **train_kw: Any,
) -> TrainResult:
    """`lmpipe.train.train` on the encoded train pairs, grouped by `reward.batching`, with the
    summed Bradley–Terry loss (of the scores plus `offset`'s, where given) and the first
    `eval_batches` val batches; `train_kw` goes to it (tracker, checkpoints, plot_csv,
    prefix)."""
    train_groups = preference_groups(encoded["train"], cfg.batching)
    val_groups = preference_groups(encoded["val"], cfg.batching)
    # under torchrun each process takes its slice of every global batch (batch_size each)
    source = PreferenceBatches(train_groups, cfg.batch_size, seed, pad_id, rank, world)
    # every rank evaluates the whole global batch's worth: the val set of one process
    val = PreferenceBatches(val_groups, cfg.batch_size * world, 0, pad_id).fixed_batches(
        cfg.eval_batches
    )
    return train(
        model,
        source,
        cfg,
        val_batches=val,
        loss_sum=preference_loss_sum(cfg.margin, offset),
        **train_kw,
    )
