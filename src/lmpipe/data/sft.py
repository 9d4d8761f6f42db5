"""Prompt → response pairs for SFT, and prompt sets for RL and evaluation."""

from __future__ import annotations

import json
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


ROLES = ("system", "user", "assistant")


def chat_row(row: dict, where: str) -> dict:
    """A `{"messages": [{"role", "content"}, ...]}` row checked: known roles, string contents,
    at least one user and one assistant turn."""
    msgs = row["messages"]
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        for m in msgs
    )
    roles = [m["role"] for m in msgs] if ok else []
    if not ok or "user" not in roles or "assistant" not in roles:
        raise DataError(
            f"{where}: 'messages' must be a list of {{'role': one of {', '.join(ROLES)}, "
            "'content': string}} with at least one user and one assistant message"
        )
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}


def read_pairs(path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> list[dict]:
    """User SFT data from JSONL: rows with string `prompt` and `response` fields, or chat rows
    with a `messages` list (OpenAI's / Hugging Face's chat format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.sft_path = {str(path)!r} is not a file")
    text = decode(path.read_bytes(), encoding, errors, str(path))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if '"messages"' in line and line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if isinstance(row, dict) and "messages" in row:
                rows.append(chat_row(row, f"{path}:{n}"))
                continue
        rows += [
            {"prompt": r["prompt"], "response": r["response"]}
            for r in iter_jsonl(line, str(path), ["prompt", "response"], "data.sft_path", n)
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


def fill_prompts(prompts: Sequence[dict], pairs: Sequence[dict], n: int) -> list[dict[str, str]]:
    """`prompts` (a `prompt_set`) topped up to `n` with the distinct prompts of `pairs` it
    lacks, in order: how a small corpus's RL prompt set borrows training prompts."""
    seen, extra = {p["prompt"] for p in prompts}, []
    for pair in pairs:
        if pair["prompt"] not in seen:
            seen.add(pair["prompt"])
            extra.append(pair)
    return [*prompts, *prompt_set(extra, max(n - len(prompts), 0))]
