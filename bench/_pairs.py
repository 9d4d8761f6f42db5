"""The last reward run's preference pairs, encoded as the reward stage encodes them: what the
benches that retrain the reward model on them start from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lmpipe.chat import ChatTemplate, load_template
from lmpipe.config import RewardParams, load_params
from lmpipe.io import read_jsonl
from lmpipe.model import context_length, load_model


@dataclass
class StagePairs:
    sft: str  # the SFT model folder the reward model is built on
    seed: int
    cfg: RewardParams  # the stage's reward.* params, checkpoints off
    template: ChatTemplate
    marker: int | None  # the token that starts the answer (build_reward_model's argument)
    marker_last: bool
    context: int
    encoded: dict[str, list[tuple[Any, dict[str, Any]]]]  # encode_pairs' train and val


def add_pairs_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sft", default="models/sft")
    ap.add_argument("--pairs", default="data/preferences/pairs.jsonl")


def load_pairs(args: argparse.Namespace) -> StagePairs:
    """`--params`, `--sft` and `--pairs` read, the pairs encoded in the SFT model's template."""
    from lmpipe.reward.data import encode_pairs

    params = load_params(args.params, ["reward"])
    template = load_template(args.sft)
    marker, last = template.response_marker or (None, False)
    context = context_length(load_model(args.sft))
    return StagePairs(
        args.sft,
        params.seed,
        params.reward.model_copy(update={"checkpoint_every": 0}),
        template,
        marker,
        last,
        context,
        encode_pairs(template, read_jsonl(args.pairs), context),
    )
