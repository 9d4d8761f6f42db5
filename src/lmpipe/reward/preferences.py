"""Preference pairs for the reward stage: SFT samples labelled by the gold scorer, or a JSONL."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe.chat import ChatTemplate
from lmpipe.config import PreferenceParams
from lmpipe.data.sources import DataError
from lmpipe.io import atomic_dir, write_json, write_jsonl
from lmpipe.model import context_length, load_model
from lmpipe.precision import use_bf16
from lmpipe.reward.data import PreferenceExample, encode_pairs, read_preference_file, val_prompts
from lmpipe.reward.labels import label_pairs
from lmpipe.sampling import sample_responses

log = logging.getLogger(__name__)


def sample_and_label(
    model: torch.nn.Module,
    template: ChatTemplate,
    prompts: Sequence[str],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    gold,
    tau: float,
    seed: int,
    batch_size: int = 256,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """k ancestral samples per prompt, scored by `gold`, every pair labelled by the noisy
    Bradley–Terry labeller. Under torchrun every rank calls it: each samples its share of the
    prompts and gets every sample. Responses cut at the length limit (no EOS) and duplicates
    are left out of pairs: RL never asks the reward model about a response without EOS.

    Returns (samples, pairs); pairs carry the texts, both gold scores and the labeller's p.
    """
    repeated = [p for p in prompts for _ in range(k)]
    samples = sample_responses(
        model, template, repeated, max_new_tokens, temperature, seed, batch_size, split_groups=k
    )
    ended = [s for s in samples if s["ended_with_eos"]]
    scores = gold([s["prompt"] for s in ended], [s["response"] for s in ended])
    for s, g in zip(ended, scores, strict=True):
        s["gold"] = float(g)
    rng = np.random.default_rng(seed)
    pairs: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        group, seen = [], set()
        for s in samples[i * k : (i + 1) * k]:
            if s["ended_with_eos"] and s["response"] not in seen:
                seen.add(s["response"])
                group.append(s)
        for lab in label_pairs([s["gold"] for s in group], tau, rng):
            c, r = group[lab["chosen"]], group[lab["rejected"]]
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": c["response"],
                    "rejected": r["response"],
                    "gold_chosen": c["gold"],
                    "gold_rejected": r["gold"],
                    "p_chosen": lab["p_chosen"],
                }
            )
    return samples, pairs


@dataclass
class Preferences:
    """The stage's labelled pairs, each with its `split`, and those that fit the context,
    encoded per split."""

    pairs: list[dict[str, Any]]
    encoded: dict[str, list[tuple[PreferenceExample, dict[str, Any]]]]
    context: int  # the SFT model's context: the reward model's too
    stats: dict[str, Any]  # how the samples were drawn (gold source only)
    seconds: float  # sampling and labelling

    @property
    def counts(self) -> dict[str, int]:
        return {s: len(v) for s, v in self.encoded.items()}


def labelled_samples(
    sft: torch.nn.Module,
    template: ChatTemplate,
    prompts: Sequence[str],
    pcfg: PreferenceParams,
    gold: Callable,
    seed: int,
    bf16: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`sample_and_label` on the first `preference.prompts` prompts (all of them, with a
    warning, where there are fewer), in bf16 if `bf16`; the pairs and how the samples came
    out. Each process samples its share of the prompts and gathers the rest: the pairs, and so
    the training data, are those of one process."""
    used = list(prompts[: pcfg.prompts])
    if len(used) < pcfg.prompts:
        log.warning(
            "preference.prompts = %d, but the prepared data holds %d RL prompts: sampling for "
            "all of them. More come from the training documents with a larger "
            "data.rl_prompts_min (and data.rl_prompts)",
            pcfg.prompts,
            len(used),
        )
    samples, pairs = sample_and_label(
        sft.to(torch.bfloat16) if bf16 else sft,
        template,
        used,
        k=pcfg.samples_per_prompt,
        max_new_tokens=pcfg.max_new_tokens,
        temperature=pcfg.temperature,
        gold=gold,
        tau=pcfg.tau,
        seed=seed,
        batch_size=pcfg.batch_size,
    )
    if not pairs:
        raise DataError(
            f"no preference pairs: of {len(samples)} samples, "
            f"{sum(x['ended_with_eos'] for x in samples)} ended with EOS within "
            f"preference.max_new_tokens = {pcfg.max_new_tokens}, and a pair needs two "
            "distinct ones for a prompt. Raise preference.max_new_tokens or "
            "samples_per_prompt, or train SFT longer so the model learns to stop"
        )
    return pairs, {
        "prompts": len(used),
        "samples": len(samples),
        "sample_precision": "bf16" if bf16 else "fp32",
        "samples_eos_rate": float(np.mean([s["ended_with_eos"] for s in samples])),
    }


def file_pairs(path: str | Path, gold: Callable) -> list[dict[str, Any]]:
    """`read_preference_file` rows with the gold scores of their texts, for analysis."""
    pairs = read_preference_file(path)
    for p in pairs:
        p["gold_chosen"], p["gold_rejected"] = gold(
            [p["prompt"]] * 2, [p["chosen"], p["rejected"]]
        ).tolist()
    return pairs


def collect_preferences(
    sft_dir: str | Path,
    template: ChatTemplate,
    prompts: Sequence[str],
    pcfg: PreferenceParams,
    gold: Callable,
    *,
    seed: int,
    precision: str,
    device: torch.device,
) -> Preferences:
    """The pairs of `preference.source` (SFT samples for `prompts`, or the file), split into
    train and val by prompt and encoded for the SFT model's context."""
    sft = load_model(sft_dir, device)
    t0 = time.perf_counter()
    if pcfg.source == "gold":
        # the reward model's precision when preference.precision is auto; bf16 weights sample
        # faster on a CPU with AVX512-BF16 (bench/sampling_throughput.py)
        bf16 = use_bf16(pcfg.precision if pcfg.precision != "auto" else precision, device)
        pairs, stats = labelled_samples(sft, template, prompts, pcfg, gold, seed, bf16)
    else:
        pairs, stats = file_pairs(pcfg.path, gold), {}
    seconds = time.perf_counter() - t0
    held_out = val_prompts([p["prompt"] for p in pairs], pcfg.val_fraction, seed)
    for p in pairs:
        p["split"] = "val" if p["prompt"] in held_out else "train"

    context = context_length(sft)
    encoded = encode_pairs(template, pairs, context)
    if not encoded["train"] or not encoded["val"]:
        raise DataError(
            f"{len(encoded['train'])} train and {len(encoded['val'])} val pairs fit the "
            f"context of {context} tokens; more prompts or shorter responses are needed"
        )
    return Preferences(pairs, encoded, context, stats, seconds)


def write_pairs(directory: str | Path, prefs: Preferences, pcfg: PreferenceParams) -> None:
    """`pairs.jsonl` (every pair, with its split) and `meta.json` (source, labeller, counts)."""
    with atomic_dir(directory) as tmp:
        write_jsonl(tmp / "pairs.jsonl", prefs.pairs)
        write_json(
            tmp / "meta.json",
            {
                "source": pcfg.source,
                "gold": pcfg.gold,
                "tau": pcfg.tau,
                "pairs": prefs.counts,
                **prefs.stats,
            },
        )
