"""SFT: pairs and conversations in the chat template as examples with loss on the answers only
(batched by `lmpipe.batches.PairBatches`).

A pair is rendered as the prompt with the generation prompt (`ChatTemplate.prompt_ids`), then
the answer and the end-of-turn token; with lmpipe's plain template that is
`BOS PROMPT <prompt> RESPONSE <response> EOS`. Labels are IGNORE on the prompt, the template's
markers and padding; the answer's tokens and its end-of-turn token carry the loss, so the model
learns what to say and when to stop.

For the sft stage: the prepared data's pairs as examples, samples of the eval prompts after
training, and the report's figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmpipe.batches import Example, example
from lmpipe.chat import ChatTemplate
from lmpipe.config import SftParams
from lmpipe.io import read_jsonl
from lmpipe.model import n_params
from lmpipe.sampling import sample_responses
from lmpipe.train import TrainResult


def prompt_ids(template: ChatTemplate, prompt: str) -> list[int]:
    """Token ids of a prompt in the template, ending with the generation prompt."""
    return template.prompt_ids(prompt)


def encode_pair(template: ChatTemplate, prompt: str, response: str, context: int) -> Example | None:
    """One training example, or None when the prompt alone does not fit the context."""
    return example(*template.pair(prompt, response), context)


def encode_row(template: ChatTemplate, row: dict, context: int) -> Example | None:
    """A `{"prompt", "response"}` pair or a `{"messages": [...]}` conversation (loss on every
    assistant turn)."""
    if "messages" in row:
        return example(*template.conversation(row["messages"]), context)
    return encode_pair(template, row["prompt"], row["response"], context)


def encode_pairs(template: ChatTemplate, pairs: Sequence[dict], context: int) -> list[Example]:
    out = [e for p in pairs if (e := encode_row(template, p, context))]
    if not out:
        raise ValueError(f"no SFT pair fits model.context = {context}; raise it or shorten pairs")
    return out


def read_examples(
    template: ChatTemplate, data: Path, context: int
) -> tuple[list[Example], list[Example]]:
    """The prepared data's train and val pairs (`sft/train.jsonl`, `sft/val.jsonl`) encoded
    for a model of `context` tokens."""
    train = encode_pairs(template, read_jsonl(data / "sft" / "train.jsonl"), context)
    val = encode_pairs(template, read_jsonl(data / "sft" / "val.jsonl"), context)
    return train, val


def eval_samples(
    model: torch.nn.Module, template: ChatTemplate, data: Path, cfg: SftParams, seed: int
) -> list[dict[str, Any]]:
    """`sample_responses` of the first `sft.samples` eval prompts (`prompts/eval.jsonl`)."""
    prompts = [r["prompt"] for r in read_jsonl(data / "prompts" / "eval.jsonl")]
    return sample_responses(
        model, template, prompts[: cfg.samples], cfg.max_new_tokens, cfg.temperature, seed=seed
    )


def samples_text(samples: Sequence[dict[str, Any]]) -> str:
    """The samples as PROMPT/RESPONSE blocks, for reading in MLflow."""
    return "\n\n".join(f"PROMPT: {s['prompt']}\nRESPONSE: {s['response']}" for s in samples)


def report(
    result: TrainResult,
    model: torch.nn.Module,
    train_pairs: int,
    samples: Sequence[dict[str, Any]],
    world: int,
) -> dict[str, Any]:
    """The stage's figures: val loss and perplexity, speed and size, and how the samples
    ended (the share that ended with EOS, their mean length in tokens)."""
    return {
        "val_loss": result.val_loss,
        "val_ppl": math.exp(result.val_loss),
        "tokens_per_sec": result.tokens_per_sec,
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "params": n_params(model),
        "train_pairs": train_pairs,
        "eos_rate": sum(s["ended_with_eos"] for s in samples) / len(samples),
        "mean_response_tokens": sum(s["n_tokens"] for s in samples) / len(samples),
        "world_size": world,
    }
