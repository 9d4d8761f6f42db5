"""SFT: the prompt/response template, padded batches with loss on the response only, sampling.

Template (token ids): BOS PROMPT <prompt tokens> RESPONSE <response tokens> EOS.
Labels are IGNORE on everything up to and including RESPONSE, and on padding; the response
tokens and the final EOS carry the loss, so the model learns what to say and when to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lmpipe.data.tokenizer import BOS, EOS, PAD, PROMPT, RESPONSE, special_ids
from lmpipe.sampling import generate
from lmpipe.train import IGNORE, Batch


def prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt in the template, ending with RESPONSE (generation starts after)."""
    ids = special_ids(tok)
    return [ids[BOS], ids[PROMPT], *tok.encode(prompt, add_special_tokens=False).ids, ids[RESPONSE]]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # already shifted: labels[t] is the target after input_ids[t]


def encode_pair(tok: Tokenizer, prompt: str, response: str, context: int) -> Example | None:
    """One training example, or None when the prompt alone does not fit the context."""
    eos = special_ids(tok)[EOS]
    p = prompt_ids(tok, prompt)
    r = [*tok.encode(response, add_special_tokens=False).ids, eos]
    seq = (p + r)[: context + 1]
    if len(p) >= len(seq):
        return None
    targets = [IGNORE] * (len(p) - 1) + r
    return Example(seq[:-1], targets[: len(seq) - 1])


def encode_pairs(tok: Tokenizer, pairs: Sequence[dict], context: int) -> list[Example]:
    out = [e for p in pairs if (e := encode_pair(tok, p["prompt"], p["response"], context))]
    if not out:
        raise ValueError(f"no SFT pair fits model.context = {context}; raise it or shorten pairs")
    return out


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example. With a causal mask, right padding never changes the
    logits of real tokens, so no attention mask is needed; padded labels carry no loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, labels)


class PairBatches:
    """Epochs of seeded permutations; each process takes its slice of the global batch.
    Subclasses change `collate` (the reward model batches preference pairs)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order = self.rng.permutation(len(self.examples)).tolist()
                self.pos = 0
                self.epoch += 1
            k = min(n - len(out), len(self.order) - self.pos)
            out.extend(self.order[self.pos : self.pos + k])
            self.pos += k
        return out

    def next_batch(self) -> Batch:
        idx = self._take(self.batch_size * self.world)
        mine = idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in mine])

    def collate(self, examples: Sequence[Any]) -> Any:
        return collate(examples, self.pad_id)

    def fixed_batches(self, n: int | None = None) -> list[Batch]:
        """All examples (or the first n batches) in order: the val set."""
        chunks = [
            self.examples[i : i + self.batch_size]
            for i in range(0, len(self.examples), self.batch_size)
        ]
        return [self.collate(c) for c in chunks[:n]]

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "order": self.order,
            "pos": self.pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.pos, self.epoch = list(state["order"]), state["pos"], state["epoch"]


def sample_responses(
    model: torch.nn.Module,
    tok: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Ancestral samples (see `lmpipe.sampling.generate`) for text prompts, seeded.

    Returns `{"prompt", "response", "ended_with_eos", "n_tokens"}` per prompt.
    """
    ids = special_ids(tok)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        g = generate(
            model, [prompt_ids(tok, p) for p in chunk], max_new_tokens=max_new_tokens,
            eos_id=ids[EOS], pad_id=ids[PAD], temperature=temperature, generator=gen,
        )  # fmt: skip
        lengths = g.lengths.tolist()
        for p, row, ended, n in zip(
            chunk, g.response.tolist(), g.ended.tolist(), lengths, strict=True
        ):
            out.append(
                {
                    "prompt": p,
                    "response": tok.decode(row[: n - int(ended)], skip_special_tokens=True),
                    "ended_with_eos": ended,
                    "n_tokens": n,
                }
            )
    return out
