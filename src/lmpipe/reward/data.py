"""Preference data for training: pairs encoded in the template, grouped by prompt, batched, and
split into train and val by prompt; the JSONL file source."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe.batches import PairBatches
from lmpipe.chat import ChatTemplate
from lmpipe.data.sources import DataError, iter_jsonl
from lmpipe.reward.model import encode_for_reward
from lmpipe.reward.scoring import right_pad


@dataclass(frozen=True)
class PreferenceExample:
    chosen: list[int]
    rejected: list[int]


@dataclass(frozen=True)
class PreferenceGroup:
    """Labelled pairs over distinct sequences: (chosen, rejected) indices into `seqs`. A batch
    of groups scores each sequence once however many of its pairs it holds.

    `reward.batching: prompt` (the default) makes one group per prompt (`group_pairs`): k
    samples give up to k(k−1)/2 pairs for k forward passes instead of k(k−1), and all
    comparisons of a prompt enter one gradient step together, as InstructGPT trains its reward
    model (Ouyang et al. 2022). `reward.batching: pair` makes one group per pair (`of_pair`)."""

    seqs: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def of_pair(cls, example: PreferenceExample) -> PreferenceGroup:
        return cls((tuple(example.chosen), tuple(example.rejected)), ((0, 1),))


def group_pairs(
    examples: Sequence[PreferenceExample], keys: Sequence[str]
) -> list[PreferenceGroup]:
    """Pairs with the same key (their prompt) into one group, identical sequences merged;
    groups in order of first appearance."""
    seqs: dict[str, dict[tuple[int, ...], int]] = {}
    pairs: dict[str, list[tuple[int, int]]] = {}
    for e, key in zip(examples, keys, strict=True):
        index = seqs.setdefault(key, {})
        c = index.setdefault(tuple(e.chosen), len(index))
        r = index.setdefault(tuple(e.rejected), len(index))
        pairs.setdefault(key, []).append((c, r))
    return [PreferenceGroup(tuple(seqs[k]), tuple(pairs[k])) for k in seqs]


def encode_pairs(
    template: ChatTemplate, rows: Sequence[dict[str, Any]], context: int
) -> dict[str, list[tuple[PreferenceExample, dict[str, Any]]]]:
    """Rows with `prompt`, `chosen`, `rejected` and `split` (train/val), encoded; a pair whose
    chosen or rejected sequence does not fit the context is left out."""
    out: dict[str, list[tuple[PreferenceExample, dict[str, Any]]]] = {"train": [], "val": []}
    cache: dict[tuple[str, str], list[int] | None] = {}  # k samples make k(k-1)/2 pairs

    def encode(prompt: str, response: str) -> list[int] | None:
        key = (prompt, response)
        if key not in cache:
            cache[key] = encode_for_reward(template, prompt, response, context)
        return cache[key]

    for p in rows:
        c = encode(p["prompt"], p["chosen"])
        r = encode(p["prompt"], p["rejected"])
        if c and r:
            out[p["split"]].append((PreferenceExample(c, r), p))
    return out


def preference_groups(
    encoded: Sequence[tuple[PreferenceExample, dict[str, Any]]], batching: str
) -> list[PreferenceGroup]:
    """`encode_pairs` output of one split as training examples: one group per prompt
    (`batching: prompt`) or per pair (`pair`)."""
    if batching == "prompt":
        return group_pairs([e for e, _ in encoded], [p["prompt"] for _, p in encoded])
    if batching == "pair":
        return [PreferenceGroup.of_pair(e) for e, _ in encoded]
    raise ValueError(f"reward.batching {batching!r} is not 'pair' or 'prompt'")


@dataclass
class PreferenceBatch:
    """Distinct sequences, right-padded to one width, and each pair's (chosen, rejected) rows."""

    input_ids: torch.Tensor
    chosen: torch.Tensor  # (P,) row of each pair's chosen sequence
    rejected: torch.Tensor  # (P,)
    lengths: torch.Tensor  # (B,) tokens of each row before its padding

    @property
    def n_targets(self) -> int:  # the loop divides the summed loss by this: pairs
        return int(self.chosen.numel())

    def to(self, device: torch.device) -> PreferenceBatch:
        nb = device.type == "cuda"
        return PreferenceBatch(
            *(
                t.to(device, non_blocking=nb)
                for t in (self.input_ids, self.chosen, self.rejected, self.lengths)
            )
        )


def collate_preferences(groups: Sequence[PreferenceGroup], pad_id: int) -> PreferenceBatch:
    seqs: list[Sequence[int]] = []
    chosen, rejected = [], []
    for g in groups:
        chosen += [len(seqs) + c for c, _ in g.pairs]
        rejected += [len(seqs) + r for _, r in g.pairs]
        seqs += g.seqs
    lengths = torch.tensor([len(s) for s in seqs])
    return PreferenceBatch(
        right_pad(seqs, pad_id), torch.tensor(chosen), torch.tensor(rejected), lengths
    )


class PreferenceBatches(PairBatches):
    """Seeded epochs over preference groups, `batch_size` groups a micro-batch (same sampler,
    state and rank slicing as SFT)."""

    def collate(self, groups: Sequence[PreferenceGroup]) -> PreferenceBatch:
        return collate_preferences(groups, self.pad_id)


def read_preference_file(path: str | Path) -> list[dict[str, str]]:
    """A JSONL of `prompt`, `chosen`, `rejected` strings; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference.path {path} does not exist; point it at a JSONL file")
    rows = list(
        iter_jsonl(
            path.read_text(encoding="utf-8"),
            str(path),
            ("prompt", "chosen", "rejected"),
            "preference.path",
        )
    )
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} preference rows; at least 2 are needed")
    return rows


def val_prompts(prompts: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded share of the distinct prompts, held out (pairs are split by prompt, so no
    prompt is in both train and val)."""
    distinct = sorted(set(prompts))
    n_val = max(1, round(fraction * len(distinct)))
    if n_val >= len(distinct):
        raise DataError(
            f"{len(distinct)} distinct prompts cannot be split with val_fraction {fraction}; "
            "add prompts or lower preference.val_fraction"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    return {distinct[i] for i in order[:n_val]}
