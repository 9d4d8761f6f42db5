"""The reward model: the SFT backbone with a fresh scalar head, the text it reads, and the
normalised scorer (gain·r + bias) that RL and evaluation load."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from lmpipe.chat import ChatTemplate, load_template
from lmpipe.model import attention_for, context_length, read_manifest
from lmpipe.reward.scoring import raw_scores


def encode_for_reward(
    template: ChatTemplate, prompt: str, response: str, context: int
) -> list[int] | None:
    """The prompt, the answer and its end-of-turn token in the template (plain: `BOS PROMPT
    prompt RESPONSE response EOS`), or None when it does not fit the context."""
    ids = template.pair(prompt, response)[0]
    return ids if len(ids) <= context else None


POOLINGS = ("last", "mean", "sum")


def build_reward_model(
    sft_dir: str | Path,
    seed: int,
    pooling: str = "last",
    response_token_id: int | None = None,
    marker_last: bool = False,
) -> PreTrainedModel:
    """The SFT backbone with a fresh scalar head, N(0, 1/(d+1)) as in Ziegler et al.; dropout
    off (eval-mode numerics in training too). `pooling` (see `scoring.sequence_scores`) is
    written to the config, so it is saved with the model, with the token that starts the answer
    (`ChatTemplate.response_marker`: the id, and whether its last occurrence counts; default:
    from the folder's template)."""
    if pooling not in POOLINGS:
        raise ValueError(f"reward pooling {pooling!r} is not one of {POOLINGS}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # transformers reports the new head as a MISSING weight to train "on your downstream task":
    # the head is new on purpose and initialised below, so the warning would only mislead
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):  # one seeded stream: loading, then the head
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(sft_dir),
                num_labels=1,
                attn_implementation=attention_for(),
                use_safetensors=True,
            )
            head = model.score
            torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    finally:
        hf_logging.set_verbosity(verbosity)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
    model.config.lmpipe_reward_pooling = pooling
    if response_token_id is None and pooling != "last":
        marker = load_template(sft_dir).response_marker
        response_token_id, marker_last = marker if marker else (None, False)
    if response_token_id is not None:  # mean/sum pooling and prompt sharing read it
        model.config.lmpipe_response_token_id = response_token_id
        model.config.lmpipe_response_marker_last = marker_last
    return model


def fit_normalisation(raw: np.ndarray) -> dict[str, float]:
    """gain, bias with gain·raw + bias of mean 0 and std 1 on `raw`."""
    raw = np.asarray(raw, dtype=np.float64)
    std = float(raw.std())
    if raw.size < 2 or not math.isfinite(std) or std < 1e-8:
        raise ValueError(
            f"cannot normalise the reward: {raw.size} scores with std {std:.3g}; "
            "the reward model gives (nearly) one score to everything — train longer or check "
            "the preference labels"
        )
    return {"gain": 1.0 / std, "bias": -float(raw.mean()) / std}


@dataclass
class RewardModel:
    """A trained reward model with its normalisation: what RL and evaluation call."""

    model: PreTrainedModel
    template: ChatTemplate
    gain: float
    bias: float

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        manifest = read_manifest(directory)
        norm = manifest.get("normalization")
        if not norm:
            raise FileNotFoundError(
                f"{directory} has no reward normalisation in lmpipe.json; rerun the reward stage"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            str(directory), attn_implementation=attention_for(device), use_safetensors=True
        )
        template = load_template(directory)
        return cls(model.to(device).eval(), template, norm["gain"], norm["bias"])

    @property
    def pad_id(self) -> int:
        return self.template.pad_id

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 128) -> np.ndarray:
        """Normalised scores of token sequences in the template (ending in EOS)."""
        return self.gain * raw_scores(self.model, seqs, self.pad_id, batch_size) + self.bias

    def score_text(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        ctx = context_length(self.model)
        seqs = []
        for p, r in zip(prompts, responses, strict=True):
            ids = encode_for_reward(self.template, p, r, 10**9)
            seqs.append(ids[-ctx:])  # a too-long text is judged on its end
        return self.score_ids(seqs)
