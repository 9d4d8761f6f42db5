"""Prompt → response pairs for SFT, and prompt sets for RL and evaluation."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from lmpipe.data.sources import DataError, decode, iter_jsonl

# After . ! or ? (optionally one closing quote or bracket), at whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def split_sentences(text: str) -> list[str]:
    """Split after `.`, `!` or `?` (and closing quotes) followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def cut_at_word(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip()


def make_pair(
    doc: str,
    prompt_sentences: int,
    response_sentences: int,
    max_prompt_chars: int,
    max_response_chars: int,
) -> dict[str, str] | None:
    """`{"prompt": first k sentences, "response": the next m}`; None when the doc is too short."""
    sents = split_sentences(doc)
    if len(sents) <= prompt_sentences:
        return None
    prompt = " ".join(sents[:prompt_sentences])
    response = " ".join(sents[prompt_sentences : prompt_sentences + response_sentences])
    if len(prompt) > max_prompt_chars or not response:
        return None
    return {"prompt": prompt, "response": cut_at_word(response, max_response_chars)}


def build_pairs(docs: Sequence[str], **kw: int) -> list[dict[str, str]]:
    return [p for d in docs if (p := make_pair(d, **kw)) is not None]


def read_pairs(path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> list[dict]:
    """User SFT pairs from JSONL rows with string `prompt` and `response` fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.sft_path = {str(path)!r} is not a file")
    text = decode(path.read_bytes(), encoding, errors, str(path))
    rows = [
        {"prompt": r["prompt"], "response": r["response"]}
        for r in iter_jsonl(text, str(path), ["prompt", "response"], "data.sft_path")
    ]
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} pair(s); SFT needs at least 2 (train and val)")
    return rows


def split_pairs(pairs: Sequence[dict], val_fraction: float, seed: int) -> dict[str, list[dict]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * val_fraction))
    return {
        "train": [pairs[i] for i in order[n_val:]],
        "val": [pairs[i] for i in order[:n_val]],
    }


def prompt_set(pairs: Sequence[dict], n: int) -> list[dict[str, str]]:
    """The first `n` prompts, each with its reference continuation from the held-out document."""
    return [{"prompt": p["prompt"], "reference": p["response"]} for p in pairs[:n]]
